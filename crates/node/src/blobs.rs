//! The localnet's HTTP blob host: `PUT` and `GET /v1/blobs/{name}` on a port of its own, where
//! publishers put encrypted weights and submitters put data.
//!
//! An upload streams into a unique temporary file (a name no request can fetch), is fsynced and
//! then renamed into place; a failed or oversized upload removes its temporary file. A published
//! name is never overwritten (409), so a URL on chain keeps serving the bytes it was committed
//! with. A quota bounds what all blobs together (uploads in progress included) may take on
//! disk: an upload past it is refused with 507 before it can fill the disk the chain needs.

use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::put;
use futures_util::StreamExt;
use somatrain_protocol::crypto::CommitmentHasher;
use tokio::io::AsyncWriteExt;

/// Largest blob accepted: a V1 checkpoint in f32 (4.84 GB) with room to spare.
pub const DEFAULT_MAX_BLOB_BYTES: u64 = 6 * 1024 * 1024 * 1024;

struct Host {
    dir: PathBuf,
    max_bytes: u64,
    /// How long an upload may go without data.
    idle: std::time::Duration,
    /// Bytes all blobs and uploads in progress may take together.
    quota: u64,
    /// Bytes the disk holding the blobs must keep free for the chain.
    disk_reserve: u64,
    /// Bytes taken now: published blobs plus what uploads in progress have written.
    used: std::sync::atomic::AtomicU64,
}

impl Host {
    /// Takes `bytes` of the quota, or says why not.
    fn reserve(&self, bytes: u64) -> Result<(), (StatusCode, String)> {
        use std::sync::atomic::Ordering;
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            let after = used.saturating_add(bytes);
            if after > self.quota {
                return Err((
                    StatusCode::INSUFFICIENT_STORAGE,
                    format!(
                        "the blob host's quota of {} bytes is full ({used} taken); nothing \
                         was stored",
                        self.quota
                    ),
                ));
            }
            match self
                .used
                .compare_exchange_weak(used, after, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => break,
                Err(now) => used = now,
            }
        }
        // The chain writes to the same disk: it keeps its reserve whatever the quota says.
        if let Some(free) = available_bytes(&self.dir)
            && free < bytes.saturating_add(self.disk_reserve)
        {
            self.release(bytes);
            return Err((
                StatusCode::INSUFFICIENT_STORAGE,
                format!(
                    "the disk has {free} bytes free and keeps {} for the chain; nothing was \
                     stored",
                    self.disk_reserve
                ),
            ));
        }
        Ok(())
    }

    fn release(&self, bytes: u64) {
        self.used
            .fetch_sub(bytes, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Bytes of the published blobs in `dir` (left-over temporary files are removed).
fn published_bytes(dir: &std::path::Path) -> std::io::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with(".upload-") {
            let _ = std::fs::remove_file(entry.path());
            continue;
        }
        let meta = entry.metadata()?;
        if meta.is_file() {
            total += meta.len();
        }
    }
    Ok(total)
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    let body = serde_json::json!({ "error": message.into() });
    (status, axum::Json(body)).into_response()
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// The blob host over `dir` (created if missing).
pub fn router(dir: PathBuf, max_bytes: u64) -> std::io::Result<Router> {
    router_with_idle(dir, max_bytes, BODY_IDLE_TIMEOUT)
}

/// As [`router`], abandoning an upload after `idle` without data.
pub fn router_with_idle(
    dir: PathBuf,
    max_bytes: u64,
    idle: std::time::Duration,
) -> std::io::Result<Router> {
    build(dir, max_bytes, idle, u64::MAX, 0)
}

/// What the disk holding the blobs keeps free for the chain unless told otherwise: 1 GiB.
pub const CHAIN_DISK_RESERVE: u64 = 1 << 30;

/// As [`router`], with all blobs together (uploads in progress included) held to `quota` bytes
/// and [`CHAIN_DISK_RESERVE`] kept free on the disk.
pub fn router_with_quota(dir: PathBuf, max_bytes: u64, quota: u64) -> std::io::Result<Router> {
    router_with_limits(dir, max_bytes, quota, CHAIN_DISK_RESERVE)
}

/// As [`router_with_quota`], keeping `disk_reserve` bytes free on the disk.
pub fn router_with_limits(
    dir: PathBuf,
    max_bytes: u64,
    quota: u64,
    disk_reserve: u64,
) -> std::io::Result<Router> {
    build(dir, max_bytes, BODY_IDLE_TIMEOUT, quota, disk_reserve)
}

/// Bytes an unprivileged writer may still put on the filesystem holding `path`.
pub fn available_bytes(path: &std::path::Path) -> Option<u64> {
    let stat = rustix::fs::statvfs(path).ok()?;
    Some(stat.f_bavail.saturating_mul(stat.f_frsize))
}

fn build(
    dir: PathBuf,
    max_bytes: u64,
    idle: std::time::Duration,
    quota: u64,
    disk_reserve: u64,
) -> std::io::Result<Router> {
    std::fs::create_dir_all(&dir)?;
    let used = published_bytes(&dir)?;
    let host = Arc::new(Host {
        dir,
        max_bytes,
        idle,
        quota,
        disk_reserve,
        used: used.into(),
    });
    Ok(Router::new()
        .route("/v1/blobs/{name}", put(put_blob).get(get_blob))
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(host))
}

/// The longest a client may take to send a request's headers.
pub const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Serves `router` on `listener` until the task is dropped: HTTP/1 and HTTP/2, request headers
/// within [`HEADER_READ_TIMEOUT`], and every connection closed after `idle` without a byte from
/// the peer. (`axum::serve` sets no header timeout.)
pub async fn serve(listener: tokio::net::TcpListener, router: Router, idle: std::time::Duration) {
    serve_with(listener, router, idle, HEADER_READ_TIMEOUT).await
}

/// As [`serve`], with another header timeout.
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    router: Router,
    idle: std::time::Duration,
    header_timeout: std::time::Duration,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    use hyper_util::service::TowerToHyperService;
    let limits = crate::limits::ConnectionLimits::for_this_process();
    loop {
        let (stream, permit) = match listener.accept().await {
            Ok((stream, peer)) => match limits.admit(peer.ip()) {
                Some(permit) => (stream, permit),
                // Over the limit: closed before anything is read.
                None => continue,
            },
            Err(e) => {
                tracing::warn!("blob host: accepting a connection: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let service = TowerToHyperService::new(router.clone());
        tokio::spawn(async move {
            let mut builder = Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout);
            let io = TokioIo::new(crate::idle::IdleTimeout::new(stream, idle).holding(permit));
            if let Err(e) = builder.serve_connection(io, service).await {
                tracing::debug!("blob host connection ended: {e}");
            }
        });
    }
}

/// The longest an upload may go without sending a byte.
pub const BODY_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

async fn put_blob(
    State(host): State<Arc<Host>>,
    Path(name): Path<String>,
    request: Request,
) -> Response {
    if !valid_name(&name) {
        return error(
            StatusCode::BAD_REQUEST,
            "blob names use letters, digits, '.', '_' and '-', and do not start with '.'",
        );
    }
    let path = host.dir.join(&name);
    if path.exists() {
        return error(StatusCode::CONFLICT, format!("{name} is already published"));
    }
    // A declared size past the quota is refused before a byte is read.
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(declared) = declared {
        if let Err((status, message)) = host.reserve(declared) {
            return error(status, message);
        }
        host.release(declared);
    }
    let unique = somatrain_protocol::EncryptionKey::generate().to_base58();
    let tmp = host.dir.join(format!(".upload-{unique}"));
    let mut reserved = 0u64;
    let outcome = async {
        let mut file = tokio::fs::File::create(&tmp)
            .await
            .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        let mut stream = request.into_body().into_data_stream();
        let mut hasher = CommitmentHasher::default();
        let mut size = 0u64;
        loop {
            // A client that stops sending holds a temporary file and a task: give up on it.
            let next = tokio::time::timeout(host.idle, stream.next())
                .await
                .map_err(|_| {
                    (
                        StatusCode::REQUEST_TIMEOUT,
                        format!("no upload data for {:?}; upload abandoned", host.idle),
                    )
                })?;
            let Some(chunk) = next else {
                break;
            };
            let chunk =
                chunk.map_err(|e| (StatusCode::BAD_REQUEST, format!("upload interrupted: {e}")))?;
            size += chunk.len() as u64;
            if size > host.max_bytes {
                return Err((
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("blobs hold at most {} bytes", host.max_bytes),
                ));
            }
            host.reserve(chunk.len() as u64)?;
            reserved += chunk.len() as u64;
            hasher.update(&chunk);
            file.write_all(&chunk)
                .await
                .map_err(|e| (StatusCode::INSUFFICIENT_STORAGE, e.to_string()))?;
        }
        file.sync_all()
            .await
            .map_err(|e| (StatusCode::INSUFFICIENT_STORAGE, e.to_string()))?;
        drop(file);
        // A hard link fails if the name appeared meanwhile: no upload replaces another.
        tokio::fs::hard_link(&tmp, &path).await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                (StatusCode::CONFLICT, format!("{name} is already published"))
            } else {
                (StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
            }
        })?;
        Ok((size, hasher.finish()))
    }
    .await;
    let _ = tokio::fs::remove_file(&tmp).await;
    if outcome.is_err() {
        // A published blob keeps its bytes counted; a failed upload gives them back.
        host.release(reserved);
    }
    match outcome {
        Ok((size, checksum)) => axum::Json(serde_json::json!({
            "name": name,
            "size": size,
            "checksum": checksum.to_base58(),
        }))
        .into_response(),
        Err((status, message)) => {
            if status.is_server_error() {
                tracing::error!("blob upload of {name} failed: {message}");
            }
            error(status, message)
        }
    }
}

async fn get_blob(State(host): State<Arc<Host>>, Path(name): Path<String>) -> Response {
    if !valid_name(&name) {
        return error(StatusCode::BAD_REQUEST, "not a blob name");
    }
    let Ok(file) = tokio::fs::File::open(host.dir.join(&name)).await else {
        return error(StatusCode::NOT_FOUND, "no such blob");
    };
    let len = file.metadata().await.map(|m| m.len()).unwrap_or(0);
    let stream = tokio_util::io::ReaderStream::new(file);
    (
        [
            (header::CONTENT_LENGTH, len.to_string()),
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
        ],
        Body::from_stream(stream),
    )
        .into_response()
}
