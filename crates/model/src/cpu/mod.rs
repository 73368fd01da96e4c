//! The V1 forward pass on the CPU, top to bottom (llm.c style), with fused kernels and `gemm`.
//!
//! Shapes: `B` sequences of `T` tokens, `N = B*T` rows, width `D`, `H` heads of `h = D/H`,
//! feed-forward width `F`, vocabulary `V = 264`. Every activation is a row-major `[N, *]` buffer
//! kept in `Activations` so that scoring many batches allocates once.

pub mod kernels;
pub mod train;

use somatrain_data::Batch;

use crate::config::{SIGREG_COEFFICIENT, SIGREG_SLICES};
use crate::loss::{batch_embedding, cross_entropy_sum, sigreg_mean};
use crate::score::{BatchOutput, BatchScorer, ScoreError};
use crate::weights::Weights;
use kernels::AttentionShape;

/// Reusable activation buffers, grown to the largest batch seen.
#[derive(Default)]
struct Activations {
    x: Vec<f32>,      // [N, D] residual stream
    h: Vec<f32>,      // [N, D] normed input of a block; after the last layer, the representations
    q: Vec<f32>,      // [N, D]
    k: Vec<f32>,      // [N, D]
    v: Vec<f32>,      // [N, D]
    ctx: Vec<f32>,    // [N, D] attention output before the output projection
    delta: Vec<f32>,  // [N, D] a block's output before the residual add
    ff: Vec<f32>,     // [N, F]
    logits: Vec<f32>, // [N, V]
    proj: Vec<f32>,   // [N, SLICES] SIGReg projections
}

fn resize(buf: &mut Vec<f32>, len: usize) {
    buf.resize(len, 0.0);
}

/// A model ready to run on the CPU.
pub struct CpuModel {
    weights: Weights,
    timescales: Vec<f32>,
    acts: Activations,
}

impl CpuModel {
    pub fn new(weights: Weights) -> Self {
        let timescales = kernels::rope_timescales(weights.config.head_dim());
        CpuModel {
            weights,
            timescales,
            acts: Activations::default(),
        }
    }

    pub fn weights(&self) -> &Weights {
        &self.weights
    }

    /// Runs the encoder: afterwards `acts.h` holds the final-norm representations `[N, D]`.
    fn encode(&mut self, tokens: &[u32], positions: &[u32], batch: usize, seq: usize) {
        let cfg = self.weights.config;
        let (d, f, n) = (cfg.embedding_dim, cfg.pwff_hidden_dim, batch * seq);
        assert_eq!(tokens.len(), n);
        assert_eq!(positions.len(), n);
        let a = &mut self.acts;
        for buf in [
            &mut a.x,
            &mut a.h,
            &mut a.q,
            &mut a.k,
            &mut a.v,
            &mut a.ctx,
            &mut a.delta,
        ] {
            resize(buf, n * d);
        }
        resize(&mut a.ff, n * f);

        for (row, &t) in a.x.chunks_exact_mut(d).zip(tokens) {
            assert!(
                (t as usize) < cfg.vocab_size,
                "token id {t} out of vocabulary"
            );
            row.copy_from_slice(&self.weights.embedding[t as usize * d..][..d]);
        }
        let (cos, sin) = kernels::rope_tables(positions, &self.timescales);
        let shape = AttentionShape {
            batch,
            seq,
            heads: cfg.num_heads,
            head_dim: cfg.head_dim(),
        };

        let layers = &self.weights.layers;
        kernels::layer_norm(
            &a.x,
            &layers[0].norm_1_gamma,
            &layers[0].norm_1_beta,
            &mut a.h,
        );
        for (l, w) in layers.iter().enumerate() {
            // Attention block: h = norm_1(x) on entry.
            kernels::linear(&a.h, &w.query_w, &w.query_b, &mut a.q, n);
            kernels::linear(&a.h, &w.key_w, &w.key_b, &mut a.k, n);
            kernels::linear(&a.h, &w.value_w, &w.value_b, &mut a.v, n);
            kernels::apply_rope(&mut a.q, &cos, &sin, shape.head_dim);
            kernels::apply_rope(&mut a.k, &cos, &sin, shape.head_dim);
            kernels::causal_attention(&a.q, &a.k, &a.v, &mut a.ctx, shape, None);
            kernels::linear(&a.ctx, &w.output_w, &w.output_b, &mut a.delta, n);
            kernels::add_then_layer_norm(
                &mut a.x,
                &a.delta,
                &w.norm_2_gamma,
                &w.norm_2_beta,
                &mut a.h,
            );
            // Feed-forward block: h = norm_2(x).
            kernels::linear(&a.h, &w.inner_w, &w.inner_b, &mut a.ff, n);
            kernels::gelu_in_place(&mut a.ff);
            kernels::linear(&a.ff, &w.outer_w, &w.outer_b, &mut a.delta, n);
            let (gamma, beta) = match layers.get(l + 1) {
                Some(next) => (&next.norm_1_gamma, &next.norm_1_beta),
                None => (
                    &self.weights.final_norm_gamma,
                    &self.weights.final_norm_beta,
                ),
            };
            kernels::add_then_layer_norm(&mut a.x, &a.delta, gamma, beta, &mut a.h);
        }
    }

    /// Final-norm representations `[N, D]` and logits `[N, V]` of one batch.
    pub fn forward(
        &mut self,
        tokens: &[u32],
        positions: &[u32],
        batch: usize,
        seq: usize,
    ) -> (&[f32], &[f32]) {
        self.encode(tokens, positions, batch, seq);
        self.predict(batch * seq);
        (&self.acts.h, &self.acts.logits)
    }

    fn predict(&mut self, n: usize) {
        let v = self.weights.config.vocab_size;
        resize(&mut self.acts.logits, n * v);
        kernels::linear(
            &self.acts.h,
            &self.weights.predictor_w,
            &self.weights.predictor_b,
            &mut self.acts.logits,
            n,
        );
    }
}

impl BatchScorer for CpuModel {
    fn score_batch(&mut self, batch: &Batch, noise_seed: u64) -> Result<BatchOutput, ScoreError> {
        let (b, t) = (batch.batch, batch.seq_len);
        let n = b * t;
        let d = self.weights.config.embedding_dim;
        let v = self.weights.config.vocab_size;
        self.forward(&batch.tokens, &batch.positions, b, t);
        let ce = (cross_entropy_sum(&self.acts.logits, &batch.targets, v) / n as f64) as f32;
        let noise = somatrain_noise::unit_column_noise(noise_seed, d, SIGREG_SLICES);
        resize(&mut self.acts.proj, n * SIGREG_SLICES);
        kernels::matmul(
            &self.acts.h,
            &noise,
            &mut self.acts.proj,
            n,
            d,
            SIGREG_SLICES,
        );
        let sigreg = sigreg_mean(&self.acts.proj);
        let embedding = batch_embedding(&self.acts.h, b, t, d);
        Ok(BatchOutput {
            loss: ce + SIGREG_COEFFICIENT * sigreg,
            cross_entropy: ce,
            sigreg,
            embedding,
        })
    }
}
