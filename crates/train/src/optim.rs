//! AdamW with warmup, a constant or cosine schedule, and global-norm gradient clipping.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use somatrain_model::Weights;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Constant,
    Cosine,
}

/// Optimizer hyperparameters. The defaults are the reference trainer's (Adam, lr 1e-4, no
/// weight decay), plus clipping at norm 1.0.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimConfig {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    pub warmup_steps: u64,
    pub schedule: Schedule,
    /// Length of the cosine decay, in optimizer steps; the rate then stays at its floor.
    pub decay_steps: u64,
    /// Floor of the cosine schedule as a fraction of `lr`.
    pub min_lr_ratio: f32,
    /// Clip the global gradient norm to this value; `None` disables clipping.
    pub grad_clip: Option<f32>,
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            warmup_steps: 0,
            schedule: Schedule::Constant,
            decay_steps: 10_000,
            min_lr_ratio: 0.1,
            grad_clip: Some(1.0),
        }
    }
}

impl OptimConfig {
    /// Learning rate of optimizer step `step` (0-based).
    pub fn lr_at(&self, step: u64) -> f32 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f32 / self.warmup_steps as f32;
        }
        match self.schedule {
            Schedule::Constant => self.lr,
            Schedule::Cosine => {
                let progress =
                    ((step - self.warmup_steps) as f32 / self.decay_steps.max(1) as f32).min(1.0);
                let floor = self.lr * self.min_lr_ratio;
                floor + (self.lr - floor) * 0.5 * (1.0 + (std::f32::consts::PI * progress).cos())
            }
        }
    }
}

/// Adam moments, shaped like the weights.
#[derive(Debug, Clone, PartialEq)]
pub struct AdamState {
    pub m: Weights,
    pub v: Weights,
    /// Optimizer steps taken.
    pub step: u64,
}

/// What one update did.
#[derive(Debug, Clone, Copy)]
pub struct StepStats {
    pub lr: f32,
    pub grad_norm: f32,
}

impl AdamState {
    pub fn new(like: &Weights) -> Self {
        AdamState {
            m: Weights::zeros(like.config),
            v: Weights::zeros(like.config),
            step: 0,
        }
    }

    /// One AdamW update of `weights` with `grads` (clipped in place first).
    pub fn update(
        &mut self,
        config: &OptimConfig,
        weights: &mut Weights,
        grads: &mut Weights,
    ) -> StepStats {
        let grad_norm = global_norm(grads);
        if let Some(max) = config.grad_clip
            && grad_norm > max
        {
            let scale = max / grad_norm;
            for (_, g) in grads.tensors_mut() {
                g.par_iter_mut().for_each(|x| *x *= scale);
            }
        }
        let lr = config.lr_at(self.step);
        self.step += 1;
        let t = self.step as i32;
        let bias1 = 1.0 - config.beta1.powi(t);
        let bias2 = 1.0 - config.beta2.powi(t);
        let (b1, b2, eps, wd) = (config.beta1, config.beta2, config.eps, config.weight_decay);
        let tensors = weights.tensors_mut().into_iter();
        let moments = self.m.tensors_mut().into_iter().zip(self.v.tensors_mut());
        for (((_, w), (_, g)), ((_, m), (_, v))) in tensors.zip(grads.tensors()).zip(moments) {
            const CHUNK: usize = 1 << 14;
            w.par_chunks_mut(CHUNK)
                .zip(g.par_chunks(CHUNK))
                .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
                .for_each(|((w, g), (m, v))| {
                    for i in 0..w.len() {
                        m[i] = b1 * m[i] + (1.0 - b1) * g[i];
                        v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
                        let update = (m[i] / bias1) / ((v[i] / bias2).sqrt() + eps);
                        w[i] -= lr * (update + wd * w[i]);
                    }
                });
        }
        StepStats { lr, grad_norm }
    }
}

/// L2 norm of all gradients together, summed in a fixed order.
pub fn global_norm(grads: &Weights) -> f32 {
    let total: f64 = grads
        .tensors()
        .iter()
        .map(|(_, g)| {
            let partials: Vec<f64> = g
                .par_chunks(1 << 16)
                .map(|c| c.iter().map(|x| (*x as f64) * (*x as f64)).sum::<f64>())
                .collect();
            partials.iter().sum::<f64>()
        })
        .sum();
    total.sqrt() as f32
}

#[cfg(test)]
mod tests {
    use super::*;
    use somatrain_model::Preset;

    #[test]
    fn schedule_shapes() {
        let c = OptimConfig {
            warmup_steps: 10,
            schedule: Schedule::Cosine,
            decay_steps: 100,
            ..OptimConfig::default()
        };
        let close = |a: f32, b: f32| (a - b).abs() <= 1e-5 * b;
        assert!(close(c.lr_at(0), 1e-5));
        assert!(close(c.lr_at(9), 1e-4));
        assert!(close(c.lr_at(10), 1e-4));
        assert!(close(c.lr_at(60), 5.5e-5));
        assert!(close(c.lr_at(1000), 1e-5));
    }

    /// The first Adam step moves every parameter with a non-zero gradient by about lr.
    #[test]
    fn first_step_moves_by_lr() {
        let w0 = Weights::init(Preset::Tiny.config(), 1);
        let mut w = w0.clone();
        let mut g = Weights::zeros(w.config);
        g.embedding[0] = 0.5;
        g.predictor_b[3] = -2.0;
        let config = OptimConfig {
            grad_clip: None,
            ..OptimConfig::default()
        };
        let mut state = AdamState::new(&w);
        state.update(&config, &mut w, &mut g);
        // Within the f32 rounding of weights near 1.
        assert!(((w0.embedding[0] - w.embedding[0]) - 1e-4).abs() < 3e-7);
        assert!(((w.predictor_b[3] - w0.predictor_b[3]) - 1e-4).abs() < 3e-7);
        assert_eq!(w.embedding[1], w0.embedding[1]);
    }

    #[test]
    fn clipping_bounds_the_norm() {
        let w = Weights::init(Preset::Tiny.config(), 1);
        let mut g = Weights::zeros(w.config);
        g.embedding[0] = 3.0;
        g.embedding[1] = 4.0;
        assert!((global_norm(&g) - 5.0).abs() < 1e-6);
        let mut state = AdamState::new(&w);
        let stats = state.update(&OptimConfig::default(), &mut w.clone(), &mut g);
        assert!((stats.grad_norm - 5.0).abs() < 1e-6);
        assert!((global_norm(&g) - 1.0).abs() < 1e-6);
    }
}
