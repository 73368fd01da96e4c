//! `somatrain submitter` against a localnet process and models our trainer made: hits
//! submitted across epochs and never twice, a SIGKILL between submitting and claiming, claims at
//! the first epoch allowed with the exact shares, the weights cache kept across restarts, a
//! target filled by someone else first, and a bucket that refuses uploads.

use somatrain_protocol::transaction::SubmitData;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use somatrain_client::chain::ChainClient;
use somatrain_protocol::{Keypair, ObjectId};

mod common;
use common::{COMMAND_DEADLINE, GrpcLocalnet, OutputWithin, bin, executed_by, sent_fees};

/// A localnet with one model trained, committed and revealed by the binary; targets are
/// generated at the change to epoch 2.
struct World {
    net: GrpcLocalnet,
    chain: ChainClient,
    dir: tempfile::TempDir,
}

async fn world() -> World {
    let dir = tempfile::tempdir().unwrap();
    let net = GrpcLocalnet::start(&dir.path().join("node"), &["--embedding-dim", "16"]);
    let chain = net.client();
    let owner = Keypair::generate();
    chain.faucet(&owner.address()).await.unwrap();
    let run = dir.path().join("run");
    common::train_tiny(&run, &["--steps", "3", "--lr", "3e-3"]);
    for verb in ["commit", "reveal"] {
        let out = bin()
            .args([verb, "--run-dir", run.to_str().unwrap()])
            .args(net.args())
            .env("SOMA_SECRET_KEY", owner.secret_hex())
            .env_remove("S3_BUCKET")
            .output_within(COMMAND_DEADLINE)
            .unwrap();
        assert!(
            out.status.success(),
            "{verb}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        chain.advance_epoch().await.unwrap();
    }
    World { net, chain, dir }
}

impl World {
    fn submitter(&self, kp: &Keypair, state: &str, extra: &[&str]) -> Command {
        self.submitter_to(kp, state, &self.net.blobs, extra)
    }

    /// As [`World::submitter`], uploading to `blob_url` instead of the localnet's host.
    fn submitter_to(&self, kp: &Keypair, state: &str, blob_url: &str, extra: &[&str]) -> Command {
        let mut cmd = bin();
        cmd.arg("submitter")
            .args(["--state-dir", self.path(state).to_str().unwrap()])
            .args(["--cache-dir", self.path("cache").to_str().unwrap()])
            .args(["--corpus-dir", common::sources().to_str().unwrap()])
            .args(["--piece-bytes", "2048", "--poll-ms", "200", "--json"])
            .args(self.net.chain_args())
            .args(["--blob-url", blob_url])
            .args(extra)
            .env("SOMA_SECRET_KEY", kp.secret_hex())
            .env_remove("S3_BUCKET")
            .env_remove("SOMATRAIN_PAUSE_AT")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

fn journal(state: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(state.join("journal.json")).unwrap()).unwrap()
}

/// The hits of a journal by state name.
fn states(state: &Path) -> Vec<(String, String)> {
    journal(state)["hits"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(id, h)| {
            (
                id.clone(),
                h["state"]["state"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// A running submitter; its stderr is collected on a thread.
struct Running {
    child: Child,
    stderr: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Running {
    fn start(mut cmd: Command) -> Running {
        let mut child = cmd.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Running {
            child,
            stderr: rx,
            seen: Vec::new(),
        }
    }

    /// Waits (at most `limit`) for a stderr line containing `text`.
    fn wait_for(&mut self, text: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !self.seen.iter().any(|l| l.contains(text)) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(_) => {
                    let _ = self.child.kill();
                    panic!(
                        "no line with {text:?} within {limit:?}; saw:\n{}",
                        self.seen.join("\n")
                    );
                }
            }
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM: the submitter stops after the current piece and transaction.
    fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits (at most `limit`) for the process to exit on its own; its stdout.
    fn finish(mut self, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                while let Ok(line) = self.stderr.recv_timeout(Duration::from_millis(100)) {
                    self.seen.push(line);
                }
                let mut out = String::new();
                std::io::Read::read_to_string(&mut self.child.stdout.take().unwrap(), &mut out)
                    .unwrap();
                assert!(
                    status.success(),
                    "the submitter failed:\n{}",
                    self.seen.join("\n")
                );
                return out;
            }
            if Instant::now() > deadline {
                self.kill();
                panic!(
                    "the submitter did not exit within {limit:?}:\n{}",
                    self.seen.join("\n")
                );
            }
            while let Ok(line) = self.stderr.try_recv() {
                self.seen.push(line);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.kill();
    }
}

fn summary(stdout: &str) -> serde_json::Value {
    let line = stdout
        .lines()
        .rfind(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no summary in {stdout}"));
    serde_json::from_str(line).unwrap()
}

/// Waits until `check` holds for the journal, at most `limit`.
fn until(state: &Path, limit: Duration, what: &str, check: impl Fn(&[(String, String)]) -> bool) {
    let deadline = Instant::now() + limit;
    loop {
        if state.join("journal.json").exists() && check(&states(state)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within {limit:?}: {:?}",
            states(state)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits (at most 180 s) until the journal counts `pieces` scored, nothing is queued or being
/// submitted, and `check` holds: a run's scoring is over and its submissions are settled.
fn until_scored(
    state: &Path,
    pieces: u64,
    what: &str,
    check: impl Fn(&[(String, String)], &serde_json::Value) -> bool,
) {
    until(
        state,
        Duration::from_secs(180),
        &format!("{pieces} pieces and {what}"),
        |s| {
            let j = journal(state);
            j["totals"]["pieces_scored"].as_u64() == Some(pieces)
                && !s.iter().any(|(_, st)| st == "queued" || st == "submitting")
                && check(s, &j)
        },
    );
}

async fn balance(chain: &ChainClient, kp: &Keypair) -> u64 {
    chain.balance(&kp.address()).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submits_across_epochs_survives_sigkill_and_claims_exactly() {
    let w = world().await;
    let kp = Keypair::generate();
    // Eighteen coins: more than the 16 the submitter keeps before it merges them.
    for _ in 0..18 {
        w.chain.faucet(&kp.address()).await.unwrap();
    }
    let start_balance = balance(&w.chain, &kp).await;
    let state = w.path("state");
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();

    let run_with = |pause: &str| {
        let mut cmd = w.submitter(
            &kp,
            "state",
            &[
                "--max-pieces",
                "40",
                "--max-submissions-per-epoch",
                "3",
                "--progress-secs",
                "1",
                "--metrics-addr",
                &format!("127.0.0.1:{metrics_port}"),
            ],
        );
        cmd.env("SOMATRAIN_PAUSE_AT", pause);
        let mut running = Running::start(cmd);
        running.wait_for(&format!("PAUSED AT {pause}"), Duration::from_secs(120));
        running
    };
    let submit_data = |sent: &[(
        somatrain_protocol::TransactionData,
        somatrain_client::chain::Executed,
    )]| {
        sent.iter()
            .filter(|(data, _)| data.kind.name() == "SubmitData")
            .count()
    };

    // First run: killed with SIGKILL once its first SubmitData is signed and journaled, before
    // it is sent.
    let mut first = run_with("submitter-journaled");
    first.kill();
    assert_eq!(
        states(&state)
            .iter()
            .filter(|(_, s)| s == "submitting")
            .count(),
        1,
        "{:?}",
        states(&state)
    );
    assert_eq!(submit_data(&executed_by(&w.chain, &kp.address()).await), 0);

    // Second run: sends the journaled transaction (its coin is still current), then submits
    // another and is killed right after that one is journaled as done.
    let mut second = run_with("submitter-submitted");
    // The metrics endpoint answers while it runs.
    let metrics = tokio::time::timeout(Duration::from_secs(20), async {
        somatrain_client::http_client()
            .get(format!("http://127.0.0.1:{metrics_port}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    })
    .await
    .expect("/metrics answers within 20 s");
    assert!(
        metrics.contains("somatrain_submitter_submissions_total 2"),
        "{metrics}"
    );
    second.kill();
    let scored_before = journal(&state)["totals"]["pieces_scored"].as_u64().unwrap();
    let after_kill = states(&state);
    assert_eq!(
        after_kill.iter().filter(|(_, s)| s == "submitted").count(),
        2,
        "{after_kill:?}"
    );
    assert_eq!(submit_data(&executed_by(&w.chain, &kp.address()).await), 2);

    // Third run: the same state; it resumes, submits up to the epoch's limit of three, then
    // waits for the claims.
    let third = Running::start(w.submitter(
        &kp,
        "state",
        &["--max-pieces", "40", "--max-submissions-per-epoch", "3"],
    ));
    // Its 40 pieces scored (so none is scored against the next epoch's targets) and three
    // submissions made.
    until_scored(&state, scored_before + 40, "three submissions", |s, _| {
        s.iter().filter(|(_, st)| st == "submitted").count() == 3
    });
    // Not claimable before epoch fill + 2 = 4.
    assert_eq!(w.chain.advance_epoch().await.unwrap(), 3);
    std::thread::sleep(Duration::from_secs(1));
    assert!(states(&state).iter().all(|(_, s)| s != "claimed"));
    assert_eq!(w.chain.advance_epoch().await.unwrap(), 4);
    let out = third.finish(Duration::from_secs(120));
    let summary = summary(&out);
    assert_eq!(summary["submissions"], 3, "{summary}");
    assert_eq!(summary["claims"], 3, "{summary}");
    assert_eq!(summary["bond_outstanding"], 0, "{summary}");
    assert_eq!(
        summary["weights_downloads"], 0,
        "the restarted submitter found the weights in its cache: {summary}"
    );

    // On chain: three SubmitData to three distinct targets, none twice, and three claims, all
    // in epoch 4, the first the chain allows.
    let sent = executed_by(&w.chain, &kp.address()).await;
    let mut submitted: Vec<ObjectId> = sent
        .iter()
        .filter(|(_, e)| e.effects.status.is_success())
        .filter_map(|(data, _)| match &data.kind {
            somatrain_protocol::TransactionKind::SubmitData(SubmitData { target_id, .. }) => {
                Some(*target_id)
            }
            _ => None,
        })
        .collect();
    assert_eq!(submitted.len(), 3);
    submitted.sort();
    submitted.dedup();
    assert_eq!(submitted.len(), 3, "a target was submitted to twice");
    let claims: Vec<u64> = sent
        .iter()
        .filter(|(data, e)| data.kind.name() == "ClaimRewards" && e.effects.status.is_success())
        .map(|(_, e)| e.effects.executed_epoch)
        .collect();
    assert_eq!(claims, vec![4, 4, 4]);

    // The coins were merged once (the SDK's way: the smallest sent to ourselves, the others
    // merged into the gas), in the first epoch.
    let merges: Vec<u64> = sent
        .iter()
        .filter(|(data, e)| data.kind.name() == "TransferCoin" && e.effects.status.is_success())
        .map(|(_, e)| e.effects.executed_epoch)
        .collect();
    assert_eq!(merges, vec![2], "{merges:?}");
    let coins = w
        .chain
        .owned_objects(&kp.address(), Some(somatrain_protocol::ObjectType::Coin))
        .await
        .unwrap();
    assert!(coins.len() < 18, "{} coins", coins.len());

    // The exact arithmetic: each claim returns the bond, the submitter's share and remainder
    // and the claimer's incentive (everything but the model's 49.75%), less its fee.
    let j = journal(&state);
    let mut bonds = 0u64;
    let hits: Vec<&serde_json::Value> = j["hits"].as_object().unwrap().values().collect();
    // Hits past the epoch's limit of three were dropped, never sent.
    let (claimed, dropped): (Vec<_>, Vec<_>) = hits
        .into_iter()
        .partition(|h| h["state"]["state"] == "claimed");
    assert_eq!(claimed.len(), 3);
    for hit in &dropped {
        assert_eq!(hit["state"]["state"], "dropped", "{hit}");
        assert!(
            hit["state"]["reason"]
                .as_str()
                .unwrap()
                .contains("limit of 3 submissions"),
            "{hit}"
        );
    }
    for hit in claimed {
        let st = &hit["state"];
        assert_eq!(st["epoch"], 4);
        let bond = st["bond"].as_u64().unwrap();
        assert_eq!(bond, hit["size"].as_u64().unwrap() * 65);
        let reward = hit["reward_pool"].as_u64().unwrap();
        let digest: somatrain_protocol::TxDigest = st["digest"].as_str().unwrap().parse().unwrap();
        let claim = w.chain.transaction(&digest).await.unwrap().unwrap();
        let fee = claim.effects.fee.total_fee as i128;
        let expected = (reward - reward * 4975 / 10_000 + bond) as i128 - fee;
        assert_eq!(st["received"].as_i64().unwrap() as i128, expected, "{hit}");
        bonds += bond;
    }
    // The wallet moved by exactly what the journal says: fees of every transaction out,
    // claims in (bonds went out and came back).
    let fees: u64 = sent.iter().map(|(_, e)| e.effects.fee.total_fee).sum();
    let claim_fees = sent_fees(&w.chain, &kp, "ClaimRewards").await;
    let net_claims: i128 = j["totals"]["claimed_shannons"].as_i64().unwrap() as i128;
    assert_eq!(
        balance(&w.chain, &kp).await as i128,
        start_balance as i128 - (fees - claim_fees) as i128 - bonds as i128 + net_claims,
    );

    // Later epochs, the same state: epoch 4's new targets are scored and one is submitted
    // (this run's limit), then claimed in epoch 6.
    let scored_before = journal(&state)["totals"]["pieces_scored"].as_u64().unwrap();
    let fourth = Running::start(w.submitter(
        &kp,
        "state",
        &["--max-pieces", "3", "--max-submissions-per-epoch", "1"],
    ));
    // Its three pieces scored before the epoch moves on (so none meets epoch 5's targets),
    // and its one submission made.
    until_scored(
        &state,
        scored_before + 3,
        "a submission in epoch 4",
        |_, j| {
            j["hits"]
                .as_object()
                .unwrap()
                .values()
                .any(|h| h["state"]["fill_epoch"] == 4)
        },
    );
    assert_eq!(w.chain.advance_epoch().await.unwrap(), 5);
    assert_eq!(w.chain.advance_epoch().await.unwrap(), 6);
    let later = crate::summary(&fourth.finish(Duration::from_secs(120)));
    assert_eq!(later["submissions"], 4, "{later}");
    assert_eq!(later["claims"], 4, "{later}");
    assert_eq!(later["bond_outstanding"], 0, "{later}");
    let claims: Vec<u64> = executed_by(&w.chain, &kp.address())
        .await
        .iter()
        .filter(|(data, e)| data.kind.name() == "ClaimRewards" && e.effects.status.is_success())
        .map(|(_, e)| e.effects.executed_epoch)
        .collect();
    assert_eq!(claims, vec![4, 4, 4, 6]);
}

/// A bucket that refuses every request (403, as S3 does for a wrong key): uploads fail fast.
async fn refusing_bucket() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = axum::Router::new()
        .fallback(|| async { (axum::http::StatusCode::FORBIDDEN, "AccessDenied") });
    tokio::spawn(async move { axum::serve(listener, router).await });
    format!("http://{addr}/v1/blobs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_filled_first_and_a_failing_bucket_lose_nothing() {
    let w = world().await;
    let kp = Keypair::generate();
    w.chain.faucet(&kp.address()).await.unwrap();
    let start_balance = balance(&w.chain, &kp).await;
    let state = w.path("state");

    // A dry run scores and reports hits, needs no bucket and sends nothing.
    let out = Running::start(w.submitter_to(
        &kp,
        "dry",
        "http://127.0.0.1:1/v1/blobs",
        &["--max-pieces", "2", "--dry-run"],
    ))
    .finish(Duration::from_secs(120));
    let dry = summary(&out);
    assert!(dry["hits"].as_u64().unwrap() > 0, "{dry}");
    assert_eq!(dry["submissions"], 0, "{dry}");
    assert_eq!(dry["dropped"], dry["hits"], "{dry}");
    assert_eq!(dry["run"]["pieces"], 2, "{dry}");

    // One piece scored; its hits queued; the transaction task held before it submits any.
    let mut cmd = w.submitter(&kp, "state", &["--max-pieces", "1"]);
    cmd.env("SOMATRAIN_PAUSE_AT", "submitter-before-submit");
    let mut held = Running::start(cmd);
    held.wait_for(
        "PAUSED AT submitter-before-submit",
        Duration::from_secs(120),
    );
    held.kill();
    let j = journal(&state);
    let mut queued: Vec<&serde_json::Value> = j["hits"]
        .as_object()
        .unwrap()
        .values()
        .filter(|h| h["state"]["state"] == "queued")
        .collect();
    assert!(queued.len() >= 2, "{j}");
    queued.sort_by(|a, b| {
        a["distance"]
            .as_f64()
            .unwrap()
            .total_cmp(&b["distance"].as_f64().unwrap())
    });
    // Someone else fills the closest one (the one the submitter would send first) with the
    // same piece.
    let first = queued[0]["target_id"].as_str().unwrap().to_string();
    let piece = state
        .join("pieces")
        .join(format!("{}.bin", queued[0]["piece"].as_str().unwrap()));
    let rival = Keypair::generate();
    w.chain.faucet(&rival.address()).await.unwrap();
    let out = bin()
        .args([
            "submit",
            "--target",
            &first,
            "--data",
            piece.to_str().unwrap(),
        ])
        .args(["--cache-dir", w.path("rival-cache").to_str().unwrap()])
        .args(w.net.args())
        .env("SOMA_SECRET_KEY", rival.secret_hex())
        .env_remove("S3_BUCKET")
        .output_within(COMMAND_DEADLINE)
        .unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("submitted"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Restarted against a bucket that refuses uploads: the filled target is refused without a
    // transaction; the next upload fails and its hits stay queued; nothing is sent.
    let bucket = refusing_bucket().await;
    let mut failing = Running::start(w.submitter_to(&kp, "state", &bucket, &["--max-pieces", "0"]));
    failing.wait_for("the upload failed", Duration::from_secs(120));
    failing.terminate();
    let out = failing.finish(Duration::from_secs(60));
    let stopped = summary(&out);
    assert_eq!(stopped["refused"], 1, "{stopped}");
    assert_eq!(stopped["submissions"], 0, "{stopped}");
    assert!(
        stopped["upload_failures"].as_u64().unwrap() >= 1,
        "{stopped}"
    );
    let j = journal(&state);
    let refused = &j["hits"][first.as_str()]["state"];
    assert_eq!(refused["state"], "refused", "{refused}");
    assert!(
        refused["reason"]
            .as_str()
            .unwrap()
            .contains("someone else filled it"),
        "{refused}"
    );
    assert_eq!(
        states(&state).iter().filter(|(_, s)| s == "queued").count(),
        queued.len() - 1,
        "every other hit is still queued"
    );
    assert!(executed_by(&w.chain, &kp.address()).await.is_empty());
    assert_eq!(
        balance(&w.chain, &kp).await,
        start_balance,
        "no bond, no fee"
    );

    // The bucket works again: the kept hits are submitted (one, the epoch's limit here).
    let working = Running::start(w.submitter(
        &kp,
        "state",
        &["--max-pieces", "0", "--max-submissions-per-epoch", "1"],
    ));
    until(&state, Duration::from_secs(120), "a submission", |s| {
        s.iter().any(|(_, st)| st == "submitted") && !s.iter().any(|(_, st)| st == "queued")
    });
    working.terminate();
    let summary = summary(&working.finish(Duration::from_secs(60)));
    assert_eq!(summary["submissions"], 1, "{summary}");
    assert_eq!(summary["refused"], 1, "{summary}");
    let sent = executed_by(&w.chain, &kp.address()).await;
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].0.kind.name(), "SubmitData");
    assert!(sent[0].1.effects.status.is_success());
}
