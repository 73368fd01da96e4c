//! A connection whose peer sends nothing is closed after the idle limit; traffic keeps it open.

use std::time::{Duration, Instant};

use somatrain_node::idle::IdleTimeout;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn silence_closes_a_connection_and_traffic_keeps_it() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (server, _) = listener.accept().await.unwrap();
    let mut server = IdleTimeout::new(server, Duration::from_millis(300));

    // Bytes every 100 ms for 600 ms: twice the limit, never idle for long.
    let writer = tokio::spawn(async move {
        for _ in 0..6 {
            client.write_all(b"x").await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        client // kept open, now silent
    });
    let mut got = 0;
    let mut buf = [0u8; 16];
    let started = Instant::now();
    // A deadline of its own, so that a timeout that never fires fails instead of hanging.
    let error = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match server.read(&mut buf).await {
                Ok(0) => panic!("the client closed the connection"),
                Ok(n) => got += n,
                Err(e) => break e,
            }
        }
    })
    .await
    .expect("the idle connection was not closed within 10 s");
    assert_eq!(got, 6, "every byte arrived before the timeout");
    assert_eq!(error.kind(), std::io::ErrorKind::TimedOut);
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(700) && elapsed < Duration::from_secs(5),
        "closed {elapsed:?} after the start: after the last byte plus the limit"
    );
    drop(writer.await.unwrap());
}
