//! Training through libtorch against the hand-written CPU trainer, its test oracle: autograd's
//! gradients against the CPU backward, the real trainer's steps against the CPU run, bf16
//! against f32, a resumed run against an uninterrupted one, and checkpoints moving between the
//! two trainers.

use somatrain_data::batches;
use somatrain_model::Weights;
use somatrain_model::config::SIGREG_SLICES;
use somatrain_model::cpu::train::{TrainOptions, TrainPass};
use somatrain_torch::train::TorchEngine;
use somatrain_train::optim::AdamState;
use somatrain_train::{GradientEngine, TrainSettings, Until, run_with};

mod common;

/// Autograd's gradients of the device loss equal the hand-written backward's (dropout off:
/// libtorch draws its own masks).
#[test]
fn autograd_gradients_match_the_cpu_backward() {
    let config = common::small_model(2);
    let weights = Weights::init(config, 7);
    // Two sequences of 24, the second short: EOS, PAD and clamped positions are in it.
    let data: Vec<u8> = (0..41u32).map(|i| (i * 53 + 11) as u8).collect();
    let batch = batches(&data, 24, 2).next().unwrap();
    let noise = somatrain_noise::unit_column_noise(4, 16, SIGREG_SLICES);
    let options = TrainOptions {
        sigreg_coefficient: 0.02,
        grad_scale: 0.5,
        ..TrainOptions::default()
    };
    let mut cpu_grads = Weights::zeros(config);
    let cpu = TrainPass::new().loss_and_grad(&weights, &batch, &noise, options, &mut cpu_grads);

    let mut engine = TorchEngine::new(common::device());
    let mut torch_grads = Weights::zeros(config);
    let mut outputs = vec![
        engine
            .loss_and_grad(&weights, 1, &batch, &noise, options, &mut torch_grads)
            .unwrap(),
    ];
    assert!(outputs[0].loss.is_nan(), "the loss stays on the device");
    engine.step_losses(&mut outputs).unwrap();
    let out = &outputs[0];
    assert!(
        (out.loss - cpu.loss).abs() <= 1e-5 * cpu.loss.abs(),
        "loss {} vs {}",
        out.loss,
        cpu.loss
    );
    // Nothing reaches the host until the flush.
    assert!(
        torch_grads
            .tensors()
            .iter()
            .all(|(_, g)| g.iter().all(|x| *x == 0.0))
    );
    engine.flush_gradients(&mut torch_grads).unwrap();
    for ((name, a), (_, b)) in torch_grads.tensors().into_iter().zip(cpu_grads.tensors()) {
        let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
        let worst = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(scale > 0.0, "{name}: the CPU gradient is all zero");
        assert!(
            worst <= 1e-6 + 1e-4 * scale,
            "{name}: max difference {worst} against a gradient scale of {scale}"
        );
    }
}

fn settings(dropout: f32) -> TrainSettings {
    use somatrain_train::corpus::{CorpusConfig, Source};
    let corpus = CorpusConfig {
        max_seq_len: 64,
        heldout_per_mille: 500,
        ..CorpusConfig::new(vec![Source::Dir {
            path: std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../train/src"),
        }])
    };
    let mut settings = TrainSettings::reference(somatrain_model::Preset::Tiny.config(), corpus);
    settings.accumulation = 2;
    settings.dropout = dropout;
    settings.optim.lr = 1e-3;
    settings.heldout_bytes = 1024;
    settings
}

/// Trains `dir` to `until` with `engine`: the logged losses, the round's weights and round.
fn train(
    dir: &std::path::Path,
    settings: &TrainSettings,
    until: u64,
    engine: &mut dyn GradientEngine,
) -> (Vec<f32>, Weights, somatrain_train::trainer::RoundArtifacts) {
    let mut losses = Vec::new();
    let summary = run_with(dir, settings, Until::Step(until), engine, &mut |log| {
        losses.push(log.loss)
    })
    .unwrap();
    let weights =
        somatrain_model::io::load_file(&summary.round.weights_path(dir), Default::default())
            .unwrap();
    (losses, weights, summary.round)
}

fn max_difference(a: &Weights, b: &Weights) -> f32 {
    a.tensors()
        .into_iter()
        .zip(b.tensors())
        .fold(0f32, |worst, ((_, x), (_, y))| {
            x.iter()
                .zip(y)
                .fold(worst, |m, (p, q)| m.max((p - q).abs()))
        })
}

/// Three optimizer steps of the real trainer (corpus, accumulation, AdamW on the device,
/// checkpoints) end where the CPU run ends.
#[test]
fn the_trainer_on_libtorch_follows_the_cpu_run() {
    let settings = settings(0.0);
    let (cpu_dir, torch_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (cpu_losses, cpu_weights, cpu_round) =
        train(cpu_dir.path(), &settings, 3, &mut TrainPass::new());
    let (torch_losses, torch_weights, torch_round) = train(
        torch_dir.path(),
        &settings,
        3,
        &mut TorchEngine::new(common::device()),
    );
    assert_eq!(cpu_losses.len(), 3);
    for (a, b) in torch_losses.iter().zip(&cpu_losses) {
        assert!(
            (a - b).abs() <= 1e-4 * b.abs(),
            "losses {torch_losses:?} vs {cpu_losses:?}"
        );
    }
    // Three Adam steps of 1e-3 move a weight by at most 3e-3; the runs agree far closer.
    let worst = max_difference(&torch_weights, &cpu_weights);
    assert!(worst < 1e-4, "weights differ by {worst}");
    let (a, b) = (torch_round.heldout.unwrap(), cpu_round.heldout.unwrap());
    assert_eq!(a.bytes, b.bytes);
    assert!((a.loss - b.loss).abs() < 1e-3 * b.loss, "{a:?} vs {b:?}");
}

/// With dropout (libtorch's masks, seeded per micro-batch) a run stopped after two steps and
/// resumed from its checkpoint ends bit-identical to an uninterrupted one; a checkpoint the CPU
/// trainer wrote is resumed by this one, and the other way round.
#[test]
fn resumed_runs_end_bit_identical_and_checkpoints_move_between_trainers() {
    let settings = settings(0.1);
    let device = common::device();
    let (whole, split) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (whole_losses, whole_weights, _) =
        train(whole.path(), &settings, 3, &mut TorchEngine::new(device));
    let (mut losses, _, _) = train(split.path(), &settings, 2, &mut TorchEngine::new(device));
    let (rest, split_weights, _) = train(split.path(), &settings, 3, &mut TorchEngine::new(device));
    losses.extend(rest);
    assert_eq!(losses, whole_losses);
    assert_eq!(max_difference(&split_weights, &whole_weights), 0.0);
    // Dropout is on: the masks matter.
    let (no_dropout, _, _) = train(
        tempfile::tempdir().unwrap().path(),
        &self::settings(0.0),
        3,
        &mut TorchEngine::new(device),
    );
    assert_ne!(no_dropout, whole_losses);

    // CPU for two steps, then libtorch; and the other way round: each resumes where the
    // other stopped (same checkpoint format), so the optimizer state carried over.
    for (first, second) in [(true, false), (false, true)] {
        let dir = tempfile::tempdir().unwrap();
        let engine = |cpu: bool| -> Box<dyn GradientEngine> {
            if cpu {
                Box::new(TrainPass::new())
            } else {
                Box::new(TorchEngine::new(device))
            }
        };
        let settings = self::settings(0.0);
        train(dir.path(), &settings, 2, engine(first).as_mut());
        let checkpoint = somatrain_train::checkpoint::latest_state(&dir.path().join("checkpoints"))
            .expect("a checkpoint");
        assert_eq!(checkpoint.1.step, 2);
        let (losses, weights, _) = train(dir.path(), &settings, 3, engine(second).as_mut());
        assert_eq!(losses.len(), 1, "one more step, not a fresh run");
        let reference = tempfile::tempdir().unwrap();
        let (_, cpu_weights, _) = train(reference.path(), &settings, 3, &mut TrainPass::new());
        let worst = max_difference(&weights, &cpu_weights);
        assert!(
            worst < 1e-4,
            "a mixed run differs from the CPU run by {worst}"
        );
    }
}

/// Mixed precision (bf16 products and attention, f32 masters): the loss within bf16's precision
/// of the f32 loss, every gradient pointing the same way.
#[test]
fn bf16_keeps_loss_and_gradients_close_to_f32() {
    let device = common::device();
    let config = somatrain_model::Preset::Small.config();
    let weights = Weights::init(config, 11);
    let data: Vec<u8> = (0..150u32).map(|i| (i * 29 + 3) as u8).collect();
    let batch = batches(&data, 64, 3).next().unwrap();
    let noise = somatrain_noise::unit_column_noise(2, config.embedding_dim, SIGREG_SLICES);
    let run = |bf16: bool| {
        let mut engine = TorchEngine::new(device).with_bf16(bf16).unwrap();
        let mut grads = Weights::zeros(config);
        let options = TrainOptions {
            sigreg_coefficient: 0.02,
            grad_scale: 1.0,
            ..TrainOptions::default()
        };
        let mut outputs = vec![
            engine
                .loss_and_grad(&weights, 1, &batch, &noise, options, &mut grads)
                .unwrap(),
        ];
        engine.step_losses(&mut outputs).unwrap();
        engine.flush_gradients(&mut grads).unwrap();
        (outputs[0].loss, grads)
    };
    let (full, full_grads) = run(false);
    let (mixed, mixed_grads) = run(true);
    assert_ne!(full, mixed, "bf16 products change the rounding");
    assert!((full - mixed).abs() < 1e-2 * full, "loss {mixed} vs {full}");
    for ((name, a), (_, b)) in mixed_grads.tensors().into_iter().zip(full_grads.tensors()) {
        let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
        let norm = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        let cosine = dot / (norm(a) * norm(b)).max(1e-30);
        assert!(cosine > 0.99, "{name}: cosine {cosine}");
    }
}

/// bf16 copies of the linears' weights, cast once per optimizer step with their gradients
/// added into the f32 masters', compute what casts inside every micro-batch's graph compute:
/// three steps of two micro-batches with dropout end with the same losses and the same
/// weights, bit for bit; and both are bf16 runs, not the f32 one.
#[test]
fn bf16_copies_train_exactly_as_casts_in_every_micro_batch() {
    let settings = settings(0.1);
    let device = common::device();
    let run = |bf16: Option<bool>| {
        let dir = tempfile::tempdir().unwrap();
        let mut engine = TorchEngine::new(device);
        if let Some(copies) = bf16 {
            engine = engine.with_bf16(true).unwrap().with_bf16_copies(copies);
        }
        let expected = match bf16 {
            None => "f32",
            Some(true) => "copies",
            Some(false) => "casts",
        };
        assert_eq!(engine.bf16_weights(), expected);
        let (losses, weights, _) = train(dir.path(), &settings, 3, &mut engine);
        assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
        (losses, weights)
    };
    let (cast_losses, cast_weights) = run(Some(false));
    let (copy_losses, copy_weights) = run(Some(true));
    assert_eq!(copy_losses.len(), 3);
    assert_eq!(copy_losses, cast_losses);
    for ((name, a), (_, b)) in copy_weights
        .tensors()
        .into_iter()
        .zip(cast_weights.tensors())
    {
        assert!(
            a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{name} differs"
        );
    }
    let (f32_losses, _) = run(None);
    assert_ne!(f32_losses, copy_losses, "bf16 products change the rounding");
}

/// The optimizer state stays on the device between steps and comes back whole on sync.
#[test]
fn weights_and_moments_come_back_on_sync() {
    let config = common::small_model(1);
    let weights = Weights::init(config, 5);
    let data: Vec<u8> = (0..96u32).map(|i| (i * 31 + 7) as u8).collect();
    let batch = batches(&data, 24, 2).next().unwrap();
    let noise = somatrain_noise::unit_column_noise(1, 16, SIGREG_SLICES);
    let optim = somatrain_train::optim::OptimConfig::default();
    let options = TrainOptions::default();
    // The CPU: gradient, then host AdamW.
    let (mut cpu_weights, mut cpu_adam) = (weights.clone(), AdamState::new(&weights));
    let mut grads = Weights::zeros(config);
    TrainPass::new().loss_and_grad(&weights, &batch, &noise, options, &mut grads);
    cpu_adam.update(&optim, &mut cpu_weights, &mut grads);
    // libtorch: the same step on the device, then read back.
    let mut engine = TorchEngine::new(common::device());
    let (mut host_weights, mut adam) = (weights.clone(), AdamState::new(&weights));
    let mut unused = Weights::zeros(config);
    engine
        .loss_and_grad(&host_weights, 1, &batch, &noise, options, &mut unused)
        .unwrap();
    engine
        .optimizer_step(&optim, &mut host_weights, &mut adam, &mut unused)
        .unwrap();
    assert_eq!(adam.step, 1);
    assert_eq!(
        host_weights, weights,
        "the host copy is stale until the sync"
    );
    engine.sync_to_host(&mut host_weights, &mut adam).unwrap();
    assert!(max_difference(&host_weights, &cpu_weights) < 1e-6);
    assert!(max_difference(&adam.m, &cpu_adam.m) < 1e-6);
    assert!(max_difference(&adam.v, &cpu_adam.v) < 1e-9);
}

/// The fused AdamW (one multi-tensor kernel, clipping as its gradient scale) follows the host's
/// AdamW and the tensor-by-tensor one over three steps with clipping and weight decay at work.
#[test]
fn the_fused_adamw_follows_the_host_and_the_tensor_by_tensor_update() {
    let config = common::small_model(2);
    let weights = Weights::init(config, 11);
    let data: Vec<u8> = (0..96u32).map(|i| (i * 37 + 5) as u8).collect();
    let batch = batches(&data, 24, 2).next().unwrap();
    let optim = somatrain_train::optim::OptimConfig {
        lr: 1e-2,
        weight_decay: 0.1,
        // Far below the gradients' norm: every step clips.
        grad_clip: Some(0.05),
        ..somatrain_train::optim::OptimConfig::default()
    };
    let options = TrainOptions::default();
    let (mut cpu_weights, mut cpu_adam) = (weights.clone(), AdamState::new(&weights));
    let mut engines = [
        TorchEngine::new(common::device()),
        TorchEngine::new(common::device()).with_fused_optimizer(false),
    ];
    let mut states: Vec<(Weights, AdamState)> = engines
        .iter()
        .map(|_| (weights.clone(), AdamState::new(&weights)))
        .collect();
    for step in 0..3u64 {
        let noise = somatrain_noise::unit_column_noise(step, 16, SIGREG_SLICES);
        // The host, from the host's own weights.
        let mut grads = Weights::zeros(config);
        TrainPass::new().loss_and_grad(&cpu_weights, &batch, &noise, options, &mut grads);
        let host = cpu_adam.update(&optim, &mut cpu_weights, &mut grads);
        assert!(
            host.grad_norm > 0.05,
            "the step clips: |g| = {}",
            host.grad_norm
        );
        for (engine, (w, adam)) in engines.iter_mut().zip(&mut states) {
            let mut unused = Weights::zeros(config);
            engine
                .loss_and_grad(w, step, &batch, &noise, options, &mut unused)
                .unwrap();
            let stats = engine.optimizer_step(&optim, w, adam, &mut unused).unwrap();
            assert!(
                (stats.grad_norm - host.grad_norm).abs() <= 1e-4 * host.grad_norm,
                "|g| {} against the host's {}",
                stats.grad_norm,
                host.grad_norm
            );
            assert_eq!(engine.first_nonfinite_parameter(w).unwrap(), None);
        }
    }
    assert!(engines[0].uses_fused_optimizer(), "the fused kernel ran");
    assert!(!engines[1].uses_fused_optimizer());
    for (engine, (w, adam)) in engines.iter_mut().zip(&mut states) {
        engine.sync_to_host(w, adam).unwrap();
        assert_eq!(adam.step, 3);
        assert!(
            max_difference(w, &cpu_weights) < 1e-5,
            "{}",
            max_difference(w, &cpu_weights)
        );
        assert!(max_difference(&adam.m, &cpu_adam.m) < 1e-6);
        assert!(max_difference(&adam.v, &cpu_adam.v) < 1e-8);
    }
    let ((fused, _), (per_tensor, _)) = (&states[0], &states[1]);
    let apart = max_difference(fused, per_tensor);
    assert!(
        apart < 1e-5,
        "fused and tensor-by-tensor weights differ by {apart}"
    );
}

/// Per micro-batch only the batch goes up (three i64 arrays) and nothing comes back; the step's
/// loss terms come back in one read after its last micro-batch, and the optimizer step reads
/// the gradient norm and the divergence check. The weights go up once, and the step's
/// projections once per step.
#[test]
fn only_the_batch_crosses_per_micro_batch_and_the_losses_once_per_step() {
    let config = common::small_model(1);
    let weights = Weights::init(config, 3);
    let data: Vec<u8> = (0..400u32).map(|i| (i * 31 + 7) as u8).collect();
    let micro: Vec<_> = batches(&data, 24, 2).take(3).collect();
    let noise = somatrain_noise::unit_column_noise(1, 16, SIGREG_SLICES);
    let optim = somatrain_train::optim::OptimConfig::default();
    let mut engine = TorchEngine::new(common::device());
    let (mut host, mut adam, mut unused) = (
        weights.clone(),
        AdamState::new(&weights),
        Weights::zeros(config),
    );
    let traffic = |e: &TorchEngine| {
        let t = e.transfers().unwrap();
        (t.host_to_device_bytes, t.device_to_host_bytes)
    };
    let options = TrainOptions::default();
    let mut outputs = Vec::new();
    outputs.push(
        engine
            .loss_and_grad(&host, 1, &micro[0], &noise, options, &mut unused)
            .unwrap(),
    );
    let params = 4 * config.parameter_count();
    let noise_bytes = 4 * noise.len() as u64;
    let batch_bytes = 3 * 8 * 48;
    assert_eq!(traffic(&engine), (params + noise_bytes + batch_bytes, 0));
    for batch in &micro[1..] {
        let before = traffic(&engine);
        outputs.push(
            engine
                .loss_and_grad(&host, 1, batch, &noise, options, &mut unused)
                .unwrap(),
        );
        let after = traffic(&engine);
        assert_eq!((after.0 - before.0, after.1 - before.1), (batch_bytes, 0));
    }
    let before = traffic(&engine);
    engine.step_losses(&mut outputs).unwrap();
    let after = traffic(&engine);
    assert_eq!((after.0 - before.0, after.1 - before.1), (0, 3 * 8));
    // Each micro-batch's own loss, as the CPU computes it for that micro-batch alone.
    for (out, batch) in outputs.iter().zip(&micro) {
        let alone = TrainPass::new().loss_and_grad(
            &weights,
            batch,
            &noise,
            options,
            &mut Weights::zeros(config),
        );
        assert!(
            (out.loss - alone.loss).abs() <= 1e-5 * alone.loss.abs(),
            "{} against {}",
            out.loss,
            alone.loss
        );
    }
    let before = traffic(&engine);
    engine
        .optimizer_step(&optim, &mut host, &mut adam, &mut unused)
        .unwrap();
    let after = traffic(&engine);
    // The moments go up once, the first time; the gradient norm comes back.
    assert_eq!((after.0 - before.0, after.1 - before.1), (2 * params, 4));
    assert_eq!(engine.first_nonfinite_parameter(&host).unwrap(), None);
    assert_eq!(traffic(&engine).1 - after.1, 8);
    // After the first step the weights stay on the device: the next micro-batch takes only its
    // batch up.
    let before = traffic(&engine);
    engine
        .loss_and_grad(&host, 1, &micro[0], &noise, options, &mut unused)
        .unwrap();
    let after = traffic(&engine);
    assert_eq!((after.0 - before.0, after.1 - before.1), (batch_bytes, 0));
    // Asking for the losses of another number of micro-batches than ran is refused.
    assert!(engine.step_losses(&mut outputs[..2]).is_err());
}
