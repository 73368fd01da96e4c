//! End-to-end training through the real binary: a run killed with SIGKILL at arbitrary moments
//! (many of them inside a checkpoint write) and restarted ends bit-identical to a run that was
//! never interrupted.

mod common;
use common::{COMMAND_DEADLINE, OutputWithin};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn corpus() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../train/src")
}

fn train(run_dir: &Path, pause_ms: u64) -> Command {
    let mut cmd = common::bin();
    cmd.args([
        "train",
        "--run-dir",
        run_dir.to_str().unwrap(),
        "--preset",
        "tiny",
    ])
    .args([
        "--corpus-dir",
        corpus().to_str().unwrap(),
        "--seq-len",
        "128",
    ])
    .args([
        "--micro-batch",
        "2",
        "--accumulation",
        "2",
        "--until-step",
        "12",
    ])
    .args([
        "--checkpoint-every",
        "1",
        "--keep-checkpoints",
        "2",
        "--dropout",
        "0.1",
    ])
    .args([
        "--lr",
        "3e-3",
        "--heldout-per-mille",
        "200",
        "--heldout-bytes",
        "4096",
        "--seed",
        "5",
    ])
    .env("SOMATRAIN_CHECKPOINT_PAUSE_MS", pause_ms.to_string())
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    cmd
}

fn final_files(run_dir: &Path) -> Vec<(String, Vec<u8>)> {
    let ckpt = run_dir.join("checkpoints/step-0000000012");
    ["weights.safetensors", "optimizer.safetensors", "state.json"]
        .iter()
        .map(|f| {
            (
                format!("checkpoint {f}"),
                std::fs::read(ckpt.join(f)).unwrap(),
            )
        })
        .chain(std::iter::once((
            "round weights".to_string(),
            std::fs::read(run_dir.join("round/weights.safetensors")).unwrap(),
        )))
        .collect()
}

#[test]
fn killed_and_resumed_run_is_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let clean = tmp.path().join("clean");
    let start = Instant::now();
    assert!(train(&clean, 25).status().unwrap().success());
    let clean_ms = start.elapsed().as_millis() as u64;

    let killed = tmp.path().join("killed");
    let mut kills = 0;
    let mut kills_mid_checkpoint = 0;
    // Kill points spread over a whole run (start-up, steps, checkpoint writes), scaled to how
    // long a run takes on this machine; each restart resumes and gets further.
    let delays: Vec<u64> = [5u64, 13, 21, 8, 17, 30, 11, 25, 15, 35]
        .iter()
        .map(|p| clean_ms * p / 100)
        .collect();
    for delay in delays {
        let mut child = train(&killed, 25).spawn().unwrap();
        let start = Instant::now();
        let mut exited = None;
        while start.elapsed() < Duration::from_millis(delay) {
            if let Some(status) = child.try_wait().unwrap() {
                exited = Some(status);
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if let Some(status) = exited {
            assert!(status.success(), "a run exited with {status}");
            break;
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
        let root = killed.join("checkpoints");
        if std::fs::read_dir(&root).is_ok_and(|mut d| {
            d.any(|e| {
                e.unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with(".tmp-")
            })
        }) {
            kills_mid_checkpoint += 1;
        }
    }
    eprintln!("{kills} kills, {kills_mid_checkpoint} inside a checkpoint write");
    // Finish whatever is left.
    assert!(train(&killed, 0).status().unwrap().success());
    assert!(kills >= 3, "only {kills} kills landed");
    assert!(
        kills_mid_checkpoint >= 1,
        "no kill landed inside a checkpoint write ({kills} kills)"
    );
    for ((name, a), (_, b)) in final_files(&clean).iter().zip(final_files(&killed)) {
        assert!(a == &b, "{name} differs after {kills} kills");
    }
    // The history holds one line per step, once, in order (steps a kill undid were cut back and
    // trained again), with the losses of the run that was never killed.
    let history = |run: &Path| somatrain_train::history::read(run).unwrap();
    let (clean_history, killed_history) = (history(&clean), history(&killed));
    let steps: Vec<u64> = killed_history.iter().map(|r| r.step).collect();
    assert_eq!(steps, (1..=12).collect::<Vec<u64>>(), "after {kills} kills");
    let losses = |h: &[somatrain_train::history::StepRecord]| -> Vec<(f32, f32)> {
        h.iter().map(|r| (r.loss, r.grad_norm)).collect()
    };
    assert_eq!(losses(&clean_history), losses(&killed_history));
}

/// Every file under `root`, by its path relative to `root`, with its bytes.
fn snapshot(root: &std::path::Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut files = std::collections::BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let name = path.strip_prefix(root).unwrap().display().to_string();
                files.insert(name, std::fs::read(&path).unwrap());
            }
        }
    }
    files
}

#[test]
fn when_no_checkpoint_verifies_training_stops_and_deletes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let keep = ["--checkpoint-every", "1", "--keep-checkpoints", "3"];
    let mut first = vec!["--steps", "3"];
    first.extend(keep);
    common::train_tiny(&run, &first);
    let checkpoints = run.join("checkpoints");
    let mut steps: Vec<std::path::PathBuf> = std::fs::read_dir(&checkpoints)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    steps.sort();
    assert_eq!(steps.len(), 3, "{steps:?}");
    // The weights swapped round in a ring: every file intact, no checkpoint consistent.
    let weights = |i: usize| steps[i].join("weights.safetensors");
    let held = std::fs::read(weights(0)).unwrap();
    std::fs::copy(weights(1), weights(0)).unwrap();
    std::fs::copy(weights(2), weights(1)).unwrap();
    std::fs::write(weights(2), held).unwrap();
    let before = snapshot(&checkpoints);

    let train = |extra: &[&str]| {
        common::bin()
            .args(["train", "--run-dir", run.to_str().unwrap()])
            .args(["--corpus-dir", common::sources().to_str().unwrap()])
            .args(common::TINY_SHAPE)
            .args(["--heldout-bytes", "2048", "--steps", "2"])
            .args(keep)
            .args(extra)
            .output_within(COMMAND_DEADLINE)
            .unwrap()
    };
    let out = train(&[]);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("verifies, so training cannot resume"),
        "{stderr}"
    );
    assert!(stderr.contains("--restart-from-scratch"), "{stderr}");
    for step in &steps {
        let name = step.file_name().unwrap().to_string_lossy().to_string();
        assert!(stderr.contains(&name), "{name} not named: {stderr}");
    }
    assert_eq!(snapshot(&checkpoints), before, "nothing was changed");

    // Starting over keeps the old checkpoints aside, byte for byte.
    let out = train(&["--restart-from-scratch"]);
    common::succeeded(&out);
    let aside: Vec<std::path::PathBuf> = std::fs::read_dir(&run)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("checkpoints.set-aside-")
        })
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert_eq!(snapshot(&aside[0]), before);
    assert!(checkpoints.join("step-0000000002").is_dir());
}

/// SIGINT (or SIGTERM) asks a run to stop after its current step: that step is saved even
/// though `--checkpoint-minutes` would not have saved it yet, the process exits 0 saying so,
/// and the same command resumes from it.
#[test]
fn an_interrupted_run_saves_its_step_before_it_ends_and_resumes_from_it() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let command = |until: &str| {
        let mut cmd = common::bin();
        cmd.args(["train", "--run-dir", run.to_str().unwrap()])
            .args(["--corpus-dir", corpus().to_str().unwrap()])
            .args(common::TINY_SHAPE)
            .args(["--heldout-bytes", "1024", "--checkpoint-minutes", "60"])
            .args(["--until-step", until]);
        cmd
    };
    let mut child = common::KillOnDrop(
        command("100000")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // Drained as it comes: a full pipe would block the run's logging.
    let mut pipe = child.stderr.take().unwrap();
    let stderr = std::thread::spawn(move || {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut pipe, &mut text).unwrap();
        text
    });
    let history = run.join("history.jsonl");
    common::wait_for_logged_steps(&mut child, &run, 2);
    assert!(
        checkpoint_steps(&run).is_empty(),
        "no checkpoint is due yet"
    );
    common::interrupt(&child);
    let status = common::wait_until(COMMAND_DEADLINE, "the interrupted run to end", || {
        child.try_wait().unwrap()
    });
    let stderr = stderr.join().unwrap();
    assert!(status.success(), "{status:?}\n{stderr}");
    assert!(
        stderr.contains("as asked, with its checkpoint saved"),
        "{stderr}"
    );
    let steps = checkpoint_steps(&run);
    let logged = std::fs::read_to_string(&history).unwrap().lines().count() as u64;
    assert_eq!(steps, [logged], "the last logged step is the one saved");

    let out = command(&(logged + 1).to_string())
        .arg("--json")
        .output_within(COMMAND_DEADLINE)
        .unwrap();
    common::succeeded(&out);
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["start_step"], logged);
    assert_eq!(summary["end_step"], logged + 1);
}

fn checkpoint_steps(run: &Path) -> Vec<u64> {
    let mut steps: Vec<u64> = somatrain_train::checkpoint::list(&run.join("checkpoints"))
        .into_iter()
        .map(|(step, _)| step)
        .collect();
    steps.sort();
    steps
}
