//! burn's autodiff gradients of the device-side training loss against the hand-written CPU
//! backward (itself checked against finite differences), on burn's flex backend or the device
//! named by `SOMATRAIN_BURN_DEVICE`: the check that the GPU training path computes the same loss
//! and the same gradients.

use somatrain_burn::BurnModel;
use somatrain_data::batches;
use somatrain_model::Weights;
use somatrain_model::config::SIGREG_SLICES;
use somatrain_model::cpu::train::{TrainOptions, TrainPass};

mod common;

#[test]
fn autodiff_gradients_match_the_cpu_backward() {
    compare_with_cpu(TrainOptions {
        sigreg_coefficient: 0.02,
        grad_scale: 0.5,
        ..TrainOptions::default()
    });
}

/// With dropout the device draws the CPU path's own masks, so the gradients still agree.
#[test]
fn autodiff_gradients_match_the_cpu_backward_with_dropout() {
    compare_with_cpu(TrainOptions {
        dropout: 0.25,
        dropout_key: 0xfeed,
        sigreg_coefficient: 0.02,
        grad_scale: 1.0,
    });
}

fn compare_with_cpu(options: TrainOptions) {
    let config = common::small_model(2);
    let weights = Weights::init(config, 7);
    // Two sequences of 24, the second short: EOS, PAD and clamped positions are in it.
    let data: Vec<u8> = (0..41u32).map(|i| (i * 53 + 11) as u8).collect();
    let batch = batches(&data, 24, 2).next().unwrap();
    let noise = somatrain_noise::unit_column_noise(4, 16, SIGREG_SLICES);

    let mut cpu_grads = Weights::zeros(config);
    let cpu = TrainPass::new().loss_and_grad(&weights, &batch, &noise, options, &mut cpu_grads);

    let device = common::device();
    let model = BurnModel::trainable(&weights, device);
    let mut burn_grads = Weights::zeros(config);
    let loss = model
        .loss_and_grad(&batch, &noise, &options, &mut burn_grads)
        .unwrap()
        .loss;
    assert!(
        (loss - cpu.loss).abs() <= 1e-5 * cpu.loss.abs(),
        "loss {loss} vs {}",
        cpu.loss
    );
    for ((name, a), (_, b)) in burn_grads.tensors().into_iter().zip(cpu_grads.tensors()) {
        let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
        let worst = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(scale > 0.0, "{name}: the CPU gradient is all zero");
        assert!(
            worst <= 1e-6 + 2e-3 * scale,
            "{name}: max difference {worst} against a gradient scale of {scale}"
        );
    }
}

/// Three optimizer steps of the real trainer (corpus, accumulation, dropout, AdamW,
/// checkpoints) with the gradients from burn on flex end where the CPU engine ends.
#[test]
fn the_trainer_on_a_burn_device_follows_the_cpu_run() {
    use somatrain_train::corpus::{CorpusConfig, Source};
    use somatrain_train::{TrainSettings, Until, run_with};
    let corpus = CorpusConfig {
        max_seq_len: 64,
        heldout_per_mille: 500,
        ..CorpusConfig::new(vec![Source::Dir {
            path: std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../train/src"),
        }])
    };
    let mut settings = TrainSettings::reference(somatrain_model::Preset::Tiny.config(), corpus);
    settings.accumulation = 2;
    settings.dropout = 0.1;
    settings.optim.lr = 1e-3;
    settings.heldout_bytes = 1024;
    let train = |engine: &mut dyn somatrain_train::GradientEngine| {
        let dir = tempfile::tempdir().unwrap();
        let mut losses = Vec::new();
        let summary = run_with(dir.path(), &settings, Until::Step(3), engine, &mut |log| {
            losses.push(log.loss)
        })
        .unwrap();
        let weights = somatrain_model::io::load_file(
            &summary.round.weights_path(dir.path()),
            Default::default(),
        )
        .unwrap();
        (losses, weights, summary.round)
    };
    let (cpu_losses, cpu_weights, cpu_round) =
        train(&mut somatrain_model::cpu::train::TrainPass::new());
    let device = common::device();
    let (burn_losses, burn_weights, burn_round) =
        train(&mut somatrain_burn::train::BurnEngine::new(device));
    assert_eq!(cpu_losses.len(), 3);
    for (a, b) in burn_losses.iter().zip(&cpu_losses) {
        assert!(
            (a - b).abs() <= 1e-4 * b.abs(),
            "losses {burn_losses:?} vs {cpu_losses:?}"
        );
    }
    let mut worst = 0f32;
    for ((_, a), (_, b)) in burn_weights
        .tensors()
        .into_iter()
        .zip(cpu_weights.tensors())
    {
        worst = a
            .iter()
            .zip(b)
            .fold(worst, |m, (x, y)| m.max((x - y).abs()));
    }
    // Three Adam steps of 1e-3 move a weight by at most 3e-3; the runs agree far closer.
    assert!(worst < 1e-4, "weights differ by {worst}");
    // The round's held-out score and embedding, computed on the device, match the CPU's.
    let (a, b) = (burn_round.heldout.unwrap(), cpu_round.heldout.unwrap());
    assert_eq!(a.bytes, b.bytes);
    assert!((a.loss - b.loss).abs() < 1e-3 * b.loss, "{a:?} vs {b:?}");
    assert!(
        (a.bits_per_byte - b.bits_per_byte).abs() < 1e-3 * b.bits_per_byte,
        "{a:?} vs {b:?}"
    );
    let drift = burn_round
        .embedding
        .iter()
        .zip(&cpu_round.embedding)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(drift < 1e-3, "embeddings differ by {drift}");
}

/// Mixed precision (bf16 products, f32 masters): the loss within bf16's precision of the f32
/// loss, and every gradient pointing the same way as the f32 one. A device without bf16
/// products refuses mixed precision up front instead.
#[test]
fn bf16_matmuls_keep_loss_and_gradients_close_to_f32() {
    if !somatrain_burn::supports_bf16(&common::device()) {
        let refused = somatrain_burn::train::BurnEngine::new(common::device())
            .with_bf16_matmuls(true)
            .err()
            .expect("bf16 refused on a device without it");
        assert!(refused.to_string().contains("bf16"), "{refused}");
        return;
    }
    let config = somatrain_model::Preset::Small.config();
    let weights = Weights::init(config, 11);
    let data: Vec<u8> = (0..150u32).map(|i| (i * 29 + 3) as u8).collect();
    let batch = batches(&data, 64, 3).next().unwrap();
    let noise = somatrain_noise::unit_column_noise(2, config.embedding_dim, SIGREG_SLICES);
    let run = |bf16: bool| {
        let device = common::device();
        let model = BurnModel::trainable(&weights, device).with_bf16_matmuls(bf16);
        let mut grads = Weights::zeros(config);
        let options = TrainOptions {
            sigreg_coefficient: 0.02,
            grad_scale: 1.0,
            ..TrainOptions::default()
        };
        let out = model
            .loss_and_grad(&batch, &noise, &options, &mut grads)
            .unwrap();
        (out.loss, grads)
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

/// The engine sums micro-batch gradients on the device and hands them over once, on flush:
/// nothing reaches the host before, the sum equals the two gradients added on the host, and
/// changing the weights with gradients still held is refused.
#[test]
fn the_engine_accumulates_on_the_device_until_flushed() {
    use somatrain_train::GradientEngine;
    let config = common::small_model(1);
    let weights = Weights::init(config, 3);
    let data: Vec<u8> = (0..96u32).map(|i| (i * 31 + 7) as u8).collect();
    let micro: Vec<_> = batches(&data, 24, 2).take(2).collect();
    let noise = somatrain_noise::unit_column_noise(1, 16, SIGREG_SLICES);
    let options = TrainOptions {
        grad_scale: 0.5,
        ..TrainOptions::default()
    };
    let device = common::device();

    let model = BurnModel::trainable(&weights, device.clone());
    let mut expected = Weights::zeros(config);
    for b in &micro {
        model
            .loss_and_grad(b, &noise, &options, &mut expected)
            .unwrap();
    }

    let mut engine = somatrain_burn::train::BurnEngine::new(device);
    let mut grads = Weights::zeros(config);
    for b in &micro {
        engine
            .loss_and_grad(&weights, 0, b, &noise, options, &mut grads)
            .unwrap();
    }
    assert!(
        grads
            .tensors()
            .iter()
            .all(|(_, g)| g.iter().all(|&x| x == 0.0)),
        "gradients reached the host before the flush"
    );
    engine.flush_gradients(&mut grads).unwrap();
    for ((name, a), (_, b)) in grads.tensors().into_iter().zip(expected.tensors()) {
        let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
        let worst = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(
            worst <= 1e-6 * scale.max(1.0),
            "{name}: {worst} off at scale {scale}"
        );
    }

    engine
        .loss_and_grad(&weights, 0, &micro[0], &noise, options, &mut grads)
        .unwrap();
    let err = engine
        .loss_and_grad(&weights, 1, &micro[1], &noise, options, &mut grads)
        .unwrap_err();
    assert!(err.to_string().contains("flush_gradients"), "{err}");
}

/// A backend's out-of-memory panic becomes an error naming the micro-batch, what it asks for
/// and what to lower; other failures keep the backend's words.
#[test]
fn out_of_memory_names_the_micro_batch_and_the_fix() {
    let config = somatrain_model::Preset::V1.config();
    let data = vec![b'x'; 4096];
    let batch = batches(&data, 1024, 2).next().unwrap();
    let oom = somatrain_burn::train::device_failure(
        "Unable to allocate 536870912 bytes: CUDA_ERROR_OUT_OF_MEMORY",
        &config,
        &batch,
    )
    .to_string();
    assert!(oom.contains("ran out of memory"), "{oom}");
    assert!(oom.contains("536870912 bytes"), "{oom}");
    assert!(oom.contains("2 x 1024"), "{oom}");
    assert!(oom.contains("try a smaller --micro-batch"), "{oom}");
    assert!(!oom.contains("  "), "a run of spaces in: {oom}");
    let other =
        somatrain_burn::train::device_failure("kernel launch failed", &config, &batch).to_string();
    assert!(other.contains("kernel launch failed"), "{other}");
    assert!(!other.contains("--micro-batch"), "{other}");
}
