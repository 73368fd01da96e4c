//! The localnet as a real process: `kill -9` while transactions are in flight loses none that
//! the node acknowledged, and supply is conserved after the restart.

use std::process::Command;

use somatrain_client::Client;
use somatrain_protocol::Keypair;
use somatrain_protocol::tx::{SignedTx, TxBody, TxKind};

mod common;
use common::Localnet;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_dash_nine_loses_no_acknowledged_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = Localnet::start(dir.path(), &["--embedding-dim", "4"]);
    let url = node.url.clone();
    let client = Client::new(&url);
    let senders: Vec<Keypair> = (0..4).map(|_| Keypair::generate()).collect();
    for kp in &senders {
        client.faucet(&kp.address()).await.unwrap();
    }
    let sink = Keypair::generate().address();
    // Each sender streams transfers with consecutive sequence numbers; the node is killed while
    // they are in flight.
    let mut tasks = Vec::new();
    for kp in senders.clone() {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            for sequence in 0..10_000u64 {
                let body = TxBody {
                    sender: kp.address(),
                    sequence,
                    kind: TxKind::Transfer {
                        to: sink,
                        amount: 1,
                    },
                };
                let tx = SignedTx::sign(&kp, &body);
                match client.submit(&tx).await {
                    Ok(_) => acknowledged.push(tx.digest()),
                    Err(_) => break,
                }
            }
            acknowledged
        }));
    }
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
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

    let mut node = Localnet::start(dir.path(), &["--embedding-dim", "4"]);
    let url = node.url.clone();
    let client = Client::new(&url);
    for digest in &acknowledged {
        assert!(
            client.transaction(digest).await.unwrap().is_some(),
            "acknowledged {digest} was lost"
        );
    }
    let received = client.account(&sink).await.unwrap().balance;
    assert!(
        received >= acknowledged.len() as u64,
        "sink got {received} for {} transfers",
        acknowledged.len()
    );
    let status = client.status().await.unwrap();
    assert_eq!(status.accounted_supply, status.total_supply);
    // `somatrain status` reads the same node.
    let out = Command::new(env!("CARGO_BIN_EXE_somatrain"))
        .args([
            "status",
            "--node",
            &url,
            "--json",
            "--address",
            &sink.to_string(),
        ])
        .env_remove("SOMA_SECRET_KEY")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["account"]["balance"].as_u64().unwrap(), received);
    assert_eq!(
        shown["status"]["total_supply"].as_u64().unwrap(),
        status.total_supply
    );
    let text = Command::new(env!("CARGO_BIN_EXE_somatrain"))
        .args(["status", "--node", &url])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&text.stdout).contains("open targets"));
    node.kill();
}
