//! No outage and no other user can cost the stake, against real processes: the blob host
//! killed with SIGKILL right after the commit (the reveal still lands, the weights go back up
//! when the host returns), another wallet's models with 1 MiB URLs inflating the system state
//! (our loop still reveals; `status` and `claim` still work), a restart after a missed reveal
//! (nothing signed, the way out named), `reveal` with the journal gone, and a journal taken to
//! another chain.

use somatrain_protocol::transaction::{CommitModel, CreateModel};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use somatrain_client::chain::ChainClient;
use somatrain_client::view::ModelState;
use somatrain_protocol::{
    Commitment, Keypair, Manifest, SHANNONS_PER_SOMA, TransactionKind, crypto::EncryptionKey,
};

mod common;
use common::{
    COMMAND_DEADLINE, GrpcLocalnet, KillOnDrop, OutputWithin, bin, sent_by, sources, succeeded,
    train_tiny,
};

/// A day-long epoch: only the admin call moves it.
const DAY_MS: &str = "86400000";

fn chain_node(dir: &Path) -> GrpcLocalnet {
    GrpcLocalnet::start(
        dir,
        &["--embedding-dim", "16", "--epoch-duration-ms", DAY_MS],
    )
}

fn journal(run_dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(run_dir.join("journal.json")).unwrap()).unwrap()
}

fn failed(out: &Output) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "expected a failure:\n{text}");
    text
}

/// A command of this wallet against `net` for the chain and `blob_url` for the weights.
fn wallet_cmd(net: &GrpcLocalnet, blob_url: &str, kp: &Keypair, args: &[&str]) -> Command {
    let mut cmd = bin();
    cmd.args(args)
        .args(net.chain_args())
        .args(["--blob-url", blob_url])
        .env("SOMA_SECRET_KEY", kp.secret_hex())
        .env_remove("S3_BUCKET");
    cmd
}

/// Trains the tiny preset 2 steps into `run_dir` and commits it with `blob_url` for the weights.
fn train_and_commit(net: &GrpcLocalnet, blob_url: &str, kp: &Keypair, run_dir: &Path) {
    train_tiny(run_dir, &["--steps", "2", "--heldout-per-mille", "200"]);
    succeeded(
        &wallet_cmd(
            net,
            blob_url,
            kp,
            &["commit", "--run-dir", run_dir.to_str().unwrap()],
        )
        .output_within(COMMAND_DEADLINE)
        .unwrap(),
    );
}

/// The state of model `id` (hex) on chain.
async fn state(chain: &ChainClient, id: &str) -> ModelState {
    chain
        .model(&id.parse().unwrap())
        .await
        .unwrap()
        .unwrap()
        .state
}

/// `somatrain status --run-dir` of this wallet.
fn status(net: &GrpcLocalnet, kp: &Keypair, run_dir: &Path) -> Output {
    bin()
        .args(["status", "--run-dir", run_dir.to_str().unwrap()])
        .args(net.chain_args())
        .env("SOMA_SECRET_KEY", kp.secret_hex())
        .output_within(COMMAND_DEADLINE)
        .unwrap()
}

/// `somatrain run` of the tiny preset: rounds of 2 steps, epochs advanced by the admin.
fn run_args(run_dir: &Path, rounds: u64) -> Vec<String> {
    let mut args: Vec<String> = ["run", "--run-dir", run_dir.to_str().unwrap()]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(["--corpus-dir".into(), sources().display().to_string()]);
    args.extend(common::TINY_SHAPE.iter().map(|s| s.to_string()));
    for flag in [
        "--heldout-per-mille",
        "200",
        "--heldout-bytes",
        "2048",
        "--steps-per-round",
        "2",
        "--advance-epochs",
        "--faucet",
        "--poll-ms",
        "100",
        "--rounds",
    ] {
        args.push(flag.into());
    }
    args.push(rounds.to_string());
    args
}

/// Waits for `what` in the journal, failing after `limit` with the daemon's output so far.
fn wait_for_journal(
    run_dir: &Path,
    limit: Duration,
    what: &str,
    seen: &std::sync::mpsc::Receiver<String>,
    check: impl Fn(&serde_json::Value) -> bool,
) {
    let deadline = Instant::now() + limit;
    let mut log = String::new();
    loop {
        while let Ok(line) = seen.try_recv() {
            log.push_str(&line);
            log.push('\n');
        }
        if std::fs::read(run_dir.join("journal.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .is_some_and(|j| check(&j))
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {limit:?}\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reveal_lands_while_the_blob_host_is_down_and_the_weights_go_back_up() {
    let dir = tempfile::tempdir().unwrap();
    let net = chain_node(&dir.path().join("chain"));
    // The blob host is a process of its own, so it can die alone.
    let host_dir = dir.path().join("host");
    let mut host = GrpcLocalnet::start(&host_dir, &[]);
    let blob_url = host.blobs.clone();
    let blob_port: u16 = blob_url
        .trim_start_matches("http://")
        .split(['/', ':'])
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let chain = net.client();
    let kp = Keypair::generate();
    chain.faucet(&kp.address()).await.unwrap();
    let run_dir = dir.path().join("run");
    train_and_commit(&net, &blob_url, &kp, &run_dir);
    let id: somatrain_protocol::ObjectId = journal(&run_dir)["model_id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let stake = chain.model(&id).await.unwrap().unwrap().stake;
    // Right after the commit the host dies, and its copy of the weights with it.
    host.kill();
    std::fs::remove_dir_all(host_dir.join("blobs")).unwrap();

    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut args = run_args(&run_dir, 1);
    args.extend(["--metrics-addr".into(), format!("127.0.0.1:{metrics_port}")]);
    let mut daemon = KillOnDrop(
        wallet_cmd(
            &net,
            &blob_url,
            &kp,
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap(),
    );
    let (lines_tx, lines) = std::sync::mpsc::channel();
    let stderr = daemon.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    // The reveal lands with the host still down.
    wait_for_journal(
        &run_dir,
        Duration::from_secs(120),
        "the reveal",
        &lines,
        |j| j["rounds_revealed"] == 1 && j["reupload"]["since_ms"].is_u64(),
    );
    assert_eq!(
        chain.model(&id).await.unwrap().unwrap().state,
        ModelState::Active
    );
    // `/metrics` and `status` say loudly that the weights are missing.
    let metrics = somatrain_client::http_client()
        .get(format!("http://127.0.0.1:{metrics_port}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("somatrain_weights_unserved{round=\"1\"} 1"),
        "{metrics}"
    );
    let shown = succeeded(&status(&net, &kp, &run_dir));
    assert!(
        shown.contains("WARNING: the weights of round 1 have been missing"),
        "{shown}"
    );
    assert!(
        daemon.try_wait().unwrap().is_none(),
        "the daemon stopped with its weights unserved"
    );

    // The host comes back on its port, empty: the daemon uploads the weights again and stops.
    let _host = GrpcLocalnet::start_with_blob_port(&host_dir, blob_port, &[]);
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = daemon.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = daemon.kill();
            let log: Vec<String> = lines.try_iter().collect();
            panic!("the daemon did not finish:\n{}", log.join("\n"));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let log: Vec<String> = lines.try_iter().collect();
    assert!(status.success(), "{}", log.join("\n"));
    let j = journal(&run_dir);
    assert!(j["reupload"].is_null(), "{j}");
    assert_eq!(j["missed_reveals"], 0);
    let model = chain.model(&id).await.unwrap().unwrap();
    assert_eq!(model.state, ModelState::Active);
    assert_eq!(model.stake, stake, "the whole stake is kept");
    // The host holds the committed bytes again, under the committed name.
    let manifest = model.manifest.clone().unwrap();
    let name = manifest.url.rsplit('/').next().unwrap();
    let hosted = std::fs::read(host_dir.join("blobs").join(name)).unwrap();
    assert_eq!(Commitment::of_bytes(&hosted), manifest.checksum);
    assert_eq!(
        sent_by(&chain, &kp.address()).await,
        [
            ("CreateModel".to_string(), true),
            ("CommitModel".to_string(), true),
            ("RevealModel".to_string(), true)
        ]
    );
}

/// Another wallet, funded only by the faucet, makes the registry large: `count` models, each
/// committed with a URL of `url_bytes`.
async fn inflate_registry(chain: &ChainClient, count: usize, url_bytes: usize) {
    let attacker = Keypair::generate();
    // A coin per model: each stake is taken from one gas coin.
    for _ in 0..=count {
        chain.faucet(&attacker.address()).await.unwrap();
    }
    let url = format!("http://127.0.0.1/{}", "a".repeat(url_bytes));
    for _ in 0..count {
        let created = chain
            .sign_and_execute(&attacker, |_| {
                TransactionKind::CreateModel(CreateModel {
                    stake_amount: SHANNONS_PER_SOMA,
                    commission_rate: 0,
                    architecture_version: 1,
                })
            })
            .await
            .unwrap()
            .success()
            .unwrap();
        let model_id = somatrain_protocol::ObjectId::derive(&created.digest, 0);
        let zero = Commitment([0; 32]);
        chain
            .sign_and_execute(&attacker, |_| {
                TransactionKind::CommitModel(CommitModel {
                    model_id,
                    manifest: Manifest {
                        url: url.clone(),
                        checksum: zero,
                        size: 1,
                    },
                    weights_commitment: zero,
                    embedding_commitment: zero,
                    decryption_key_commitment: zero,
                })
            })
            .await
            .unwrap()
            .success()
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_wallets_long_urls_stop_neither_our_reveal_nor_status_nor_claim() {
    let dir = tempfile::tempdir().unwrap();
    let net = chain_node(&dir.path().join("chain"));
    let chain = net.client();
    inflate_registry(&chain, 5, 1 << 20).await;
    // The registry now holds over 5 MiB of URLs: more than the 4 MiB a gRPC client takes
    // by default.
    let urls: usize = chain
        .epoch_view()
        .await
        .unwrap()
        .models
        .iter()
        .filter_map(|m| m.pending.as_ref())
        .map(|p| p.manifest.url.len())
        .sum();
    assert!(urls > 5 << 20, "the registry holds {urls} bytes of URLs");

    let kp = Keypair::generate();
    let run_dir = dir.path().join("run");
    let args = run_args(&run_dir, 1);
    let out = wallet_cmd(
        &net,
        &net.blobs,
        &kp,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    )
    .output_within(COMMAND_DEADLINE)
    .unwrap();
    succeeded(&out);
    let j = journal(&run_dir);
    assert_eq!(j["rounds_revealed"], 1, "{j}");
    let id: somatrain_protocol::ObjectId = j["model_id"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        chain.model(&id).await.unwrap().unwrap().state,
        ModelState::Active
    );
    let shown = succeeded(&status(&net, &kp, &run_dir));
    assert!(shown.contains(&id.to_string()), "{shown}");
    succeeded(
        &bin()
            .arg("claim")
            .args(net.chain_args())
            .env("SOMA_SECRET_KEY", kp.secret_hex())
            .output_within(COMMAND_DEADLINE)
            .unwrap(),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_after_a_missed_reveal_signs_nothing_and_names_the_way_out() {
    let dir = tempfile::tempdir().unwrap();
    let net = chain_node(&dir.path().join("chain"));
    let chain = net.client();
    let kp = Keypair::generate();
    chain.faucet(&kp.address()).await.unwrap();
    let run_dir = dir.path().join("run");
    train_and_commit(&net, &net.blobs, &kp, &run_dir);
    let id = journal(&run_dir)["model_id"].as_str().unwrap().to_string();
    // The reveal window passes without the reveal: the model goes inactive.
    chain.advance_epoch().await.unwrap();
    chain.advance_epoch().await.unwrap();
    let model = chain.model(&id.parse().unwrap()).await.unwrap().unwrap();
    assert_eq!(model.state, ModelState::Inactive);
    let before = sent_by(&chain, &kp.address()).await;

    let args = run_args(&run_dir, 2);
    let out = wallet_cmd(
        &net,
        &net.blobs,
        &kp,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    )
    .output_within(COMMAND_DEADLINE)
    .unwrap();
    let text = failed(&out);
    assert!(text.contains(&id), "{text}");
    assert!(text.contains("is inactive on chain"), "{text}");
    assert!(text.contains("--new-model"), "{text}");
    assert!(text.contains("nothing was signed"), "{text}");
    assert_eq!(
        sent_by(&chain, &kp.address()).await,
        before,
        "nothing signed"
    );

    // The way out it names works: a new model, revealed.
    let mut args = run_args(&run_dir, 1);
    args.push("--new-model".into());
    succeeded(
        &wallet_cmd(
            &net,
            &net.blobs,
            &kp,
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
        )
        .output_within(COMMAND_DEADLINE)
        .unwrap(),
    );
    let new_id = journal(&run_dir)["model_id"].as_str().unwrap().to_string();
    assert_ne!(new_id, id);
    assert_eq!(state(&chain, &new_id).await, ModelState::Active);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reveal_without_the_journal_names_the_pending_model_and_reveals_with_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let net = chain_node(&dir.path().join("chain"));
    let chain = net.client();
    let kp = Keypair::generate();
    chain.faucet(&kp.address()).await.unwrap();
    let run_dir = dir.path().join("run");
    train_and_commit(&net, &net.blobs, &kp, &run_dir);
    let run = run_dir.to_str().unwrap();
    let j = journal(&run_dir);
    let id = j["model_id"].as_str().unwrap().to_string();
    let key = j["pending"]["decryption_key"].as_str().unwrap().to_string();
    std::fs::remove_file(run_dir.join("journal.json")).unwrap();
    chain.advance_epoch().await.unwrap();

    let text = failed(
        &wallet_cmd(&net, &net.blobs, &kp, &["reveal", "--run-dir", run])
            .output_within(COMMAND_DEADLINE)
            .unwrap(),
    );
    assert!(text.contains(&id), "{text}");
    assert!(text.contains("not at hand"), "{text}");
    assert!(text.contains("--decryption-key"), "{text}");
    assert!(!text.contains(&key), "the key was printed");

    // A wrong key is refused before anything is signed.
    let wrong = EncryptionKey::generate().to_base58();
    let text = failed(
        &wallet_cmd(
            &net,
            &net.blobs,
            &kp,
            &["reveal", "--run-dir", run, "--decryption-key", &wrong],
        )
        .output_within(COMMAND_DEADLINE)
        .unwrap(),
    );
    assert!(text.contains("is not the one model"), "{text}");
    assert_eq!(sent_by(&chain, &kp.address()).await.len(), 2);

    let key_file = dir.path().join("key");
    std::fs::write(&key_file, &key).unwrap();
    let at_key = format!("@{}", key_file.display());
    let shown = succeeded(
        &wallet_cmd(
            &net,
            &net.blobs,
            &kp,
            &["reveal", "--run-dir", run, "--decryption-key", &at_key],
        )
        .output_within(COMMAND_DEADLINE)
        .unwrap(),
    );
    assert!(shown.contains(&format!("model {id} revealed")), "{shown}");
    assert_eq!(state(&chain, &id).await, ModelState::Active);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_from_another_chain_is_named_as_such_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let home = chain_node(&dir.path().join("home"));
    let other = chain_node(&dir.path().join("other"));
    let kp = Keypair::generate();
    home.client().faucet(&kp.address()).await.unwrap();
    let run_dir = dir.path().join("run");
    train_and_commit(&home, &home.blobs, &kp, &run_dir);
    let run = run_dir.to_str().unwrap();
    // The other chain is two epochs on: by its epochs alone the window would look closed.
    other.client().advance_epoch().await.unwrap();
    other.client().advance_epoch().await.unwrap();
    let text = failed(
        &wallet_cmd(&other, &home.blobs, &kp, &["reveal", "--run-dir", run])
            .output_within(COMMAND_DEADLINE)
            .unwrap(),
    );
    assert!(text.contains("was committed on chain"), "{text}");
    assert!(
        text.contains("use the run directory with the network"),
        "{text}"
    );
    assert!(!text.contains("closed"), "{text}");
    assert!(
        journal(&run_dir)["pending"]["commit_epoch"].is_u64(),
        "the round is kept"
    );
    // On its own chain it reveals.
    home.client().advance_epoch().await.unwrap();
    succeeded(
        &wallet_cmd(&home, &home.blobs, &kp, &["reveal", "--run-dir", run])
            .output_within(COMMAND_DEADLINE)
            .unwrap(),
    );
}
