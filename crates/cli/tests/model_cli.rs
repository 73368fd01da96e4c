//! `somatrain model ...` and `somatrain transfer` through the real binary against a localnet
//! process: each write lands as the node records it, and refusals come back with their reason.

use somatrain_client::Client;
use somatrain_protocol::chain::ModelStatus;
use somatrain_protocol::crypto::embedding_commitment;
use somatrain_protocol::tx::{Manifest, TxKind};
use somatrain_protocol::{Commitment, EncryptionKey, Keypair, ObjectId};

mod common;
use common::{Localnet, TOKEN, bin};

/// Runs the binary as `kp` against `url`; (success, stdout, stderr).
fn somatrain(url: &str, kp: &Keypair, args: &[&str]) -> (bool, String, String) {
    let out = bin()
        .args(args)
        .args(["--node", url])
        .env("SOMA_SECRET_KEY", kp.secret_hex())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A model taken through create, commit and reveal by the test itself.
async fn active_model(client: &Client, owner: &Keypair) -> ObjectId {
    let created = client
        .send(
            owner,
            TxKind::CreateModel {
                stake: 1_000_000_000,
                commission_bps: 0,
                architecture_version: 1,
            },
        )
        .await
        .unwrap();
    let model_id = created.created[0];
    let key = EncryptionKey::generate();
    let embedding = vec![0.5, -1.0, 0.25, 2.0];
    let checksum = Commitment::of_bytes(b"weights");
    client
        .send(
            owner,
            TxKind::CommitModel {
                model_id,
                manifest: Manifest {
                    url: "http://127.0.0.1/weights".into(),
                    checksum,
                    size: 7,
                },
                weights_commitment: checksum,
                embedding_commitment: embedding_commitment(&embedding),
                decryption_key_commitment: key.commitment(),
            },
        )
        .await
        .unwrap();
    client
        .clone()
        .with_admin_token(TOKEN)
        .advance_epoch()
        .await
        .unwrap();
    client
        .send(
            owner,
            TxKind::RevealModel {
                model_id,
                decryption_key: key.to_base58(),
                embedding,
            },
        )
        .await
        .unwrap();
    assert_eq!(
        client.model(&model_id).await.unwrap().status,
        ModelStatus::Active
    );
    model_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_management_and_transfers_land_on_chain() {
    let dir = tempfile::tempdir().unwrap();
    let net = Localnet::start(dir.path(), &["--embedding-dim", "4"]);
    let client = Client::new(&net.url);
    let (owner, staker) = (Keypair::generate(), Keypair::generate());
    for kp in [&owner, &owner, &staker] {
        client.faucet(&kp.address()).await.unwrap();
    }
    let model_id = active_model(&client, &owner).await;
    let id = model_id.to_string();
    let fee = client.status().await.unwrap().params.base_fee;

    // Another account stakes 0.5 SOMA exactly, then takes all of it back.
    let before = client.account(&staker.address()).await.unwrap().balance;
    let (ok, stdout, stderr) = somatrain(
        &net.url,
        &staker,
        &["model", "stake", "--model", &id, "--amount", "0.5"],
    );
    assert!(ok, "{stderr}");
    assert!(stdout.contains("stake 1.500000000 SOMA"), "{stdout}");
    let model = client.model(&model_id).await.unwrap();
    assert_eq!(model.stakes[&staker.address()], 500_000_000);
    assert_eq!(
        client.account(&staker.address()).await.unwrap().balance,
        before - 500_000_000 - fee
    );
    let (ok, _, stderr) = somatrain(
        &net.url,
        &staker,
        &["model", "unstake", "--model", &id, "--amount", "all"],
    );
    assert!(ok, "{stderr}");
    assert!(
        !client
            .model(&model_id)
            .await
            .unwrap()
            .stakes
            .contains_key(&staker.address())
    );
    assert_eq!(
        client.account(&staker.address()).await.unwrap().balance,
        before - 2 * fee
    );
    let (ok, _, stderr) = somatrain(
        &net.url,
        &staker,
        &["model", "unstake", "--model", &id, "--amount", "all"],
    );
    assert!(!ok && stderr.contains("has no stake in model"), "{stderr}");

    // Only the owner sets the commission; the node says why.
    let (ok, _, stderr) = somatrain(
        &net.url,
        &staker,
        &["model", "commission", "--model", &id, "--bps", "500"],
    );
    assert!(!ok && stderr.contains("not_model_owner"), "{stderr}");
    let (ok, stdout, stderr) = somatrain(
        &net.url,
        &owner,
        &["model", "commission", "--model", &id, "--bps", "500"],
    );
    assert!(ok, "{stderr}");
    assert!(stdout.contains("500 bps from next epoch"), "{stdout}");
    assert_eq!(
        client.model(&model_id).await.unwrap().next_commission_bps,
        500
    );

    let (ok, _, stderr) = somatrain(&net.url, &owner, &["model", "show"]);
    assert!(
        !ok && stderr.contains("--model ID or --run-dir RUN"),
        "{stderr}"
    );

    // `show` reads the same model as JSON.
    let (ok, stdout, stderr) = somatrain(
        &net.url,
        &owner,
        &["model", "show", "--model", &id, "--json"],
    );
    assert!(ok, "{stderr}");
    let shown: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(shown["next_commission_bps"], 500);
    assert_eq!(shown["status"], "active");

    // Transfers are exact to the shannon; bad amounts never reach the node.
    let recipient = Keypair::generate().address();
    let (ok, _, stderr) = somatrain(
        &net.url,
        &owner,
        &[
            "transfer",
            "--to",
            &recipient.to_string(),
            "--amount",
            "0.000000123",
        ],
    );
    assert!(ok, "{stderr}");
    assert_eq!(client.account(&recipient).await.unwrap().balance, 123);
    let sequence = client.account(&owner.address()).await.unwrap().sequence;
    for bad in ["1.0000000001", "-1", "0", "lots"] {
        let (ok, _, stderr) = somatrain(
            &net.url,
            &owner,
            &["transfer", "--to", &recipient.to_string(), "--amount", bad],
        );
        assert!(!ok, "{bad} was sent: {stderr}");
    }
    assert_eq!(
        client.account(&owner.address()).await.unwrap().sequence,
        sequence,
        "a refused amount sent nothing"
    );

    // Deactivation needs --yes, then takes the model out.
    let (ok, _, stderr) = somatrain(&net.url, &owner, &["model", "deactivate", "--model", &id]);
    assert!(!ok && stderr.contains("--yes"), "{stderr}");
    assert_eq!(
        client.model(&model_id).await.unwrap().status,
        ModelStatus::Active
    );
    let (ok, _, stderr) = somatrain(
        &net.url,
        &owner,
        &["model", "deactivate", "--model", &id, "--yes"],
    );
    assert!(ok, "{stderr}");
    assert_eq!(
        client.model(&model_id).await.unwrap().status,
        ModelStatus::Inactive
    );
}
