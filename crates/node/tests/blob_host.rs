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
