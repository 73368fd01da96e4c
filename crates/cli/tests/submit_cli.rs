//! The data submitter end to end on a real localnet process: a model is trained, committed and
//! revealed through the binary; targets appear; submissions hit, miss and are refused for each
//! rule; `--auto` scans a corpus; a corrupted weights download is caught by its checksum; claims
//! fail before the audit window ends and pay the exact shares after it.

use somatrain_protocol::transaction::{SubmitData, TransferCoin};
use std::path::{Path, PathBuf};
use std::process::Output;

use somatrain_client::chain::ChainClient;
use somatrain_client::view::TargetView;
use somatrain_protocol::object::{Target, TargetStatus};
use somatrain_protocol::{Keypair, ObjectId, TransactionKind};

mod common;
use common::{COMMAND_DEADLINE, OutputWithin};
use common::{GrpcLocalnet, bin, sent_fees};

fn localnet(dir: &Path, verify: bool) -> GrpcLocalnet {
    let mut flags = vec!["--embedding-dim", "16"];
    if verify {
        flags.push("--verify-submissions");
    }
    GrpcLocalnet::start(dir, &flags)
}

/// The target object itself (what the chain stores, with the winning scores).
async fn target_object(chain: &ChainClient, id: &ObjectId) -> Target {
    chain
        .object(id)
        .await
        .unwrap()
        .expect("the target exists")
        .target()
        .unwrap()
}

async fn balance(chain: &ChainClient, kp: &Keypair) -> u64 {
    chain.balance(&kp.address()).await.unwrap()
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "command failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn failed(out: Output) -> String {
    assert!(
        !out.status.success(),
        "expected a failure:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// The text of every file under `dir`, in path order.
fn walk_texts(dir: &Path) -> Vec<String> {
    let mut paths = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            if entry.file_type().unwrap().is_dir() {
                stack.push(entry.path());
            } else {
                paths.push(entry.path());
            }
        }
    }
    paths.sort();
    paths
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .collect()
}

fn cosine_distance(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let norm = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    1.0 - dot / (norm(a) * norm(b))
}

struct World {
    net: GrpcLocalnet,
    client: ChainClient,
    dir: tempfile::TempDir,
    owner: Keypair,
    weights: PathBuf,
}

impl World {
    fn submit_command(&self, kp: &Keypair, cache: &str) -> std::process::Command {
        let mut command = bin();
        command
            .args([
                "submit",
                "--cache-dir",
                self.dir.path().join(cache).to_str().unwrap(),
            ])
            .args(self.net.args())
            .env("SOMA_SECRET_KEY", kp.secret_hex())
            .env_remove("S3_BUCKET");
        command
    }

    fn submit(&self, kp: &Keypair, cache: &str, args: &[&str]) -> Output {
        self.submit_command(kp, cache)
            .args(args)
            .output_within(COMMAND_DEADLINE)
            .unwrap()
    }

    fn claim(&self, kp: &Keypair, args: &[&str]) -> String {
        ok(bin()
            .arg("claim")
            .args(self.net.chain_args())
            .args(args)
            .env("SOMA_SECRET_KEY", kp.secret_hex())
            .output_within(COMMAND_DEADLINE)
            .unwrap())
    }

    /// `status --run-dir` of the owner's run, as JSON: it also writes down what the model won.
    fn run_status(&self) -> serde_json::Value {
        let out = ok(bin()
            .args(["status", "--json", "--run-dir"])
            .arg(self.dir.path().join("run"))
            .args(self.net.chain_args())
            .output_within(COMMAND_DEADLINE)
            .unwrap());
        serde_json::from_str(out.trim()).unwrap()
    }

    async fn advance(&self) -> u64 {
        self.client.advance_epoch().await.unwrap()
    }
}

/// A model trained, committed and revealed through the binary, then an epoch change that
/// generates targets for it.
async fn world(verify: bool) -> World {
    let dir = tempfile::tempdir().unwrap();
    let net = localnet(&dir.path().join("node"), verify);
    let client = net.client();
    let owner = Keypair::generate();
    client.faucet(&owner.address()).await.unwrap();
    let run = dir.path().join("run");
    common::train_tiny(&run, &["--steps", "3", "--lr", "3e-3"]);
    let (net_args, secret) = (net.args(), owner.secret_hex());
    let publish = |verb: &str| {
        ok(bin()
            .args([verb, "--run-dir", run.to_str().unwrap()])
            .args(&net_args)
            .env("SOMA_SECRET_KEY", &secret)
            .env_remove("S3_BUCKET")
            .output_within(COMMAND_DEADLINE)
            .unwrap())
    };
    publish("commit");
    let w = World {
        client: client.clone(),
        weights: run.join("round/weights.safetensors"),
        net,
        dir,
        owner,
    };
    assert_eq!(w.advance().await, 1);
    publish("reveal");
    assert_eq!(w.advance().await, 2, "targets are generated at this change");
    w
}

fn embedding_of(weights: &Path, data: &Path) -> Vec<f32> {
    let out = ok(bin()
        .args([
            "embed",
            "--weights",
            weights.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
        ])
        .output_within(COMMAND_DEADLINE)
        .unwrap());
    serde_json::from_str(out.trim()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submitters_hit_miss_are_refused_and_claim() {
    let w = world(false).await;
    // Anyone can download the revealed weights: checked against the commitment, decrypted,
    // and they are the bytes the owner's round trained.
    let downloaded = w.dir.path().join("downloads/model.safetensors");
    ok(bin()
        .args(["model", "download", "--run-dir"])
        .arg(w.dir.path().join("run"))
        .arg("--out")
        .arg(&downloaded)
        .args(w.net.chain_args())
        .output_within(COMMAND_DEADLINE)
        .unwrap());
    assert!(
        std::fs::read(&downloaded).unwrap() == std::fs::read(&w.weights).unwrap(),
        "the downloaded weights differ from the round's"
    );
    let missing = failed(
        bin()
            .args(["model", "download", &format!("0x{}", "ab".repeat(32))])
            .arg("--out")
            .arg(w.dir.path().join("downloads/none.safetensors"))
            .args(w.net.chain_args())
            .output_within(COMMAND_DEADLINE)
            .unwrap(),
    );
    assert!(missing.contains("no model"), "{missing}");
    let targets_out = ok(bin()
        .args(["targets", "--json"])
        .args(w.net.chain_args())
        .output_within(COMMAND_DEADLINE)
        .unwrap());
    let targets: Vec<serde_json::Value> = serde_json::from_str(&targets_out).unwrap();
    assert!(targets.iter().all(|t| t["status"] == "open"));
    let targets = w.client.target_views("open").await.unwrap();
    assert_eq!(
        targets.iter().map(|t| t.id.to_string()).collect::<Vec<_>>(),
        serde_json::from_str::<Vec<serde_json::Value>>(&targets_out)
            .unwrap()
            .iter()
            .map(|t| t["id"]
                .as_str()
                .unwrap()
                .parse::<ObjectId>()
                .unwrap()
                .to_string())
            .collect::<Vec<_>>(),
        "--json lists the chain's open targets"
    );
    assert!(
        targets.len() > 10,
        "targets were generated: {}",
        targets.len()
    );
    let table = ok(bin()
        .arg("targets")
        .args(w.net.chain_args())
        .output_within(COMMAND_DEADLINE)
        .unwrap());
    assert!(
        table.contains(&format!("{} open targets", targets.len())),
        "{table}"
    );

    // Where this data lands, computed independently of `submit`: the embedding from `embed`
    // and the distance to each target by hand.
    let data = common::sources().join("optim.rs");
    let embedding = embedding_of(&w.weights, &data);
    let mut by_distance: Vec<(f64, &TargetView)> = targets
        .iter()
        .map(|t| (cosine_distance(&embedding, &t.embedding), t))
        .collect();
    by_distance.sort_by(|a, b| a.0.total_cmp(&b.0));
    let hits: Vec<&(f64, &TargetView)> = by_distance
        .iter()
        .filter(|(d, t)| *d <= t.distance_threshold as f64 - 1e-4)
        .collect();
    let miss = by_distance
        .iter()
        .rev()
        .find(|(d, t)| *d > t.distance_threshold as f64 + 1e-4)
        .expect("a target out of reach");
    assert!(
        hits.len() >= 3,
        "need three reachable targets, got {}",
        hits.len()
    );

    let submitter = Keypair::generate();
    w.client.faucet(&submitter.address()).await.unwrap();
    let data_arg = data.to_str().unwrap();

    // A miss: reported with its distance, nothing submitted, nothing paid.
    let before = balance(&w.client, &submitter).await;
    let report = ok(w.submit(
        &submitter,
        "cache",
        &[
            "--target",
            &miss.1.id.to_string(),
            "--data",
            data_arg,
            "--json",
        ],
    ));
    let report: serde_json::Value = serde_json::from_str(report.trim()).unwrap();
    assert_eq!(report["hit"], false);
    assert!(report["submitted"].is_null());
    assert!(
        (report["distance"].as_f64().unwrap() - miss.0).abs() < 1e-4,
        "{report}"
    );
    assert_eq!(balance(&w.client, &submitter).await, before);

    // A hit: uploaded, submitted, bonded; the chain records what we computed.
    let (hit_distance, hit) = (hits[0].0, hits[0].1);
    let report = ok(w.submit(
        &submitter,
        "cache",
        &[
            "--target",
            &hit.id.to_string(),
            "--data",
            data_arg,
            "--json",
        ],
    ));
    let report: serde_json::Value = serde_json::from_str(report.trim()).unwrap();
    assert_eq!(report["hit"], true, "{report}");
    assert!(report["submitted"].is_string());
    let filled = target_object(&w.client, &hit.id).await;
    assert_eq!(filled.status, TargetStatus::Filled { fill_epoch: 2 });
    assert_eq!(filled.submitter, Some(submitter.address()));
    // Anyone can download what filled it, checked against the chain's manifest.
    let fetched = w.dir.path().join("downloads/target.bin");
    let said = ok(bin()
        .args(["target", "download", &hit.id.to_string(), "--json", "--out"])
        .arg(&fetched)
        .args(w.net.chain_args())
        .output_within(COMMAND_DEADLINE)
        .unwrap());
    assert_eq!(
        std::fs::read(&fetched).unwrap(),
        std::fs::read(&data).unwrap()
    );
    let said: serde_json::Value = serde_json::from_str(said.trim()).unwrap();
    assert_eq!(
        said["model"].as_str().unwrap(),
        filled.winning_model_id.unwrap().to_string()
    );
    let unfilled = failed(
        bin()
            .args(["target", "download", &miss.1.id.to_string(), "--out"])
            .arg(w.dir.path().join("downloads/none.bin"))
            .args(w.net.chain_args())
            .output_within(COMMAND_DEADLINE)
            .unwrap(),
    );
    assert!(unfilled.contains("has not been filled"), "{unfilled}");
    assert!(!w.dir.path().join("downloads/none.bin").exists());
    let distance = filled
        .winning_distance_score
        .as_ref()
        .unwrap()
        .values()
        .unwrap()[0];
    assert!((distance as f64 - hit_distance).abs() < 1e-4);
    let size = std::fs::metadata(&data).unwrap().len();
    let data_manifest = filled.winning_data_manifest.clone().unwrap();
    assert_eq!(data_manifest.size, size);
    assert_eq!(filled.bond_amount, size * 65);
    let served = somatrain_client::http_client()
        .get(&data_manifest.url)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(
        served.as_ref(),
        std::fs::read(&data).unwrap().as_slice(),
        "the data was uploaded as is"
    );
    let score = ok(bin()
        .args([
            "score",
            "--weights",
            w.weights.to_str().unwrap(),
            "--data",
            data_arg,
            "--json",
        ])
        .output_within(COMMAND_DEADLINE)
        .unwrap());
    let score: serde_json::Value = serde_json::from_str(score.trim()).unwrap();
    let scored = score["models"][0]["loss"].as_f64().unwrap();
    let winning_loss = filled
        .winning_loss_score
        .as_ref()
        .unwrap()
        .values()
        .unwrap()[0];
    assert!((scored - winning_loss as f64).abs() < 1e-6);

    // Refusals, one per rule.
    let err = failed(w.submit(
        &submitter,
        "cache",
        &["--target", &hit.id.to_string(), "--data", data_arg],
    ));
    assert!(err.contains("is not open (filled in epoch 2)"), "{err}");
    let wrong_model = ObjectId([7; 32]).to_string();
    let err = failed(w.submit(
        &submitter,
        "cache",
        &[
            "--target",
            &hits[1].1.id.to_string(),
            "--data",
            data_arg,
            "--model",
            &wrong_model,
        ],
    ));
    assert!(err.contains("model_not_in_target"), "{err}");
    let reward_pool = hit.reward_pool;
    let big = w.dir.path().join("big.bin");
    std::fs::write(&big, vec![b'x'; (1 << 20) + 1]).unwrap();
    let err = failed(w.submit(
        &submitter,
        "cache",
        &[
            "--target",
            &hits[1].1.id.to_string(),
            "--data",
            big.to_str().unwrap(),
        ],
    ));
    assert!(err.contains("submissions hold at most 1048576"), "{err}");
    // A wallet that can pay the fee but not the bond: refused by the chain.
    let poor = Keypair::generate();
    w.client
        .sign_and_execute(&submitter, |gas| {
            TransactionKind::TransferCoin(TransferCoin {
                coin: gas[0],
                amount: Some(100_000),
                recipient: poor.address(),
            })
        })
        .await
        .unwrap()
        .success()
        .unwrap();
    let err = failed(w.submit(
        &poor,
        "cache",
        &["--target", &hits[1].1.id.to_string(), "--data", data_arg],
    ));
    assert!(err.contains("InsufficientBond"), "{err}");
    assert_eq!(
        target_object(&w.client, &hits[1].1.id).await.status,
        TargetStatus::Open
    );

    // --auto over a Hub dataset (the repository's sources as rows of a text column, on the fake
    // Hub): read in order and cut into the same pieces; a dry run submits nothing.
    let hub = somatrain_hub::fake::FakeHub::start(None, std::time::Duration::ZERO);
    let rows: Vec<Vec<Option<String>>> = walk_texts(&common::sources())
        .into_iter()
        .map(|text| vec![Some(text)])
        .collect();
    let mut files = std::collections::BTreeMap::new();
    files.insert(
        "data/train-00000-of-00001.parquet".to_string(),
        somatrain_hub::fake::Bytes::from(somatrain_hub::fake::parquet_of_strings(
            &["content"],
            &rows,
            8,
        )),
    );
    hub.add_dataset(somatrain_hub::fake::FakeDataset {
        repo: "owner/sources".into(),
        commit: "abc".into(),
        files,
        configs: None,
    });
    let dry = ok(w
        .submit_command(&submitter, "cache")
        .args(["--auto", "--dry-run", "--hf-dataset", "owner/sources"])
        .args(["--chunk-bytes", "4096", "--max-chunks", "6", "--json"])
        .env("HF_ENDPOINT", hub.endpoint())
        .output_within(COMMAND_DEADLINE)
        .unwrap());
    let dry: serde_json::Value = serde_json::from_str(dry.trim()).unwrap();
    assert_eq!(dry["chunks"], 6, "{dry}");
    assert_eq!(dry["submitted"].as_array().unwrap().len(), 0, "{dry}");
    assert!(hub.bytes_served("/datasets/owner/sources/") > 24 * 1024);

    // --auto over a corpus: at most two submissions, each to a different open target.
    let auto = ok(w.submit(
        &submitter,
        "cache",
        &[
            "--auto",
            "--corpus",
            common::sources().to_str().unwrap(),
            "--chunk-bytes",
            "4096",
            "--max-chunks",
            "6",
            "--max-submissions",
            "2",
            "--json",
        ],
    ));
    let auto: serde_json::Value = serde_json::from_str(auto.trim()).unwrap();
    let submitted = auto["submitted"].as_array().unwrap();
    assert_eq!(submitted.len(), 2, "{auto}");
    for s in submitted {
        let t = target_object(
            &w.client,
            &s["target_id"].as_str().unwrap().parse().unwrap(),
        )
        .await;
        assert_eq!(t.submitter, Some(submitter.address()));
    }

    // The weights host corrupts the file: a fresh cache refuses it by checksum; the verified
    // cache still serves.
    let still_open = w.client.target_views("open").await.unwrap()[0]
        .id
        .to_string();
    let model = w.client.model(&hit.model_ids[0]).await.unwrap().unwrap();
    let blob_name = model
        .manifest
        .as_ref()
        .unwrap()
        .url
        .rsplit('/')
        .next()
        .unwrap()
        .to_string();
    let blob = w.dir.path().join("node/blobs").join(blob_name);
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&blob, bytes).unwrap();
    let err = failed(w.submit(
        &submitter,
        "fresh-cache",
        &["--target", &still_open, "--data", data_arg, "--dry-run"],
    ));
    assert!(err.contains("does not serve the expected bytes"), "{err}");
    ok(w.submit(
        &submitter,
        "cache",
        &["--target", &still_open, "--data", data_arg, "--dry-run"],
    ));

    // Claims: not before the audit window closes (epoch fill + 2), then the exact shares.
    let out = w.claim(&submitter, &[]);
    assert!(
        out.contains("0 claimed") && out.contains("claimable from epoch 4"),
        "{out}"
    );
    assert_eq!(w.advance().await, 3);
    assert!(w.claim(&submitter, &[]).contains("0 claimed"));
    assert_eq!(w.advance().await, 4);
    let reward = reward_pool;
    let model_share = reward * 4975 / 10_000;
    // The run's status writes down the three targets its model won, shares awaiting a claim.
    let earnings = &w.run_status()["run"]["earnings"];
    assert_eq!(earnings["targets_won"], 3, "{earnings}");
    assert_eq!(earnings["pending_shannons"], 3 * model_share, "{earnings}");
    assert_eq!(earnings["claimed_shannons"], 0, "{earnings}");
    let owner_before = balance(&w.client, &w.owner).await;
    let submitter_before = balance(&w.client, &submitter).await;
    let bond_total: u64 = w
        .client
        .target_views("filled")
        .await
        .unwrap()
        .iter()
        .filter(|t| t.submitter == Some(submitter.address()))
        .map(|t| t.bond_amount)
        .sum();
    let out = w.claim(&submitter, &[]);
    assert!(out.contains("3 claimed"), "{out}");
    // Three targets with the same reward: the submitter gets its share, the claimer's share
    // and its bond back for each, less the three claim fees; the model owner its share.
    let claim_fees: u64 = sent_fees(&w.client, &submitter, "ClaimRewards").await;
    assert_eq!(
        balance(&w.client, &submitter).await,
        submitter_before + 3 * (reward - model_share) + bond_total - claim_fees
    );
    assert_eq!(
        balance(&w.client, &w.owner).await - owner_before,
        3 * model_share
    );
    // The claimed targets are gone from the chain; the run's record counts them as paid, as
    // much as the owner's balance grew.
    let earnings = &w.run_status()["run"]["earnings"];
    assert_eq!(earnings["claimed_shannons"], 3 * model_share, "{earnings}");
    assert_eq!(earnings["pending_shannons"], 0, "{earnings}");
    // Expired targets of epoch 2 are settled by anyone with --expired.
    let sweeper = Keypair::generate();
    w.client.faucet(&sweeper.address()).await.unwrap();
    let sweeper_before = balance(&w.client, &sweeper).await;
    let out = w.claim(&sweeper, &["--expired"]);
    assert!(out.contains("expired)"), "{out}");
    let sweep_fees = sent_fees(&w.client, &sweeper, "ClaimRewards").await;
    assert!(
        balance(&w.client, &sweeper).await + sweep_fees > sweeper_before,
        "the claimer's share exceeds nothing: {out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verifying_node_rescores_submissions_and_refuses_false_claims() {
    let w = world(true).await;
    let targets = w.client.target_views("open").await.unwrap();
    let data = common::sources().join("checkpoint.rs");
    let bytes = std::fs::read(&data).unwrap();
    let embedding = embedding_of(&w.weights, &data);
    let reachable: Vec<(f64, &TargetView)> = targets
        .iter()
        .map(|t| (cosine_distance(&embedding, &t.embedding), t))
        .filter(|(d, t)| *d <= t.distance_threshold as f64 - 1e-4)
        .collect();
    assert!(reachable.len() >= 2);
    let score = ok(bin()
        .args([
            "score",
            "--weights",
            w.weights.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--json",
        ])
        .output_within(COMMAND_DEADLINE)
        .unwrap());
    let loss = serde_json::from_str::<serde_json::Value>(score.trim()).unwrap()["models"][0]["loss"]
        .as_f64()
        .unwrap() as f32;
    let submitter = Keypair::generate();
    w.client.faucet(&submitter.address()).await.unwrap();
    let url = format!("{}/claim.bin", w.net.blobs);
    let put = somatrain_client::http_client()
        .put(&url)
        .body(bytes.clone())
        .send()
        .await
        .unwrap();
    assert!(put.status().is_success(), "{}", put.status());
    let manifest = somatrain_protocol::Manifest {
        url,
        checksum: somatrain_protocol::Commitment::of_bytes(&bytes),
        size: bytes.len() as u64,
    };
    let claim = |target: &TargetView, distance: f64, loss: f32, embedding: Vec<f32>| {
        let (manifest, target_id, model_id) = (manifest.clone(), target.id, target.model_ids[0]);
        move |gas: &[somatrain_protocol::ObjectRef]| {
            TransactionKind::SubmitData(SubmitData {
                target_id,
                data_manifest: manifest.clone(),
                model_id,
                embedding: somatrain_protocol::SomaTensor::vector(&embedding),
                distance_score: somatrain_protocol::SomaTensor::scalar(distance as f32),
                loss_score: somatrain_protocol::SomaTensor::vector(&[loss]),
                bond_coin: gas[0],
            })
        }
    };
    let (d, t) = reachable[0];
    let before = balance(&w.client, &submitter).await;
    // An inflated loss, and an embedding that is not the model's: both refused before
    // execution, so nothing is paid.
    let refused = |e: somatrain_client::chain::ChainError| {
        assert!(
            e.is_malformed() && e.to_string().contains("verification failed"),
            "{e}"
        );
    };
    refused(
        w.client
            .sign_and_execute(&submitter, claim(t, d, loss * 1.1, embedding.clone()))
            .await
            .unwrap_err(),
    );
    let mut other = embedding.clone();
    other.reverse();
    refused(
        w.client
            .sign_and_execute(&submitter, claim(t, d, loss, other))
            .await
            .unwrap_err(),
    );
    assert_eq!(balance(&w.client, &submitter).await, before);
    // The true values (from `score` and `embed`) are accepted, and so is `submit` itself.
    w.client
        .sign_and_execute(&submitter, claim(t, d, loss, embedding.clone()))
        .await
        .unwrap()
        .success()
        .unwrap();
    let report = ok(w.submit(
        &submitter,
        "cache",
        &[
            "--target",
            &reachable[1].1.id.to_string(),
            "--data",
            data.to_str().unwrap(),
            "--json",
        ],
    ));
    assert!(report.contains("\"submitted\":\""), "{report}");
}

/// The localnet's validator checks submitted data as the network's proxy does: data the host
/// lost during the audit window is reported, and the claim hands the bond to the validator
/// (its whole voting power is a quorum); the submitter and the model owner get nothing but the
/// claimer's share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_gone_in_the_audit_window_costs_the_bond() {
    let w = world(false).await;
    let data = common::sources().join("optim.rs");
    let embedding = embedding_of(&w.weights, &data);
    let targets = w.client.target_views("open").await.unwrap();
    let hit = targets
        .iter()
        .find(|t| cosine_distance(&embedding, &t.embedding) <= t.distance_threshold as f64 - 1e-4)
        .expect("a reachable target");
    let submitter = Keypair::generate();
    w.client.faucet(&submitter.address()).await.unwrap();
    let report = ok(w.submit(
        &submitter,
        "cache",
        &[
            "--target",
            &hit.id.to_string(),
            "--data",
            data.to_str().unwrap(),
            "--json",
        ],
    ));
    let report: serde_json::Value = serde_json::from_str(report.trim()).unwrap();
    assert_eq!(report["hit"], true, "{report}");
    let filled = target_object(&w.client, &hit.id).await;
    let bond = filled.bond_amount;
    assert!(bond > 0);
    // The fill epoch closes with the data in place: nothing to check yet.
    assert_eq!(w.advance().await, 3);
    assert!(
        target_object(&w.client, &hit.id)
            .await
            .submission_reports
            .is_empty()
    );
    // In the audit window the host loses the data; the window closes.
    let url = filled.winning_data_manifest.unwrap().url;
    let blob = w
        .dir
        .path()
        .join("node/blobs")
        .join(url.rsplit('/').next().unwrap());
    std::fs::remove_file(&blob).unwrap();
    assert_eq!(w.advance().await, 4);
    let validator = w.client.epoch_view().await.unwrap().validators[0].address;
    assert_eq!(
        target_object(&w.client, &hit.id).await.submission_reports,
        vec![validator],
        "the validator reported the submission"
    );

    let validator_before = w.client.balance(&validator).await.unwrap();
    let owner_before = balance(&w.client, &w.owner).await;
    let submitter_before = balance(&w.client, &submitter).await;
    let out = w.claim(&submitter, &[]);
    assert!(out.contains("1 claimed"), "{out}");
    assert_eq!(
        w.client.balance(&validator).await.unwrap() - validator_before,
        bond,
        "the bond went to the reporting validator"
    );
    assert_eq!(balance(&w.client, &w.owner).await, owner_before);
    let claimer_share = hit.reward_pool * 50 / 10_000;
    let fees = sent_fees(&w.client, &submitter, "ClaimRewards").await;
    assert_eq!(
        balance(&w.client, &submitter).await,
        submitter_before + claimer_share - fees,
        "the submitter, as claimer, got only the claimer's share"
    );
}
