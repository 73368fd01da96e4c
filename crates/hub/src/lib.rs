//! Datasets on the Hugging Face Hub, read over HTTP as the corpus reads local files.
//!
//! - [`HubClient`]: the Hub's endpoint (`HF_ENDPOINT`, default `https://huggingface.co`), the
//!   token (`HF_TOKEN`, sent to the Hub only, never logged) and every request's retry policy:
//!   429 and 5xx are retried with backoff, 401/403 and 404 are clear errors at once.
//! - [`listing`]: which Parquet files make a dataset's config and split, from the dataset's
//!   own card (its `configs:`), pinned to the revision's commit.
//! - [`remote_file`]: a Parquet file read by HTTP range requests: the footer once, then only the
//!   needed columns of one row group at a time, so a resume seeks to its row group.
//! - [`rows`]: a file's rows as documents, either a text column or, for The Stack v2, each
//!   row's file fetched by `blob_id` from a bucket (gzip, decoded with `src_encoding`), several
//!   in flight.
//!
//! Owns HTTP access to remote corpora. It knows nothing of training: which rows are held out is
//! the caller's rule, passed in. Its API is synchronous (each open file reads on its own thread
//! with its own small runtime), so the corpus stream stays plain blocking code.

#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;

pub mod listing;
pub mod remote_file;
pub mod rows;

#[cfg(feature = "fake")]
pub mod fake;

pub use listing::{DatasetRef, HubFile, list_parquet_files};
pub use rows::{BlobSource, Content, Row, RowReader};

/// The Hub's public endpoint.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Attempts per request before a retryable failure (429, 5xx, a dropped connection) is final.
pub const MAX_ATTEMPTS: u32 = 6;

/// The longest a request may take, body included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// The longest wait between attempts (a server's Retry-After included).
const MAX_BACKOFF: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error(
        "{what}: the server refused access (HTTP {status}); the dataset may be gated or private: \
         set HF_TOKEN to a token of an account that has accepted its terms"
    )]
    Unauthorized { what: String, status: u16 },
    #[error("{what}: not found (HTTP 404)")]
    NotFound { what: String },
    #[error("{what}: HTTP {status}{}", if detail.is_empty() { String::new() } else { format!(": {detail}") })]
    Status {
        what: String,
        status: u16,
        detail: String,
    },
    #[error("{what}: {error} (after {attempts} attempts)")]
    Transport {
        what: String,
        error: String,
        attempts: u32,
    },
    #[error("{what}: the answer is larger than {limit} bytes, the most read")]
    TooLarge { what: String, limit: u64 },
    #[error("{what}: {reason}")]
    Malformed { what: String, reason: String },
    #[error("{0}")]
    Usage(String),
}

/// Requests made and body bytes received by every client in this process (for benchmarks and
/// progress lines).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    pub requests: u64,
    pub bytes: u64,
}

static REQUESTS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);

/// What all clients of this process have fetched so far.
pub fn traffic() -> Traffic {
    Traffic {
        requests: REQUESTS.load(Ordering::Relaxed),
        bytes: BYTES.load(Ordering::Relaxed),
    }
}

/// The Hub's endpoint and token, and the HTTP client every request goes through.
#[derive(Clone)]
pub struct HubClient {
    endpoint: String,
    token: Option<String>,
    http: reqwest::Client,
    first_backoff: Duration,
}

impl std::fmt::Debug for HubClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubClient")
            .field("endpoint", &self.endpoint)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .finish()
    }
}

/// A request's range: `Suffix(n)` is the last n bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ByteRange {
    Span { start: u64, end: u64 },
    Suffix(u64),
}

/// A successful answer: its body and, for a range request, the whole file's size.
pub(crate) struct Fetched {
    pub body: Bytes,
    pub total_len: Option<u64>,
    pub partial: bool,
}

impl HubClient {
    /// `endpoint`, else `HF_ENDPOINT`, else the public Hub; the token from `HF_TOKEN`, as the
    /// Hub's own tools read them.
    pub fn from_env(endpoint: Option<&str>) -> HubClient {
        let endpoint = endpoint
            .map(str::to_string)
            .or_else(|| std::env::var("HF_ENDPOINT").ok())
            .filter(|e| !e.trim().is_empty())
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        let token = std::env::var("HF_TOKEN")
            .ok()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty());
        HubClient::new(&endpoint, token)
    }

    pub fn new(endpoint: &str, token: Option<String>) -> HubClient {
        // The workspace builds reqwest without a default crypto provider; install ring once.
        static TLS: std::sync::Once = std::sync::Once::new();
        TLS.call_once(|| {
            let _ = rustls::crypto::ring::default_provider().install_default();
        });
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(REQUEST_TIMEOUT)
            .build()
            .expect("the HTTP client's configuration is static");
        HubClient {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            token,
            http,
            first_backoff: Duration::from_millis(250),
        }
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// GETs `url` (with `range`), retrying 429, 5xx and transport failures with backoff, and
    /// reads at most `limit` body bytes. The token goes only to the Hub's own endpoint.
    pub(crate) async fn fetch(
        &self,
        url: &str,
        range: Option<ByteRange>,
        limit: u64,
        what: &str,
    ) -> Result<Fetched, HubError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (error, asked_wait) = match self.fetch_once(url, range, limit, what).await {
                Ok(fetched) => return Ok(fetched),
                Err(Attempt::Final(error)) => return Err(error),
                Err(Attempt::Retry { error, after }) => (error, after),
            };
            if attempt >= MAX_ATTEMPTS {
                return Err(match error {
                    RetryableError::Status(status) => HubError::Status {
                        what: what.to_string(),
                        status,
                        detail: format!("still failing after {attempt} attempts"),
                    },
                    RetryableError::Transport(error) => HubError::Transport {
                        what: what.to_string(),
                        error,
                        attempts: attempt,
                    },
                });
            }
            let backoff = self.first_backoff * 2u32.pow(attempt - 1);
            let wait = asked_wait.unwrap_or(backoff).min(MAX_BACKOFF);
            tracing::debug!("{what}: retrying in {wait:?} ({error:?})");
            tokio::time::sleep(wait).await;
        }
    }

    async fn fetch_once(
        &self,
        url: &str,
        range: Option<ByteRange>,
        limit: u64,
        what: &str,
    ) -> Result<Fetched, Attempt> {
        let mut request = self.http.get(url);
        if let Some(token) = &self.token
            && url.starts_with(&format!("{}/", self.endpoint))
        {
            request = request.bearer_auth(token);
        }
        if let Some(range) = range {
            request = request.header(
                reqwest::header::RANGE,
                match range {
                    ByteRange::Span { start, end } => format!("bytes={start}-{}", end - 1),
                    ByteRange::Suffix(n) => format!("bytes=-{n}"),
                },
            );
        }
        REQUESTS.fetch_add(1, Ordering::Relaxed);
        let response = request.send().await.map_err(|e| Attempt::Retry {
            error: RetryableError::Transport(without_url(&e)),
            after: None,
        })?;
        let status = response.status().as_u16();
        match status {
            200..=299 => {}
            401 | 403 => {
                return Err(Attempt::Final(HubError::Unauthorized {
                    what: what.to_string(),
                    status,
                }));
            }
            404 => {
                return Err(Attempt::Final(HubError::NotFound {
                    what: what.to_string(),
                }));
            }
            408 | 429 | 500..=599 => {
                let after = response
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(Duration::from_secs);
                return Err(Attempt::Retry {
                    error: RetryableError::Status(status),
                    after,
                });
            }
            _ => {
                let detail = response.text().await.unwrap_or_default();
                return Err(Attempt::Final(HubError::Status {
                    what: what.to_string(),
                    status,
                    detail: detail.chars().take(200).collect(),
                }));
            }
        }
        let partial = status == 206;
        let total_len = response
            .headers()
            .get(reqwest::header::CONTENT_RANGE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit('/').next())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if response.content_length().is_some_and(|n| n > limit) {
            return Err(Attempt::Final(HubError::TooLarge {
                what: what.to_string(),
                limit,
            }));
        }
        let mut body = Vec::new();
        let mut response = response;
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    if (body.len() + chunk.len()) as u64 > limit {
                        return Err(Attempt::Final(HubError::TooLarge {
                            what: what.to_string(),
                            limit,
                        }));
                    }
                    BYTES.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(e) => {
                    return Err(Attempt::Retry {
                        error: RetryableError::Transport(without_url(&e)),
                        after: None,
                    });
                }
            }
        }
        Ok(Fetched {
            body: Bytes::from(body),
            total_len,
            partial,
        })
    }
}

#[derive(Debug)]
enum RetryableError {
    Status(u16),
    Transport(String),
}

enum Attempt {
    Final(HubError),
    /// `after`: the wait the server asked for (Retry-After), if it did.
    Retry {
        error: RetryableError,
        after: Option<Duration>,
    },
}

/// A transport error without its URL (a signed CDN URL carries credentials in its query).
fn without_url(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    if let Some(url) = error.url() {
        text = text.replace(url.as_str(), "<url>");
    }
    let mut source = std::error::Error::source(error);
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

/// Runs `future` to completion on a fresh single-threaded runtime on its own thread, so that
/// blocking callers work whether or not they are inside another runtime.
pub(crate) fn block_on_own_thread<T: Send>(
    future: impl std::future::Future<Output = T> + Send,
) -> T {
    std::thread::scope(|scope| {
        scope
            .spawn(|| new_runtime().block_on(future))
            .join()
            .expect("the Hub thread does not panic")
    })
}

pub(crate) fn new_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime builds")
}
