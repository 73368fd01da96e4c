//! A Parquet file read by HTTP range requests.
//!
//! Opening asks for the file's last 64 KiB (a suffix range, which also tells the file's size)
//! and parses the footer from it. Before a row group is read, [`RemoteFile::prefetch`] fetches
//! the byte ranges of the columns that will be read, and the Parquet reader is then served
//! from memory: one request per column per row group, and nothing of the row groups a resumed
//! run has already read.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use parquet::errors::ParquetError;
use parquet::file::reader::{ChunkReader, Length};

use crate::{ByteRange, HubClient, HubError};

/// What the first request asks for: enough for most footers.
const TAIL_BYTES: u64 = 64 << 10;

/// The most one prefetch (a row group's columns) or one footer may hold.
pub const MAX_CHUNK_BYTES: u64 = 1 << 30;

/// What a read outside the prefetched ranges fetches at least.
const MISS_WINDOW: u64 = 1 << 20;

#[derive(Clone)]
pub struct RemoteFile {
    inner: Arc<Inner>,
}

struct Inner {
    hub: HubClient,
    url: String,
    what: String,
    len: u64,
    runtime: Arc<tokio::runtime::Runtime>,
    tail: Span,
    /// The row group's prefetched ranges (replaced by each prefetch) and any misses since.
    spans: Mutex<Vec<Span>>,
}

#[derive(Clone)]
struct Span {
    start: u64,
    bytes: Bytes,
}

impl Span {
    fn slice(&self, start: u64, len: u64) -> Option<Bytes> {
        let end = start.checked_add(len)?;
        (start >= self.start && end <= self.start + self.bytes.len() as u64).then(|| {
            let from = (start - self.start) as usize;
            self.bytes.slice(from..from + len as usize)
        })
    }
}

impl RemoteFile {
    /// Opens the file at `url`: one request for its tail (two when the footer is larger).
    /// `runtime` runs the requests; the caller must not be inside it.
    pub fn open(
        hub: &HubClient,
        url: &str,
        what: &str,
        runtime: Arc<tokio::runtime::Runtime>,
    ) -> Result<RemoteFile, HubError> {
        let malformed = |reason: &str| HubError::Malformed {
            what: what.to_string(),
            reason: reason.to_string(),
        };
        let fetched = runtime.block_on(hub.fetch(
            url,
            Some(ByteRange::Suffix(TAIL_BYTES)),
            TAIL_BYTES,
            what,
        ))?;
        let len = match (fetched.partial, fetched.total_len) {
            (true, Some(len)) => len,
            (false, _) if (fetched.body.len() as u64) < TAIL_BYTES => fetched.body.len() as u64,
            _ => {
                return Err(malformed(
                    "the server does not answer range requests (no 206 with Content-Range)",
                ));
            }
        };
        let mut tail = Span {
            start: len - fetched.body.len() as u64,
            bytes: fetched.body,
        };
        if tail.bytes.len() < 8 || &tail.bytes[tail.bytes.len() - 4..] != b"PAR1" {
            return Err(malformed("not a Parquet file (no PAR1 at its end)"));
        }
        let footer = &tail.bytes[tail.bytes.len() - 8..tail.bytes.len() - 4];
        let metadata_len = u32::from_le_bytes(footer.try_into().expect("4 bytes")) as u64;
        let needed = metadata_len + 8;
        if needed > len || needed > MAX_CHUNK_BYTES {
            return Err(malformed("its footer's length is impossible"));
        }
        if needed > tail.bytes.len() as u64 {
            let fetched = runtime.block_on(hub.fetch(
                url,
                Some(ByteRange::Span {
                    start: len - needed,
                    end: len,
                }),
                needed,
                what,
            ))?;
            if fetched.body.len() as u64 != needed {
                return Err(malformed("the server answered a different range"));
            }
            tail = Span {
                start: len - needed,
                bytes: fetched.body,
            };
        }
        Ok(RemoteFile {
            inner: Arc::new(Inner {
                hub: hub.clone(),
                url: url.to_string(),
                what: what.to_string(),
                len,
                runtime,
                tail,
                spans: Mutex::new(Vec::new()),
            }),
        })
    }

    /// Fetches `ranges` (start, length), concurrently, in place of what was prefetched before.
    pub fn prefetch(&self, ranges: &[(u64, u64)]) -> Result<(), HubError> {
        let total: u64 = ranges.iter().map(|r| r.1).sum();
        if total > MAX_CHUNK_BYTES {
            return Err(HubError::TooLarge {
                what: format!("{}: one row group's columns", self.inner.what),
                limit: MAX_CHUNK_BYTES,
            });
        }
        let inner = &self.inner;
        let fetches = ranges.iter().map(|&(start, len)| async move {
            // A small file came whole with its footer.
            if let Some(bytes) = inner.tail.slice(start, len) {
                return Ok(Span { start, bytes });
            }
            let fetched = inner
                .hub
                .fetch(
                    &inner.url,
                    Some(ByteRange::Span {
                        start,
                        end: start + len,
                    }),
                    len,
                    &inner.what,
                )
                .await?;
            if fetched.body.len() as u64 != len {
                return Err(HubError::Malformed {
                    what: inner.what.clone(),
                    reason: "the server answered a different range".into(),
                });
            }
            Ok(Span {
                start,
                bytes: fetched.body,
            })
        });
        let spans = inner
            .runtime
            .block_on(futures::future::try_join_all(fetches))?;
        *inner.spans.lock().expect("the span list is not poisoned") = spans;
        Ok(())
    }

    fn bytes(&self, start: u64, len: u64) -> Result<Bytes, HubError> {
        if let Some(found) = self.inner.tail.slice(start, len) {
            return Ok(found);
        }
        let spans = self
            .inner
            .spans
            .lock()
            .expect("the span list is not poisoned");
        if let Some(found) = spans.iter().find_map(|s| s.slice(start, len)) {
            return Ok(found);
        }
        drop(spans);
        // A read the prefetch did not foresee: fetch a window, keep it for the next reads.
        let end = (start + len.max(MISS_WINDOW)).min(self.inner.len);
        if start + len > self.inner.len {
            return Err(HubError::Malformed {
                what: self.inner.what.clone(),
                reason: format!("a read past the end of the file at {start}+{len}"),
            });
        }
        let fetched = self.inner.runtime.block_on(self.inner.hub.fetch(
            &self.inner.url,
            Some(ByteRange::Span { start, end }),
            end - start,
            &self.inner.what,
        ))?;
        let span = Span {
            start,
            bytes: fetched.body,
        };
        let found = span.slice(start, len).ok_or_else(|| HubError::Malformed {
            what: self.inner.what.clone(),
            reason: "the server answered a different range".into(),
        })?;
        self.inner
            .spans
            .lock()
            .expect("the span list is not poisoned")
            .push(span);
        Ok(found)
    }
}

impl Length for RemoteFile {
    fn len(&self) -> u64 {
        self.inner.len
    }
}

impl ChunkReader for RemoteFile {
    type T = std::io::Cursor<Bytes>;

    fn get_read(&self, start: u64) -> parquet::errors::Result<Self::T> {
        // Page headers are read through this; they are small, so what remains of the span (or
        // a window) serves.
        let spans = self
            .inner
            .spans
            .lock()
            .expect("the span list is not poisoned");
        let covering = spans
            .iter()
            .chain(std::iter::once(&self.inner.tail))
            .find(|s| start >= s.start && start < s.start + s.bytes.len() as u64)
            .cloned();
        drop(spans);
        let bytes = match covering {
            Some(span) => span.bytes.slice((start - span.start) as usize..),
            None => {
                let len = MISS_WINDOW.min(self.inner.len.saturating_sub(start));
                self.bytes(start, len).map_err(external)?
            }
        };
        Ok(std::io::Cursor::new(bytes))
    }

    fn get_bytes(&self, start: u64, length: usize) -> parquet::errors::Result<Bytes> {
        self.bytes(start, length as u64).map_err(external)
    }
}

fn external(error: HubError) -> ParquetError {
    ParquetError::External(Box::new(error))
}
