//! The libtorch devices through the binary. Without the `torch` feature every libtorch device
//! is a clear error naming the build; with it (`scripts/test` runs this file again with
//! `--features torch`), `torch-cpu` scores a conformance case as the network does and trains,
//! resumes with the CPU trainer, and `cuda` trains or says why it cannot.

mod common;
use common::{COMMAND_DEADLINE, OutputWithin, TINY_SHAPE};
use std::path::PathBuf;

fn case(name: &str) -> (PathBuf, serde_json::Value) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/conformance/scoring")
        .join(name);
    let expected =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    (dir, expected)
}

fn score(device: &str) -> std::process::Output {
    let (dir, e) = case("small_40kb");
    common::bin()
        .args(["score", "--json", "--device", device, "--weights"])
        .arg(dir.join("weights.safetensors"))
        .arg("--data")
        .arg(dir.join("data.bin"))
        .args(["--num-heads", &e["config"]["num_heads"].to_string()])
        .args(["--max-seq-len", &e["max_seq_len"].to_string()])
        .args(["--batch-size", &e["batch_size"].to_string()])
        .args(["--seed", &e["seed"].to_string()])
        .output_within(COMMAND_DEADLINE)
        .unwrap()
}

fn train(run: &std::path::Path, device: &str, extra: &[&str]) -> std::process::Output {
    common::bin()
        .args(["train", "--run-dir", run.to_str().unwrap()])
        .args(["--corpus-dir", common::sources().to_str().unwrap()])
        .args(TINY_SHAPE)
        .args(["--heldout-bytes", "1024", "--dropout", "0.1"])
        .args(["--device", device])
        .args(extra)
        .output_within(COMMAND_DEADLINE)
        .unwrap()
}

#[test]
fn libtorch_devices_score_and_train_or_name_the_build_they_need() {
    if !cfg!(feature = "torch") {
        for device in ["torch-cpu", "cuda", "cuda:1"] {
            let out = score(device);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success());
            assert!(
                stderr.contains("--features torch") && stderr.contains(device),
                "{stderr}"
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let out = train(&dir.path().join("run"), "cuda", &["--steps", "1"]);
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("--features torch"));
        let cycle = common::bin()
            .args(["localnet-cycle", "--device", "torch-cpu", "--dir"])
            .arg(dir.path().join("cycle"))
            .output_within(COMMAND_DEADLINE)
            .unwrap();
        assert!(!cycle.status.success());
        assert!(String::from_utf8_lossy(&cycle.stderr).contains("--features torch"));
        let bad = score("gpu");
        assert!(String::from_utf8_lossy(&bad.stderr).contains("cpu, torch-cpu, cuda or cuda:N"));
        return;
    }
    // libtorch's CPU device: the network's loss and embedding for a conformance case.
    let out = score("torch-cpu");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let (_, e) = case("small_40kb");
    let (loss, expected) = (
        got["models"][0]["loss"].as_f64().unwrap(),
        e["loss"].as_f64().unwrap(),
    );
    assert!(
        ((loss - expected) / expected).abs() <= 1e-5,
        "{loss} vs {expected}"
    );

    // Two steps with bf16 products on libtorch, then one more on the CPU trainer from its
    // checkpoint: one history line per step, the step count carried over.
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let out = train(&run, "torch-cpu", &["--steps", "2", "--bf16"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = train(&run, "cpu", &["--until-step", "3"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let history = std::fs::read_to_string(run.join("history.jsonl")).unwrap();
    assert_eq!(history.lines().count(), 3, "{history}");

    // The whole localnet flow on libtorch: the rounds train there, the localnet's scoring
    // service and the submitter score there, and the hit is claimed.
    let cycle = common::bin()
        .args(["localnet-cycle", "--device", "torch-cpu", "--dir"])
        .arg(dir.path().join("cycle"))
        .arg("--corpus-dir")
        .arg(common::sources())
        .output_within(COMMAND_DEADLINE)
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&cycle.stdout),
        String::from_utf8_lossy(&cycle.stderr),
    );
    assert!(cycle.status.success(), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("training with libtorch autograd"),
        "{stderr}"
    );
    assert!(stdout.contains("claimed target"), "{stdout}");

    // CUDA: trains where a GPU and its libraries are, else says what is missing.
    let gpu = dir.path().join("gpu");
    let out = train(&gpu, "cuda", &["--steps", "1", "--bf16"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        assert!(gpu.join("round/weights.safetensors").exists());
    } else {
        assert!(stderr.contains("no usable CUDA device"), "{stderr}");
        assert!(stderr.contains("LD_LIBRARY_PATH"), "{stderr}");
    }
}

/// On libtorch's CPU device with dropout, a run SIGKILLed mid-run (kill points spread over the
/// run, several while a checkpoint pauses half-written) and restarted ends bit-identical to one
/// that was never killed: libtorch's masks are reseeded per micro-batch, so nothing about them
/// needs saving.
#[test]
fn a_killed_libtorch_run_resumes_bit_identical() {
    if !cfg!(feature = "torch") {
        return;
    }
    use std::time::{Duration, Instant};
    let tmp = tempfile::tempdir().unwrap();
    let run = |dir: &std::path::Path, pause_ms: u64| {
        let mut command = common::bin();
        command
            .args(["train", "--run-dir", dir.to_str().unwrap()])
            .args(["--corpus-dir", common::sources().to_str().unwrap()])
            .args(TINY_SHAPE)
            .args([
                "--heldout-bytes",
                "1024",
                "--dropout",
                "0.1",
                "--lr",
                "3e-3",
            ])
            .args(["--device", "torch-cpu", "--until-step", "12"])
            .env("SOMATRAIN_CHECKPOINT_PAUSE_MS", pause_ms.to_string())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        command
    };
    let clean = tmp.path().join("clean");
    let start = Instant::now();
    let run_to_end = |mut command: std::process::Command| {
        let out = command.output_within(COMMAND_DEADLINE).unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run_to_end(run(&clean, 50));
    let clean_ms = start.elapsed().as_millis() as u64;
    let killed = tmp.path().join("killed");
    let mut kills = 0;
    // Each restart resumes from its last checkpoint, so what is left shrinks: later kill points
    // come sooner.
    for percent in [30u64, 20, 15, 12, 10, 8] {
        let mut child = common::KillOnDrop(run(&killed, 50).spawn().unwrap());
        let started = Instant::now();
        let deadline = Duration::from_millis(clean_ms * percent / 100);
        let mut finished = false;
        while started.elapsed() < deadline {
            if child.try_wait().unwrap().is_some() {
                finished = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if finished {
            break;
        }
        child.kill().unwrap();
        child.wait().unwrap();
        kills += 1;
    }
    run_to_end(run(&killed, 0));
    assert!(kills >= 2, "only {kills} kills landed");
    for file in [
        "round/weights.safetensors",
        "checkpoints/step-0000000012/optimizer.safetensors",
    ] {
        assert!(
            std::fs::read(clean.join(file)).unwrap() == std::fs::read(killed.join(file)).unwrap(),
            "{file} differs after {kills} kills"
        );
    }
}

/// A `torch` build carried to a machine where libtorch is not where it was built: the launcher
/// names the library and the variable to set, where the binary linked with libtorch would be
/// stopped by the dynamic loader; with `LIBTORCH` (or `LD_LIBRARY_PATH`) it starts, and a
/// libtorch of another PyTorch release is refused. The copies' recorded libtorch folders are
/// rewritten to paths of the same length that do not exist, as on another machine.
#[cfg(feature = "torch")]
#[test]
fn a_carried_torch_build_without_libtorch_names_the_library_and_the_variable_to_set() {
    use std::os::unix::fs::PermissionsExt;
    use std::process::Command;
    // Recorded only when LIBTORCH is set at build time, as scripts/setup-torch sets it.
    let recorded = env!("SOMATRAIN_LIBTORCH_RUN_PATH");
    let built_against: Vec<PathBuf> = std::env::split_paths(recorded).collect();
    let libtorch = built_against[0].parent().unwrap().to_path_buf();
    assert!(
        libtorch.join("lib/libtorch_cpu.so").is_file(),
        "{libtorch:?}"
    );
    let dir = tempfile::tempdir().unwrap();
    for (from, name) in [
        (env!("CARGO_BIN_EXE_somatrain"), "somatrain"),
        (
            env!("CARGO_BIN_EXE_somatrain-libtorch"),
            "somatrain-libtorch",
        ),
    ] {
        let mut bytes = std::fs::read(from).unwrap();
        for folder in &built_against {
            let folder = folder.to_str().unwrap().as_bytes();
            let mut gone = vec![b'x'; folder.len()];
            gone[0] = b'/';
            let mut rewritten = 0;
            let mut at = 0;
            while let Some(found) = bytes[at..].windows(folder.len()).position(|w| w == folder) {
                let start = at + found;
                bytes[start..start + folder.len()].copy_from_slice(&gone);
                rewritten += 1;
                at = start + folder.len();
            }
            assert!(rewritten > 0, "{name} does not record {folder:?}");
        }
        let to = dir.path().join(name);
        std::fs::write(&to, bytes).unwrap();
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let run = |binary: &str, env: &[(&str, &std::ffi::OsStr)]| {
        let out = Command::new(dir.path().join(binary))
            .arg("--version")
            .env_remove("LD_LIBRARY_PATH")
            .env_remove("LIBTORCH")
            .envs(env.iter().copied())
            .output_within(COMMAND_DEADLINE)
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        (out.status.success(), stderr)
    };

    // The binary linked with libtorch cannot say it: the loader stops it first.
    let (started, stderr) = run("somatrain-libtorch", &[]);
    assert!(
        !started && stderr.contains("error while loading shared libraries"),
        "{stderr}"
    );
    let (started, stderr) = run("somatrain", &[]);
    assert!(!started, "{stderr}");
    assert!(
        stderr.contains("libtorch_cpu.so is not found") && stderr.contains("export LIBTORCH="),
        "{stderr}"
    );
    assert!(!stderr.contains("error while loading"), "{stderr}");

    let (started, stderr) = run("somatrain", &[("LIBTORCH", libtorch.as_os_str())]);
    assert!(started, "{stderr}");
    let library_path = std::env::join_paths(&built_against).unwrap();
    let (started, stderr) = run(
        "somatrain",
        &[("LD_LIBRARY_PATH", library_path.as_os_str())],
    );
    assert!(started, "{stderr}");

    // Another release's libtorch (as its version.py says) is refused before it is loaded.
    let other = dir.path().join("torch");
    std::fs::create_dir_all(other.join("lib")).unwrap();
    for library in ["libtorch_cpu.so", "libc10.so"] {
        std::os::unix::fs::symlink(
            libtorch.join("lib").join(library),
            other.join("lib").join(library),
        )
        .unwrap();
    }
    std::fs::write(other.join("version.py"), "__version__ = '2.10.0+cu130'\n").unwrap();
    let (started, stderr) = run("somatrain", &[("LIBTORCH", other.as_os_str())]);
    assert!(!started, "{stderr}");
    assert!(
        stderr.contains("PyTorch 2.10.0+cu130's libtorch")
            && stderr.contains("built for PyTorch 2.11"),
        "{stderr}"
    );

    // Without the binary it starts, the launcher says which file to copy.
    std::fs::remove_file(dir.path().join("somatrain-libtorch")).unwrap();
    let (started, stderr) = run("somatrain", &[("LIBTORCH", libtorch.as_os_str())]);
    assert!(
        !started && stderr.contains("somatrain-libtorch is missing"),
        "{stderr}"
    );
}

/// `bench train|score` on libtorch's CPU print their JSON line with what the GPU run reads: the
/// optimizer that ran, how batches went up, and the bytes each way per step: 8 per micro-batch
/// for its two loss terms, then the gradient norm (4) and the divergence check over all
/// weights (8 from the fused optimizer's f64 reduction, 4 from the per-tensor one's f32).
/// Without the feature they name the build.
#[test]
fn libtorch_benches_report_the_optimizer_the_uploads_and_the_traffic() {
    let bench = |args: &[&str]| {
        common::bin()
            .args(["bench"])
            .args(args)
            .args(["--preset", "tiny", "--device", "torch-cpu", "--runs", "1"])
            .output_within(COMMAND_DEADLINE)
            .unwrap()
    };
    if !cfg!(feature = "torch") {
        let out = bench(&["score"]);
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("--features torch"));
        return;
    }
    let json = |out: std::process::Output| -> serde_json::Value {
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "{stderr}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(stdout.lines().last().expect("a JSON line")).unwrap()
    };
    for (optimizer, extra, check_bytes) in [
        ("fused", None, 8.0),
        ("per-tensor", Some("--per-tensor-optimizer"), 4.0),
    ] {
        let mut args = vec!["train", "--accumulation", "3", "--seq-len", "64"];
        args.extend(extra);
        let train = json(bench(&args));
        assert_eq!(train["bench"], "train");
        assert_eq!(train["optimizer"], optimizer, "{train}");
        assert_eq!(train["bf16_weights"], "f32", "{train}");
        assert_eq!(train["batch_uploads"], "host", "{train}");
        assert!(train["tokens_per_s"].as_f64().unwrap() > 0.0, "{train}");
        assert!(train["mfu_f32"].as_f64().unwrap() > 0.0, "{train}");
        let split = &train["time_split"];
        let down = 3.0 * 8.0 + 4.0 + check_bytes;
        assert_eq!(split["device_to_host_bytes"], down, "{train}");
        assert!(
            split["host_to_device_bytes"].as_f64().unwrap() > 0.0,
            "{train}"
        );
    }
    // Mixed precision: bf16 copies of the weights by default, casts in every micro-batch to
    // compare; the latter alone names what it needs.
    for (made, extra) in [("copies", None), ("casts", Some("--bf16-casts"))] {
        let mut args = vec!["train", "--seq-len", "64", "--bf16"];
        args.extend(extra);
        let train = json(bench(&args));
        assert_eq!(train["precision"], "bf16", "{train}");
        assert_eq!(train["bf16_weights"], made, "{train}");
    }
    let alone = bench(&["train", "--seq-len", "64", "--bf16-casts"]);
    assert!(!alone.status.success());
    assert!(
        String::from_utf8_lossy(&alone.stderr).contains("give --bf16 too"),
        "{}",
        String::from_utf8_lossy(&alone.stderr)
    );
    // The host's part of a libtorch step, measured on libtorch's CPU.
    let host = json(
        common::bin()
            .args(["bench", "host", "--preset", "tiny", "--runs", "1"])
            .output_within(COMMAND_DEADLINE)
            .unwrap(),
    );
    let dispatch = &host["libtorch_dispatch"];
    assert_eq!(dispatch["layers"], 2, "{host}");
    for dropout in ["dropout_0.1", "dropout_0"] {
        for variant in ["f32", "bf16", "bf16_casts"] {
            let measured = &dispatch[dropout][variant];
            assert!(
                measured["micro_batch_s"].as_f64().unwrap() > 0.0
                    && measured["optimizer_step_s"].as_f64().unwrap() > 0.0,
                "{dropout} {variant}: {host}"
            );
        }
    }
    let score = json(bench(&["score"]));
    assert_eq!(score["bench"], "score");
    assert_eq!(score["batch_uploads"], "host", "{score}");
    assert!(score["tokens_per_s"].as_f64().unwrap() > 0.0, "{score}");
}
