//! `somatrain strategy` against a localnet process: its estimate of a model's share of new
//! targets is held against the node's own assignment of hundreds of generated targets, with
//! unequal stakes, and with fewer models than `models_per_target`.

use somatrain_client::chain::ChainClient;
use somatrain_protocol::assignment::target_embedding;
use somatrain_protocol::crypto::embedding_commitment;
use somatrain_protocol::transaction::{CommitModel, CreateModel, RevealModel};
use somatrain_protocol::{
    Commitment, Digest, EncryptionKey, Keypair, Manifest, ObjectId, SHANNONS_PER_SOMA, SomaTensor,
    TransactionKind,
};

mod common;
use common::{COMMAND_DEADLINE, GrpcLocalnet, OutputWithin, bin};

const DIM: usize = 8;

async fn run(chain: &ChainClient, kp: &Keypair, kind: TransactionKind) -> ObjectId {
    let executed = chain
        .sign_and_execute(kp, |_| kind.clone())
        .await
        .unwrap()
        .success()
        .unwrap();
    ObjectId::derive(&executed.digest, 0)
}

/// A model created with `stake` SOMA and committed to `embedding`; revealed by [`reveal`].
struct Committed {
    owner: Keypair,
    id: ObjectId,
    key: EncryptionKey,
    embedding: Vec<f32>,
}

async fn commit(chain: &ChainClient, stake_soma: u64, embedding: Vec<f32>) -> Committed {
    let owner = Keypair::generate();
    chain.faucet(&owner.address()).await.unwrap();
    let id = run(
        chain,
        &owner,
        TransactionKind::CreateModel(CreateModel {
            stake_amount: stake_soma * SHANNONS_PER_SOMA,
            commission_rate: 0,
            architecture_version: 1,
        }),
    )
    .await;
    let key = EncryptionKey::generate();
    let checksum = Commitment::of_bytes(b"weights");
    run(
        chain,
        &owner,
        TransactionKind::CommitModel(CommitModel {
            model_id: id,
            manifest: Manifest {
                url: "http://127.0.0.1/weights".into(),
                checksum,
                size: 7,
            },
            weights_commitment: checksum,
            embedding_commitment: embedding_commitment(&embedding),
            decryption_key_commitment: key.commitment(),
        }),
    )
    .await;
    Committed {
        owner,
        id,
        key,
        embedding,
    }
}

async fn reveal(chain: &ChainClient, m: &Committed) {
    run(
        chain,
        &m.owner,
        TransactionKind::RevealModel(RevealModel {
            model_id: m.id,
            decryption_key: Digest(*m.key.as_bytes()),
            embedding: SomaTensor::vector(&m.embedding),
        }),
    )
    .await;
}

fn strategy(net: &GrpcLocalnet, args: &[&str]) -> serde_json::Value {
    let out = bin()
        .arg("strategy")
        .args(net.chain_args())
        .args(args)
        .arg("--json")
        .output_within(COMMAND_DEADLINE)
        .unwrap();
    common::succeeded(&out);
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Advances one epoch and returns (targets generated at the change, those assigned to `model`).
async fn generate(chain: &ChainClient, model: &ObjectId) -> (u64, u64) {
    let epoch = chain.advance_epoch().await.unwrap();
    let targets: Vec<_> = chain
        .target_views("open")
        .await
        .unwrap()
        .into_iter()
        .filter(|t| t.generation_epoch == epoch)
        .collect();
    let ours = targets
        .iter()
        .filter(|t| t.model_ids.contains(model))
        .count();
    (targets.len() as u64, ours as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_estimate_agrees_with_the_nodes_own_assignment() {
    let dir = tempfile::tempdir().unwrap();
    let net = GrpcLocalnet::start(
        dir.path(),
        &[
            "--embedding-dim",
            &DIM.to_string(),
            "--faucet-amount",
            &(100 * SHANNONS_PER_SOMA).to_string(),
            // The models publish no real weights: this test is about assignment.
            "--no-weight-checks",
        ],
    );
    let chain = net.client();
    // Fixed embeddings: target seeds come from epoch numbers, so the whole test is
    // deterministic and the comparison cannot flake.
    let ours = commit(&chain, 9, target_embedding(1000, DIM)).await;
    let first_rival = commit(&chain, 1, target_embedding(1001, DIM)).await;
    assert_eq!(chain.advance_epoch().await.unwrap(), 1);
    reveal(&chain, &first_rival).await;

    // One rival and three seats: the newcomer is on every target, exactly.
    let embedding_file = dir.path().join("ours.json");
    std::fs::write(
        &embedding_file,
        serde_json::to_vec(&ours.embedding).unwrap(),
    )
    .unwrap();
    let few = strategy(
        &net,
        &[
            "--embedding",
            embedding_file.to_str().unwrap(),
            "--stake",
            "9",
        ],
    );
    assert_eq!(few["everyone_is_assigned"], true, "{few}");
    assert!(
        few["note"].as_str().unwrap().contains("fewer than"),
        "{few}"
    );
    assert_eq!(few["estimates"][0]["rate"], 1.0);
    assert_eq!(few["estimates"][0]["exact"], true);
    reveal(&chain, &ours).await;
    // Five more rivals with unequal stakes, revealed next epoch.
    let mut rivals = Vec::new();
    for (k, stake) in [2u64, 4, 16, 64, 3].into_iter().enumerate() {
        rivals.push(commit(&chain, stake, target_embedding(2000 + k as u64, DIM)).await);
    }
    let (generated, assigned) = generate(&chain, &ours.id).await;
    assert!(generated >= 50, "only {generated} targets were generated");
    assert_eq!(
        assigned, generated,
        "with two active models every target goes to both"
    );
    for r in &rivals {
        reveal(&chain, r).await;
    }

    // Seven active models, three seats, stakes 1 to 64: the estimate for our model (the
    // field without it) against what the node then assigns.
    let report = strategy(
        &net,
        &[
            "--model",
            &ours.id.to_string(),
            "--samples",
            "20000",
            "--seed",
            "5",
        ],
    );
    assert_eq!(report["everyone_is_assigned"], false, "{report}");
    assert_eq!(report["rivals"], 6, "{report}");
    let estimate = &report["estimates"][0];
    assert_eq!(estimate["stake_shannons"], 9 * SHANNONS_PER_SOMA);
    let rate = estimate["rate"].as_f64().unwrap();
    let strategy_se = estimate["standard_error"].as_f64().unwrap();
    let (mut generated, mut assigned) = (0, 0);
    for _ in 0..6 {
        let (g, a) = generate(&chain, &ours.id).await;
        generated += g;
        assigned += a;
    }
    assert!(generated >= 300, "only {generated} targets were generated");
    let node_rate = assigned as f64 / generated as f64;
    let node_se = (node_rate * (1.0 - node_rate) / generated as f64).sqrt();
    let se = (strategy_se.powi(2) + node_se.powi(2)).sqrt();
    eprintln!(
        "strategy {rate:.4} ± {strategy_se:.4}; node {assigned}/{generated} = {node_rate:.4} ± \
         {node_se:.4}"
    );
    assert!(
        rate > 0.05 && rate < 0.95,
        "a rate of {rate} tests little; choose other stakes"
    );
    assert!(
        (rate - node_rate).abs() <= 3.0 * se,
        "strategy says {rate} ± {strategy_se}; the node assigned {assigned} of {generated} \
         ({node_rate} ± {node_se})"
    );
    // The rivals it shares targets with are real models, and the expected numbers follow.
    let shared = estimate["shares_targets_with"].as_array().unwrap();
    assert!(!shared.is_empty());
    let rival_ids: Vec<String> = rivals
        .iter()
        .chain([&first_rival])
        .map(|r| r.id.to_string())
        .collect();
    assert!(
        shared
            .iter()
            .all(|s| rival_ids.contains(&s["model"].as_str().unwrap().to_string()))
    );
    let per_epoch = &estimate["per_epoch"];
    let targets = per_epoch["targets_per_epoch"].as_f64().unwrap();
    assert_eq!(targets, 100.0, "{per_epoch}");
    assert!((per_epoch["assigned_per_epoch"].as_f64().unwrap() - rate * targets).abs() < 1e-9);

    // More stake never lowers the share, and the search's best is at least as good.
    let swept = strategy(
        &net,
        &[
            "--model",
            &ours.id.to_string(),
            "--stake",
            "1,9,81",
            "--search",
            "8",
            "--samples",
            "4000",
            "--out",
            dir.path().join("best.json").to_str().unwrap(),
        ],
    );
    let rates: Vec<f64> = swept["estimates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["rate"].as_f64().unwrap())
        .collect();
    assert!(rates[0] <= rates[1] && rates[1] <= rates[2], "{rates:?}");
    let best: Vec<f32> =
        serde_json::from_slice(&std::fs::read(dir.path().join("best.json")).unwrap()).unwrap();
    assert_eq!(best.len(), DIM);
    assert_eq!(swept["search"]["candidates"], 9);
}

#[test]
fn a_wrong_embedding_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let net = GrpcLocalnet::start(dir.path(), &["--embedding-dim", "8"]);
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, b"[1.0, 2.0]").unwrap();
    let out = bin()
        .arg("strategy")
        .args(net.chain_args())
        .args(["--embedding", bad.to_str().unwrap()])
        .output_within(COMMAND_DEADLINE)
        .unwrap();
    // No model is active: every newcomer is assigned, which needs no estimate, but the
    // dimension is still checked.
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("2 values") && stderr.contains("8"),
        "{stderr}"
    );
}
