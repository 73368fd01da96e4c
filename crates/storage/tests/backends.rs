//! Every backend against a real server on 127.0.0.1: a moto S3 server (installed by `.ci/run`),
//! the localnet's blob host, and a directory it serves. Faults are injected by a TCP proxy that
//! answers 503 or drops connections before passing traffic through.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use somatrain_storage::testing::MotoServer;
use somatrain_storage::{
    Backend, RetryPolicy, S3Config, Storage, StorageError, download_verified, verify_url,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn pseudo_random_file(dir: &Path, name: &str, len: usize) -> std::path::PathBuf {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let bytes: Vec<u8> = (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

#[derive(Default)]
struct Faults {
    /// Connections answered with 503 before any pass through.
    refuse: usize,
    /// Connections dropped without an answer after those.
    drop: usize,
    seen: AtomicUsize,
}

/// A TCP proxy to `upstream` whose first connections fail as `faults` says.
async fn faulty_proxy(upstream: SocketAddr, faults: Arc<Faults>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut inbound, _)) = listener.accept().await else {
                return;
            };
            let n = faults.seen.fetch_add(1, Ordering::SeqCst);
            let faults = faults.clone();
            tokio::spawn(async move {
                if n < faults.refuse + faults.drop {
                    let mut buf = [0u8; 1024];
                    let _ = inbound.read(&mut buf).await;
                    if n < faults.refuse {
                        let _ = inbound
                            .write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                            .await;
                    }
                    return;
                }
                let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_multipart_upload_round_trips_and_is_verified() {
    let moto = MotoServer::start("weights").await;
    let dir = tempfile::tempdir().unwrap();
    // 20 MiB: three parts of 8 MiB.
    let file = pseudo_random_file(dir.path(), "w.enc", 20 << 20);
    let storage = Storage::open(&moto.backend_at(moto.endpoint())).unwrap();
    let manifest = storage.upload_file("round-1.enc", &file).await.unwrap();
    assert_eq!(
        manifest.url,
        format!("http://{}/weights/round-1.enc", moto.addr)
    );
    assert_eq!(manifest.size, 20 << 20);
    let (expected, _) =
        somatrain_protocol::Commitment::of_reader(std::fs::File::open(&file).unwrap()).unwrap();
    assert_eq!(manifest.checksum, expected);
    let copy = dir.path().join("copy");
    download_verified(storage.http(), &manifest, &copy)
        .await
        .unwrap();
    assert_eq!(std::fs::read(&copy).unwrap(), std::fs::read(&file).unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_upload_survives_server_errors_and_dropped_connections() {
    let moto = MotoServer::start("flaky").await;
    let faults = Arc::new(Faults {
        refuse: 2,
        drop: 2,
        ..Faults::default()
    });
    let proxy = faulty_proxy(moto.addr, faults.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let file = pseudo_random_file(dir.path(), "w.enc", 9 << 20);
    let storage = Storage::open(&moto.backend_at(format!("http://{proxy}")))
        .unwrap()
        .with_retry(RetryPolicy {
            attempts: 4,
            first_backoff: Duration::from_millis(50),
        });
    let manifest = storage.upload_file("w.enc", &file).await.unwrap();
    assert!(
        faults.seen.load(Ordering::SeqCst) > 4,
        "the faults were exercised"
    );
    // Read back straight from the server, past the proxy.
    let direct = somatrain_protocol::Manifest {
        url: format!("http://{}/flaky/w.enc", moto.addr),
        ..manifest
    };
    verify_url(storage.http(), &direct).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_gives_up_with_a_clear_error_when_the_server_never_answers() {
    let moto = MotoServer::start("down").await;
    let faults = Arc::new(Faults {
        refuse: 1000,
        ..Faults::default()
    });
    let proxy = faulty_proxy(moto.addr, faults).await;
    let dir = tempfile::tempdir().unwrap();
    let file = pseudo_random_file(dir.path(), "w.enc", 1000);
    let storage = Storage::open(&moto.backend_at(format!("http://{proxy}")))
        .unwrap()
        .with_retry(RetryPolicy {
            attempts: 2,
            first_backoff: Duration::from_millis(10),
        });
    let err = storage.upload_file("w.enc", &file).await.unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, StorageError::Upload { attempts: 2, .. }),
        "{text}"
    );
    assert!(!text.contains("test-secret"), "a secret leaked: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_url_that_later_serves_other_bytes_is_detected() {
    let moto = MotoServer::start("changing").await;
    let dir = tempfile::tempdir().unwrap();
    let file = pseudo_random_file(dir.path(), "w.enc", 4096);
    let storage = Storage::open(&moto.backend_at(moto.endpoint())).unwrap();
    let manifest = storage.upload_file("w.enc", &file).await.unwrap();
    verify_url(storage.http(), &manifest).await.unwrap();
    storage.overwrite("w.enc", vec![7u8; 4096]).await.unwrap();
    let err = verify_url(storage.http(), &manifest).await.unwrap_err();
    assert!(
        matches!(err, StorageError::Mismatch { got_size: 4096, .. }),
        "{err}"
    );
    let dest = dir.path().join("dl");
    assert!(
        download_verified(storage.http(), &manifest, &dest)
            .await
            .is_err()
    );
    assert!(!dest.exists(), "a bad download must not be left in place");
}

#[test]
fn s3_settings_come_from_the_quickstart_variables() {
    let vars = |pairs: &'static [(&'static str, &'static str)]| {
        move |name: &str| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    };
    assert!(S3Config::from_lookup(vars(&[])).unwrap().is_none());
    let err = S3Config::from_lookup(vars(&[("S3_BUCKET", "b")])).unwrap_err();
    assert!(err.to_string().contains("S3_ACCESS_KEY_ID"), "{err}");
    let config = S3Config::from_lookup(vars(&[
        ("S3_BUCKET", "b"),
        ("S3_ACCESS_KEY_ID", "id"),
        ("S3_SECRET_ACCESS_KEY", "very-secret"),
        ("S3_ENDPOINT_URL", "http://127.0.0.1:1"),
        ("S3_PUBLIC_URL", "https://pub.example/b"),
    ]))
    .unwrap()
    .unwrap();
    assert_eq!(config.public_url.as_deref(), Some("https://pub.example/b"));
    assert!(!format!("{config:?}").contains("very-secret"));
    let storage = Storage::open(&Backend::S3(config)).unwrap();
    assert_eq!(storage.public_url("x.enc"), "https://pub.example/b/x.enc");
}

async fn localnet() -> (String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let router = somatrain_node::blobs::router(
        dir.path().join("blobs"),
        somatrain_node::blobs::DEFAULT_MAX_BLOB_BYTES,
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    (format!("http://{addr}"), dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_localnet_blob_host_and_its_directory_are_backends() {
    let (url, node_dir) = localnet().await;
    let dir = tempfile::tempdir().unwrap();
    let file = pseudo_random_file(dir.path(), "w.enc", (1 << 20) + 17);
    let over_http = Storage::open(&Backend::BlobHost {
        base: format!("{url}/v1/blobs"),
    })
    .unwrap();
    let manifest = over_http.upload_file("a.enc", &file).await.unwrap();
    assert_eq!(manifest.url, format!("{url}/v1/blobs/a.enc"));
    assert_eq!(
        std::fs::read(node_dir.path().join("blobs/a.enc")).unwrap(),
        std::fs::read(&file).unwrap()
    );

    let in_dir = Storage::open(&Backend::Dir {
        dir: node_dir.path().join("blobs"),
        public_base: format!("{url}/v1/blobs"),
    })
    .unwrap();
    let manifest = in_dir.upload_file("b.enc", &file).await.unwrap();
    verify_url(in_dir.http(), &manifest).await.unwrap();
    assert!(matches!(
        in_dir.upload_file("../escape", &file).await,
        Err(StorageError::BadName(_))
    ));
}
