//! The training pass's gradients against central finite differences of its own loss, with and
//! without dropout; and its forward loss against the scoring path.

use somatrain_data::{Batch, batches};
use somatrain_model::config::SIGREG_SLICES;
use somatrain_model::cpu::CpuModel;
use somatrain_model::cpu::train::{TrainOptions, TrainPass};
use somatrain_model::score::BatchScorer;
use somatrain_model::{ModelConfig, Weights};

fn config() -> ModelConfig {
    ModelConfig {
        embedding_dim: 16,
        num_layers: 2,
        num_heads: 4,
        pwff_hidden_dim: 32,
        vocab_size: 264,
    }
}

fn batch() -> Batch {
    // 2 chunks of 12: the second one short, so EOS and PAD (and clamped positions) are covered.
    let data: Vec<u8> = (0..19u32).map(|i| (i * 37 + 5) as u8).collect();
    batches(&data, 12, 2).next().unwrap()
}

fn loss(w: &Weights, b: &Batch, noise: &[f32], options: TrainOptions) -> f64 {
    let mut grads = Weights::zeros(w.config);
    TrainPass::new()
        .loss_and_grad(w, b, noise, options, &mut grads)
        .loss as f64
}

fn check_gradients(options: TrainOptions) {
    let weights = Weights::init(config(), 3);
    let b = batch();
    let noise = somatrain_noise::unit_column_noise(9, 16, SIGREG_SLICES);
    let mut grads = Weights::zeros(weights.config);
    TrainPass::new().loss_and_grad(&weights, &b, &noise, options, &mut grads);
    let eps = 1e-2f32;
    let mut checked = 0;
    let mut worst = 0f64;
    let names: Vec<String> = weights.tensors().into_iter().map(|(n, _)| n).collect();
    for (ti, name) in names.iter().enumerate() {
        let len = weights.tensors()[ti].1.len();
        // A few spread-out elements of every tensor.
        for k in 0..4 {
            let idx = (k * 7919 + ti * 31) % len;
            let mut plus = weights.clone();
            plus.tensors_mut()[ti].1[idx] += eps;
            let mut minus = weights.clone();
            minus.tensors_mut()[ti].1[idx] -= eps;
            let numeric = (loss(&plus, &b, &noise, options) - loss(&minus, &b, &noise, options))
                / (2.0 * eps as f64);
            let analytic = grads.tensors()[ti].1[idx] as f64;
            let err = (analytic - numeric).abs();
            let tolerance = 5e-4 + 1e-2 * numeric.abs().max(analytic.abs());
            worst = worst.max(err / tolerance);
            assert!(
                err <= tolerance,
                "{name}[{idx}]: analytic {analytic:.6} vs numeric {numeric:.6}"
            );
            checked += 1;
        }
    }
    eprintln!("{checked} gradients checked, worst error {worst:.3} of tolerance");
}

#[test]
fn gradients_match_finite_differences() {
    check_gradients(TrainOptions::default());
}

#[test]
fn gradients_match_finite_differences_with_dropout() {
    check_gradients(TrainOptions {
        dropout: 0.1,
        dropout_key: 77,
        ..TrainOptions::default()
    });
}

#[test]
fn training_forward_equals_scoring_loss() {
    let weights = Weights::init(config(), 4);
    let b = batch();
    let seed = 12;
    let noise = somatrain_noise::unit_column_noise(seed, 16, SIGREG_SLICES);
    let mut grads = Weights::zeros(weights.config);
    let train =
        TrainPass::new().loss_and_grad(&weights, &b, &noise, TrainOptions::default(), &mut grads);
    let score = CpuModel::new(weights).score_batch(&b, seed).unwrap();
    assert!(
        (train.loss - score.loss).abs() <= 1e-6 * score.loss.abs(),
        "{} vs {}",
        train.loss,
        score.loss
    );
    assert!((train.sigreg - score.sigreg).abs() <= 1e-5 * score.sigreg.abs());
}

#[test]
fn gradients_are_bit_reproducible() {
    let weights = Weights::init(config(), 5);
    let b = batch();
    let noise = somatrain_noise::unit_column_noise(1, 16, SIGREG_SLICES);
    let options = TrainOptions {
        dropout: 0.1,
        dropout_key: 3,
        ..TrainOptions::default()
    };
    let run = || {
        let mut g = Weights::zeros(weights.config);
        TrainPass::new().loss_and_grad(&weights, &b, &noise, options, &mut g);
        g
    };
    let (a, c) = (run(), run());
    for ((name, x), (_, y)) in a.tensors().iter().zip(c.tensors()) {
        assert!(
            x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits()),
            "{name} differs"
        );
    }
}
