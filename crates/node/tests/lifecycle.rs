//! End-to-end over real HTTP on 127.0.0.1: accounts, transactions, the model lifecycle with
//! both slashing paths and an update; supply is checked after every step.

use std::sync::Arc;

use somatrain_client::{Client, ClientError};
use somatrain_node::{Node, NodeConfig};
use somatrain_protocol::chain::{ModelStatus, Params};
use somatrain_protocol::crypto::embedding_commitment;
use somatrain_protocol::tx::{Manifest, SignedTx, TxBody, TxKind};
use somatrain_protocol::{Commitment, EncryptionKey, Keypair, ObjectId};

const TOKEN: &str = "test-admin-token";
const SOMA: u64 = 1_000_000_000;

struct Net {
    client: Client,
    _node: Arc<Node>,
    _dir: tempfile::TempDir,
}

async fn start() -> Net {
    let dir = tempfile::tempdir().unwrap();
    let config = NodeConfig {
        data_dir: dir.path().to_path_buf(),
        genesis: Params {
            embedding_dim: 4,
            ..Params::default()
        },
        admin_token: Some(TOKEN.into()),
    };
    let node = Node::open(&config).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(somatrain_node::serve(
        node.clone(),
        listener,
        std::future::pending(),
    ));
    let client = Client::new(&format!("http://{addr}")).with_admin_token(TOKEN);
    Net {
        client,
        _node: node,
        _dir: dir,
    }
}

async fn supply_is_conserved(client: &Client) {
    let s = client.status().await.unwrap();
    assert_eq!(s.accounted_supply, s.total_supply, "supply leaked: {s:?}");
}

async fn funded(client: &Client, times: usize) -> Keypair {
    let kp = Keypair::generate();
    for _ in 0..times {
        client.faucet(&kp.address()).await.unwrap();
    }
    kp
}

fn code(e: ClientError) -> String {
    e.code().unwrap_or("none").to_string()
}

struct Commit {
    key: EncryptionKey,
    embedding: Vec<f32>,
    kind: TxKind,
}

fn commit_for(model_id: ObjectId, seed: f32) -> Commit {
    let key = EncryptionKey::generate();
    let embedding = vec![seed, 1.0, -0.5, 0.25];
    let checksum = Commitment::of_bytes(format!("weights {seed}").as_bytes());
    let kind = TxKind::CommitModel {
        model_id,
        manifest: Manifest {
            url: "http://127.0.0.1/blob".into(),
            checksum,
            size: 100,
        },
        weights_commitment: checksum,
        embedding_commitment: embedding_commitment(&embedding),
        decryption_key_commitment: key.commitment(),
    };
    Commit {
        key,
        embedding,
        kind,
    }
}

fn reveal(model_id: ObjectId, c: &Commit) -> TxKind {
    TxKind::RevealModel {
        model_id,
        decryption_key: c.key.to_base58(),
        embedding: c.embedding.clone(),
    }
}

#[tokio::test]
async fn accounts_transfers_and_refusals() {
    let net = start().await;
    let c = &net.client;
    let alice = funded(c, 1).await;
    let bob = Keypair::generate();
    assert_eq!(c.account(&alice.address()).await.unwrap().balance, 2 * SOMA);
    let fee = c.status().await.unwrap().params.base_fee;

    let body = TxBody {
        sender: alice.address(),
        sequence: 0,
        kind: TxKind::Transfer {
            to: bob.address(),
            amount: 500,
        },
    };
    let tx = SignedTx::sign(&alice, &body);
    let record = c.submit(&tx).await.unwrap();
    assert_eq!(c.account(&bob.address()).await.unwrap().balance, 500);
    assert_eq!(
        c.account(&alice.address()).await.unwrap().balance,
        2 * SOMA - 500 - fee
    );
    // The same signed transaction again: its record, not a second transfer.
    assert_eq!(c.submit(&tx).await.unwrap(), record);
    assert_eq!(c.account(&bob.address()).await.unwrap().balance, 500);
    assert_eq!(c.transaction(&tx.digest()).await.unwrap(), Some(record));
    // A new body with a used sequence number is a replay.
    let replay = TxBody {
        kind: TxKind::Transfer {
            to: bob.address(),
            amount: 501,
        },
        ..body.clone()
    };
    assert_eq!(
        code(
            c.submit(&SignedTx::sign(&alice, &replay))
                .await
                .unwrap_err()
        ),
        "sequence_mismatch"
    );
    // Tampered body, wrong sender, malformed body, more than the balance.
    let mut tampered = SignedTx::sign(
        &alice,
        &TxBody {
            sequence: 1,
            ..body.clone()
        },
    );
    tampered.body = tampered.body.replace("500", "900");
    assert_eq!(
        code(c.submit(&tampered).await.unwrap_err()),
        "bad_signature"
    );
    let forged = SignedTx::sign(
        &bob,
        &TxBody {
            sequence: 1,
            ..body.clone()
        },
    );
    assert_eq!(code(c.submit(&forged).await.unwrap_err()), "wrong_sender");
    let mut garbage = SignedTx::sign(
        &alice,
        &TxBody {
            sequence: 1,
            ..body.clone()
        },
    );
    garbage.body = "{\"sender\": 1}".into();
    garbage = SignedTx {
        signature: hex_sig(&alice, &garbage.body),
        ..garbage
    };
    assert_eq!(
        code(c.submit(&garbage).await.unwrap_err()),
        "malformed_body"
    );
    let err = c
        .send(
            &bob,
            TxKind::Transfer {
                to: alice.address(),
                amount: 10_000,
            },
        )
        .await
        .unwrap_err();
    assert_eq!(code(err), "insufficient_balance");
    let huge = SignedTx {
        body: "x".repeat(600 * 1024),
        ..tx.clone()
    };
    let err = c.submit(&huge).await.unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Rejected { status: 413, .. } | ClientError::Rejected { status: 400, .. }
        ),
        "{err}"
    );
    assert_eq!(c.transaction(&tampered.digest()).await.unwrap(), None);
    supply_is_conserved(c).await;
}

/// Signs arbitrary body text (to exercise the node's body parsing behind a valid signature).
fn hex_sig(kp: &Keypair, body: &str) -> String {
    use somatrain_protocol::tx::INTENT;
    let mut msg = INTENT.to_vec();
    msg.extend_from_slice(body.as_bytes());
    let digest = Commitment::of_bytes(&msg);
    let sig = kp.sign(&digest.0);
    sig.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn model_lifecycle_with_update_and_both_slashing_paths() {
    let net = start().await;
    let c = &net.client;
    let owner = funded(c, 3).await;
    let stranger = funded(c, 1).await;
    let create = TxKind::CreateModel {
        stake: SOMA,
        commission_bps: 1000,
        architecture_version: 1,
    };

    // Refusals at creation.
    let bad = TxKind::CreateModel {
        stake: SOMA,
        commission_bps: 10_001,
        architecture_version: 1,
    };
    assert_eq!(
        code(c.send(&owner, bad).await.unwrap_err()),
        "commission_too_high"
    );
    let bad = TxKind::CreateModel {
        stake: SOMA - 1,
        commission_bps: 0,
        architecture_version: 1,
    };
    assert_eq!(
        code(c.send(&owner, bad).await.unwrap_err()),
        "min_stake_not_met"
    );
    let bad = TxKind::CreateModel {
        stake: SOMA,
        commission_bps: 0,
        architecture_version: 2,
    };
    assert_eq!(
        code(c.send(&owner, bad).await.unwrap_err()),
        "architecture_mismatch"
    );

    // Model A: create, commit, reveal in the next epoch, active.
    let a = c.send(&owner, create.clone()).await.unwrap().created[0];
    let first = commit_for(a, 0.5);
    assert_eq!(
        code(c.send(&stranger, first.kind.clone()).await.unwrap_err()),
        "not_model_owner"
    );
    c.send(&owner, first.kind.clone()).await.unwrap();
    assert_eq!(c.model(&a).await.unwrap().status, ModelStatus::Pending);
    assert_eq!(
        code(c.send(&owner, reveal(a, &first)).await.unwrap_err()),
        "reveal_epoch_mismatch"
    );
    c.advance_epoch().await.unwrap();
    let wrong_key = Commit {
        key: EncryptionKey::generate(),
        ..commit_for(a, 0.5)
    };
    let wrong_key = TxKind::RevealModel {
        model_id: a,
        decryption_key: wrong_key.key.to_base58(),
        embedding: first.embedding.clone(),
    };
    assert_eq!(
        code(c.send(&owner, wrong_key).await.unwrap_err()),
        "decryption_key_commitment_mismatch"
    );
    let wrong_emb = TxKind::RevealModel {
        model_id: a,
        decryption_key: first.key.to_base58(),
        embedding: vec![9.0; 4],
    };
    assert_eq!(
        code(c.send(&owner, wrong_emb).await.unwrap_err()),
        "embedding_commitment_mismatch"
    );
    let short = TxKind::RevealModel {
        model_id: a,
        decryption_key: first.key.to_base58(),
        embedding: vec![1.0; 3],
    };
    assert_eq!(
        code(c.send(&owner, short).await.unwrap_err()),
        "embedding_dimension_mismatch"
    );
    c.send(&owner, reveal(a, &first)).await.unwrap();
    let model = c.model(&a).await.unwrap();
    assert_eq!(model.status, ModelStatus::Active);
    assert_eq!(model.embedding.as_deref(), Some(first.embedding.as_slice()));
    assert_eq!(
        model.decryption_key.as_deref(),
        Some(first.key.to_base58().as_str())
    );

    // An update: committed, overwritten by a second commit, revealed next epoch.
    let update_1 = commit_for(a, 0.7);
    let update_2 = commit_for(a, 0.9);
    c.send(&owner, update_1.kind.clone()).await.unwrap();
    c.send(&owner, update_2.kind.clone()).await.unwrap();
    assert_eq!(
        c.model(&a).await.unwrap().embedding.as_deref(),
        Some(first.embedding.as_slice()),
        "old weights stay live"
    );
    c.advance_epoch().await.unwrap();
    assert_eq!(
        code(c.send(&owner, reveal(a, &update_1)).await.unwrap_err()),
        "decryption_key_commitment_mismatch"
    );
    c.send(&owner, reveal(a, &update_2)).await.unwrap();
    assert_eq!(
        c.model(&a).await.unwrap().embedding.as_deref(),
        Some(update_2.embedding.as_slice())
    );

    // A missed update reveal drops the update and slashes nothing.
    let update_3 = commit_for(a, 0.3);
    c.send(&owner, update_3.kind.clone()).await.unwrap();
    c.advance_epoch().await.unwrap();
    c.advance_epoch().await.unwrap();
    let model = c.model(&a).await.unwrap();
    assert!(model.pending.is_none());
    assert_eq!(
        (model.status, model.stake, model.slashed),
        (ModelStatus::Active, SOMA, 0)
    );

    // Model B: committed, never revealed: half its stake is slashed and it goes inactive.
    let b = c.send(&owner, create.clone()).await.unwrap().created[0];
    let commit_b = commit_for(b, 0.1);
    c.send(&owner, commit_b.kind.clone()).await.unwrap();
    let burned_before = c.status().await.unwrap().burned;
    c.advance_epoch().await.unwrap();
    assert_eq!(
        c.model(&b).await.unwrap().status,
        ModelStatus::Pending,
        "still inside its reveal window"
    );
    c.advance_epoch().await.unwrap();
    let model_b = c.model(&b).await.unwrap();
    assert_eq!(model_b.status, ModelStatus::Inactive);
    assert_eq!((model_b.stake, model_b.slashed), (SOMA / 2, SOMA / 2));
    assert_eq!(c.status().await.unwrap().burned - burned_before, SOMA / 2);
    assert_eq!(
        code(c.send(&owner, reveal(b, &commit_b)).await.unwrap_err()),
        "invalid_model_state"
    );

    // Model C: created but never committed: slashed once after its window, then frozen.
    let model_c = c.send(&owner, create.clone()).await.unwrap().created[0];
    c.advance_epoch().await.unwrap();
    c.advance_epoch().await.unwrap();
    c.advance_epoch().await.unwrap();
    let mc = c.model(&model_c).await.unwrap();
    assert_eq!((mc.stake, mc.slashed), (SOMA / 2, SOMA / 2));
    assert_eq!(
        code(
            c.send(&owner, commit_for(model_c, 0.2).kind)
                .await
                .unwrap_err()
        ),
        "invalid_model_state"
    );

    // Commission changes take effect at the next epoch; stake in, stake out; deactivation.
    c.send(
        &owner,
        TxKind::SetCommission {
            model_id: a,
            commission_bps: 2500,
        },
    )
    .await
    .unwrap();
    assert_eq!(c.model(&a).await.unwrap().commission_bps, 1000);
    c.advance_epoch().await.unwrap();
    assert_eq!(c.model(&a).await.unwrap().commission_bps, 2500);
    c.send(
        &stranger,
        TxKind::AddStake {
            model_id: a,
            amount: SOMA / 4,
        },
    )
    .await
    .unwrap();
    assert_eq!(c.model(&a).await.unwrap().stake, SOMA + SOMA / 4);
    let err = c
        .send(
            &stranger,
            TxKind::WithdrawStake {
                model_id: a,
                amount: SOMA,
            },
        )
        .await
        .unwrap_err();
    assert_eq!(code(err), "insufficient_stake");
    c.send(
        &stranger,
        TxKind::WithdrawStake {
            model_id: a,
            amount: SOMA / 4,
        },
    )
    .await
    .unwrap();
    assert_eq!(
        code(
            c.send(&stranger, TxKind::DeactivateModel { model_id: a })
                .await
                .unwrap_err()
        ),
        "not_model_owner"
    );
    c.send(&owner, TxKind::DeactivateModel { model_id: a })
        .await
        .unwrap();
    assert_eq!(c.model(&a).await.unwrap().status, ModelStatus::Inactive);
    supply_is_conserved(c).await;
}

#[tokio::test]
async fn admin_endpoint_needs_the_token_and_blobs_round_trip() {
    let net = start().await;
    let no_token = Client::new(net.client.base_url());
    assert_eq!(
        code(no_token.advance_epoch().await.unwrap_err()),
        "unauthorized"
    );
    let wrong = Client::new(net.client.base_url()).with_admin_token("nope");
    assert_eq!(
        code(wrong.advance_epoch().await.unwrap_err()),
        "unauthorized"
    );
    assert_eq!(net.client.advance_epoch().await.unwrap(), 1);

    // Blobs: upload, read back byte for byte, checksum reported.
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let (url, info) = net
        .client
        .put_blob("weights.enc", data.clone())
        .await
        .unwrap();
    assert_eq!(info.size, data.len() as u64);
    assert_eq!(info.checksum, Commitment::of_bytes(&data));
    assert_eq!(net.client.download(&url).await.unwrap(), data);
    assert!(net.client.put_blob("../escape", vec![1]).await.is_err());
}
