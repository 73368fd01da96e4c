//! `somatrain model ...` and `somatrain transfer` through the real binary against a localnet
//! process: each write lands as the chain records it (read back over gRPC, fees from the
//! transactions' own effects), and failures come back with the network's error kind.

use somatrain_client::chain::ChainClient;
use somatrain_client::view::ModelState;
use somatrain_protocol::crypto::embedding_commitment;
use somatrain_protocol::transaction::{CommitModel, CreateModel, RevealModel};
use somatrain_protocol::{
    Commitment, Digest, EncryptionKey, Keypair, Manifest, ObjectId, ObjectType, SomaTensor,
    TransactionKind,
};

mod common;
use common::{GrpcLocalnet, sent_by, sent_fees};

fn somatrain(net: &GrpcLocalnet, kp: &Keypair, args: &[&str]) -> (bool, String, String) {
    common::run_as(net, kp, args)
}

async fn run(chain: &ChainClient, kp: &Keypair, kind: TransactionKind) {
    chain
        .sign_and_execute(kp, |_| kind.clone())
        .await
        .unwrap()
        .success()
        .unwrap();
}

/// A model taken through create, commit and reveal by the test itself.
async fn active_model(chain: &ChainClient, owner: &Keypair) -> ObjectId {
    let created = chain
        .sign_and_execute(owner, |_| {
            TransactionKind::CreateModel(CreateModel {
                stake_amount: 1_000_000_000,
                commission_rate: 0,
                architecture_version: 1,
            })
        })
        .await
        .unwrap()
        .success()
        .unwrap();
    let model_id = ObjectId::derive(&created.digest, 0);
    let key = EncryptionKey::generate();
    let embedding = vec![0.5, -1.0, 0.25, 2.0];
    let checksum = Commitment::of_bytes(b"weights");
    let commit = TransactionKind::CommitModel(CommitModel {
        model_id,
        manifest: Manifest {
            url: "http://127.0.0.1/weights".into(),
            checksum,
            size: 7,
        },
        weights_commitment: checksum,
        embedding_commitment: embedding_commitment(&embedding),
        decryption_key_commitment: key.commitment(),
    });
    run(chain, owner, commit).await;
    chain.advance_epoch().await.unwrap();
    let reveal = TransactionKind::RevealModel(RevealModel {
        model_id,
        decryption_key: Digest(*key.as_bytes()),
        embedding: SomaTensor::vector(&embedding),
    });
    run(chain, owner, reveal).await;
    let model = chain.model(&model_id).await.unwrap().unwrap();
    assert_eq!(model.state, ModelState::Active);
    model_id
}

async fn balance(chain: &ChainClient, kp: &Keypair) -> u64 {
    chain.balance(&kp.address()).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_management_and_transfers_land_on_chain() {
    let dir = tempfile::tempdir().unwrap();
    let net = GrpcLocalnet::start(dir.path(), &["--embedding-dim", "4"]);
    let chain = net.client();
    let (owner, staker) = (Keypair::generate(), Keypair::generate());
    for kp in [&owner, &owner, &staker] {
        chain.faucet(&kp.address()).await.unwrap();
    }
    let model_id = active_model(&chain, &owner).await;
    let id = model_id.to_string();

    // Another account stakes 0.5 SOMA exactly, then takes all of it back.
    let before = balance(&chain, &staker).await;
    let (ok, stdout, stderr) = somatrain(
        &net,
        &staker,
        &["model", "stake", "--model", &id, "--amount", "0.5"],
    );
    assert!(ok, "{stderr}");
    assert!(stdout.contains("stake 1.500000000 SOMA"), "{stdout}");
    let stakes = chain
        .owned_objects(&staker.address(), Some(ObjectType::StakedSoma))
        .await
        .unwrap();
    assert_eq!(stakes.len(), 1);
    assert_eq!(stakes[0].staked_soma().unwrap().principal, 500_000_000);
    let stake_fee = sent_fees(&chain, &staker, "AddStakeToModel").await;
    assert!(stake_fee > 0);
    assert_eq!(
        balance(&chain, &staker).await,
        before - 500_000_000 - stake_fee
    );
    let (ok, stdout, stderr) = somatrain(&net, &staker, &["model", "unstake", "--model", &id]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("stake 1.000000000 SOMA"), "{stdout}");
    assert!(
        chain
            .owned_objects(&staker.address(), Some(ObjectType::StakedSoma))
            .await
            .unwrap()
            .is_empty()
    );
    let unstake_fee = sent_fees(&chain, &staker, "WithdrawStake").await;
    assert_eq!(
        balance(&chain, &staker).await,
        before - stake_fee - unstake_fee
    );
    let (ok, _, stderr) = somatrain(&net, &staker, &["model", "unstake", "--model", &id]);
    assert!(!ok && stderr.contains("holds no StakedSoma"), "{stderr}");

    // Only the owner sets the commission; the chain says why (and charges the fee).
    let (ok, _, stderr) = somatrain(
        &net,
        &staker,
        &["model", "commission", "--model", &id, "--bps", "500"],
    );
    assert!(!ok && stderr.contains("NotModelOwner"), "{stderr}");
    let (ok, stdout, stderr) = somatrain(
        &net,
        &owner,
        &["model", "commission", "--model", &id, "--bps", "500"],
    );
    assert!(ok, "{stderr}");
    assert!(stdout.contains("500 bps from next epoch"), "{stdout}");
    let model = chain.model(&model_id).await.unwrap().unwrap();
    assert_eq!((model.commission_bps, model.next_commission_bps), (0, 500));

    let (ok, _, stderr) = somatrain(&net, &owner, &["model", "show"]);
    assert!(
        !ok && stderr.contains("--model ID or --run-dir RUN"),
        "{stderr}"
    );

    // `show` reads the same model as JSON.
    let (ok, stdout, stderr) =
        somatrain(&net, &owner, &["model", "show", "--model", &id, "--json"]);
    assert!(ok, "{stderr}");
    let shown: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(shown["next_commission_bps"], 500);
    assert_eq!(shown["state"], "active");

    // Transfers are exact to the shannon; bad amounts never reach the chain.
    let recipient = Keypair::generate().address();
    let (ok, _, stderr) = somatrain(
        &net,
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
    assert_eq!(chain.balance(&recipient).await.unwrap(), 123);
    let sent = sent_by(&chain, &owner.address()).await.len();
    for bad in ["1.0000000001", "-1", "0", "lots"] {
        let (ok, _, stderr) = somatrain(
            &net,
            &owner,
            &["transfer", "--to", &recipient.to_string(), "--amount", bad],
        );
        assert!(!ok, "{bad} was sent: {stderr}");
    }
    assert_eq!(
        sent_by(&chain, &owner.address()).await.len(),
        sent,
        "a refused amount sent nothing"
    );

    // Deactivation needs --yes, then takes the model out.
    let (ok, _, stderr) = somatrain(&net, &owner, &["model", "deactivate", "--model", &id]);
    assert!(!ok && stderr.contains("--yes"), "{stderr}");
    assert_eq!(
        chain.model(&model_id).await.unwrap().unwrap().state,
        ModelState::Active
    );
    let (ok, _, stderr) = somatrain(
        &net,
        &owner,
        &["model", "deactivate", "--model", &id, "--yes"],
    );
    assert!(ok, "{stderr}");
    assert_eq!(
        chain.model(&model_id).await.unwrap().unwrap().state,
        ModelState::Inactive
    );
}
