//! The optimizer on the device: AdamW there matches the host's AdamW, and a run resumed from a
//! checkpoint ends bit for bit where an uninterrupted one does. On burn's flex backend, or the
//! device named by `SOMATRAIN_BURN_DEVICE`.

use somatrain_burn::train::BurnEngine;
use somatrain_data::batches;
use somatrain_model::Weights;
use somatrain_model::config::SIGREG_SLICES;
use somatrain_model::cpu::train::TrainOptions;
use somatrain_train::GradientEngine;
use somatrain_train::optim::{AdamState, OptimConfig, Schedule};

mod common;

/// Largest difference of two weight sets relative to each tensor's scale, and its tensor.
fn worst_relative(a: &Weights, b: &Weights) -> (f32, String) {
    let mut worst = (0f32, String::new());
    for ((name, x), (_, y)) in a.tensors().into_iter().zip(b.tensors()) {
        let scale = y.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
        let diff = x.iter().zip(y).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
        if diff / scale > worst.0 {
            worst = (diff / scale, name.to_string());
        }
    }
    worst
}

/// Five steps with warmup, the cosine schedule, weight decay and clipping that bites: the
/// device's AdamW (weights and moments never leaving it) against the host's AdamW, both fed the
/// same gradients each step (computed on the host's weights), so only the optimizers differ.
#[test]
fn device_adamw_matches_host_adamw() {
    let config = common::small_model(2);
    let start = Weights::init(config, 5);
    let optim = OptimConfig {
        lr: 1e-3,
        weight_decay: 0.1,
        warmup_steps: 2,
        schedule: Schedule::Cosine,
        decay_steps: 4,
        grad_clip: Some(0.05),
        ..OptimConfig::default()
    };
    let data: Vec<u8> = (0..2000u32).map(|i| (i * 37 + i / 7) as u8).collect();
    let micro: Vec<_> = batches(&data, 32, 2).take(10).collect();
    let options = |step: usize, m: usize| TrainOptions {
        dropout: 0.1,
        dropout_key: (step * 2 + m) as u64,
        sigreg_coefficient: 0.02,
        grad_scale: 0.5,
    };

    let mut device_engine = BurnEngine::new(common::device());
    let mut device_weights = start.clone();
    let mut device_adam = AdamState::new(&start);
    let mut gradient_engine = BurnEngine::new(common::device());
    let mut host_weights = start.clone();
    let mut host_adam = AdamState::new(&start);
    let mut clipped = 0;
    for step in 0..5 {
        let noise = somatrain_noise::unit_column_noise(step as u64, 16, SIGREG_SLICES);
        let mut grads = Weights::zeros(config);
        for m in 0..2 {
            let batch = &micro[step * 2 + m];
            gradient_engine
                .loss_and_grad(
                    &host_weights,
                    step as u64,
                    batch,
                    &noise,
                    options(step, m),
                    &mut grads,
                )
                .unwrap();
        }
        gradient_engine.flush_gradients(&mut grads).unwrap();
        device_engine.add_gradients(&grads);
        let mut unused = Weights::zeros(config);
        let on_device = device_engine
            .optimizer_step(&optim, &mut device_weights, &mut device_adam, &mut unused)
            .unwrap();
        let on_host = host_adam.update(&optim, &mut host_weights, &mut grads);
        assert_eq!(on_device.lr, on_host.lr);
        assert!(
            (on_device.grad_norm - on_host.grad_norm).abs() <= 1e-5 * on_host.grad_norm,
            "step {step}: norm {} vs {}",
            on_device.grad_norm,
            on_host.grad_norm
        );
        clipped += usize::from(on_host.grad_norm > 0.05);
        assert_eq!(
            device_engine
                .first_nonfinite_parameter(&device_weights)
                .unwrap(),
            None
        );
    }
    assert!(clipped >= 3, "clipping bit on only {clipped} of 5 steps");
    // Nothing came back during the steps: the host copies are the starting point still.
    assert_eq!(device_weights, start);
    assert!(
        device_adam
            .m
            .tensors()
            .iter()
            .all(|(_, t)| t.iter().all(|&x| x == 0.0))
    );
    assert_eq!(device_adam.step, 5);
    device_engine
        .sync_to_host(&mut device_weights, &mut device_adam)
        .unwrap();
    for (what, a, b) in [
        ("weights", &device_weights, &host_weights),
        ("first moments", &device_adam.m, &host_adam.m),
        ("second moments", &device_adam.v, &host_adam.v),
    ] {
        let (worst, name) = worst_relative(a, b);
        assert!(
            worst <= 1e-6,
            "{what}: {name} differs by {worst} of its scale"
        );
    }
    assert_ne!(device_weights, start, "five steps moved the weights");
}

fn device_settings() -> somatrain_train::TrainSettings {
    use somatrain_train::corpus::{CorpusConfig, Source};
    let corpus = CorpusConfig {
        max_seq_len: 64,
        heldout_per_mille: 500,
        ..CorpusConfig::new(vec![Source::Dir {
            path: std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../train/src"),
        }])
    };
    let mut settings =
        somatrain_train::TrainSettings::reference(somatrain_model::Preset::Tiny.config(), corpus);
    settings.accumulation = 2;
    settings.dropout = 0.1;
    settings.optim.lr = 1e-3;
    settings.optim.weight_decay = 0.01;
    settings.heldout_bytes = 1024;
    settings
}

fn train_on_device(dir: &std::path::Path, until: u64) -> somatrain_train::RunSummary {
    let mut engine = BurnEngine::new(common::device());
    somatrain_train::run_with(
        dir,
        &device_settings(),
        somatrain_train::Until::Step(until),
        &mut engine,
        &mut |_| {},
    )
    .unwrap()
}

/// A run stopped after its second step's checkpoint and resumed by a fresh engine ends with
/// the same bits as a run that never stopped: weights, moments and round.
#[test]
fn a_resumed_device_run_is_bit_identical() {
    use somatrain_train::checkpoint;
    let whole = tempfile::tempdir().unwrap();
    let whole_round = train_on_device(whole.path(), 4).round;
    let parts = tempfile::tempdir().unwrap();
    let first = train_on_device(parts.path(), 2);
    assert_eq!(first.end_step, 2);
    let resumed = train_on_device(parts.path(), 4);
    assert_eq!(resumed.start_step, 2);
    let load = |p: &std::path::Path| std::fs::read(p).unwrap();
    assert!(
        load(&whole_round.weights_path(whole.path()))
            == load(&resumed.round.weights_path(parts.path())),
        "the resumed run's weights differ from the uninterrupted run's"
    );
    assert_eq!(whole_round.heldout, resumed.round.heldout);
    assert_eq!(whole_round.embedding, resumed.round.embedding);
    let (a, _) = checkpoint::load_latest(&whole.path().join("checkpoints"));
    let (b, _) = checkpoint::load_latest(&parts.path().join("checkpoints"));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.state.step, 4);
    assert!(a.adam == b.adam, "the moments differ");
}

const CHILD_DIR: &str = "SOMATRAIN_DEVICE_KILL_TEST_DIR";
const KILL_TEST_STEPS: u64 = 10;

/// The child side of the kill test: trains on the device in the directory the parent names.
/// Does nothing when run on its own.
#[test]
#[ignore = "run as a child process by a_killed_device_run_resumes_bit_identical"]
fn device_training_child() {
    if let Some(dir) = std::env::var_os(CHILD_DIR) {
        train_on_device(std::path::Path::new(&dir), KILL_TEST_STEPS);
    }
}

/// The device path killed with SIGKILL at moments spread over a run (this test binary re-run
/// as the child), then finished: the last checkpoint and the round are the bits of a run that
/// was never interrupted.
#[test]
fn a_killed_device_run_resumes_bit_identical() {
    use std::time::{Duration, Instant};
    let tmp = tempfile::tempdir().unwrap();
    let clean = tmp.path().join("clean");
    let start = Instant::now();
    let clean_round = train_on_device(&clean, KILL_TEST_STEPS).round;
    let clean_ms = start.elapsed().as_millis() as u64;
    let killed = tmp.path().join("killed");
    let mut kills = 0;
    // A child also pays process start-up; the delays reach past a clean run's length.
    for percent in [20u64, 45, 30, 60, 40, 80, 50, 100] {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["device_training_child", "--exact", "--ignored", "--quiet"])
            .env(CHILD_DIR, &killed)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_millis(clean_ms * percent / 100 + 50);
        let mut exited = None;
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait().unwrap() {
                exited = Some(status);
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if let Some(status) = exited {
            assert!(status.success(), "a child run exited with {status}");
            break;
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
    }
    let resumed = train_on_device(&killed, KILL_TEST_STEPS);
    assert!(kills >= 2, "only {kills} kills landed");
    let load = |p: &std::path::Path| std::fs::read(p).unwrap();
    assert!(
        load(&clean_round.weights_path(&clean)) == load(&resumed.round.weights_path(&killed)),
        "the round's weights differ after {kills} kills"
    );
    let step = format!("checkpoints/step-{KILL_TEST_STEPS:010}");
    for file in ["weights.safetensors", "optimizer.safetensors"] {
        assert!(
            load(&clean.join(&step).join(file)) == load(&killed.join(&step).join(file)),
            "{file} differs after {kills} kills"
        );
    }
    eprintln!("{kills} kills");
}
