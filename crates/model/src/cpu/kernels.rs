//! Fused CPU kernels for the V1 forward pass, over row-major `[rows, cols]` f32 buffers.
//!
//! Each kernel follows the canonical scorer's operation order (burn 0.19 on NdArray) where that
//! order changes rounding noticeably: RoPE angles in f32, sin/cos/erf evaluated in f64 and
//! rounded to f32, the causal mask as a replacement rather than an addition.
//! Matrix products go through the `gemm` crate; everything else is parallel over rows.

use gemm::Parallelism;
use rayon::prelude::*;

use crate::config::{LAYER_NORM_EPS, ROPE_MAX_WAVELENGTH};

/// Rows per task for the row-parallel kernels: big enough to amortise scheduling.
const ROWS_PER_TASK: usize = 16;
/// Query rows per attention tile.
const QUERY_BLOCK: usize = 128;

/// A buffer that tasks writing disjoint regions may share: its pointer and length.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32, usize);
// SAFETY: only used by tasks that write provably disjoint index ranges of one live buffer.
unsafe impl Send for SharedMut {}
// SAFETY: as for `Send`: concurrent tasks never touch the same element.
unsafe impl Sync for SharedMut {}

impl SharedMut {
    fn new(buffer: &mut [f32]) -> Self {
        SharedMut(buffer.as_mut_ptr(), buffer.len())
    }

    /// A method (not field access) so closures capture the whole `Send` wrapper.
    fn get(self) -> *mut f32 {
        self.0
    }

    fn len(self) -> usize {
        self.1
    }
}

/// Where a matrix sits in a buffer: element `(i, j)` at
/// `offset + i * row_stride + j * col_stride`.
#[derive(Clone, Copy, Debug)]
struct Layout {
    offset: usize,
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl Layout {
    /// A row-major matrix at `offset` whose rows are `row_stride` apart.
    fn rows_at(offset: usize, rows: usize, cols: usize, row_stride: usize) -> Self {
        Layout {
            offset,
            rows,
            cols,
            row_stride,
            col_stride: 1,
        }
    }

    /// A matrix read transposed in place: element `(i, j)` at `offset + i + j * col_stride`.
    fn columns_at(offset: usize, rows: usize, cols: usize, col_stride: usize) -> Self {
        Layout {
            offset,
            rows,
            cols,
            row_stride: 1,
            col_stride,
        }
    }

    /// One past the last element the layout addresses (its offset when it is empty).
    fn end(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            return self.offset;
        }
        self.offset + (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride + 1
    }
}

/// Checks that `dst = lhs . rhs` is a well-formed product and that every layout stays inside
/// its buffer; panics (like slice indexing) when one does not.
fn check_product(
    dst: Layout,
    dst_len: usize,
    lhs: Layout,
    lhs_len: usize,
    rhs: Layout,
    rhs_len: usize,
) {
    assert!(
        dst.rows == lhs.rows && lhs.cols == rhs.rows && rhs.cols == dst.cols,
        "product shapes disagree: {dst:?} = {lhs:?} . {rhs:?}"
    );
    assert!(
        dst.end() <= dst_len,
        "product output {dst:?} overruns {dst_len} elements"
    );
    assert!(
        lhs.end() <= lhs_len,
        "product input {lhs:?} overruns {lhs_len} elements"
    );
    assert!(
        rhs.end() <= rhs_len,
        "product input {rhs:?} overruns {rhs_len} elements"
    );
}

/// `dst = lhs . rhs` (or `dst += lhs . rhs` when `accumulate`), every layout checked against
/// its slice first. The one safe door to `gemm` for buffers a task owns.
#[allow(clippy::too_many_arguments)]
fn product(
    dst: &mut [f32],
    d: Layout,
    lhs: &[f32],
    l: Layout,
    rhs: &[f32],
    r: Layout,
    accumulate: bool,
    parallelism: Parallelism,
) {
    // SAFETY: `dst` is borrowed mutably, so no other thread touches it during the call;
    // `product_shared` checks every layout against its buffer.
    unsafe {
        product_shared(
            SharedMut::new(dst),
            d,
            lhs,
            l,
            rhs,
            r,
            accumulate,
            parallelism,
        )
    }
}

/// As [`product`], writing into a buffer shared by parallel tasks.
///
/// # Safety
/// `dst` must come from [`SharedMut::new`] over a buffer that outlives the call, and no other
/// thread may read or write the elements `d` addresses while it runs.
#[allow(clippy::too_many_arguments)]
unsafe fn product_shared(
    dst: SharedMut,
    d: Layout,
    lhs: &[f32],
    l: Layout,
    rhs: &[f32],
    r: Layout,
    accumulate: bool,
    parallelism: Parallelism,
) {
    check_product(d, dst.len(), l, lhs.len(), r, rhs.len());
    // SAFETY: the offsets are inside the buffers (checked), strides fit isize because the
    // extents fit in allocations, and gemm reads/writes only the addressed elements.
    unsafe {
        gemm::gemm(
            d.rows,
            d.cols,
            l.cols,
            dst.get().add(d.offset),
            d.col_stride as isize,
            d.row_stride as isize,
            accumulate,
            lhs.as_ptr().add(l.offset),
            l.col_stride as isize,
            l.row_stride as isize,
            rhs.as_ptr().add(r.offset),
            r.col_stride as isize,
            r.row_stride as isize,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// `out[n, o] = b[o] + x[n, :] . w[:, o]` with `w` stored `[in, out]`.
pub fn linear(x: &[f32], w: &[f32], b: &[f32], out: &mut [f32], rows: usize) {
    let d_out = b.len();
    let d_in = w.len() / d_out;
    for row in out.chunks_exact_mut(d_out) {
        row.copy_from_slice(b);
    }
    dense_product(x, w, out, rows, d_in, d_out, true);
}

/// `out = x @ m` without bias (`m` is `[in, out]`), written over `out`.
pub fn matmul(x: &[f32], m: &[f32], out: &mut [f32], rows: usize, d_in: usize, d_out: usize) {
    dense_product(x, m, out, rows, d_in, d_out, false);
}

/// `out (+)= x @ m` for row-major `x [rows, d_in]`, `m [d_in, d_out]`, `out [rows, d_out]`.
fn dense_product(
    x: &[f32],
    m: &[f32],
    out: &mut [f32],
    rows: usize,
    d_in: usize,
    d_out: usize,
    accumulate: bool,
) {
    assert_eq!(x.len(), rows * d_in);
    assert_eq!(m.len(), d_in * d_out);
    assert_eq!(out.len(), rows * d_out);
    product(
        out,
        Layout::rows_at(0, rows, d_out, d_out),
        x,
        Layout::rows_at(0, rows, d_in, d_in),
        m,
        Layout::rows_at(0, d_in, d_out, d_out),
        accumulate,
        Parallelism::Rayon(0),
    );
}

/// LayerNorm over the last axis: `((x - mean) / sqrt(var + eps)) * gamma + beta`, biased
/// variance, two passes.
pub fn layer_norm(x: &[f32], gamma: &[f32], beta: &[f32], out: &mut [f32]) {
    let d = gamma.len();
    out.par_chunks_mut(d * ROWS_PER_TASK)
        .zip(x.par_chunks(d * ROWS_PER_TASK))
        .for_each(|(out_rows, x_rows)| {
            for (o, r) in out_rows.chunks_exact_mut(d).zip(x_rows.chunks_exact(d)) {
                layer_norm_row(r, gamma, beta, o);
            }
        });
}

/// `x += delta`, then `out = LayerNorm(x)`: the residual add fused with the next norm.
pub fn add_then_layer_norm(
    x: &mut [f32],
    delta: &[f32],
    gamma: &[f32],
    beta: &[f32],
    out: &mut [f32],
) {
    let d = gamma.len();
    let chunk = d * ROWS_PER_TASK;
    x.par_chunks_mut(chunk)
        .zip(delta.par_chunks(chunk))
        .zip(out.par_chunks_mut(chunk))
        .for_each(|((x_rows, d_rows), out_rows)| {
            for ((r, dr), o) in x_rows
                .chunks_exact_mut(d)
                .zip(d_rows.chunks_exact(d))
                .zip(out_rows.chunks_exact_mut(d))
            {
                for (a, b) in r.iter_mut().zip(dr) {
                    *a += b;
                }
                layer_norm_row(r, gamma, beta, o);
            }
        });
}

/// `x += delta` in parallel.
pub fn add_in_place(x: &mut [f32], delta: &[f32]) {
    x.par_chunks_mut(4096)
        .zip(delta.par_chunks(4096))
        .for_each(|(a, b)| {
            for (p, q) in a.iter_mut().zip(b) {
                *p += q;
            }
        });
}

#[inline]
fn sum_f32(values: impl Iterator<Item = f32>) -> f32 {
    // Eight running sums vectorise and keep rounding error near that of pairwise summation.
    let mut lanes = [0f32; 8];
    for (i, v) in values.enumerate() {
        lanes[i & 7] += v;
    }
    ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
        + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]))
}

#[inline]
fn layer_norm_row(x: &[f32], gamma: &[f32], beta: &[f32], out: &mut [f32]) {
    let n = x.len() as f32;
    let mean = sum_f32(x.iter().copied()) / n;
    let var = sum_f32(x.iter().map(|v| (v - mean) * (v - mean))) / n;
    let denom = (var + LAYER_NORM_EPS).sqrt();
    for (((o, v), g), b) in out.iter_mut().zip(x).zip(gamma).zip(beta) {
        *o = ((v - mean) / denom) * g + b;
    }
}

/// Exact (erf) GELU in place: `(x * (erf(x / sqrt 2) + 1)) / 2`.
pub fn gelu_in_place(x: &mut [f32]) {
    x.par_chunks_mut(4096).for_each(|chunk| {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("fma") && is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports FMA, checked just above.
            unsafe { gelu_chunk_fma(chunk) };
            return;
        }
        gelu_chunk(chunk);
    });
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn gelu_chunk_fma(chunk: &mut [f32]) {
    gelu_chunk(chunk);
}

#[inline(always)]
fn gelu_chunk(chunk: &mut [f32]) {
    for v in chunk {
        *v = gelu(*v);
    }
}

#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    (x * (erf(x / std::f32::consts::SQRT_2) + 1.0)) / 2.0
}

/// erf in f32: a polynomial in x^2 near zero and `1 - exp(poly(|x|))` beyond, both minimax fits
/// (after N. Juffa's erff). The test below bounds its error against f64 erf over a dense sweep;
/// the scorer itself evaluates erf in f64 and rounds, so both agree to about one ulp.
#[inline(always)]
pub fn erf(a: f32) -> f32 {
    // Both branches are evaluated and one is selected, so that loops over erf vectorise.
    let t = a.abs();
    let s = a * a;
    let mut r = (-1.728_534_7e-5f32).mul_add(t, 3.831_971_3e-4);
    let u = (-3.883_964_4e-3f32).mul_add(t, 2.425_462_2e-2);
    r = r.mul_add(s, u);
    r = r.mul_add(t, -1.067_778_8e-1);
    r = r.mul_add(t, -6.348_467e-1);
    r = r.mul_add(t, -1.287_175_1e-1);
    r = r.mul_add(t, -t);
    // r <= 0 wherever this branch is selected (|a| > 0.9277).
    let large = (1.0 - exp_nonpositive(r.min(0.0))).copysign(a);
    let mut q = -5.967_617e-4f32;
    q = q.mul_add(s, 4.991_194_2e-3);
    q = q.mul_add(s, -2.676_813_5e-2);
    q = q.mul_add(s, 1.128_199_3e-1);
    q = q.mul_add(s, -3.761_253_4e-1);
    q = q.mul_add(s, 1.283_791_7e-1);
    let small = q.mul_add(a, a);
    if t > 0.927_734_4 { large } else { small }
}

/// e^x for x <= 0: Cody-Waite reduction to |r| <= ln2/2 and a degree-7 Taylor polynomial
/// (truncation error below 0.1 ulp), scaled by 2^k through the exponent bits. Branch-free, so
/// loops over it vectorise (libm's `expf` is a call per element). Inputs at or below -87.33 give
/// 0 (subnormal results are flushed); positive inputs are out of contract.
#[inline(always)]
pub fn exp_nonpositive(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75; // 0x3f317200: few mantissa bits, so k * LN2_HI is exact
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUNDER: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to the nearest integer
    const FLOOR: f32 = -87.336_55;
    let clamped = x.max(FLOOR);
    let k = (clamped * LOG2E + ROUNDER) - ROUNDER;
    let r = k.mul_add(-LN2_LO, k.mul_add(-LN2_HI, clamped));
    let mut p = 1.0f32 / 5040.0;
    p = p.mul_add(r, 1.0 / 720.0);
    p = p.mul_add(r, 1.0 / 120.0);
    p = p.mul_add(r, 1.0 / 24.0);
    p = p.mul_add(r, 1.0 / 6.0);
    p = p.mul_add(r, 0.5);
    p = p.mul_add(r, 1.0);
    p = p.mul_add(r, 1.0);
    let scale = f32::from_bits(((k as i32 + 127) as u32) << 23);
    if x <= FLOOR { 0.0 } else { p * scale }
}

/// RoPE timescales `10000^(2i/h)` for `i < h/2`, each correctly rounded to f32 as the canonical
/// scorer computes them.
pub fn rope_timescales(head_dim: usize) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| {
            let fraction = (i as f32 * 2.0) / head_dim as f32;
            (ROPE_MAX_WAVELENGTH as f64).powf(fraction as f64) as f32
        })
        .collect()
}

/// cos and sin of every (token, frequency) angle, `[tokens, head_dim / 2]` each. The angle is
/// `f32(position) / timescale` in f32; only then are sin and cos taken (in f64, rounded).
pub fn rope_tables(positions: &[u32], timescales: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let half = timescales.len();
    let mut cos = vec![0f32; positions.len() * half];
    let mut sin = vec![0f32; positions.len() * half];
    cos.par_chunks_mut(half)
        .zip(sin.par_chunks_mut(half))
        .zip(positions.par_iter())
        .for_each(|((c, s), &pos)| {
            for ((c, s), ts) in c.iter_mut().zip(s.iter_mut()).zip(timescales) {
                let angle = (pos as f32 / ts) as f64;
                let (sv, cv) = angle.sin_cos();
                *c = cv as f32;
                *s = sv as f32;
            }
        });
    (cos, sin)
}

/// Half-split RoPE in place on `x [tokens, heads * head_dim]`:
/// `a' = a cos - b sin`, `b' = b cos + a sin` for the two halves `a`, `b` of each head.
pub fn apply_rope(x: &mut [f32], cos: &[f32], sin: &[f32], head_dim: usize) {
    let half = head_dim / 2;
    let width = x.len() / (cos.len() / half);
    x.par_chunks_mut(width)
        .zip(cos.par_chunks(half))
        .zip(sin.par_chunks(half))
        .for_each(|((row, c), s)| {
            for head in row.chunks_exact_mut(head_dim) {
                let (a, b) = head.split_at_mut(half);
                for i in 0..half {
                    let (ai, bi) = (a[i], b[i]);
                    a[i] = ai * c[i] - bi * s[i];
                    b[i] = bi * c[i] + ai * s[i];
                }
            }
        });
}

/// What a training forward pass keeps of attention: the softmax probabilities
/// `[batch, heads, seq, seq]` (zero above the diagonal), and the dropout applied to them.
pub struct AttentionRecord<'a> {
    pub probs: &'a mut [f32],
    pub dropout: Option<Dropout>,
}

/// Inverted dropout with a counter-based mask: element `i` is dropped when the top 24 bits of a
/// keyed 32-bit hash of `i` fall below `rate * 2^24`, and kept elements are scaled by
/// `1 / (1 - rate)`. The mask is a pure function of the key, so the backward pass and a resumed
/// run regenerate it exactly instead of storing it.
///
/// The hash uses only what a device computes exactly with integer tensor ops on `u32`:
/// xor, logical right shifts, wrapping additions, and wrapping products by constants below
/// 2^31 (a backend that widens `u32` to `i64` for a product cannot overflow). The libtorch path
/// (`somatrain-torch`) draws its own masks with libtorch's generator instead.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dropout {
    pub rate: f32,
    pub key: u64,
}

/// One step of [`Dropout`]'s hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashStep {
    /// `x ^= low 32 bits of the key`
    XorKeyLow,
    /// `x = x + high 32 bits of the key`, wrapping
    AddKeyHigh,
    /// `x ^= x >> n`
    XorShift(u32),
    /// `x = x * c`, wrapping; `c < 2^31`
    Multiply(u32),
}

impl Dropout {
    /// The hash of an element index, step by step (two 32-bit finalisers of Wellons'
    /// hash-prospector family, keyed before the first and between the two).
    pub const HASH_STEPS: [HashStep; 10] = [
        HashStep::XorKeyLow,
        HashStep::XorShift(16),
        HashStep::Multiply(0x7feb_352d),
        HashStep::XorShift(15),
        HashStep::AddKeyHigh,
        HashStep::XorShift(15),
        HashStep::Multiply(0x2c1b_3c6d),
        HashStep::XorShift(12),
        HashStep::Multiply(0x297a_2d39),
        HashStep::XorShift(15),
    ];

    /// The most elements one dropout site may have: indices are 32-bit.
    pub const MAX_ELEMENTS: u64 = 1 << 32;

    /// The 32-bit hash of element `index` under this key.
    #[inline(always)]
    pub fn bits(&self, index: u32) -> u32 {
        let (low, high) = (self.key as u32, (self.key >> 32) as u32);
        let mut x = index;
        for step in Self::HASH_STEPS {
            x = match step {
                HashStep::XorKeyLow => x ^ low,
                HashStep::AddKeyHigh => x.wrapping_add(high),
                HashStep::XorShift(n) => x ^ (x >> n),
                HashStep::Multiply(c) => x.wrapping_mul(c),
            };
        }
        x
    }

    /// Elements whose `bits >> 8` is below this are dropped: `uniform < rate` with
    /// `uniform = (bits >> 8) / 2^24`, compared exactly in integers.
    #[inline(always)]
    pub fn threshold(&self) -> u32 {
        ((self.rate as f64) * (1u64 << 24) as f64)
            .ceil()
            .clamp(0.0, (1u64 << 24) as f64) as u32
    }

    /// Whether element `index` is dropped.
    #[inline(always)]
    pub fn drops(&self, index: u64) -> bool {
        debug_assert!(
            index < Self::MAX_ELEMENTS,
            "dropout index {index} past 2^32"
        );
        (self.bits(index as u32) >> 8) < self.threshold()
    }

    /// What a kept element is multiplied by.
    #[inline(always)]
    pub fn keep_scale(&self) -> f32 {
        1.0 / (1.0 - self.rate)
    }

    /// 0 or `1 / (1 - rate)` for element `index`.
    #[inline(always)]
    pub fn scale_at(&self, index: u64) -> f32 {
        if self.drops(index) {
            0.0
        } else {
            self.keep_scale()
        }
    }

    /// [`Dropout::drops`] for elements `0..count`, drawn in parallel (devices upload this mask).
    pub fn dropped(&self, count: usize) -> Vec<bool> {
        let mut out = vec![false; count];
        out.par_chunks_mut(1 << 16)
            .enumerate()
            .for_each(|(c, chunk)| {
                let base = (c << 16) as u64;
                for (i, d) in chunk.iter_mut().enumerate() {
                    *d = self.drops(base + i as u64);
                }
            });
        out
    }

    /// A key for one dropout site, derived from a base key and site coordinates.
    pub fn derive(base: u64, parts: &[u64]) -> u64 {
        let mut key = base ^ 0x5851_f42d_4c95_7f2d;
        for &p in parts {
            key = (key ^ p)
                .wrapping_mul(0x2545_f491_4f6c_dd1d)
                .rotate_left(29);
        }
        key
    }

    /// `x *= mask` element-wise, element `i` of the slice being index `i`.
    pub fn apply(&self, x: &mut [f32]) {
        x.par_chunks_mut(4096).enumerate().for_each(|(c, chunk)| {
            let base = (c * 4096) as u64;
            for (i, v) in chunk.iter_mut().enumerate() {
                *v *= self.scale_at(base + i as u64);
            }
        });
    }
}

/// Shape of a multi-head attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub head_dim: usize,
}

/// Causal softmax attention, `q`, `k`, `v`, `ctx` all `[batch * seq, heads * head_dim]` with head
/// `h` in columns `h*head_dim..`. Query tiles only look at keys up to their last row, so the
/// masked upper half is never computed (its softmax weights are exactly zero in the canonical
/// computation too, since masked scores are replaced by -1e4).
pub fn causal_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    ctx: &mut [f32],
    shape: AttentionShape,
    record: Option<AttentionRecord<'_>>,
) {
    let AttentionShape {
        batch,
        seq,
        heads,
        head_dim,
    } = shape;
    let width = heads * head_dim;
    let n = batch * seq * width;
    assert!(
        q.len() == n && k.len() == n && v.len() == n && ctx.len() == n,
        "attention buffers must each hold batch * seq * width = {n} values"
    );
    let scale = (head_dim as f32).sqrt();
    let blocks = seq.div_ceil(QUERY_BLOCK);
    let out = SharedMut::new(ctx);
    let (probs_out, dropout) = match record {
        Some(r) => {
            assert_eq!(r.probs.len(), batch * heads * seq * seq);
            (Some(SharedMut::new(r.probs)), r.dropout)
        }
        None => (None, None),
    };
    (0..batch * heads * blocks)
        .into_par_iter()
        .for_each_init(Vec::<f32>::new, |scores, task| {
            // Later tiles are larger; visiting them first balances the two cores.
            let block = blocks - 1 - task % blocks;
            let head = (task / blocks) % heads;
            let b = task / (blocks * heads);
            let q0 = block * QUERY_BLOCK;
            let rows = QUERY_BLOCK.min(seq - q0);
            let keys = q0 + rows;
            let base = b * seq * width + head * head_dim;
            scores.clear();
            scores.resize(rows * keys, 0.0);
            // SAFETY: the reads stay within q/k/v (row < batch*seq, col < width) and the write goes
            // to rows q0..q0+rows of sequence b, columns of `head`: a region no other task touches.
            product(
                scores,
                Layout::rows_at(0, rows, keys, keys),
                q,
                Layout::rows_at(base + q0 * width, rows, head_dim, width),
                k,
                Layout::columns_at(base, head_dim, keys, width),
                false,
                Parallelism::None,
            );
            softmax_tile(scores, keys, q0, scale);
            if let Some(probs) = probs_out {
                let plane = (b * heads + head) * seq * seq;
                for r in 0..rows {
                    let start = plane + (q0 + r) * seq;
                    assert!(start + seq <= probs.len(), "probability row out of bounds");
                    // SAFETY: inside the buffer (checked above), and row q0 + r of plane
                    // (b, head) belongs to this task alone.
                    let dst =
                        unsafe { std::slice::from_raw_parts_mut(probs.get().add(start), seq) };
                    dst[..keys].copy_from_slice(&scores[r * keys..(r + 1) * keys]);
                    dst[keys..].fill(0.0);
                }
            }
            if let Some(drop) = dropout {
                let plane = ((b * heads + head) * seq * seq) as u64;
                for r in 0..rows {
                    let row_base = plane + ((q0 + r) * seq) as u64;
                    for (j, s) in scores[r * keys..(r + 1) * keys].iter_mut().enumerate() {
                        *s *= drop.scale_at(row_base + j as u64);
                    }
                }
            }
            // SAFETY: rows q0..q0+rows of sequence b, in head `head`'s columns of `ctx`, belong
            // to this task alone (tasks split by batch, head and query block).
            unsafe {
                product_shared(
                    out,
                    Layout::rows_at(base + q0 * width, rows, head_dim, width),
                    scores,
                    Layout::rows_at(0, rows, keys, keys),
                    v,
                    Layout::rows_at(base, keys, head_dim, width),
                    false,
                    Parallelism::None,
                );
            }
        });
}

/// Softmax of every row of a `[rows, keys]` score tile whose first row is query `q0`: row `r`
/// sees keys `0..=q0 + r`, the rest is zeroed.
fn softmax_tile(scores: &mut [f32], keys: usize, q0: usize, scale: f32) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("fma") && is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports FMA, checked just above.
        unsafe { softmax_tile_fma(scores, keys, q0, scale) };
        return;
    }
    softmax_tile_generic(scores, keys, q0, scale);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn softmax_tile_fma(scores: &mut [f32], keys: usize, q0: usize, scale: f32) {
    softmax_tile_generic(scores, keys, q0, scale);
}

#[inline(always)]
fn softmax_tile_generic(scores: &mut [f32], keys: usize, q0: usize, scale: f32) {
    for (r, row) in scores.chunks_exact_mut(keys).enumerate() {
        softmax_prefix(row, q0 + r + 1, scale);
    }
}

/// Scales the first `valid` scores by `1/scale` (as a division, like the scorer), softmaxes them
/// and zeroes the rest of the row.
#[inline(always)]
fn softmax_prefix(row: &mut [f32], valid: usize, scale: f32) {
    let (live, masked) = row.split_at_mut(valid);
    let mut max = f32::NEG_INFINITY;
    for s in live.iter_mut() {
        *s /= scale;
        max = max.max(*s);
    }
    // Separate loops (exp, then an 8-lane sum) so that the exp loop vectorises.
    for s in live.iter_mut() {
        *s = exp_nonpositive(*s - max);
    }
    let sum = sum_f32(live.iter().copied());
    for s in live.iter_mut() {
        *s /= sum;
    }
    masked.fill(0.0);
}

// ---------------------------------------------------------------------------------------------
// Training kernels: forward variants that keep what the backward pass needs, and backward passes.
// Reductions over rows use fixed chunks summed in order, so gradients are bit-reproducible
// whatever the thread scheduling (a resumed run must match an uninterrupted one exactly).

/// Rows per fixed reduction chunk.
const REDUCE_ROWS: usize = 64;

/// LayerNorm that also records each row's mean and `sqrt(var + eps)` for the backward pass.
pub fn layer_norm_record(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    out: &mut [f32],
    mean: &mut [f32],
    denom: &mut [f32],
) {
    let d = gamma.len();
    out.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .zip(mean.par_iter_mut().zip(denom.par_iter_mut()))
        .for_each(|((o, r), (m, s))| {
            let n = d as f32;
            let mu = sum_f32(r.iter().copied()) / n;
            let var = sum_f32(r.iter().map(|v| (v - mu) * (v - mu))) / n;
            let den = (var + LAYER_NORM_EPS).sqrt();
            for (((o, v), g), b) in o.iter_mut().zip(r).zip(gamma).zip(beta) {
                *o = ((v - mu) / den) * g + b;
            }
            *m = mu;
            *s = den;
        });
}

/// Backward of LayerNorm: `dx += ...`, `dgamma += sum(dy * xhat)`, `dbeta += sum(dy)`.
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_backward(
    x: &[f32],
    mean: &[f32],
    denom: &[f32],
    gamma: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) {
    let d = gamma.len();
    let rows = mean.len();
    let chunks = rows.div_ceil(REDUCE_ROWS);
    let mut partial = vec![0f32; chunks * 2 * d];
    partial
        .par_chunks_mut(2 * d)
        .zip(dx.par_chunks_mut(REDUCE_ROWS * d))
        .enumerate()
        .for_each(|(c, (part, dx_rows))| {
            let (pg, pb) = part.split_at_mut(d);
            let mut xhat = vec![0f32; d];
            let mut dxhat = vec![0f32; d];
            for (i, dx_row) in dx_rows.chunks_exact_mut(d).enumerate() {
                let row = c * REDUCE_ROWS + i;
                let xr = &x[row * d..][..d];
                let dyr = &dy[row * d..][..d];
                let rstd = 1.0 / denom[row];
                for j in 0..d {
                    xhat[j] = (xr[j] - mean[row]) * rstd;
                    dxhat[j] = dyr[j] * gamma[j];
                    pg[j] += dyr[j] * xhat[j];
                    pb[j] += dyr[j];
                }
                let m1 = sum_f32(dxhat.iter().copied()) / d as f32;
                let m2 = sum_f32(dxhat.iter().zip(&xhat).map(|(a, b)| a * b)) / d as f32;
                for j in 0..d {
                    dx_row[j] += rstd * (dxhat[j] - m1 - xhat[j] * m2);
                }
            }
        });
    for part in partial.chunks_exact(2 * d) {
        let (pg, pb) = part.split_at(d);
        for j in 0..d {
            dgamma[j] += pg[j];
            dbeta[j] += pb[j];
        }
    }
}

/// Backward of `y = x W + b` for `rows` rows: `dw += x^T dy`, `db += colsum(dy)`, and
/// `dx = dy W^T` (or `dx += dy W^T` when `accumulate_dx`).
#[allow(clippy::too_many_arguments)]
pub fn linear_backward(
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    rows: usize,
    dx: Option<(&mut [f32], bool)>,
    dw: &mut [f32],
    db: &mut [f32],
) {
    let d_out = db.len();
    let d_in = w.len() / d_out;
    assert_eq!(x.len(), rows * d_in);
    assert_eq!(dy.len(), rows * d_out);
    assert_eq!(dw.len(), w.len());
    product(
        dw,
        Layout::rows_at(0, d_in, d_out, d_out),
        x,
        Layout::columns_at(0, d_in, rows, d_in),
        dy,
        Layout::rows_at(0, rows, d_out, d_out),
        true,
        Parallelism::Rayon(0),
    );
    if let Some((dx, accumulate)) = dx {
        assert_eq!(dx.len(), rows * d_in);
        product(
            dx,
            Layout::rows_at(0, rows, d_in, d_in),
            dy,
            Layout::rows_at(0, rows, d_out, d_out),
            w,
            Layout::columns_at(0, d_out, d_in, d_out),
            accumulate,
            Parallelism::Rayon(0),
        );
    }
    column_sums_into(dy, rows, db);
}

/// `acc[j] += sum over rows of m[row, j]`, in a fixed order.
pub fn column_sums_into(m: &[f32], rows: usize, acc: &mut [f32]) {
    let d = acc.len();
    let chunks = rows.div_ceil(REDUCE_ROWS);
    let mut partial = vec![0f32; chunks * d];
    partial
        .par_chunks_mut(d)
        .zip(m.par_chunks(REDUCE_ROWS * d))
        .for_each(|(p, block)| {
            for row in block.chunks_exact(d) {
                for (a, v) in p.iter_mut().zip(row) {
                    *a += v;
                }
            }
        });
    for p in partial.chunks_exact(d) {
        for (a, v) in acc.iter_mut().zip(p) {
            *a += v;
        }
    }
}

/// `dx *= GELU'(x)` where `GELU'(x) = Phi(x) + x phi(x)`.
pub fn gelu_backward_in_place(x: &[f32], dx: &mut [f32]) {
    dx.par_chunks_mut(4096)
        .zip(x.par_chunks(4096))
        .for_each(|(g, xs)| {
            #[cfg(target_arch = "x86_64")]
            if is_x86_feature_detected!("fma") && is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU supports FMA, checked just above.
                unsafe { gelu_backward_chunk_fma(xs, g) };
                return;
            }
            gelu_backward_chunk(xs, g);
        });
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn gelu_backward_chunk_fma(x: &[f32], g: &mut [f32]) {
    gelu_backward_chunk(x, g);
}

#[inline(always)]
fn gelu_backward_chunk(x: &[f32], g: &mut [f32]) {
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    for (g, &v) in g.iter_mut().zip(x) {
        let cdf = 0.5 * (1.0 + erf(v / std::f32::consts::SQRT_2));
        let pdf = INV_SQRT_2PI * exp_nonpositive(-0.5 * v * v);
        *g *= cdf + v * pdf;
    }
}

/// Backward of [`causal_attention`] given the recorded probabilities: writes `dq`, `dk`, `dv`
/// (all `[batch * seq, heads * head_dim]`, q and k after RoPE). Works in the same query tiles
/// as the forward pass, so the masked upper half is skipped here too.
#[allow(clippy::too_many_arguments)]
pub fn causal_attention_backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    probs: &[f32],
    dropout: Option<Dropout>,
    dctx: &[f32],
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    shape: AttentionShape,
) {
    let AttentionShape {
        batch,
        seq,
        heads,
        head_dim,
    } = shape;
    let width = heads * head_dim;
    let n = batch * seq * width;
    assert!(
        [
            q.len(),
            k.len(),
            v.len(),
            dctx.len(),
            dq.len(),
            dk.len(),
            dv.len()
        ]
        .iter()
        .all(|len| *len == n),
        "attention buffers must each hold batch * seq * width = {n} values"
    );
    assert_eq!(
        probs.len(),
        batch * heads * seq * seq,
        "attention probabilities"
    );
    let scale = (head_dim as f32).sqrt();
    let blocks = seq.div_ceil(QUERY_BLOCK);
    let (dq_p, dk_p, dv_p) = (SharedMut::new(dq), SharedMut::new(dk), SharedMut::new(dv));
    (0..batch * heads).into_par_iter().for_each(|task| {
        let (b, head) = (task / heads, task % heads);
        let base = b * seq * width + head * head_dim;
        let plane_off = task * seq * seq;
        let plane = &probs[plane_off..][..seq * seq];
        let mut pd = vec![0f32; QUERY_BLOCK * seq];
        let mut dp = vec![0f32; QUERY_BLOCK * seq];
        for block in 0..blocks {
            let q0 = block * QUERY_BLOCK;
            let rows = QUERY_BLOCK.min(seq - q0);
            let keys = q0 + rows;
            // Pd: this tile's probabilities after dropout, [rows, keys].
            for r in 0..rows {
                let src = &plane[(q0 + r) * seq..][..keys];
                let dst = &mut pd[r * keys..][..keys];
                dst.copy_from_slice(src);
                if let Some(drop) = dropout {
                    let off = (plane_off + (q0 + r) * seq) as u64;
                    for (j, p) in dst.iter_mut().enumerate() {
                        *p *= drop.scale_at(off + j as u64);
                    }
                }
            }
            let first = block == 0;
            // SAFETY: reads stay inside the [N, width] buffers; writes go to sequence b's rows
            // in head `head`'s columns, which belong to this task alone.
            unsafe {
                // dPd = dctx_tile V^T            [rows, keys]
                product(
                    &mut dp,
                    Layout::rows_at(0, rows, keys, keys),
                    dctx,
                    Layout::rows_at(base + q0 * width, rows, head_dim, width),
                    v,
                    Layout::columns_at(base, head_dim, keys, width),
                    false,
                    Parallelism::None,
                );
                // dV[0..keys] += Pd^T dctx_tile  [keys, hd]
                let dv_rows = if first { keys } else { q0 };
                if !first {
                    product_shared(
                        dv_p,
                        Layout::rows_at(base, dv_rows, head_dim, width),
                        &pd,
                        Layout::columns_at(0, dv_rows, rows, keys),
                        dctx,
                        Layout::rows_at(base + q0 * width, rows, head_dim, width),
                        true,
                        Parallelism::None,
                    );
                }
                // Rows q0..keys of dV are first touched by this tile: write them.
                product_shared(
                    dv_p,
                    Layout::rows_at(base + q0 * width, rows, head_dim, width),
                    &pd,
                    Layout::columns_at(q0, rows, rows, keys),
                    dctx,
                    Layout::rows_at(base + q0 * width, rows, head_dim, width),
                    false,
                    Parallelism::None,
                );
            }
            // dP = dPd through the mask, then dS = P (dP - rowsum(P dP)) / scale.
            for r in 0..rows {
                let i = q0 + r;
                let p_row = &plane[i * seq..][..=i];
                let d_row = &mut dp[r * keys..][..keys];
                if let Some(drop) = dropout {
                    let off = (plane_off + i * seq) as u64;
                    for (j, g) in d_row.iter_mut().enumerate() {
                        *g *= drop.scale_at(off + j as u64);
                    }
                }
                let dot = sum_f32(p_row.iter().zip(d_row.iter()).map(|(a, b)| a * b));
                for j in 0..=i {
                    d_row[j] = p_row[j] * (d_row[j] - dot) / scale;
                }
                d_row[i + 1..].fill(0.0);
            }
            // SAFETY: dQ and dK rows of sequence b in head `head`'s columns belong to this task
            // alone (tasks split by batch and head).
            unsafe {
                // dQ_tile = dS K[0..keys]        [rows, hd]
                product_shared(
                    dq_p,
                    Layout::rows_at(base + q0 * width, rows, head_dim, width),
                    &dp,
                    Layout::rows_at(0, rows, keys, keys),
                    k,
                    Layout::rows_at(base, keys, head_dim, width),
                    false,
                    Parallelism::None,
                );
                // dK[0..q0] += dS[:, 0..q0]^T Q_tile; rows q0..keys are written fresh.
                if !first {
                    product_shared(
                        dk_p,
                        Layout::rows_at(base, q0, head_dim, width),
                        &dp,
                        Layout::columns_at(0, q0, rows, keys),
                        q,
                        Layout::rows_at(base + q0 * width, rows, head_dim, width),
                        true,
                        Parallelism::None,
                    );
                }
                product_shared(
                    dk_p,
                    Layout::rows_at(base + q0 * width, rows, head_dim, width),
                    &dp,
                    Layout::columns_at(q0, rows, rows, keys),
                    q,
                    Layout::rows_at(base + q0 * width, rows, head_dim, width),
                    false,
                    Parallelism::None,
                );
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The mask drops the asked-for share, independently of the key, and keys give unrelated
    /// masks.
    #[test]
    fn dropout_masks_drop_their_rate_and_differ_by_key() {
        let count = 1 << 20;
        for rate in [0.1f32, 0.5] {
            let a = Dropout { rate, key: 7 }.dropped(count);
            let b = Dropout { rate, key: 8 }.dropped(count);
            let share = |m: &[bool]| m.iter().filter(|&&d| d).count() as f64 / count as f64;
            // 1 M Bernoulli draws: the standard deviation of the share is under 5e-4.
            assert!(
                (share(&a) - rate as f64).abs() < 3e-3,
                "{rate}: {}",
                share(&a)
            );
            let both = a.iter().zip(&b).filter(|(x, y)| **x && **y).count() as f64;
            let expected = (rate as f64) * (rate as f64);
            assert!(
                (both / count as f64 - expected).abs() < 3e-3,
                "{rate}: overlap {both}"
            );
        }
        assert!(
            Dropout { rate: 0.0, key: 1 }
                .dropped(4096)
                .iter()
                .all(|d| !d)
        );
        assert_eq!(Dropout { rate: 0.5, key: 1 }.threshold(), 1 << 23);
        // Neighbouring indices and the key's two halves all matter.
        let d = Dropout {
            rate: 0.5,
            key: 0x1234_5678_9abc_def0,
        };
        let e = Dropout {
            rate: 0.5,
            key: 0x1234_5679_9abc_def0,
        };
        assert_ne!(d.bits(0), d.bits(1));
        assert_ne!(d.bits(0), e.bits(0));
    }

    #[test]
    fn products_refuse_short_buffers() {
        let x = vec![1.0f32; 6];
        let m = vec![1.0f32; 6];
        let mut out = vec![0.0f32; 4];
        matmul(&x, &m, &mut out, 2, 3, 2);
        assert_eq!(out, vec![3.0; 4]);
        let layout = |rows, cols| Layout::rows_at(0, rows, cols, cols);
        // An output one element short, an input one short, disagreeing shapes: each refused.
        for (d, l, r, dst_len) in [
            (layout(2, 2), layout(2, 3), layout(3, 2), 3),
            (layout(2, 2), layout(2, 4), layout(4, 2), 4),
            (layout(2, 2), layout(2, 3), layout(2, 2), 4),
        ] {
            let mut dst = vec![0.0f32; dst_len];
            let refused = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                product(&mut dst, d, &x, l, &m, r, false, Parallelism::None)
            }));
            assert!(refused.is_err(), "{d:?} = {l:?} . {r:?} into {dst_len}");
        }
        // Attention with a short key buffer is refused before anything runs.
        let shape = AttentionShape {
            batch: 1,
            seq: 2,
            heads: 1,
            head_dim: 2,
        };
        let q = vec![0.0f32; 4];
        let short = vec![0.0f32; 3];
        let mut ctx = vec![0.0f32; 4];
        let refused = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            causal_attention(&q, &short, &q, &mut ctx, shape, None)
        }));
        assert!(refused.is_err());
    }

    /// The scorer's f32 timescales for head dim 256, as IEEE-754 bits, from the reference
    /// research notes (checked there against 50-digit arithmetic).
    const CANONICAL_TIMESCALE_BITS_256: [u32; 128] = [
        0x3f800000, 0x3f898cc0, 0x3f93cfe5, 0x3f9ed70c, 0x3faab0d5, 0x3fb76cf5, 0x3fc51c50,
        0x3fd3d10c, 0x3fe39ea9, 0x3ff49a1b, 0x40036cf4, 0x400d3b22, 0x4017c496, 0x4023174b,
        0x402f4244, 0x403c55a4, 0x404a62c2, 0x40597c3f, 0x4069b621, 0x407b25ed, 0x4086f161,
        0x409102bc, 0x409bd461, 0x40a774aa, 0x40b3f300, 0x40c15ff6, 0x40cfcd58, 0x40df4e48,
        0x40eff755, 0x4100ef4c, 0x410a8de6, 0x4114e43b, 0x41200000, 0x412beff0, 0x4138c3df,
        0x41468cd0, 0x41555d0a, 0x41654832, 0x41766364, 0x418462a7, 0x418e432a, 0x4198e051,
        0x41a44831, 0x41b089ea, 0x41bdb5bc, 0x41cbdd1e, 0x41db12d6, 0x41eb6b0d, 0x41fcfb72,
        0x4207eda7, 0x421211d5, 0x421cf7b4, 0x4228adb9, 0x4235436b, 0x4242c979, 0x425151d4,
        0x4260efc0, 0x4271b7f3, 0x4281e057, 0x428b90ed, 0x4295fa95, 0x42a12b1f, 0x42ad3160,
        0x42ba1d4a, 0x42c80000, 0x42d6ebec, 0x42e6f4d6, 0x42f83003, 0x43055a26, 0x430f4d1f,
        0x4319fe1e, 0x43257b51, 0x4331d3f4, 0x433f1865, 0x434d5a3e, 0x435cac64, 0x436d232b,
        0x437ed466, 0x4388ebc5, 0x439322e8, 0x439e1d27, 0x43a9e911, 0x43b6964a, 0x43c435a1,
        0x43d2d927, 0x43e29445, 0x43f37bd8, 0x4402d325, 0x440c95d8, 0x441712f8, 0x4422586d,
        0x442e7528, 0x443b793b, 0x444975e6, 0x44587db7, 0x4468a49c, 0x447a0000, 0x44865373,
        0x44905906, 0x449b1e02, 0x44a6b0b0, 0x44b32067, 0x44c07da6, 0x44ceda26, 0x44de48f1,
        0x44eede7f, 0x45005867, 0x4509ebbf, 0x451435fb, 0x451f44bf, 0x452b26b7, 0x4537eba3,
        0x4545a471, 0x45546355, 0x45643bdc, 0x45754309, 0x4583c7b8, 0x458d9cab, 0x45982d67,
        0x45a387ee, 0x45afbb4e, 0x45bcd7b6, 0x45caee88, 0x45da1272, 0x45ea5789, 0x45fbd360,
        0x46074e93, 0x461166e2,
    ];

    #[test]
    fn timescales_match_the_scorer_bit_for_bit() {
        let ours = rope_timescales(256);
        for (i, (t, bits)) in ours.iter().zip(CANONICAL_TIMESCALE_BITS_256).enumerate() {
            assert_eq!(t.to_bits(), bits, "timescale {i}");
        }
    }

    /// The scorer's own unit vector: head dim 2, position 1, input ones.
    #[test]
    fn rope_of_ones_at_position_one() {
        let ts = rope_timescales(2);
        let (c, s) = rope_tables(&[1], &ts);
        let mut x = vec![1.0f32, 1.0];
        apply_rope(&mut x, &c, &s, 2);
        assert!((x[0] - (-0.301_168_68)).abs() < 1e-6, "{x:?}");
        assert!((x[1] - 1.381_773_2).abs() < 1e-6, "{x:?}");
    }

    /// Naive attention with the scorer's mask-fill, for comparison with the tiled kernel.
    fn naive_attention(q: &[f32], k: &[f32], v: &[f32], s: AttentionShape) -> Vec<f32> {
        let w = s.heads * s.head_dim;
        let mut out = vec![0f32; q.len()];
        for b in 0..s.batch {
            for h in 0..s.heads {
                for i in 0..s.seq {
                    let qi = &q[(b * s.seq + i) * w + h * s.head_dim..][..s.head_dim];
                    let mut scores: Vec<f32> = (0..s.seq)
                        .map(|j| {
                            if j > i {
                                -1.0e4
                            } else {
                                let kj = &k[(b * s.seq + j) * w + h * s.head_dim..][..s.head_dim];
                                qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>()
                                    / (s.head_dim as f32).sqrt()
                            }
                        })
                        .collect();
                    let max = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                    scores.iter_mut().for_each(|x| *x = (*x - max).exp());
                    let sum: f32 = scores.iter().sum();
                    for d in 0..s.head_dim {
                        out[(b * s.seq + i) * w + h * s.head_dim + d] = (0..s.seq)
                            .map(|j| scores[j] / sum * v[(b * s.seq + j) * w + h * s.head_dim + d])
                            .sum();
                    }
                }
            }
        }
        out
    }

    #[test]
    fn tiled_attention_matches_naive() {
        let shape = AttentionShape {
            batch: 2,
            seq: 150,
            heads: 3,
            head_dim: 8,
        };
        let n = shape.batch * shape.seq * shape.heads * shape.head_dim;
        let normal = |seed: u64| somatrain_noise::normal_array(seed, n, 0.0, 1.0);
        let (q, k, v) = (normal(1), normal(2), normal(3));
        let mut ctx = vec![0f32; n];
        causal_attention(&q, &k, &v, &mut ctx, shape, None);
        let expected = naive_attention(&q, &k, &v, shape);
        for (i, (a, b)) in ctx.iter().zip(&expected).enumerate() {
            assert!((a - b).abs() < 1e-5, "element {i}: {a} vs {b}");
        }
    }

    #[test]
    fn erf_is_within_two_ulp_of_f64_erf() {
        let mut worst = 0f64;
        let mut x = -6.0f32;
        while x <= 6.0 {
            let exact = libm::erf(x as f64);
            let got = erf(x) as f64;
            let ulp = (exact.abs() as f32).max(f32::MIN_POSITIVE);
            let ulp = (f32::from_bits(ulp.to_bits() + 1) - ulp) as f64;
            worst = worst.max((got - exact).abs() / ulp);
            x += 1.0e-5;
        }
        eprintln!("erf: worst error {worst:.3} ulp");
        assert!(worst <= 2.0, "worst error {worst} ulp");
        assert_eq!(erf(0.0), 0.0);
        assert_eq!(erf(10.0), 1.0);
        assert_eq!(erf(-10.0), -1.0);
    }

    /// Straightforward attention backward over the full matrices, for the tiled kernel to match.
    #[allow(clippy::too_many_arguments)]
    fn naive_attention_backward(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        probs: &[f32],
        drop: Option<Dropout>,
        dctx: &[f32],
        s: AttentionShape,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let (t, hd, w) = (s.seq, s.head_dim, s.heads * s.head_dim);
        let (mut dq, mut dk, mut dv) = (
            vec![0f32; q.len()],
            vec![0f32; q.len()],
            vec![0f32; q.len()],
        );
        for b in 0..s.batch {
            for h in 0..s.heads {
                let plane = (b * s.heads + h) * t * t;
                let at = |m: &[f32], i: usize, d: usize| m[(b * t + i) * w + h * hd + d];
                let mask = |i: usize, j: usize| {
                    drop.map_or(1.0, |dr| dr.scale_at((plane + i * t + j) as u64))
                };
                for i in 0..t {
                    let mut dp = vec![0f32; t];
                    for j in 0..=i {
                        let p = probs[plane + i * t + j];
                        for d in 0..hd {
                            dv[(b * t + j) * w + h * hd + d] += p * mask(i, j) * at(dctx, i, d);
                            dp[j] += at(dctx, i, d) * at(v, j, d);
                        }
                        dp[j] *= mask(i, j);
                    }
                    let dot: f32 = (0..=i).map(|j| probs[plane + i * t + j] * dp[j]).sum();
                    for j in 0..=i {
                        let ds = probs[plane + i * t + j] * (dp[j] - dot) / (hd as f32).sqrt();
                        for d in 0..hd {
                            dq[(b * t + i) * w + h * hd + d] += ds * at(k, j, d);
                            dk[(b * t + j) * w + h * hd + d] += ds * at(q, i, d);
                        }
                    }
                }
            }
        }
        (dq, dk, dv)
    }

    #[test]
    fn tiled_attention_backward_matches_naive_across_tiles() {
        // 300 positions: three query tiles, the last one partial.
        let shape = AttentionShape {
            batch: 2,
            seq: 300,
            heads: 2,
            head_dim: 4,
        };
        let n = shape.batch * shape.seq * shape.heads * shape.head_dim;
        let normal = |seed: u64| somatrain_noise::normal_array(seed, n, 0.0, 1.0);
        let (q, k, v, dctx) = (normal(1), normal(2), normal(3), normal(4));
        for drop in [None, Some(Dropout { rate: 0.2, key: 99 })] {
            let mut ctx = vec![0f32; n];
            let mut probs = vec![0f32; shape.batch * shape.heads * shape.seq * shape.seq];
            let record = AttentionRecord {
                probs: &mut probs,
                dropout: drop,
            };
            causal_attention(&q, &k, &v, &mut ctx, shape, Some(record));
            let (mut dq, mut dk, mut dv) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
            causal_attention_backward(
                &q, &k, &v, &probs, drop, &dctx, &mut dq, &mut dk, &mut dv, shape,
            );
            let (eq, ek, ev) = naive_attention_backward(&q, &k, &v, &probs, drop, &dctx, shape);
            for (name, got, want) in [("dq", &dq, &eq), ("dk", &dk, &ek), ("dv", &dv, &ev)] {
                for (i, (a, b)) in got.iter().zip(want.iter()).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                        "{name}[{i}] {a} vs {b} ({drop:?})"
                    );
                }
            }
        }
    }

    #[test]
    fn exp_is_within_one_ulp_of_f64_exp() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x <= 0.0 {
            let exact = (x as f64).exp();
            let e32 = exact as f32;
            let ulp = (f32::from_bits(e32.to_bits() + 1) - e32) as f64;
            worst = worst.max((exp_nonpositive(x) as f64 - exact).abs() / ulp);
            x += 3.0e-4;
        }
        eprintln!("exp: worst error {worst:.3} ulp");
        assert!(worst <= 1.0, "worst error {worst} ulp");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(-1000.0), 0.0);
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
    }

    #[test]
    fn gelu_reference_points() {
        // GELU(1) = 0.5 (1 + erf(1/sqrt 2)) = 0.8413447460685429...
        assert!((gelu(1.0) - 0.841_344_7).abs() < 1e-7);
        assert_eq!(gelu(0.0), 0.0);
        assert!((gelu(-3.0) - (-0.004_049_696_3)).abs() < 1e-8);
    }
}
