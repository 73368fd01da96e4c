//! The localnet as a real process: `kill -9` while signed transactions are in flight loses none
//! that the node acknowledged, and `somatrain status` reads the restarted node.

use somatrain_protocol::transaction::TransferCoin;
use somatrain_protocol::{Keypair, TransactionKind};

mod common;
use common::GrpcLocalnet;
use common::{COMMAND_DEADLINE, OutputWithin};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_dash_nine_loses_no_acknowledged_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = GrpcLocalnet::start(dir.path(), &["--embedding-dim", "4"]);
    let client = node.client();
    let senders: Vec<Keypair> = (0..4).map(|_| Keypair::generate()).collect();
    for kp in &senders {
        client.faucet(&kp.address()).await.unwrap();
    }
    let sink = Keypair::generate().address();
    // Each sender streams transfers, each paid with its coin's newest version; the node is
    // killed while they are in flight.
    let mut tasks = Vec::new();
    for kp in senders.clone() {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            for _ in 0..10_000u64 {
                let sent = client
                    .sign_and_execute(&kp, |gas| {
                        TransactionKind::TransferCoin(TransferCoin {
                            coin: gas[0],
                            amount: Some(1),
                            recipient: sink,
                        })
                    })
                    .await;
                match sent {
                    Ok(executed) => acknowledged.push(executed.digest),
                    Err(_) => break,
                }
            }
            acknowledged
        }));
    }
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    node.kill(); // SIGKILL
    let mut acknowledged = Vec::new();
    for t in tasks {
        acknowledged.extend(t.await.unwrap());
    }
    eprintln!(
        "{} transactions acknowledged before the kill",
        acknowledged.len()
    );
    assert!(
        acknowledged.len() > 20,
        "only {} transactions went through before the kill",
        acknowledged.len()
    );

    let node = GrpcLocalnet::start(dir.path(), &["--embedding-dim", "4"]);
    let client = node.client();
    for digest in &acknowledged {
        let executed = client
            .transaction(digest)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("acknowledged {digest} was lost"));
        assert!(executed.success().is_ok());
    }
    let received = client.balance(&sink).await.unwrap();
    assert!(
        received >= acknowledged.len() as u64,
        "sink got {received} for {} transfers",
        acknowledged.len()
    );
    // `somatrain status` reads the same node.
    let out = common::bin()
        .args(["status", "--json", "--address", &sink.to_string()])
        .args(node.chain_args())
        .env_remove("SOMA_SECRET_KEY")
        .output_within(COMMAND_DEADLINE)
        .unwrap();
    common::succeeded(&out);
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["account"]["balance"].as_u64().unwrap(), received);
    assert_eq!(
        shown["status"]["epoch"].as_u64().unwrap(),
        client.epoch_view().await.unwrap().epoch
    );
    let text = common::bin()
        .arg("status")
        .args(node.chain_args())
        .output_within(COMMAND_DEADLINE)
        .unwrap();
    assert!(String::from_utf8_lossy(&text.stdout).contains("open targets"));
}
