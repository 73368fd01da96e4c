//! Where published weights and submitted data live, behind one interface: a local directory,
//! the localnet's blob host, or any S3-compatible bucket, all through the `object_store` crate.
//!
//! Owns uploads (streamed multipart with retries and backoff, the checksum computed on the way)
//! and the read-back check of a public URL against a [`Manifest`]. It knows nothing of keys,
//! commitments of embeddings or the chain: callers hand it files that are already encrypted.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use object_store::{
    BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig,
    WriteMultipart,
};
use somatrain_protocol::Manifest;
use somatrain_protocol::crypto::{Commitment, CommitmentHasher};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[cfg(feature = "testing")]
pub mod testing;

/// Parts of a multipart upload (S3 needs at least 5 MiB for every part but the last).
const PART_BYTES: usize = 8 << 20;
const PARTS_IN_FLIGHT: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("storage configuration: {0}")]
    Config(String),
    #[error("object names use letters, digits, '.', '_' and '-' (got {0:?})")]
    BadName(String),
    #[error("reading {path}: {source}")]
    Local {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("upload of {name} failed after {attempts} attempts: {reason}")]
    Upload {
        name: String,
        attempts: u32,
        reason: String,
    },
    /// The store already holds other bytes under this name and will not overwrite them (the
    /// localnet's blob host never overwrites a published name).
    #[error("{name} is already taken in the store, by other bytes")]
    Taken { name: String },
    #[error("cannot download {url}: {reason}")]
    Download { url: String, reason: String },
    #[error(
        "{url} does not serve the expected bytes: {got_size} bytes with checksum {got}, expected {expected_size} bytes with checksum {expected}"
    )]
    Mismatch {
        url: String,
        expected: Commitment,
        expected_size: u64,
        got: Commitment,
        got_size: u64,
    },
}

impl StorageError {
    /// `expected` describes what should be served; `got` what was found.
    pub fn mismatch(expected: &Manifest, got: Commitment, got_size: u64) -> Self {
        StorageError::Mismatch {
            url: expected.url.clone(),
            expected: expected.checksum,
            expected_size: expected.size,
            got,
            got_size,
        }
    }
}

/// An S3-compatible bucket, configured as in the reference quickstart.
#[derive(Clone)]
pub struct S3Config {
    pub bucket: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    /// Endpoint of a non-AWS service (R2, MinIO, a local server); None for AWS.
    pub endpoint: Option<String>,
    /// Where the bucket's objects can be read publicly; defaults to the endpoint, path style.
    pub public_url: Option<String>,
    pub region: String,
}

impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The keys are secrets: never printed.
        f.debug_struct("S3Config")
            .field("bucket", &self.bucket)
            .field("endpoint", &self.endpoint)
            .field("public_url", &self.public_url)
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

impl S3Config {
    /// Reads `S3_BUCKET`, `S3_ACCESS_KEY_ID`, `S3_SECRET_ACCESS_KEY`, `S3_ENDPOINT_URL`,
    /// `S3_PUBLIC_URL` (and `S3_REGION`, default `auto`). None when `S3_BUCKET` is unset.
    pub fn from_env() -> Result<Option<Self>, StorageError> {
        Self::from_lookup(|name| std::env::var(name).ok().filter(|v| !v.is_empty()))
    }

    pub fn from_lookup(var: impl Fn(&str) -> Option<String>) -> Result<Option<Self>, StorageError> {
        let Some(bucket) = var("S3_BUCKET") else {
            return Ok(None);
        };
        let required = |name: &str| {
            var(name)
                .ok_or_else(|| StorageError::Config(format!("S3_BUCKET is set but {name} is not")))
        };
        Ok(Some(S3Config {
            bucket,
            access_key_id: required("S3_ACCESS_KEY_ID")?,
            secret_access_key: required("S3_SECRET_ACCESS_KEY")?,
            endpoint: var("S3_ENDPOINT_URL"),
            public_url: var("S3_PUBLIC_URL"),
            region: var("S3_REGION").unwrap_or_else(|| "auto".into()),
        }))
    }
}

/// Which store, and where its objects are publicly readable.
#[derive(Debug, Clone)]
pub enum Backend {
    /// Files in a directory, readable at `public_base/NAME` (the localnet's blob host serves
    /// its own directory at `http://HOST:BLOB_PORT/v1/blobs`).
    Dir {
        dir: PathBuf,
        public_base: String,
    },
    /// The localnet's blob host over HTTP: `PUT`/`GET BASE/NAME`, where BASE is the URL the
    /// localnet prints on its `blobs` line (`http://127.0.0.1:PORT/v1/blobs`).
    BlobHost {
        base: String,
    },
    S3(S3Config),
}

/// How hard an upload tries before giving up.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Whole-upload attempts (each request inside one is also retried by `object_store`).
    pub attempts: u32,
    pub first_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 4,
            first_backoff: Duration::from_millis(500),
        }
    }
}

pub struct Storage {
    store: Arc<dyn ObjectStore>,
    public_base: String,
    multipart: bool,
    http: reqwest::Client,
    retry: RetryPolicy,
}

fn request_retries() -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            base: 2.0,
        },
        max_retries: 6,
        retry_timeout: Duration::from_secs(120),
    }
}

/// True for names the localnet's blob host accepts, which every backend then also accepts.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl Storage {
    pub fn open(backend: &Backend) -> Result<Self, StorageError> {
        somatrain_http::init_tls();
        let config = |e: object_store::Error| StorageError::Config(e.to_string());
        let (store, public_base, multipart): (Arc<dyn ObjectStore>, String, bool) = match backend {
            Backend::Dir { dir, public_base } => {
                std::fs::create_dir_all(dir).map_err(|source| StorageError::Local {
                    path: dir.clone(),
                    source,
                })?;
                let store =
                    object_store::local::LocalFileSystem::new_with_prefix(dir).map_err(config)?;
                (Arc::new(store), public_base.clone(), true)
            }
            Backend::BlobHost { base } => {
                let base = base.trim_end_matches('/').to_string();
                let store = object_store::http::HttpBuilder::new()
                    .with_url(base.clone())
                    .with_client_options(ClientOptions::new().with_allow_http(true))
                    .with_retry(request_retries())
                    .build()
                    .map_err(config)?;
                (Arc::new(store), base, false)
            }
            Backend::S3(s3) => {
                let mut builder = object_store::aws::AmazonS3Builder::new()
                    .with_bucket_name(&s3.bucket)
                    .with_access_key_id(&s3.access_key_id)
                    .with_secret_access_key(&s3.secret_access_key)
                    .with_region(&s3.region)
                    .with_retry(request_retries());
                if let Some(endpoint) = &s3.endpoint {
                    builder = builder
                        .with_endpoint(endpoint)
                        .with_allow_http(endpoint.starts_with("http://"));
                }
                let store = builder.build().map_err(config)?;
                let public_base = match (&s3.public_url, &s3.endpoint) {
                    (Some(public), _) => public.clone(),
                    (None, Some(endpoint)) => {
                        format!("{}/{}", endpoint.trim_end_matches('/'), s3.bucket)
                    }
                    (None, None) => format!("https://{}.s3.{}.amazonaws.com", s3.bucket, s3.region),
                };
                (Arc::new(store), public_base, true)
            }
        };
        Ok(Storage {
            store,
            public_base: public_base.trim_end_matches('/').to_string(),
            multipart,
            http: somatrain_http::http_client(),
            retry: RetryPolicy::default(),
        })
    }

    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    pub fn public_url(&self, name: &str) -> String {
        format!("{}/{name}", self.public_base)
    }

    /// Uploads a file under `name`, then reads the public URL back and checks size and checksum;
    /// the whole is retried with exponential backoff. Returns the manifest to commit.
    pub async fn upload_file(&self, name: &str, path: &Path) -> Result<Manifest, StorageError> {
        if !valid_name(name) {
            return Err(StorageError::BadName(name.into()));
        }
        let mut backoff = self.retry.first_backoff;
        let mut last = String::new();
        for attempt in 1..=self.retry.attempts.max(1) {
            match self.upload_once(name, path).await {
                Ok((checksum, size)) => {
                    let manifest = Manifest {
                        url: self.public_url(name),
                        checksum,
                        size,
                    };
                    match verify_url(&self.http, &manifest).await {
                        Ok(()) => return Ok(manifest),
                        Err(e) => last = e.to_string(),
                    }
                }
                Err(e @ StorageError::Local { .. }) => return Err(e),
                Err(e @ StorageError::Taken { .. }) => {
                    // Taken by these very bytes (an earlier upload of the same file) is done.
                    let file = std::fs::File::open(path).map_err(|source| StorageError::Local {
                        path: path.to_path_buf(),
                        source,
                    })?;
                    let (checksum, size) = Commitment::of_reader(std::io::BufReader::new(file))
                        .map_err(|e| StorageError::Local {
                            path: path.to_path_buf(),
                            source: std::io::Error::other(e.to_string()),
                        })?;
                    let manifest = Manifest {
                        url: self.public_url(name),
                        checksum,
                        size,
                    };
                    return match verify_url(&self.http, &manifest).await {
                        Ok(()) => Ok(manifest),
                        Err(_) => Err(e),
                    };
                }
                Err(e) => last = e.to_string(),
            }
            tracing::warn!("upload of {name}, attempt {attempt}: {last}");
            if attempt < self.retry.attempts {
                tokio::time::sleep(backoff).await;
                backoff *= 2;
            }
        }
        Err(StorageError::Upload {
            name: name.into(),
            attempts: self.retry.attempts.max(1),
            reason: last,
        })
    }

    async fn upload_once(
        &self,
        name: &str,
        path: &Path,
    ) -> Result<(Commitment, u64), StorageError> {
        let local = |source| StorageError::Local {
            path: path.to_path_buf(),
            source,
        };
        let remote = |e: object_store::Error| match e {
            object_store::Error::AlreadyExists { .. } => StorageError::Taken { name: name.into() },
            e => StorageError::Upload {
                name: name.into(),
                attempts: 1,
                reason: e.to_string(),
            },
        };
        let location = object_store::path::Path::from(name);
        let mut file = tokio::fs::File::open(path).await.map_err(local)?;
        let total = file.metadata().await.map_err(local)?.len();
        let mut progress = ProgressEvents::new("upload", name, total);
        let mut hasher = CommitmentHasher::default();
        let mut size = 0u64;
        if !self.multipart {
            let mut parts = Vec::new();
            loop {
                let chunk = read_chunk(&mut file, PART_BYTES).await.map_err(local)?;
                if chunk.is_empty() {
                    break;
                }
                hasher.update(&chunk);
                size += chunk.len() as u64;
                parts.push(chunk);
            }
            self.store
                .put(&location, PutPayload::from_iter(parts))
                .await
                .map_err(remote)?;
            progress.finish();
            return Ok((hasher.finish(), size));
        }
        let upload = self.store.put_multipart(&location).await.map_err(remote)?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
        loop {
            let chunk = match read_chunk(&mut file, PART_BYTES).await {
                Ok(chunk) => chunk,
                Err(e) => {
                    let _ = writer.abort().await;
                    return Err(local(e));
                }
            };
            if chunk.is_empty() {
                break;
            }
            hasher.update(&chunk);
            size += chunk.len() as u64;
            if let Err(e) = writer.wait_for_capacity(PARTS_IN_FLIGHT).await {
                let _ = writer.abort().await;
                return Err(remote(e));
            }
            // Counted once the part is handed over with at most PARTS_IN_FLIGHT before it.
            progress.add(chunk.len() as u64);
            writer.put(chunk);
        }
        writer.finish().await.map_err(remote)?;
        progress.finish();
        Ok((hasher.finish(), size))
    }

    /// Uploads bytes held in memory (data submissions, at most 1 MiB).
    pub async fn upload_bytes(&self, name: &str, bytes: &[u8]) -> Result<Manifest, StorageError> {
        let dir = tempfile_dir();
        let path = dir.join(format!("{}-{name}", std::process::id()));
        tokio::fs::write(&path, bytes)
            .await
            .map_err(|source| StorageError::Local {
                path: path.clone(),
                source,
            })?;
        let result = self.upload_file(name, &path).await;
        let _ = tokio::fs::remove_file(&path).await;
        result
    }

    /// Replaces an object's bytes without any check (used to simulate a bucket that changed).
    pub async fn overwrite(&self, name: &str, bytes: Vec<u8>) -> Result<(), StorageError> {
        self.store
            .put(
                &object_store::path::Path::from(name),
                PutPayload::from(bytes),
            )
            .await
            .map_err(|e| StorageError::Upload {
                name: name.into(),
                attempts: 1,
                reason: e.to_string(),
            })?;
        Ok(())
    }

    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }
}

fn tempfile_dir() -> PathBuf {
    std::env::temp_dir()
}

async fn read_chunk(file: &mut tokio::fs::File, max: usize) -> std::io::Result<bytes::Bytes> {
    let mut buffer = Vec::with_capacity(max);
    while buffer.len() < max {
        let n = (&mut *file)
            .take((max - buffer.len()) as u64)
            .read_to_end(&mut buffer)
            .await?;
        if n == 0 {
            break;
        }
    }
    Ok(bytes::Bytes::from(buffer))
}

/// Streams `url` and hashes it; the checksum and size of what it serves now.
pub async fn served_checksum(
    http: &reqwest::Client,
    url: &str,
) -> Result<(Commitment, u64), StorageError> {
    let mut hasher = CommitmentHasher::default();
    let size = stream_url(http, url, |chunk| {
        hasher.update(chunk);
        Ok(())
    })
    .await?;
    Ok((hasher.finish(), size))
}

/// A transfer's progress as `somatrain::progress` events (`kind`, `name`, `done` and `total`
/// bytes): at most one per [`ProgressEvents::EVERY`] and one at the end. The binary draws them
/// as a bar or a log line; this crate knows nothing of terminals.
struct ProgressEvents {
    kind: &'static str,
    name: String,
    total: u64,
    done: u64,
    last: std::time::Instant,
    finished: bool,
}

impl ProgressEvents {
    const EVERY: std::time::Duration = std::time::Duration::from_millis(250);

    fn new(kind: &'static str, name: &str, total: u64) -> Self {
        ProgressEvents {
            kind,
            name: name.to_string(),
            total,
            done: 0,
            last: std::time::Instant::now(),
            finished: false,
        }
    }

    fn add(&mut self, bytes: u64) {
        self.done += bytes;
        if self.done < self.total && self.last.elapsed() >= Self::EVERY {
            self.last = std::time::Instant::now();
            self.emit();
        }
    }

    fn emit(&self) {
        self.emit_marked(false);
    }

    fn emit_marked(&self, abandoned: bool) {
        tracing::info!(
            target: "somatrain::progress",
            kind = self.kind,
            name = self.name.as_str(),
            done = self.done,
            total = self.total,
            abandoned
        );
    }

    /// The last event: `done` equal to `total`, which ends the bar.
    fn finish(&mut self) {
        self.done = self.total;
        self.finished = true;
        self.emit();
    }
}

impl Drop for ProgressEvents {
    /// A transfer that failed part-way ends its bar too, marked abandoned (the error itself is
    /// reported by whoever sees it).
    fn drop(&mut self) {
        if !self.finished {
            self.emit_marked(true);
        }
    }
}

/// Checks that the manifest's URL serves exactly the committed bytes.
pub async fn verify_url(http: &reqwest::Client, manifest: &Manifest) -> Result<(), StorageError> {
    let (got, got_size) = served_checksum(http, &manifest.url).await?;
    if got != manifest.checksum || got_size != manifest.size {
        return Err(StorageError::mismatch(manifest, got, got_size));
    }
    Ok(())
}

/// Downloads the manifest's URL into `dest` (atomically: a temporary file renamed into place
/// only when size and checksum match). A download larger than the manifest stops early.
pub async fn download_verified(
    http: &reqwest::Client,
    manifest: &Manifest,
    dest: &Path,
) -> Result<(), StorageError> {
    let local = |source| StorageError::Local {
        path: dest.to_path_buf(),
        source,
    };
    if let Some(dir) = dest.parent().filter(|d| !d.as_os_str().is_empty()) {
        tokio::fs::create_dir_all(dir).await.map_err(local)?;
    }
    let tmp = PathBuf::from(format!("{}.part-{}", dest.display(), std::process::id()));
    let result = download_to(http, manifest, &tmp).await;
    match result {
        Ok(()) => tokio::fs::rename(&tmp, dest).await.map_err(local),
        Err(e) => {
            let _ = tokio::fs::remove_file(&tmp).await;
            Err(e)
        }
    }
}

async fn download_to(
    http: &reqwest::Client,
    manifest: &Manifest,
    path: &Path,
) -> Result<(), StorageError> {
    let local = |source| StorageError::Local {
        path: path.to_path_buf(),
        source,
    };
    let failed = |reason: String| StorageError::Download {
        url: manifest.url.clone(),
        reason,
    };
    let mut file = tokio::fs::File::create(path).await.map_err(local)?;
    let response = http
        .get(&manifest.url)
        .send()
        .await
        .map_err(|e| failed(e.to_string()))?;
    if !response.status().is_success() {
        return Err(failed(format!("HTTP {}", response.status())));
    }
    let mut body = response.bytes_stream();
    let mut hasher = CommitmentHasher::default();
    let mut size = 0u64;
    let name = manifest.url.rsplit('/').next().unwrap_or_default();
    let mut progress = ProgressEvents::new("download", name, manifest.size);
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| failed(e.to_string()))?;
        size += chunk.len() as u64;
        progress.add(chunk.len() as u64);
        if size > manifest.size {
            return Err(failed(format!(
                "serves more than the {} bytes committed",
                manifest.size
            )));
        }
        hasher.update(&chunk);
        file.write_all(&chunk).await.map_err(local)?;
    }
    let got = hasher.finish();
    if size != manifest.size || got != manifest.checksum {
        return Err(StorageError::mismatch(manifest, got, size));
    }
    file.sync_all().await.map_err(local)?;
    progress.finish();
    Ok(())
}

async fn stream_url(
    http: &reqwest::Client,
    url: &str,
    mut sink: impl FnMut(&[u8]) -> Result<(), StorageError>,
) -> Result<u64, StorageError> {
    let failed = |reason: String| StorageError::Download {
        url: url.to_string(),
        reason,
    };
    let response = http
        .get(url)
        .send()
        .await
        .map_err(|e| failed(e.to_string()))?;
    if !response.status().is_success() {
        return Err(failed(format!("HTTP {}", response.status())));
    }
    let mut body = response.bytes_stream();
    let mut size = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| failed(e.to_string()))?;
        size += chunk.len() as u64;
        sink(&chunk)?;
    }
    Ok(size)
}
