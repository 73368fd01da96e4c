//! The publishing loop through the real binary against a real localnet process with short
//! epochs: several rounds through an S3 bucket (moto on 127.0.0.1), `kill -9` of the daemon at
//! every phase boundary, a bucket that stops serving the committed bytes, and the one-command
//! localnet cycle.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use somatrain_client::chain::ChainClient;
use somatrain_client::view::ModelState;
use somatrain_protocol::{EncryptionKey, Keypair, ObjectId};

mod common;
use common::{COMMAND_DEADLINE, OutputWithin};
use common::{GrpcLocalnet, bin, sent_by};

fn localnet(dir: &Path, epoch_ms: u64) -> GrpcLocalnet {
    GrpcLocalnet::start(
        dir,
        &[
            "--embedding-dim",
            "16",
            "--epoch-duration-ms",
            &epoch_ms.to_string(),
        ],
    )
}

/// `somatrain run` for the tiny preset with short rounds.
fn daemon(run_dir: &Path, net: &[String], secret: &str, rounds: u64) -> Command {
    daemon_with_rounds_of(run_dir, net, secret, rounds, 2)
}

/// `somatrain run` for the tiny preset with `steps` optimizer steps per round.
fn daemon_with_rounds_of(
    run_dir: &Path,
    net: &[String],
    secret: &str,
    rounds: u64,
    steps: u64,
) -> Command {
    let mut cmd = bin();
    cmd.args(["run", "--run-dir", run_dir.to_str().unwrap()])
        .args(net)
        .args(["--corpus-dir", common::sources().to_str().unwrap()])
        .args(common::TINY_SHAPE)
        .args(["--lr", "3e-3"])
        .args([
            "--heldout-per-mille",
            "200",
            "--heldout-bytes",
            "2048",
            "--seed",
            "3",
        ])
        .args(["--steps-per-round", &steps.to_string()])
        .args(["--rounds", &rounds.to_string()])
        .args(["--faucet", "--poll-ms", "100"])
        .env("SOMA_SECRET_KEY", secret)
        .env_remove("S3_BUCKET")
        .stdout(Stdio::null());
    cmd
}

fn wait_for(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the daemon did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits (at most a minute) until the run's journal shows its round committed.
fn wait_for_commit(run_dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read(run_dir.join("journal.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .is_some_and(|j| j["pending"]["commit_epoch"].is_u64())
    {
        assert!(Instant::now() < deadline, "no commit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn journal(run_dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(run_dir.join("journal.json")).unwrap()).unwrap()
}

fn model_id(run_dir: &Path) -> ObjectId {
    journal(run_dir)["model_id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// The end state of a healthy loop after `rounds` rounds: exactly one create, and one commit
/// and one reveal per round, all successful (counted from the chain's checkpoints), nothing
/// pending, the model active.
async fn assert_clean_end(chain: &ChainClient, run_dir: &Path, kp: &Keypair, rounds: u64) {
    let j = journal(run_dir);
    assert_eq!(j["rounds_revealed"], rounds, "journal: {j}");
    assert_eq!(j["missed_reveals"], 0, "journal: {j}");
    assert!(
        j["pending"].is_null() && j["inflight"].is_null(),
        "journal: {j}"
    );
    let model = chain.model(&model_id(run_dir)).await.unwrap().unwrap();
    assert_eq!(model.state, ModelState::Active);
    assert!(model.pending.is_none());
    let sent = sent_by(chain, &kp.address()).await;
    let mut expected = vec![("CreateModel".to_string(), true)];
    for _ in 0..rounds {
        expected.push(("CommitModel".to_string(), true));
        expected.push(("RevealModel".to_string(), true));
    }
    assert_eq!(
        sent, expected,
        "exactly one commit and one reveal per round"
    );
    // rounds.jsonl: one line per round, whatever was killed on the way, each naming the reveal
    // the chain executed.
    let reveals: Vec<String> = common::executed_by(chain, &kp.address())
        .await
        .into_iter()
        .filter(|(data, _)| data.kind.name() == "RevealModel")
        .map(|(_, executed)| executed.digest.to_string())
        .collect();
    let lines: Vec<serde_json::Value> =
        somatrain_train::history::read_all(&run_dir.join("rounds.jsonl")).unwrap();
    let rounds_seen: Vec<u64> = lines.iter().map(|l| l["round"].as_u64().unwrap()).collect();
    assert_eq!(rounds_seen, (1..=rounds).collect::<Vec<u64>>(), "{lines:?}");
    let digests: Vec<String> = lines
        .iter()
        .map(|l| l["reveal_digest"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(digests, reveals);
    for line in &lines {
        assert_eq!(
            line["reveal_epoch"].as_u64().unwrap(),
            line["commit_epoch"].as_u64().unwrap() + 1,
            "{line}"
        );
    }
}

/// The published weights are what was trained: download, decrypt with the revealed key, load.
async fn assert_revealed_weights_load(chain: &ChainClient, id: &ObjectId) {
    let model = chain.model(id).await.unwrap().unwrap();
    let manifest = model.manifest.expect("revealed");
    let mut bytes = somatrain_client::http_client()
        .get(&manifest.url)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .to_vec();
    assert_eq!(bytes.len() as u64, manifest.size);
    assert_eq!(
        somatrain_protocol::Commitment::of_bytes(&bytes),
        manifest.checksum
    );
    let key = EncryptionKey::from_bytes(model.decryption_key.unwrap().0);
    somatrain_protocol::crypto::apply_keystream(&key, &mut bytes);
    let weights = somatrain_model::io::load_bytes(&bytes, Default::default())
        .expect("the revealed weights load");
    assert_eq!(weights.config.embedding_dim, 16);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_loop_runs_several_epochs_through_an_s3_bucket() {
    let moto = somatrain_storage::testing::MotoServer::start("weights").await;
    let dir = tempfile::tempdir().unwrap();
    let net = localnet(&dir.path().join("node"), 2500);
    let kp = Keypair::generate();
    let run_dir = dir.path().join("run");
    let mut cmd = daemon(&run_dir, &net.chain_args(), &kp.secret_hex(), 3);
    // Port 0: the daemon binds a free port and logs it, so no other process can take it first.
    cmd.args(["--metrics-addr", "127.0.0.1:0"]);
    cmd.envs(moto.env()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut logs = Logs::of(&mut child);
    // The status page's address is logged first, then the metrics address.
    logs.wait_for("status page on http://", COMMAND_DEADLINE);
    let line = logs.wait_for("status page on http://", COMMAND_DEADLINE);
    let metrics_addr = line
        .split_once("status page on http://")
        .and_then(|(_, rest)| rest.split('/').next())
        .unwrap_or_else(|| panic!("no address in {line}"))
        .to_string();
    // The metrics endpoint answers while the loop runs.
    let http = somatrain_client::http_client();
    let deadline = Instant::now() + Duration::from_secs(20);
    let metrics = loop {
        if let Ok(r) = http
            .get(format!("http://{metrics_addr}/metrics"))
            .send()
            .await
        {
            break r.text().await.unwrap();
        }
        assert!(Instant::now() < deadline, "no /metrics at {metrics_addr}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        metrics.contains("# TYPE somatrain_phase gauge"),
        "{metrics}"
    );
    assert!(metrics.contains("somatrain_rounds_revealed "), "{metrics}");
    let status = wait_for(&mut child, Duration::from_secs(150));
    let logs = logs.all();
    assert!(status.success(), "daemon failed:\n{logs}");
    assert!(
        !logs.contains(&kp.secret_hex()) && !logs.contains("test-secret"),
        "a secret reached the logs"
    );
    let client = net.client();
    assert_clean_end(&client, &run_dir, &kp, 3).await;
    let model = client.model(&model_id(&run_dir)).await.unwrap().unwrap();
    assert!(
        model
            .manifest
            .as_ref()
            .unwrap()
            .url
            .starts_with(&moto.endpoint()),
        "weights in the bucket"
    );
    assert_revealed_weights_load(&client, &model.id).await;
    // Three reveals, each in the epoch after its commit: at least three epoch changes.
    let j = journal(&run_dir);
    let last = &j["last_revealed"];
    assert_eq!(
        last["reveal_epoch"].as_u64().unwrap(),
        last["commit_epoch"].as_u64().unwrap() + 1
    );
    assert!(client.epoch_view().await.unwrap().epoch >= 3);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(run_dir.join("journal.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "the journal holds keys before reveal");
    }
}

/// Every point where the daemon hands something to the network or the disk.
const BOUNDARIES: [&str; 8] = [
    "create-journaled",
    "create-sent",
    "trained",
    "uploaded",
    "commit-journaled",
    "commit-sent",
    "reveal-journaled",
    "reveal-sent",
];

/// Starts the daemon paused at `boundary`, kills it there with SIGKILL, restarts it, and
/// checks the end state: no double commit, no missed reveal.
async fn crash_at(net: Vec<String>, chain: ChainClient, root: PathBuf, boundary: &'static str) {
    let kp = Keypair::generate();
    let run_dir = root.join(boundary);
    let mut first = daemon(&run_dir, &net, &kp.secret_hex(), 2)
        .env("SOMATRAIN_PAUSE_AT", boundary)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(first.stderr.take().unwrap());
    let mut line = String::new();
    let mut seen = String::new();
    loop {
        line.clear();
        if stderr.read_line(&mut line).unwrap() == 0 {
            panic!("{boundary}: the daemon ended before pausing:\n{seen}");
        }
        seen.push_str(&line);
        if line.contains(&format!("PAUSED AT {boundary}")) {
            break;
        }
    }
    first.kill().unwrap(); // SIGKILL
    first.wait().unwrap();
    let mut second = daemon(&run_dir, &net, &kp.secret_hex(), 2)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut logs = String::new();
    let mut err = second.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        err.read_to_string(&mut logs).unwrap();
        logs
    });
    let status = wait_for(&mut second, Duration::from_secs(150));
    let logs = reader.join().unwrap();
    assert!(
        status.success(),
        "{boundary}: the restarted daemon failed:\n{logs}"
    );
    assert_clean_end(&chain, &run_dir, &kp, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_dash_nine_at_every_phase_boundary_neither_double_commits_nor_misses_a_reveal() {
    let dir = tempfile::tempdir().unwrap();
    let net = localnet(&dir.path().join("node"), 3000);
    let mut tasks = Vec::new();
    for boundary in BOUNDARIES {
        tasks.push(tokio::spawn(crash_at(
            net.args(),
            net.client(),
            dir.path().to_path_buf(),
            boundary,
        )));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

async fn advance(client: &ChainClient) -> u64 {
    client.advance_epoch().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_and_reveal_commands_reupload_weights_the_host_lost() {
    let dir = tempfile::tempdir().unwrap();
    // A day-long epoch: only the admin call moves it.
    let net = localnet(&dir.path().join("node"), 86_400_000);
    let client = net.client();
    let kp = Keypair::generate();
    for _ in 0..2 {
        client.faucet(&kp.address()).await.unwrap();
    }
    let run_dir = dir.path().join("run");
    common::train_tiny(&run_dir, &["--steps", "2", "--heldout-per-mille", "200"]);
    let publish = |verb: &str, extra: &[&str]| {
        bin()
            .args([verb, "--run-dir", run_dir.to_str().unwrap()])
            .args(net.args())
            .args(extra)
            .env("SOMA_SECRET_KEY", kp.secret_hex())
            .env_remove("S3_BUCKET")
            .output_within(COMMAND_DEADLINE)
            .unwrap()
    };
    let early = publish("reveal", &[]);
    assert!(String::from_utf8_lossy(&early.stdout).contains("nothing committed"));
    let commit = publish("commit", &[]);
    let log = String::from_utf8_lossy(&commit.stderr).to_string();
    assert!(commit.status.success(), "{log}");
    // Without a terminal the upload is reported as log lines, the last at 100%.
    assert!(
        log.lines()
            .any(|l| l.contains("INFO upload ") && l.contains("(100%)")),
        "{log}"
    );
    let out = String::from_utf8_lossy(&commit.stdout).to_string();
    assert!(out.contains("committed in epoch 0"), "{out}");
    // A second commit before the reveal is refused, and so is a reveal in the commit epoch.
    let again = publish("commit", &[]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("not revealed yet"));
    let too_soon = publish("reveal", &[]);
    assert!(!too_soon.status.success());
    assert!(String::from_utf8_lossy(&too_soon.stderr).contains("opens with the next epoch"));
    // Status shows the loop's state, never the key that is still secret.
    let key = journal(&run_dir)["pending"]["decryption_key"]
        .as_str()
        .unwrap()
        .to_string();
    let status = bin()
        .args(["status", "--run-dir", run_dir.to_str().unwrap()])
        .args(net.chain_args())
        .env("SOMA_SECRET_KEY", kp.secret_hex())
        .output_within(COMMAND_DEADLINE)
        .unwrap();
    let shown = String::from_utf8_lossy(&status.stdout).to_string();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(shown.contains("loop: awaiting_reveal"), "{shown}");
    assert!(
        shown.contains("training: step 2 (last loss")
            && shown.contains("corpus epoch 0 at sequence 4"),
        "{shown}"
    );
    assert!(
        shown.contains("round 1 committed in epoch 0, reveal due in epoch 1"),
        "{shown}"
    );
    assert!(shown.contains("next deadline: reveal within"), "{shown}");
    assert!(!shown.contains(&key), "the pending key was shown");
    // With the node out of reach, the run's part (the reveal deadline above all) still shows,
    // and the exit code says the chain's part failed.
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let offline = bin()
        .args(["status", "--run-dir", run_dir.to_str().unwrap()])
        .args(["--network", &format!("http://{closed_port}")])
        .env("SOMA_SECRET_KEY", kp.secret_hex())
        .output_within(COMMAND_DEADLINE)
        .unwrap();
    let shown = String::from_utf8_lossy(&offline.stdout).to_string();
    let stderr = String::from_utf8_lossy(&offline.stderr).to_string();
    assert_eq!(offline.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("Connection refused"), "{stderr}");
    assert!(shown.contains("chain: unavailable"), "{shown}");
    assert!(shown.contains("next deadline: reveal within"), "{shown}");
    assert!(!shown.contains(&key) && !stderr.contains(&key));
    // The host loses the weights: the reveal uploads them again first.
    let blobs = net.dir.join("blobs");
    let blob = std::fs::read_dir(&blobs)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let original = std::fs::read(&blob).unwrap();
    std::fs::remove_file(&blob).unwrap();
    assert_eq!(advance(&client).await, 1);
    let reveal = publish("reveal", &[]);
    assert!(
        reveal.status.success(),
        "{}",
        String::from_utf8_lossy(&reveal.stderr)
    );
    assert!(String::from_utf8_lossy(&reveal.stderr).contains("uploading them again"));
    assert_eq!(std::fs::read(&blob).unwrap(), original);
    let id = model_id(&run_dir);
    assert_eq!(
        client.model(&id).await.unwrap().unwrap().state,
        ModelState::Active
    );
    assert_revealed_weights_load(&client, &id).await;
    // The validators check the re-uploaded weights as the epoch closes: nothing is reported,
    // and the model keeps its whole stake.
    let stake_before = client.model(&id).await.unwrap().unwrap().stake;
    assert_eq!(advance(&client).await, 2);
    let model = client.model(&id).await.unwrap().unwrap();
    assert_eq!(model.state, ModelState::Active);
    assert_eq!(model.stake, stake_before);
}

/// Publishes one round of `run_dir` on `net` (commit, epoch change, reveal) as `kp`.
async fn publish_round(net: &GrpcLocalnet, kp: &Keypair, run_dir: &Path) -> ObjectId {
    let client = net.client();
    client.faucet(&kp.address()).await.unwrap();
    common::train_tiny(run_dir, &["--steps", "2", "--heldout-per-mille", "200"]);
    for verb in ["commit", "reveal"] {
        let out = bin()
            .args([verb, "--run-dir", run_dir.to_str().unwrap()])
            .args(net.args())
            .env("SOMA_SECRET_KEY", kp.secret_hex())
            .env_remove("S3_BUCKET")
            .output_within(COMMAND_DEADLINE)
            .unwrap();
        common::succeeded(&out);
        if verb == "commit" {
            advance(&client).await;
        }
    }
    model_id(run_dir)
}

fn delete_blobs(net: &GrpcLocalnet) {
    for entry in std::fs::read_dir(net.dir.join("blobs")).unwrap() {
        std::fs::remove_file(entry.unwrap().path()).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_gone_after_the_reveal_are_reported_and_slashed() {
    let dir = tempfile::tempdir().unwrap();
    let net = localnet(&dir.path().join("node"), 86_400_000);
    let client = net.client();
    let kp = Keypair::generate();
    let id = publish_round(&net, &kp, &dir.path().join("run")).await;
    let model = client.model(&id).await.unwrap().unwrap();
    assert_eq!(model.state, ModelState::Active);
    let stake = model.stake;
    // Right after the reveal the host loses the weights; the epoch closes.
    delete_blobs(&net);
    assert_eq!(advance(&client).await, 2);
    let model = client.model(&id).await.unwrap().unwrap();
    assert_eq!(model.state, ModelState::Inactive);
    // The tally slash: 95% of the pool, as the network's `model_tally_slash_rate_bps`.
    assert_eq!(model.stake, stake - stake * 9_500 / 10_000);
    // The report came from the validator, on the chain.
    let validator: somatrain_protocol::Address =
        client.epoch_view().await.unwrap().validators[0].address;
    let reports = sent_by(&client, &validator).await;
    assert_eq!(
        reports,
        vec![("ReportModel".to_string(), true)],
        "{reports:?}"
    );

    // The same loss on a localnet without weight checks changes nothing.
    let quiet = GrpcLocalnet::start(
        &dir.path().join("quiet"),
        &["--embedding-dim", "16", "--no-weight-checks"],
    );
    let id = publish_round(&quiet, &kp, &dir.path().join("run2")).await;
    delete_blobs(&quiet);
    let client = quiet.client();
    assert_eq!(advance(&client).await, 2);
    assert_eq!(
        client.model(&id).await.unwrap().unwrap().state,
        ModelState::Active
    );
}

#[test]
fn localnet_cycle_ends_with_an_active_model_and_a_second_run_trains_further() {
    let dir = tempfile::tempdir().unwrap();
    let cycle = |rounds: &str| {
        bin()
            .args([
                "localnet-cycle",
                "--dir",
                dir.path().to_str().unwrap(),
                "--preset",
                "tiny",
            ])
            .args([
                "--corpus-dir",
                common::sources().to_str().unwrap(),
                "--seq-len",
                "64",
            ])
            .args(["--steps-per-round", "2", "--rounds", rounds])
            .output_within(COMMAND_DEADLINE)
            .unwrap()
    };
    let first = cycle("1");
    let stdout = String::from_utf8_lossy(&first.stdout).to_string();
    assert!(
        first.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(stdout.contains("model active"), "{stdout}");
    assert!(stdout.contains("rounds revealed: 1"), "{stdout}");
    // The submitter's side: with 100 targets at the initial threshold (1.05), a chunk lands.
    assert!(
        stdout.contains("submitted a hit to target") && stdout.contains("claimed target"),
        "{stdout}"
    );
    assert!(stdout.contains("balance: started "), "{stdout}");
    let second = cycle("1");
    let stdout = String::from_utf8_lossy(&second.stdout).to_string();
    assert!(
        second.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&second.stderr)
    );
    assert!(stdout.contains("rounds revealed: 2"), "{stdout}");
    assert!(
        stdout.contains("last round 2: step 4"),
        "the second round trained further: {stdout}"
    );
    // The blob host comes back on its old port, so round 1's weights URL still resolves.
    let url = |out: &std::process::Output| {
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        stderr
            .lines()
            .find_map(|l| l.split_once("(blobs at ")?.1.split([',', ' ']).next())
            .map(str::to_string)
            .unwrap_or_else(|| panic!("no localnet URL in {stderr}"))
    };
    assert_eq!(url(&first), url(&second));
}

#[test]
fn a_reveal_that_cannot_land_raises_deadline_warnings() {
    let dir = tempfile::tempdir().unwrap();
    let mut net = localnet(&dir.path().join("node"), 4000);
    let kp = Keypair::generate();
    let run_dir = dir.path().join("run");
    let mut child = daemon(&run_dir, &net.args(), &kp.secret_hex(), 1)
        .args(["--warn-before-s", "3600"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Once the commit is in, the node goes away: the reveal cannot land.
    wait_for_commit(&run_dir);
    net.kill();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "the daemon ended without warning"
        );
        if line.contains("has not landed and its window closes in") {
            break;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reveal_refused_for_good_stops_the_loop_instead_of_retrying() {
    let dir = tempfile::tempdir().unwrap();
    // A day-long epoch: only the admin call moves it, so the daemon sits waiting after its commit.
    let net = localnet(&dir.path().join("node"), 86_400_000);
    let client = net.client();
    let kp = Keypair::generate();
    let run_dir = dir.path().join("run");
    let mut first = daemon(&run_dir, &net.args(), &kp.secret_hex(), 1)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_commit(&run_dir);
    first.kill().unwrap();
    first.wait().unwrap();
    // The journal's key no longer opens what was committed: no reveal can ever match.
    let mut j = journal(&run_dir);
    j["pending"]["decryption_key"] = EncryptionKey::generate().to_base58().into();
    std::fs::write(
        run_dir.join("journal.json"),
        serde_json::to_vec(&j).unwrap(),
    )
    .unwrap();
    assert_eq!(advance(&client).await, 1);
    let mut second = daemon(&run_dir, &net.args(), &kp.secret_hex(), 1)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = second.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut logs = String::new();
        err.read_to_string(&mut logs).unwrap();
        logs
    });
    // The window is open for a day; only a loop that gives up at once ends in time.
    let status = wait_for(&mut second, Duration::from_secs(60));
    let logs = reader.join().unwrap();
    assert!(!status.success(), "{logs}");
    assert!(
        logs.contains("the reveal of round 1 cannot succeed"),
        "{logs}"
    );
    assert!(
        logs.contains("ModelDecryptionKeyCommitmentMismatch"),
        "{logs}"
    );
    assert!(!logs.contains("reveal failed, retrying"), "{logs}");
    assert!(
        journal(&run_dir)["pending"].is_object(),
        "the round stays pending"
    );
}

/// SIGINT to `localnet-cycle` in its first round's training: that step's checkpoint saved, the
/// cycle ended there (exit 0), and the same command then goes on to an active model.
#[test]
fn an_interrupted_localnet_cycle_saves_its_step_and_goes_on_when_run_again() {
    let dir = tempfile::tempdir().unwrap();
    let cycle = |steps: &str| {
        let mut cmd = bin();
        cmd.args(["localnet-cycle", "--dir", dir.path().to_str().unwrap()])
            .args(["--preset", "tiny", "--seq-len", "64"])
            .args(["--corpus-dir", common::sources().to_str().unwrap()])
            .args(["--steps-per-round", steps, "--rounds", "1"]);
        cmd
    };
    let mut child = common::KillOnDrop(
        cycle("100000")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let logs = Logs::of(&mut child.0);
    let run_dir = dir.path().join("run");
    let history = run_dir.join("history.jsonl");
    common::wait_for_logged_steps(&mut child.0, &run_dir, 2);
    common::interrupt(&child.0);
    let status = wait_for(&mut child.0, Duration::from_secs(120));
    let mut stdout = String::new();
    child
        .0
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    let stderr = logs.all();
    assert!(status.success(), "{status:?}\n{stdout}\n{stderr}");
    assert!(stdout.contains("stopped as asked"), "{stdout}\n{stderr}");
    assert!(!stdout.contains("model active"), "{stdout}");
    let logged = std::fs::read_to_string(&history).unwrap().lines().count() as u64;
    let newest = somatrain_train::checkpoint::list(&run_dir.join("checkpoints"))
        .into_iter()
        .map(|(step, _)| step)
        .max();
    assert_eq!(newest, Some(logged), "the last logged step is saved");

    // Round 1 is already past 2 steps: the next invocation commits what was trained.
    let again = cycle("2").output_within(COMMAND_DEADLINE).unwrap();
    let stdout = String::from_utf8_lossy(&again.stdout).to_string();
    assert!(
        again.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert!(stdout.contains("model active"), "{stdout}");
    assert!(
        stdout.contains(&format!("last round 1: step {logged}")),
        "{stdout}"
    );
}

/// A child's stderr, line by line, as it comes, kept whole for the failure messages.
struct Logs {
    lines: std::sync::mpsc::Receiver<String>,
    seen: String,
}

impl Logs {
    fn of(child: &mut Child) -> Logs {
        let stderr = child.stderr.take().expect("stderr piped");
        let (send, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if send.send(line).is_err() {
                    break;
                }
            }
        });
        Logs {
            lines,
            seen: String::new(),
        }
    }

    /// Waits for a line containing `needle` and returns it, failing after `limit` or at the end
    /// of the output.
    fn wait_for(&mut self, needle: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push_str(&line);
                    self.seen.push('\n');
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(e) => panic!(
                    "no line with {needle:?} ({e:?}); the output so far:\n{}",
                    self.seen
                ),
            }
        }
    }

    /// Everything the child wrote, once it has ended.
    fn all(mut self) -> String {
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(10)) {
            self.seen.push_str(&line);
            self.seen.push('\n');
        }
        self.seen
    }
}

/// SIGINT to `run` costs nothing: in training, the round stops at its step with the checkpoint
/// saved and nothing is sent to the chain; with a round committed, the loop stays up until the
/// window opens, reveals, and only then ends, without committing the round it was training;
/// the same command then goes on to a clean end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_loop_commits_nothing_new_and_reveals_what_it_committed_before_ending() {
    let dir = tempfile::tempdir().unwrap();
    // A day-long epoch: only the admin call moves it, so a committed round waits for the test.
    let net = localnet(&dir.path().join("node"), 86_400_000);
    let client = net.client();

    // In the first round's training: nothing staked, the last logged step saved.
    let kp = Keypair::generate();
    let run_dir = dir.path().join("training");
    let mut child = common::KillOnDrop(
        daemon_with_rounds_of(&run_dir, &net.args(), &kp.secret_hex(), 1, 100_000)
            .args(["--checkpoint-minutes", "60"])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut logs = Logs::of(&mut child.0);
    let history = run_dir.join("history.jsonl");
    common::wait_for_logged_steps(&mut child.0, &run_dir, 2);
    common::interrupt(&child.0);
    logs.wait_for("stopped as asked", COMMAND_DEADLINE);
    let status = wait_for(&mut child.0, Duration::from_secs(60));
    let text = logs.all();
    assert!(status.success(), "{status:?}\n{text}");
    assert!(text.contains("training stopped after step"), "{text}");
    let logged = std::fs::read_to_string(&history).unwrap().lines().count() as u64;
    let saved: Vec<u64> = somatrain_train::checkpoint::list(&run_dir.join("checkpoints"))
        .into_iter()
        .map(|(step, _)| step)
        .collect();
    assert_eq!(
        saved,
        [logged],
        "the last logged step is saved, and only it"
    );
    assert!(journal(&run_dir)["model_id"].is_null(), "no model created");
    assert!(sent_by(&client, &kp.address()).await.is_empty());

    // With a round committed: the loop stays up for its reveal, then ends.
    let kp = Keypair::generate();
    let run_dir = dir.path().join("committed");
    let mut child = common::KillOnDrop(
        daemon(&run_dir, &net.args(), &kp.secret_hex(), 3)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut logs = Logs::of(&mut child.0);
    wait_for_commit(&run_dir);
    common::interrupt(&child.0);
    logs.wait_for("staying up to reveal it", Duration::from_secs(60));
    assert!(
        child.0.try_wait().unwrap().is_none(),
        "the loop ended before its reveal:\n{}",
        logs.seen
    );
    assert_eq!(advance(&client).await, 1);
    let status = wait_for(&mut child.0, Duration::from_secs(60));
    let text = logs.all();
    assert!(status.success(), "{status:?}\n{text}");
    assert!(text.contains("stopped as asked"), "{text}");
    let j = journal(&run_dir);
    assert_eq!(j["rounds_revealed"], 1, "{j}");
    assert!(j["pending"].is_null(), "{j}");
    assert_eq!(j["phase"], "stopped", "{j}");
    let sent: Vec<String> = sent_by(&client, &kp.address())
        .await
        .into_iter()
        .map(|(kind, ok)| {
            assert!(ok, "{kind} failed");
            kind
        })
        .collect();
    assert_eq!(sent, ["CreateModel", "CommitModel", "RevealModel"]);

    // The same command goes on from there to a clean end.
    let mut again = daemon(&run_dir, &net.args(), &kp.secret_hex(), 2)
        .arg("--advance-epochs")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let logs = Logs::of(&mut again);
    let status = wait_for(&mut again, Duration::from_secs(150));
    assert!(status.success(), "{}", logs.all());
    assert_clean_end(&client, &run_dir, &kp, 2).await;
}
