//! The training pass on the CPU: a forward pass that keeps what backpropagation needs, the loss
//! (the network's: PAD-inclusive cross-entropy plus SIGReg), and the backward pass into gradient
//! buffers shaped like [`Weights`].
//!
//! Dropout (attention probabilities, after GELU, and on both residual branches, as in the
//! reference trainer) uses counter-based masks keyed by [`TrainOptions::dropout_key`], so the
//! pass is a pure function of weights, batch, noise and key: gradients are bit-reproducible.
//!
//! Shapes as in [`super`]: `N = B*T` rows, width `D`, feed-forward `F`, vocabulary `V`.

use somatrain_data::Batch;

use super::kernels::{self, AttentionRecord, AttentionShape, Dropout};
use crate::config::{SIGREG_COEFFICIENT, SIGREG_SLICES};
use crate::loss::{batch_embedding, cross_entropy_with_grad, sigreg_with_grad};
use crate::score::BatchOutput;
use crate::weights::Weights;

/// Knobs of one training pass.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainOptions {
    /// Dropout rate on all four sites; 0 disables dropout.
    pub dropout: f32,
    /// Key of this pass's dropout masks (derive it from seed, step and micro-batch).
    pub dropout_key: u64,
    /// Weight of SIGReg in the loss (0.02 on the network).
    pub sigreg_coefficient: f32,
    /// Multiplies every gradient (1/k when accumulating k micro-batches).
    pub grad_scale: f32,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            dropout: 0.0,
            dropout_key: 0,
            sigreg_coefficient: SIGREG_COEFFICIENT,
            grad_scale: 1.0,
        }
    }
}

#[derive(Default)]
struct NormCache {
    out: Vec<f32>,   // [N, D]
    mean: Vec<f32>,  // [N]
    denom: Vec<f32>, // [N] sqrt(var + eps)
}

impl NormCache {
    fn resize(&mut self, n: usize, d: usize) {
        self.out.resize(n * d, 0.0);
        self.mean.resize(n, 0.0);
        self.denom.resize(n, 0.0);
    }
}

#[derive(Default)]
struct LayerCache {
    x_in: Vec<f32>, // [N, D] residual stream entering the layer
    ln1: NormCache,
    q: Vec<f32>,     // [N, D] after RoPE
    k: Vec<f32>,     // [N, D] after RoPE
    v: Vec<f32>,     // [N, D]
    probs: Vec<f32>, // [B, H, T, T] softmax output, before dropout
    ctx: Vec<f32>,   // [N, D]
    x_mid: Vec<f32>, // [N, D] residual stream after the attention block
    ln2: NormCache,
    ff_pre: Vec<f32>, // [N, F] before GELU
    ff_act: Vec<f32>, // [N, F] after GELU and dropout
}

/// Buffers of a training pass, kept between steps so that a run allocates once.
#[derive(Default)]
pub struct TrainPass {
    layers: Vec<LayerCache>,
    x_final: Vec<f32>,
    final_norm: NormCache,
    logits: Vec<f32>,
    dlogits: Vec<f32>,
    proj: Vec<f32>,
    dproj: Vec<f32>,
    // backward scratch
    dx: Vec<f32>,
    dtmp: Vec<f32>,
    dff: Vec<f32>,
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
    dctx: Vec<f32>,
    scratch: Vec<f32>,
}

/// The four dropout sites of a layer.
pub const SITE_ATTENTION: u64 = 0;
pub const SITE_ATTENTION_OUT: u64 = 1;
pub const SITE_FFN_ACT: u64 = 2;
pub const SITE_FFN_OUT: u64 = 3;

impl TrainPass {
    pub fn new() -> Self {
        Self::default()
    }

    /// The bytes a CPU training run holds at its peak for micro-batches of `batch` sequences of
    /// `seq_len`: weights, gradients and both Adam moments, what each layer keeps for the
    /// backward (eight `[N, D]` tensors, two `[N, F]`, the attention probabilities), the head's
    /// buffers and the backward's scratch. Within 6% of the peak RSS measured for the small and
    /// medium presets at 1,024 positions (slightly below it: the binary and allocator come on
    /// top).
    pub fn memory_bytes(config: &crate::ModelConfig, batch: usize, seq_len: usize) -> f64 {
        let (b, t) = (batch as f64, seq_len as f64);
        let n = b * t;
        let d = config.embedding_dim as f64;
        let f = config.pwff_hidden_dim as f64;
        let h = config.num_heads as f64;
        let l = config.num_layers as f64;
        let v = config.vocab_size as f64;
        let slices = SIGREG_SLICES as f64;
        let per_layer = 8.0 * n * d + 2.0 * n * f + b * h * t * t;
        let head = n * d + 2.0 * n * v + 2.0 * n * slices;
        let scratch = 6.0 * n * d + n * f;
        let states = 4.0 * config.parameter_count() as f64;
        4.0 * (l * per_layer + head + scratch + states)
    }

    /// Forward and backward over one batch: returns the loss terms and adds
    /// `grad_scale * d(loss)/d(weights)` into `grads`. `noise` is the `[D, 256]` unit-column
    /// SIGReg projection for this pass.
    pub fn loss_and_grad(
        &mut self,
        weights: &Weights,
        batch: &Batch,
        noise: &[f32],
        options: TrainOptions,
        grads: &mut Weights,
    ) -> BatchOutput {
        let out = self.forward(weights, batch, noise, options);
        self.backward(weights, batch, noise, options, grads);
        out
    }

    /// The dropout of `site` (one of the `SITE_*` constants) in `layer`, if any: other
    /// implementations of the training pass use it to draw the very same masks.
    pub fn dropout(options: &TrainOptions, layer: usize, site: u64) -> Option<Dropout> {
        (options.dropout > 0.0).then(|| Dropout {
            rate: options.dropout,
            key: Dropout::derive(options.dropout_key, &[layer as u64, site]),
        })
    }

    fn forward(
        &mut self,
        w: &Weights,
        batch: &Batch,
        noise: &[f32],
        options: TrainOptions,
    ) -> BatchOutput {
        let cfg = w.config;
        let (b, t) = (batch.batch, batch.seq_len);
        let (d, f, v, n) = (
            cfg.embedding_dim,
            cfg.pwff_hidden_dim,
            cfg.vocab_size,
            b * t,
        );
        let shape = AttentionShape {
            batch: b,
            seq: t,
            heads: cfg.num_heads,
            head_dim: cfg.head_dim(),
        };
        let (cos, sin) =
            kernels::rope_tables(&batch.positions, &kernels::rope_timescales(shape.head_dim));
        self.layers.resize_with(cfg.num_layers, LayerCache::default);

        let mut x = vec![0f32; n * d];
        for (row, &tok) in x.chunks_exact_mut(d).zip(&batch.tokens) {
            row.copy_from_slice(&w.embedding[tok as usize * d..][..d]);
        }
        let mut delta = vec![0f32; n * d];
        for (l, (lw, c)) in w.layers.iter().zip(self.layers.iter_mut()).enumerate() {
            c.x_in.clone_from(&x);
            c.ln1.resize(n, d);
            kernels::layer_norm_record(
                &x,
                &lw.norm_1_gamma,
                &lw.norm_1_beta,
                &mut c.ln1.out,
                &mut c.ln1.mean,
                &mut c.ln1.denom,
            );
            for buf in [&mut c.q, &mut c.k, &mut c.v, &mut c.ctx] {
                buf.resize(n * d, 0.0);
            }
            kernels::linear(&c.ln1.out, &lw.query_w, &lw.query_b, &mut c.q, n);
            kernels::linear(&c.ln1.out, &lw.key_w, &lw.key_b, &mut c.k, n);
            kernels::linear(&c.ln1.out, &lw.value_w, &lw.value_b, &mut c.v, n);
            kernels::apply_rope(&mut c.q, &cos, &sin, shape.head_dim);
            kernels::apply_rope(&mut c.k, &cos, &sin, shape.head_dim);
            c.probs.resize(b * cfg.num_heads * t * t, 0.0);
            let record = AttentionRecord {
                probs: &mut c.probs,
                dropout: Self::dropout(&options, l, SITE_ATTENTION),
            };
            kernels::causal_attention(&c.q, &c.k, &c.v, &mut c.ctx, shape, Some(record));
            kernels::linear(&c.ctx, &lw.output_w, &lw.output_b, &mut delta, n);
            if let Some(drop) = Self::dropout(&options, l, SITE_ATTENTION_OUT) {
                drop.apply(&mut delta);
            }
            kernels::add_in_place(&mut x, &delta);
            c.x_mid.clone_from(&x);
            c.ln2.resize(n, d);
            kernels::layer_norm_record(
                &x,
                &lw.norm_2_gamma,
                &lw.norm_2_beta,
                &mut c.ln2.out,
                &mut c.ln2.mean,
                &mut c.ln2.denom,
            );
            c.ff_pre.resize(n * f, 0.0);
            kernels::linear(&c.ln2.out, &lw.inner_w, &lw.inner_b, &mut c.ff_pre, n);
            c.ff_act.clone_from(&c.ff_pre);
            kernels::gelu_in_place(&mut c.ff_act);
            if let Some(drop) = Self::dropout(&options, l, SITE_FFN_ACT) {
                drop.apply(&mut c.ff_act);
            }
            kernels::linear(&c.ff_act, &lw.outer_w, &lw.outer_b, &mut delta, n);
            if let Some(drop) = Self::dropout(&options, l, SITE_FFN_OUT) {
                drop.apply(&mut delta);
            }
            kernels::add_in_place(&mut x, &delta);
        }
        self.final_norm.resize(n, d);
        let fnc = &mut self.final_norm;
        kernels::layer_norm_record(
            &x,
            &w.final_norm_gamma,
            &w.final_norm_beta,
            &mut fnc.out,
            &mut fnc.mean,
            &mut fnc.denom,
        );
        self.x_final = x;
        self.logits.resize(n * v, 0.0);
        kernels::linear(
            &self.final_norm.out,
            &w.predictor_w,
            &w.predictor_b,
            &mut self.logits,
            n,
        );

        self.dlogits.resize(n * v, 0.0);
        let ce_sum = cross_entropy_with_grad(
            &self.logits,
            &batch.targets,
            v,
            options.grad_scale / n as f32,
            &mut self.dlogits,
        );
        let ce = (ce_sum / n as f64) as f32;
        self.proj.resize(n * SIGREG_SLICES, 0.0);
        self.dproj.resize(n * SIGREG_SLICES, 0.0);
        kernels::matmul(
            &self.final_norm.out,
            noise,
            &mut self.proj,
            n,
            d,
            SIGREG_SLICES,
        );
        let sigreg = sigreg_with_grad(
            &self.proj,
            options.sigreg_coefficient * options.grad_scale,
            &mut self.dproj,
        );
        BatchOutput {
            loss: ce + options.sigreg_coefficient * sigreg,
            cross_entropy: ce,
            sigreg,
            embedding: batch_embedding(&self.final_norm.out, b, t, d),
        }
    }

    fn backward(
        &mut self,
        w: &Weights,
        batch: &Batch,
        noise: &[f32],
        options: TrainOptions,
        g: &mut Weights,
    ) {
        let cfg = w.config;
        let (b, t) = (batch.batch, batch.seq_len);
        let (d, f, n) = (cfg.embedding_dim, cfg.pwff_hidden_dim, b * t);
        let shape = AttentionShape {
            batch: b,
            seq: t,
            heads: cfg.num_heads,
            head_dim: cfg.head_dim(),
        };
        let (cos, sin) =
            kernels::rope_tables(&batch.positions, &kernels::rope_timescales(shape.head_dim));
        let neg_sin: Vec<f32> = sin.iter().map(|s| -s).collect();
        for buf in [
            &mut self.dx,
            &mut self.dtmp,
            &mut self.dq,
            &mut self.dk,
            &mut self.dv,
            &mut self.dctx,
        ] {
            buf.resize(n * d, 0.0);
        }
        self.dff.resize(n * f, 0.0);

        // Head: logits = reps W + b; SIGReg on reps A.
        let dreps = &mut self.dtmp;
        kernels::linear_backward(
            &self.final_norm.out,
            &w.predictor_w,
            &self.dlogits,
            n,
            Some((dreps, false)),
            &mut g.predictor_w,
            &mut g.predictor_b,
        );
        // dreps += dproj A^T
        self.scratch.resize(d * SIGREG_SLICES, 0.0);
        transpose(noise, d, SIGREG_SLICES, &mut self.scratch);
        add_matmul(&self.dproj, &self.scratch, dreps, n, SIGREG_SLICES, d);
        self.dx.fill(0.0);
        kernels::layer_norm_backward(
            &self.x_final,
            &self.final_norm.mean,
            &self.final_norm.denom,
            &w.final_norm_gamma,
            dreps,
            &mut self.dx,
            &mut g.final_norm_gamma,
            &mut g.final_norm_beta,
        );

        for l in (0..cfg.num_layers).rev() {
            let (lw, c) = (&w.layers[l], &self.layers[l]);
            let lg = &mut g.layers[l];
            // x = x_mid + drop(ffn_out): the branch gradient is dx through the dropout mask.
            self.dtmp.copy_from_slice(&self.dx);
            if let Some(drop) = Self::dropout(&options, l, SITE_FFN_OUT) {
                drop.apply(&mut self.dtmp);
            }
            kernels::linear_backward(
                &c.ff_act,
                &lw.outer_w,
                &self.dtmp,
                n,
                Some((&mut self.dff, false)),
                &mut lg.outer_w,
                &mut lg.outer_b,
            );
            if let Some(drop) = Self::dropout(&options, l, SITE_FFN_ACT) {
                drop.apply(&mut self.dff);
            }
            kernels::gelu_backward_in_place(&c.ff_pre, &mut self.dff);
            kernels::linear_backward(
                &c.ln2.out,
                &lw.inner_w,
                &self.dff,
                n,
                Some((&mut self.dtmp, false)),
                &mut lg.inner_w,
                &mut lg.inner_b,
            );
            // dx (now d x_mid) += LayerNorm_2 backward.
            kernels::layer_norm_backward(
                &c.x_mid,
                &c.ln2.mean,
                &c.ln2.denom,
                &lw.norm_2_gamma,
                &self.dtmp,
                &mut self.dx,
                &mut lg.norm_2_gamma,
                &mut lg.norm_2_beta,
            );
            // x_mid = x_in + drop(attn_out)
            self.dtmp.copy_from_slice(&self.dx);
            if let Some(drop) = Self::dropout(&options, l, SITE_ATTENTION_OUT) {
                drop.apply(&mut self.dtmp);
            }
            kernels::linear_backward(
                &c.ctx,
                &lw.output_w,
                &self.dtmp,
                n,
                Some((&mut self.dctx, false)),
                &mut lg.output_w,
                &mut lg.output_b,
            );
            kernels::causal_attention_backward(
                &c.q,
                &c.k,
                &c.v,
                &c.probs,
                Self::dropout(&options, l, SITE_ATTENTION),
                &self.dctx,
                &mut self.dq,
                &mut self.dk,
                &mut self.dv,
                shape,
            );
            // RoPE is a rotation: its backward rotates by the opposite angle.
            kernels::apply_rope(&mut self.dq, &cos, &neg_sin, shape.head_dim);
            kernels::apply_rope(&mut self.dk, &cos, &neg_sin, shape.head_dim);
            kernels::linear_backward(
                &c.ln1.out,
                &lw.query_w,
                &self.dq,
                n,
                Some((&mut self.dtmp, false)),
                &mut lg.query_w,
                &mut lg.query_b,
            );
            kernels::linear_backward(
                &c.ln1.out,
                &lw.key_w,
                &self.dk,
                n,
                Some((&mut self.dtmp, true)),
                &mut lg.key_w,
                &mut lg.key_b,
            );
            kernels::linear_backward(
                &c.ln1.out,
                &lw.value_w,
                &self.dv,
                n,
                Some((&mut self.dtmp, true)),
                &mut lg.value_w,
                &mut lg.value_b,
            );
            kernels::layer_norm_backward(
                &c.x_in,
                &c.ln1.mean,
                &c.ln1.denom,
                &lw.norm_1_gamma,
                &self.dtmp,
                &mut self.dx,
                &mut lg.norm_1_gamma,
                &mut lg.norm_1_beta,
            );
        }
        // Embedding rows: scatter-add in token order (sequential, so deterministic).
        for (row, &tok) in self.dx.chunks_exact(d).zip(&batch.tokens) {
            for (a, v) in g.embedding[tok as usize * d..][..d].iter_mut().zip(row) {
                *a += v;
            }
        }
    }
}

/// `out[c, r] = m[r, c]` for `m [rows, cols]`.
fn transpose(m: &[f32], rows: usize, cols: usize, out: &mut [f32]) {
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = m[r * cols + c];
        }
    }
}

/// `out += x @ m` with `x [rows, d_in]`, `m [d_in, d_out]`.
fn add_matmul(x: &[f32], m: &[f32], out: &mut [f32], rows: usize, d_in: usize, d_out: usize) {
    let mut tmp = vec![0f32; rows * d_out];
    kernels::matmul(x, m, &mut tmp, rows, d_in, d_out);
    kernels::add_in_place(out, &tmp);
}
