//! The blob host against a client that stops sending mid-upload: the upload is abandoned with
//! 408 after the idle limit, its temporary file is removed, nothing is published, and the host
//! keeps serving others.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_upload_is_abandoned_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let router = somatrain_node::blobs::router_with_idle(
        dir.path().to_path_buf(),
        1 << 20,
        Duration::from_millis(300),
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(somatrain_node::blobs::serve_with(
        listener,
        router,
        Duration::from_millis(600),
        Duration::from_millis(800),
    ));

    let started = Instant::now();
    let answer = tokio::task::spawn_blocking(move || {
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        // Promise 1,000 bytes, send 10, then go quiet.
        write!(
            stream,
            "PUT /v1/blobs/stalled.bin HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n0123456789"
        )
        .unwrap();
        let mut answer = vec![0u8; 512];
        let n = stream.read(&mut answer).unwrap();
        String::from_utf8_lossy(&answer[..n]).to_string()
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "answered in time"
    );
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "nothing left behind: {left:?}");
    // Others are still served.
    let answer = tokio::task::spawn_blocking(move || {
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            stream,
            "PUT /v1/blobs/ok.bin HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nConnection: close\r\n\r\nfine"
        )
        .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        answer
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(std::fs::read(dir.path().join("ok.bin")).unwrap(), b"fine");
    // A connection that never sends a request is closed after the connection idle limit.
    let closed = tokio::task::spawn_blocking(move || {
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let started = Instant::now();
        let mut buf = [0u8; 16];
        let n = stream.read(&mut buf).unwrap_or(0);
        (n, started.elapsed())
    })
    .await
    .unwrap();
    assert_eq!(closed.0, 0, "closed without an answer");
    assert!(closed.1 < Duration::from_secs(5), "{:?}", closed.1);
    // A client that trickles its headers (never idle) is cut off at the header timeout.
    let cut = tokio::task::spawn_blocking(move || {
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        let started = Instant::now();
        write!(stream, "PUT /v1/blobs/slow.bin HTTP/1.1\r\n").unwrap();
        for _ in 0..50 {
            std::thread::sleep(Duration::from_millis(100));
            if stream.write_all(b"X").is_err() {
                return started.elapsed();
            }
        }
        stream
            .set_read_timeout(Some(Duration::from_secs(1)))
            .unwrap();
        let mut buf = [0u8; 64];
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => started.elapsed(),
            Ok(_) => panic!("answered a request whose headers never ended"),
        }
    })
    .await
    .unwrap();
    assert!(cut < Duration::from_secs(5), "cut off after {cut:?}");
}

/// `PUT /v1/blobs/NAME` over a raw connection, with a declared length or chunked (no length
/// known up front); the status code of the answer.
fn put(addr: std::net::SocketAddr, name: &str, body: &[u8], chunked: bool) -> u16 {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let head = if chunked {
        format!("PUT /v1/blobs/{name} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    } else {
        format!(
            "PUT /v1/blobs/{name} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
    };
    // The host may answer and close before the body is all sent: write errors are expected.
    let _ = stream.write_all(head.as_bytes());
    for piece in body.chunks(64 << 10) {
        let sent = if chunked {
            stream
                .write_all(format!("{:x}\r\n", piece.len()).as_bytes())
                .and_then(|_| stream.write_all(piece))
                .and_then(|_| stream.write_all(b"\r\n"))
        } else {
            stream.write_all(piece)
        };
        if sent.is_err() {
            break;
        }
    }
    if chunked {
        let _ = stream.write_all(b"0\r\n\r\n");
    }
    let mut answer = vec![0u8; 1024];
    let n = stream.read(&mut answer).unwrap();
    let text = String::from_utf8_lossy(&answer[..n]);
    text.split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"))
}

/// The quota holds every blob together: uploads past it are refused with 507 (a declared size
/// before any byte is read, a chunked one as soon as it passes), leave nothing behind and give
/// their bytes back; a restarted host counts what is already published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_past_the_quota_are_refused_and_leave_nothing() {
    let dir = tempfile::tempdir().unwrap();
    const MIB: usize = 1 << 20;
    let quota = (5 * MIB / 2) as u64;
    let start = |dir: std::path::PathBuf| {
        serve_host(somatrain_node::blobs::router_with_quota(dir, 16 << 20, quota).unwrap())
    };
    let addr = start(dir.path().to_path_buf()).await;
    let mib = vec![7u8; MIB];
    let statuses = tokio::task::spawn_blocking(move || {
        vec![
            put(addr, "a.bin", &mib, false),
            put(addr, "b.bin", &mib, true),
            // 2 MiB taken of 2.5: neither a declared nor a streamed 1 MiB fits.
            put(addr, "c.bin", &mib, false),
            put(addr, "d.bin", &mib, true),
            // The refused ones gave their bytes back: 0.4 MiB still fits.
            put(addr, "e.bin", &mib[..2 * MIB / 5], true),
        ]
    })
    .await
    .unwrap();
    assert_eq!(statuses, vec![200, 200, 507, 507, 200]);
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["a.bin", "b.bin", "e.bin"],
        "no temporary file is left"
    );

    // A host restarted over the same directory counts the 2.4 MiB already there.
    let again = start(dir.path().to_path_buf()).await;
    let fifth = tokio::task::spawn_blocking(move || put(again, "f.bin", &[1u8; MIB / 5], false))
        .await
        .unwrap();
    assert_eq!(fifth, 507);
}

/// Whatever the quota, the disk keeps the chain's reserve: an upload that would leave less
/// free is refused with 507 and leaves nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_that_would_eat_the_chains_disk_reserve_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let free = somatrain_node::blobs::available_bytes(dir.path()).expect("statvfs works here");
    let start = |reserve: u64| {
        let dir = dir.path().to_path_buf();
        serve_host(
            somatrain_node::blobs::router_with_limits(dir, 16 << 20, u64::MAX, reserve).unwrap(),
        )
    };
    // A reserve above what is free: nothing fits, declared or streamed.
    let tight = start(free + (1 << 30)).await;
    let refused = tokio::task::spawn_blocking(move || {
        [
            put(tight, "a.bin", b"x", false),
            put(tight, "b.bin", b"x", true),
        ]
    })
    .await
    .unwrap();
    assert_eq!(refused, [507, 507]);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    // With room above the reserve the same upload is stored.
    let roomy = start(0).await;
    let stored = tokio::task::spawn_blocking(move || put(roomy, "a.bin", b"x", false))
        .await
        .unwrap();
    assert_eq!(stored, 200);
}

/// Serves `router` on a fresh loopback port (connections idle for 10 s are closed).
async fn serve_host(router: axum::Router) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(somatrain_node::blobs::serve(
        listener,
        router,
        Duration::from_secs(10),
    ));
    addr
}
