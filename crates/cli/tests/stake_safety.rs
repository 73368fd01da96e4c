//! Nothing a user types, and no broken round, puts the stake at risk: against a localnet
//! process, each of these ends with an error and nothing sent by the wallet (read from the
//! chain's checkpoints): a run with a refused setting, a commit with a damaged `round.json`,
//! weights holding a NaN, an embedding of the wrong length; and a lost journal with a pending
//! model on chain stops `commit` naming that model. Unpublished files are private.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Output;

use somatrain_protocol::Keypair;

mod common;
use common::{COMMAND_DEADLINE, OutputWithin};
use common::{GrpcLocalnet, bin, sent_by, sources, train_tiny};

fn train(run: &Path) {
    train_tiny(run, &["--steps", "2"]);
}

fn as_wallet(net: &GrpcLocalnet, kp: &Keypair, args: &[&str]) -> Output {
    bin()
        .args(args)
        .args(net.args())
        .env("SOMA_SECRET_KEY", kp.secret_hex())
        .env_remove("S3_BUCKET")
        .output_within(COMMAND_DEADLINE)
        .unwrap()
}

fn failed_with(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected a failure: {stderr}");
    assert!(stderr.contains(needle), "{needle:?} not in: {stderr}");
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_reaches_the_chain_until_every_check_passes() {
    let dir = tempfile::tempdir().unwrap();
    let net = GrpcLocalnet::start(&dir.path().join("node"), &["--embedding-dim", "16"]);
    let chain = net.client();
    let kp = Keypair::generate();
    chain.faucet(&kp.address()).await.unwrap();
    let funded = chain.balance(&kp.address()).await.unwrap();

    // A refused setting: `run` stops before training, funding or creating anything.
    let run_dir = dir.path().join("refused");
    let out = as_wallet(
        &net,
        &kp,
        &[
            "run",
            "--run-dir",
            run_dir.to_str().unwrap(),
            "--preset",
            "tiny",
            "--corpus-dir",
            sources().to_str().unwrap(),
            "--lr",
            "NaN",
            "--rounds",
            "1",
        ],
    );
    failed_with(&out, "--lr");
    assert!(!run_dir.join("settings.json").exists());

    let run = dir.path().join("run");
    train(&run);
    let round_json = run.join("round/round.json");
    let good_round = std::fs::read(&round_json).unwrap();

    // A damaged round.json: commit creates nothing.
    std::fs::write(&round_json, b"{ not json").unwrap();
    let out = as_wallet(&net, &kp, &["commit", "--run-dir", run.to_str().unwrap()]);
    failed_with(&out, "round.json");
    std::fs::write(&round_json, &good_round).unwrap();

    // Weights holding a NaN: refused naming the tensor.
    let round: serde_json::Value = serde_json::from_slice(&good_round).unwrap();
    // round.json names its weights relative to the run directory.
    let weights_path = run.join(round["weights"].as_str().unwrap());
    let mut weights = somatrain_model::io::load_file(&weights_path, Default::default()).unwrap();
    weights.tensors_mut()[3].1[7] = f32::NAN;
    let nan_weights = dir.path().join("nan.safetensors");
    somatrain_model::io::save_file(&weights, &nan_weights).unwrap();
    let out = as_wallet(
        &net,
        &kp,
        &[
            "commit",
            "--run-dir",
            run.to_str().unwrap(),
            "--weights",
            nan_weights.to_str().unwrap(),
        ],
    );
    failed_with(&out, "is not publishable weights");
    failed_with(&out, "non-finite");

    // An embedding of the wrong length for this chain.
    let short = dir.path().join("short.json");
    std::fs::write(&short, "[0.1, 0.2, 0.3]").unwrap();
    let out = as_wallet(
        &net,
        &kp,
        &[
            "commit",
            "--run-dir",
            run.to_str().unwrap(),
            "--embedding",
            short.to_str().unwrap(),
        ],
    );
    failed_with(&out, "this chain takes 16");

    assert!(
        sent_by(&chain, &kp.address()).await.is_empty(),
        "nothing was sent"
    );
    assert_eq!(chain.balance(&kp.address()).await.unwrap(), funded);

    // A good commit: unpublished weights and the journal are private.
    let out = as_wallet(&net, &kp, &["commit", "--run-dir", run.to_str().unwrap()]);
    common::succeeded(&out);
    for private_dir in ["round", "checkpoints", "publish"] {
        assert_eq!(mode(&run.join(private_dir)), 0o700, "{private_dir}");
    }
    assert_eq!(mode(&run.join("round/weights.safetensors")), 0o600);
    assert_eq!(mode(&run.join("journal.json")), 0o600);
    for entry in std::fs::read_dir(run.join("publish")).unwrap() {
        assert_eq!(mode(&entry.unwrap().path()), 0o600);
    }
    let model_id = serde_json::from_slice::<serde_json::Value>(
        &std::fs::read(run.join("journal.json")).unwrap(),
    )
    .unwrap()["model_id"]
        .as_str()
        .unwrap()
        .to_string();

    // The journal is lost: a second commit stops, naming the pending model, instead of
    // creating another one.
    std::fs::remove_file(run.join("journal.json")).unwrap();
    let out = as_wallet(&net, &kp, &["commit", "--run-dir", run.to_str().unwrap()]);
    failed_with(&out, &model_id);
    failed_with(&out, "--new-model");
    let sent: Vec<String> = sent_by(&chain, &kp.address())
        .await
        .into_iter()
        .map(|(kind, _)| kind)
        .collect();
    assert_eq!(sent, ["CreateModel", "CommitModel"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_that_does_not_improve_enough_is_trained_on_not_committed() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let net = GrpcLocalnet::start(&dir.path().join("node"), &["--embedding-dim", "16"]);
    let chain = net.client();
    let kp = Keypair::generate();
    let run = dir.path().join("run");
    let mut child = bin()
        .args(["run", "--run-dir", run.to_str().unwrap()])
        .args(common::TINY_SHAPE)
        .args(["--corpus-dir", sources().join("../..").to_str().unwrap()])
        .args(["--include", "**/*.rs", "--heldout-per-mille", "200"])
        .args([
            "--heldout-bytes",
            "2048",
            "--steps-per-round",
            "2",
            "--rounds",
            "2",
        ])
        // No round can be 100 nats better than the last: the second is never committed.
        .args([
            "--min-improvement",
            "100",
            "--faucet",
            "--advance-epochs",
            "--poll-ms",
            "100",
        ])
        .args(net.args())
        .env("SOMA_SECRET_KEY", kp.secret_hex())
        .env_remove("S3_BUCKET")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let (lines_tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let mut refusals = 0;
    let mut seen = String::new();
    while refusals < 2 {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = lines
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no second refusal within 120 s:\n{seen}"));
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("is not 100 below the last revealed round's") {
            refusals += 1;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let sent: Vec<String> = sent_by(&chain, &kp.address())
        .await
        .into_iter()
        .map(|(kind, _)| kind)
        .collect();
    assert_eq!(
        sent,
        ["CreateModel", "CommitModel", "RevealModel"],
        "{seen}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_is_published_with_its_own_weights_wherever_its_run_directory_moved() {
    let dir = tempfile::tempdir().unwrap();
    let net = GrpcLocalnet::start(&dir.path().join("node"), &["--embedding-dim", "16"]);
    let chain = net.client();
    let kp = Keypair::generate();
    chain.faucet(&kp.address()).await.unwrap();
    let runs = dir.path().join("runs");
    let (a, b) = (runs.join("a"), runs.join("b"));
    train(&a);
    std::fs::rename(&a, &b).unwrap();
    train_tiny(&a, &["--steps", "2", "--seed", "7"]);
    let b_weights = std::fs::read(b.join("round/weights.safetensors")).unwrap();
    assert_ne!(
        b_weights,
        std::fs::read(a.join("round/weights.safetensors")).unwrap()
    );

    // From another working directory, with a relative --run-dir.
    let out = bin()
        .current_dir(&runs)
        .args(["commit", "--run-dir", "b"])
        .args(net.args())
        .env("SOMA_SECRET_KEY", kp.secret_hex())
        .env_remove("S3_BUCKET")
        .output_within(COMMAND_DEADLINE)
        .unwrap();
    common::succeeded(&out);
    // What went up is b's own weights: decrypted, they are its file byte for byte.
    let journal: serde_json::Value =
        serde_json::from_slice(&std::fs::read(b.join("journal.json")).unwrap()).unwrap();
    let pending = &journal["pending"];
    let decrypted = dir.path().join("decrypted.safetensors");
    let out = bin()
        .args([
            "decrypt",
            "--key",
            pending["decryption_key"].as_str().unwrap(),
        ])
        .arg(pending["encrypted"].as_str().unwrap())
        .arg(&decrypted)
        .output_within(COMMAND_DEADLINE)
        .unwrap();
    common::succeeded(&out);
    assert_eq!(std::fs::read(&decrypted).unwrap(), b_weights);

    // Weights another run put in a round's place are refused before anything is signed.
    let c = runs.join("c");
    train(&c);
    std::fs::copy(
        a.join("round/weights.safetensors"),
        c.join("round/weights.safetensors"),
    )
    .unwrap();
    let out = as_wallet(&net, &kp, &["commit", "--run-dir", c.to_str().unwrap()]);
    failed_with(&out, "is not the file this round wrote");
    let sent: Vec<String> = sent_by(&chain, &kp.address())
        .await
        .into_iter()
        .map(|(kind, _)| kind)
        .collect();
    assert_eq!(sent, ["CreateModel", "CommitModel"]);
}
