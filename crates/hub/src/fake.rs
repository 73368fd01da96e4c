//! A loopback server that answers as the Hub and a public bucket do, for tests and benchmarks.
//!
//! It serves the dataset info endpoint (`/api/datasets/OWNER/NAME/revision/REV`), file
//! downloads with range support (`/datasets/OWNER/NAME/resolve/REV/PATH`) and path-style bucket
//! objects (`/BUCKET/KEY`). It can require a token, answer the next requests with chosen error
//! statuses, add latency to every request, and it counts what it served per path.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::Response;
pub use bytes::Bytes;
use serde_json::{Value, json};

/// A dataset the fake Hub serves.
#[derive(Debug, Clone)]
pub struct FakeDataset {
    pub repo: String,
    pub commit: String,
    /// Path in the repository to contents.
    pub files: BTreeMap<String, Bytes>,
    /// The card's `configs:` (as the Hub's `cardData.configs`), if any.
    pub configs: Option<Value>,
}

#[derive(Default)]
struct State {
    datasets: Mutex<Vec<FakeDataset>>,
    objects: Mutex<HashMap<String, Bytes>>,
    token: Option<String>,
    failures: Mutex<VecDeque<u16>>,
    latency: Duration,
    served: Mutex<HashMap<String, u64>>,
    requests: AtomicU64,
}

pub struct FakeHub {
    addr: std::net::SocketAddr,
    state: Arc<State>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeHub {
    /// Starts on 127.0.0.1 (a free port), requiring `token` on the Hub's endpoints when given
    /// and waiting `latency` before every answer.
    pub fn start(token: Option<&str>, latency: Duration) -> FakeHub {
        let state = Arc::new(State {
            token: token.map(str::to_string),
            latency,
            ..State::default()
        });
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a loopback port");
        listener.set_nonblocking(true).expect("non-blocking");
        let addr = listener.local_addr().expect("bound");
        let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = state.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                let app = axum::Router::new().fallback(move |uri: Uri, headers: HeaderMap| {
                    let state = served.clone();
                    async move { answer(&state, uri, headers).await }
                });
                axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        let _ = stopped.await;
                    })
                    .await
                    .expect("the fake Hub serves");
            });
        });
        FakeHub {
            addr,
            state,
            shutdown: Some(shutdown),
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:PORT`, for `HF_ENDPOINT` and as an S3 endpoint.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn add_dataset(&self, dataset: FakeDataset) {
        self.state.datasets.lock().unwrap().push(dataset);
    }

    /// An object at `/BUCKET/KEY`.
    pub fn put_object(&self, bucket_and_key: &str, bytes: impl Into<Bytes>) {
        self.state.objects.lock().unwrap().insert(
            bucket_and_key.trim_start_matches('/').to_string(),
            bytes.into(),
        );
    }

    /// The next requests (any endpoint) are answered with these statuses, one each.
    pub fn fail_next(&self, statuses: &[u16]) {
        self.state.failures.lock().unwrap().extend(statuses);
    }

    /// Body bytes served for paths starting with `prefix`.
    pub fn bytes_served(&self, prefix: &str) -> u64 {
        self.state
            .served
            .lock()
            .unwrap()
            .iter()
            .filter(|(path, _)| path.starts_with(prefix))
            .map(|(_, n)| n)
            .sum()
    }

    /// Requests answered, failures included.
    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::Relaxed)
    }
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn status(code: StatusCode, text: &str) -> Response {
    Response::builder()
        .status(code)
        .body(Body::from(text.to_string()))
        .expect("a plain response")
}

async fn answer(state: &State, uri: Uri, headers: HeaderMap) -> Response {
    state.requests.fetch_add(1, Ordering::Relaxed);
    if !state.latency.is_zero() {
        tokio::time::sleep(state.latency).await;
    }
    let injected = state.failures.lock().unwrap().pop_front();
    if let Some(code) = injected {
        let mut response = status(
            StatusCode::from_u16(code).expect("a valid status"),
            "injected failure",
        );
        if code == 429 {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, "0".parse().expect("a header value"));
        }
        return response;
    }
    let path = uri.path().to_string();
    let decoded = percent_decode(&path);
    let parts: Vec<&str> = decoded.trim_start_matches('/').split('/').collect();
    let hub_endpoint = matches!(parts.first(), Some(&"api") | Some(&"datasets"));
    if hub_endpoint && let Some(token) = &state.token {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(token.as_str()) {
            return status(StatusCode::UNAUTHORIZED, "a token is required");
        }
    }
    let body = match parts.as_slice() {
        ["api", "datasets", owner, name, "revision", revision] => {
            let repo = format!("{owner}/{name}");
            let datasets = state.datasets.lock().unwrap();
            let Some(dataset) = datasets
                .iter()
                .find(|d| d.repo == repo && (*revision == "main" || *revision == d.commit))
            else {
                return status(StatusCode::NOT_FOUND, "no such dataset");
            };
            let mut info = json!({
                "id": repo,
                "sha": dataset.commit,
                "siblings": dataset.files.keys().map(|f| json!({"rfilename": f})).collect::<Vec<_>>(),
            });
            if let Some(configs) = &dataset.configs {
                info["cardData"] = json!({ "configs": configs });
            }
            return Response::builder()
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(info.to_string()))
                .expect("a JSON response");
        }
        ["datasets", owner, name, "resolve", revision, rest @ ..] => {
            let repo = format!("{owner}/{name}");
            let file = rest.join("/");
            let datasets = state.datasets.lock().unwrap();
            let found = datasets
                .iter()
                .find(|d| d.repo == repo && (*revision == "main" || *revision == d.commit))
                .and_then(|d| d.files.get(&file).cloned());
            match found {
                Some(bytes) => bytes,
                None => return status(StatusCode::NOT_FOUND, "no such file"),
            }
        }
        _ => {
            let key = parts.join("/");
            match state.objects.lock().unwrap().get(&key).cloned() {
                Some(bytes) => bytes,
                None => return status(StatusCode::NOT_FOUND, "NoSuchKey"),
            }
        }
    };
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_range(v, body.len() as u64));
    let (code, piece, content_range) = match range {
        Some((start, end)) => (
            StatusCode::PARTIAL_CONTENT,
            body.slice(start as usize..end as usize),
            Some(format!("bytes {start}-{}/{}", end - 1, body.len())),
        ),
        None => (StatusCode::OK, body, None),
    };
    *state.served.lock().unwrap().entry(path).or_default() += piece.len() as u64;
    let mut response = Response::builder()
        .status(code)
        .header(header::ACCEPT_RANGES, "bytes");
    if let Some(content_range) = content_range {
        response = response.header(header::CONTENT_RANGE, content_range);
    }
    response.body(Body::from(piece)).expect("a file response")
}

/// `bytes=A-B`, `bytes=A-` or `bytes=-N` as a half-open range within `len`.
fn parse_range(value: &str, len: u64) -> Option<(u64, u64)> {
    let spec = value.strip_prefix("bytes=")?;
    let (start, end) = spec.split_once('-')?;
    if start.is_empty() {
        let n: u64 = end.parse().ok()?;
        return Some((len.saturating_sub(n), len));
    }
    let start: u64 = start.parse().ok()?;
    let end = if end.is_empty() {
        len
    } else {
        (end.parse::<u64>().ok()? + 1).min(len)
    };
    (start < end).then_some((start, end))
}

fn percent_decode(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = path.get(i + 1..i + 3)
            && let Ok(byte) = u8::from_str_radix(hex, 16)
        {
            out.push(byte);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A Parquet file of optional UTF-8 string columns, `row_group_rows` rows per row group.
pub fn parquet_of_strings(
    columns: &[&str],
    rows: &[Vec<Option<String>>],
    row_group_rows: usize,
) -> Vec<u8> {
    use parquet::data_type::{ByteArray, ByteArrayType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    let fields: Vec<String> = columns
        .iter()
        .map(|c| format!("OPTIONAL BYTE_ARRAY {c} (UTF8);"))
        .collect();
    let schema = Arc::new(
        parquet::schema::parser::parse_message_type(&format!(
            "message schema {{ {} }}",
            fields.join(" ")
        ))
        .expect("a valid schema"),
    );
    let props = Arc::new(
        WriterProperties::builder()
            .set_compression(parquet::basic::Compression::SNAPPY)
            .build(),
    );
    let mut out = Vec::new();
    let mut writer = SerializedFileWriter::new(&mut out, schema, props).expect("a writer");
    for group in rows.chunks(row_group_rows.max(1)) {
        let mut row_group = writer.next_row_group().expect("a row group");
        for column in 0..columns.len() {
            let values: Vec<ByteArray> = group
                .iter()
                .filter_map(|row| row[column].as_ref())
                .map(|v| ByteArray::from(v.as_bytes().to_vec()))
                .collect();
            let definitions: Vec<i16> = group
                .iter()
                .map(|row| i16::from(row[column].is_some()))
                .collect();
            let mut writer = row_group
                .next_column()
                .expect("a column")
                .expect("one more");
            writer
                .typed::<ByteArrayType>()
                .write_batch(&values, Some(&definitions), None)
                .expect("values written");
            writer.close().expect("column closed");
        }
        row_group.close().expect("row group closed");
    }
    writer.close().expect("file closed");
    out
}

/// `bytes` gzip-compressed, as Software Heritage stores file contents.
pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes).expect("in memory");
    encoder.finish().expect("in memory")
}
