//! Connection limits: thousands of idle connections from one address (up to 20,000, as many as
//! this process's file limit allows) take no more than that address's share; the rest are
//! closed at once, the node does not spin, and a new client from another address is served.

use std::time::{Duration, Instant};

use somatrain_node::grpc::{Services, serve};
use somatrain_node::ledger::Params;
use somatrain_node::limits::{ConnectionLimits, open_file_limit};
use somatrain_node::localnet::{Localnet, LocalnetConfig};
use somatrain_rpc::proto::{self, ledger_service_client::LedgerServiceClient};

const PER_PEER: usize = 64;

/// CPU seconds this process has used (user + system), from `/proc/self/stat`.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_past_the_limit_are_closed_and_a_new_client_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let config = LocalnetConfig {
        validators: 1,
        data_dir: dir.path().to_path_buf(),
        genesis: Params::default(),
    };
    let node = Localnet::open(&config, 0).unwrap();
    let limits = ConnectionLimits::new(PER_PEER, 100_000);
    let mut listeners = Vec::new();
    for _ in 0..4 {
        listeners.push(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap());
    }
    let rpc = listeners[0].local_addr().unwrap();
    let listeners: [tokio::net::TcpListener; 4] = listeners.try_into().unwrap();
    let services = Services {
        node,
        scorer: None,
        verify_submissions: false,
        weight_checks: None,
        closing: Default::default(),
        connection_limits: limits.clone(),
        execution_slots: Default::default(),
    };
    tokio::spawn(serve(services, listeners, std::future::pending()));

    // Idle connections from 127.0.0.1, as many as the file limit leaves room for.
    let file_limit = open_file_limit().expect("the open-file limit is readable") as usize;
    let wanted = 20_000.min(file_limit.saturating_sub(PER_PEER + 200));
    assert!(
        wanted > 2 * PER_PEER,
        "the file limit leaves room for {wanted}"
    );
    let opened = tokio::task::spawn_blocking(move || {
        let mut held = Vec::with_capacity(wanted);
        let deadline = Instant::now() + Duration::from_secs(120);
        while held.len() < wanted {
            assert!(
                Instant::now() < deadline,
                "opened {} connections",
                held.len()
            );
            match std::net::TcpStream::connect_timeout(&rpc, Duration::from_millis(200)) {
                Ok(stream) => held.push(stream),
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        held
    })
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while (limits.refused() as usize) < wanted - PER_PEER {
        assert!(
            Instant::now() < deadline,
            "{} of {wanted} refused, {} open",
            limits.refused(),
            limits.open()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(limits.open(), PER_PEER);

    // Holding them all, the node is idle: it does not spin on the listener.
    let before = cpu_seconds();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let used = cpu_seconds() - before;
    assert!(
        used < 0.5,
        "the process used {used:.2} s of CPU in 1 s while idle"
    );

    // A new client from another loopback address is served at once.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{rpc}"))
        .unwrap()
        .local_address(Some("127.0.0.2".parse().unwrap()))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .unwrap();
    let info = LedgerServiceClient::new(channel)
        .get_service_info(proto::GetServiceInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.chain.as_deref(), Some("localnet"));
    drop(opened);
}
