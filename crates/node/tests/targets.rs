//! Targets, submissions and claims end-to-end over HTTP: generation at epoch change, model
//! assignment, each submission rule, the reward split and expired-target cleanup, with supply
//! checked after every step.

use std::sync::Arc;

use somatrain_client::{Client, ClientError};
use somatrain_node::{Node, NodeConfig};
use somatrain_protocol::chain::{Params, TargetStatus};
use somatrain_protocol::crypto::embedding_commitment;
use somatrain_protocol::tx::{Manifest, TxKind};
use somatrain_protocol::{Commitment, EncryptionKey, Keypair, ObjectId};

const SOMA: u64 = 1_000_000_000;

async fn start(params: Params) -> (Client, Arc<Node>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let config = NodeConfig {
        data_dir: dir.path().to_path_buf(),
        genesis: params,
        admin_token: Some("t".into()),
    };
    let node = Node::open(&config).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(somatrain_node::serve(
        node.clone(),
        listener,
        std::future::pending(),
    ));
    (
        Client::new(&format!("http://{addr}")).with_admin_token("t"),
        node,
        dir,
    )
}

fn code(e: ClientError) -> String {
    e.code().unwrap_or("none").to_string()
}

async fn conserved(c: &Client) {
    let s = c.status().await.unwrap();
    assert_eq!(s.accounted_supply, s.total_supply, "supply leaked");
}

/// Creates, commits and (after an epoch change) reveals a model with `embedding`.
async fn active_model(c: &Client, owner: &Keypair, embedding: Vec<f32>, stake: u64) -> ObjectId {
    let id = c
        .send(
            owner,
            TxKind::CreateModel {
                stake,
                commission_bps: 0,
                architecture_version: 1,
            },
        )
        .await
        .unwrap()
        .created[0];
    let key = EncryptionKey::generate();
    let checksum = Commitment::of_bytes(b"w");
    c.send(
        owner,
        TxKind::CommitModel {
            model_id: id,
            manifest: Manifest {
                url: "http://127.0.0.1/w".into(),
                checksum,
                size: 1,
            },
            weights_commitment: checksum,
            embedding_commitment: embedding_commitment(&embedding),
            decryption_key_commitment: key.commitment(),
        },
    )
    .await
    .unwrap();
    c.advance_epoch().await.unwrap();
    c.send(
        owner,
        TxKind::RevealModel {
            model_id: id,
            decryption_key: key.to_base58(),
            embedding,
        },
    )
    .await
    .unwrap();
    id
}

fn data_manifest(size: u64) -> Manifest {
    Manifest {
        url: "http://127.0.0.1/data".into(),
        checksum: Commitment::of_bytes(b"data"),
        size,
    }
}

#[tokio::test]
async fn targets_submissions_and_claims() {
    let params = Params {
        embedding_dim: 4,
        initial_targets_per_epoch: 5,
        ..Params::default()
    };
    let (c, _node, _dir) = start(params.clone()).await;
    let owner = Keypair::generate();
    let submitter = Keypair::generate();
    let claimer = Keypair::generate();
    for kp in [&owner, &owner, &submitter, &claimer] {
        c.faucet(&kp.address()).await.unwrap();
    }
    // No active model: an epoch change makes no target.
    c.advance_epoch().await.unwrap();
    assert!(c.targets("all").await.unwrap().is_empty());

    let a = active_model(&c, &owner, vec![1.0, 0.0, 0.0, 0.0], SOMA).await;
    let b = active_model(&c, &owner, vec![0.0, 1.0, 0.0, 0.0], SOMA).await;
    let pool_before = c.status().await.unwrap();
    // b's reveal epoch began with only `a` active: those 5 targets list `a` alone.
    let first_batch = c.targets("open").await.unwrap();
    assert_eq!(first_batch.len(), 5);
    assert!(first_batch.iter().all(|t| t.model_ids == vec![a]));

    c.advance_epoch().await.unwrap();
    let status = c.status().await.unwrap();
    let reward = params.emission_per_epoch * 8000 / 10_000 / 86_400;
    let open = c.targets("open").await.unwrap();
    assert_eq!(open.len(), 5, "five new targets in the new epoch");
    assert_eq!(
        c.targets("expired").await.unwrap().len(),
        5,
        "last epoch's targets expired"
    );
    for t in &open {
        assert_eq!(t.reward_pool, reward);
        assert_eq!(t.generation_epoch, status.epoch);
        assert_eq!(t.embedding.len(), 4);
        let mut ids = t.model_ids.clone();
        ids.sort();
        let mut both = vec![a, b];
        both.sort();
        assert_eq!(ids, both, "with two active models both are assigned");
    }
    assert_eq!(pool_before.accounted_supply, status.accounted_supply);
    conserved(&c).await;

    let target = &open[0];
    let threshold = target.distance_threshold;
    let submit =
        |target_id: ObjectId, model_id: ObjectId, size: u64, distance: f32, embedding: Vec<f32>| {
            TxKind::SubmitData {
                target_id,
                manifest: data_manifest(size),
                model_id,
                embedding,
                distance,
                loss: 3.5,
            }
        };
    let emb = vec![0.5, 0.5, 0.0, 0.0];
    // Refusals, one rule each.
    let stranger_model = ObjectId([9; 32]);
    assert_eq!(
        code(
            c.send(
                &submitter,
                submit(target.id, stranger_model, 100, 0.5, emb.clone())
            )
            .await
            .unwrap_err()
        ),
        "model_not_in_target"
    );
    assert_eq!(
        code(
            c.send(
                &submitter,
                submit(target.id, a, 100, threshold + 0.01, emb.clone())
            )
            .await
            .unwrap_err()
        ),
        "distance_exceeds_threshold"
    );
    assert_eq!(
        code(
            c.send(
                &submitter,
                submit(target.id, a, (1 << 20) + 1, 0.5, emb.clone())
            )
            .await
            .unwrap_err()
        ),
        "data_too_large"
    );
    assert_eq!(
        code(
            c.send(&submitter, submit(target.id, a, 100, 0.5, vec![1.0; 3]))
                .await
                .unwrap_err()
        ),
        "embedding_dimension_mismatch"
    );
    let poor = Keypair::generate();
    c.send(
        &owner,
        TxKind::Transfer {
            to: poor.address(),
            amount: 10_000,
        },
    )
    .await
    .unwrap();
    assert_eq!(
        code(
            c.send(&poor, submit(target.id, a, 1 << 20, 0.5, emb.clone()))
                .await
                .unwrap_err()
        ),
        "insufficient_bond"
    );
    assert_eq!(
        code(
            c.send(
                &submitter,
                submit(ObjectId([7; 32]), a, 100, 0.5, emb.clone())
            )
            .await
            .unwrap_err()
        ),
        "target_not_found"
    );
    let expired = c.targets("expired").await.unwrap()[0].clone();
    assert_eq!(
        code(
            c.send(&submitter, submit(expired.id, a, 100, 0.5, emb.clone()))
                .await
                .unwrap_err()
        ),
        "target_expired"
    );

    // A hit: bond held, target filled, one replacement spawned.
    let size = 1000;
    let before = c.account(&submitter.address()).await.unwrap().balance;
    let record = c
        .send(
            &submitter,
            submit(target.id, b, size, threshold, emb.clone()),
        )
        .await
        .unwrap();
    assert_eq!(record.created.len(), 1, "a replacement target");
    let fee = params.base_fee;
    let bond = size * 65;
    assert_eq!(
        c.account(&submitter.address()).await.unwrap().balance,
        before - fee - bond
    );
    let filled = c.target(&target.id).await.unwrap();
    assert!(
        matches!(filled.status, TargetStatus::Filled { fill_epoch } if fill_epoch == status.epoch)
    );
    assert_eq!(filled.bond_amount, bond);
    assert_eq!(c.targets("open").await.unwrap().len(), 5);
    assert_eq!(
        code(
            c.send(&submitter, submit(target.id, a, 100, 0.5, emb.clone()))
                .await
                .unwrap_err()
        ),
        "target_not_open"
    );
    conserved(&c).await;

    // Claims: not during the audit window (fill epoch + 1), then the split.
    assert_eq!(
        code(
            c.send(
                &claimer,
                TxKind::ClaimRewards {
                    target_id: target.id
                }
            )
            .await
            .unwrap_err()
        ),
        "audit_window_open"
    );
    c.advance_epoch().await.unwrap();
    assert_eq!(
        code(
            c.send(
                &claimer,
                TxKind::ClaimRewards {
                    target_id: target.id
                }
            )
            .await
            .unwrap_err()
        ),
        "audit_window_open"
    );
    c.advance_epoch().await.unwrap();
    let (sub0, own0, cl0) = (
        c.account(&submitter.address()).await.unwrap().balance,
        c.account(&owner.address()).await.unwrap().balance,
        c.account(&claimer.address()).await.unwrap().balance,
    );
    c.send(
        &claimer,
        TxKind::ClaimRewards {
            target_id: target.id,
        },
    )
    .await
    .unwrap();
    let model_share = reward * 4975 / 10_000;
    let claimer_share = reward * 50 / 10_000;
    let submitter_share = reward - model_share - claimer_share;
    assert_eq!(
        c.account(&submitter.address()).await.unwrap().balance,
        sub0 + submitter_share + bond
    );
    assert_eq!(
        c.account(&owner.address()).await.unwrap().balance,
        own0 + model_share
    );
    assert_eq!(
        c.account(&claimer.address()).await.unwrap().balance,
        cl0 - fee + claimer_share
    );
    assert!(
        c.target(&target.id).await.is_err(),
        "a claimed target is deleted"
    );
    // Each share is counted as the receiver's rewards (bonds and fees are not rewards).
    assert_eq!(
        c.account(&submitter.address()).await.unwrap().rewards,
        submitter_share
    );
    assert_eq!(
        c.account(&owner.address()).await.unwrap().rewards,
        model_share
    );
    assert_eq!(
        c.account(&claimer.address()).await.unwrap().rewards,
        claimer_share
    );

    // An expired open target: the claimer's 0.5%, the rest back to the emission pool.
    let pool = c.status().await.unwrap().emission_pool;
    let cl1 = c.account(&claimer.address()).await.unwrap().balance;
    c.send(
        &claimer,
        TxKind::ClaimRewards {
            target_id: expired.id,
        },
    )
    .await
    .unwrap();
    assert_eq!(
        c.account(&claimer.address()).await.unwrap().balance,
        cl1 - fee + claimer_share
    );
    assert_eq!(
        c.status().await.unwrap().emission_pool,
        pool + reward - claimer_share
    );
    let current = c.targets("open").await.unwrap()[0].clone();
    assert_eq!(
        code(
            c.send(
                &claimer,
                TxKind::ClaimRewards {
                    target_id: current.id
                }
            )
            .await
            .unwrap_err()
        ),
        "target_not_expired"
    );
    conserved(&c).await;
}
