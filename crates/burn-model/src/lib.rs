//! The V1 model on burn 0.22's backends: the `flex` CPU backend always, CUDA behind the `cuda`
//! feature, wgpu (the same cubecl path on Vulkan or Metal, or on a software Vulkan driver) behind
//! the `wgpu` feature. The device is chosen at run time.
//!
//! Owns only the translation of [`somatrain_model::Weights`] into device tensors and the forward
//! pass written with burn's tensor ops; the scoring procedure, the loss terms and the RoPE tables
//! come from `somatrain-model`, so every backend is checked against the same conformance cases.
//! The hand-written CPU kernels in `somatrain-model` stay the fast CPU path; this crate is the
//! GPU path and a second, independent implementation of the forward pass.

#![forbid(unsafe_code)]

pub mod libraries;
pub mod train;
pub mod transfer;

use burn::tensor::activation::{gelu, softmax};
use burn::tensor::module::{embedding, layer_norm, linear};
use burn::tensor::{Bool, DType, Int, IntDType, Tensor};

/// burn's device handle, for callers that do not depend on burn themselves.
pub use burn::tensor::Device;
use somatrain_data::Batch;
use somatrain_model::config::{LAYER_NORM_EPS, MASK_FILL, SIGREG_COEFFICIENT, SIGREG_SLICES};
use somatrain_model::cpu::kernels::{Dropout, HashStep, rope_tables, rope_timescales};
use somatrain_model::cpu::train::{
    SITE_ATTENTION, SITE_ATTENTION_OUT, SITE_FFN_ACT, SITE_FFN_OUT, TrainOptions, TrainPass,
};
use somatrain_model::loss::{cross_entropy_sum, sigreg_mean};
use somatrain_model::score::{BatchOutput, BatchScorer, ScoreError};
use somatrain_model::{ModelConfig, Weights};
use std::sync::{Arc, Mutex};
use transfer::Link;

/// Which burn device to run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BurnDevice {
    /// burn's `flex` CPU backend.
    Flex,
    /// A CUDA GPU by index (needs the `cuda` feature and a driver).
    Cuda(usize),
    /// burn's wgpu backend on its default adapter (needs the `wgpu` feature): any Vulkan or
    /// Metal GPU, or a software Vulkan driver such as lavapipe on a CPU. It runs the same
    /// cubecl code as CUDA, so it checks the device path where no CUDA GPU is.
    Wgpu,
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("this build has no CUDA support; rebuild with `cargo build --release --features cuda`")]
    NoCudaFeature,
    #[error("no usable CUDA device: {0}")]
    NoCudaDriver(String),
    #[error("this build has no wgpu support; rebuild with `--features wgpu`")]
    NoWgpuFeature,
    #[error("no usable wgpu adapter: {0}")]
    NoWgpuAdapter(String),
    #[error("this device cannot multiply in bf16; train without --bf16")]
    NoBf16,
}

/// Opens `device`, checking that it can run a tensor op; a missing CUDA driver is reported as
/// an error rather than a panic deep inside the backend.
pub fn open_device(device: BurnDevice) -> Result<Device, DeviceError> {
    match device {
        BurnDevice::Flex => Ok(Device::flex()),
        BurnDevice::Cuda(index) => open_cuda(index),
        BurnDevice::Wgpu => open_wgpu(),
    }
}

/// The device's dense matrix-multiply rate in GFLOP/s (bf16 operands when `bf16`, else f32):
/// square products of up to 4096 (64 MiB per f32 operand, within every backend's buffer
/// limits), repeated until the timed run lasts at least 0.2 s; the results are read back, so the
/// time includes finishing the work.
pub fn matmul_peak_gflops(device: &Device, bf16: bool) -> Result<f64, ScoreError> {
    use burn::tensor::Distribution;
    let operand = |n: usize| {
        let t = Tensor::<2>::random([n, n], Distribution::Default, device);
        if bf16 { t.cast(DType::BF16) } else { t }
    };
    // `reps` products of `a` and `b`, summed into one value that is read back.
    let timed = |a: &Tensor<2>, b: &Tensor<2>, reps: usize| -> Result<f64, ScoreError> {
        let start = std::time::Instant::now();
        let mut total: Option<Tensor<1>> = None;
        for _ in 0..reps {
            let s = a.clone().matmul(b.clone()).cast(DType::F32).sum();
            total = Some(match total {
                Some(t) => t + s,
                None => s,
            });
        }
        if let Some(t) = total {
            Link::new(device.clone()).read(t)?;
        }
        Ok(start.elapsed().as_secs_f64())
    };
    let mut n = 256usize;
    loop {
        let (a, b) = (operand(n), operand(n));
        timed(&a, &b, 1)?; // warm-up: kernels compiled and tuned
        let once = timed(&a, &b, 1)?;
        if once >= 0.05 || n >= 4096 {
            let reps = ((0.2 / once.max(1e-6)).ceil() as usize).clamp(1, 1000);
            let secs = timed(&a, &b, reps)?;
            return Ok(2.0 * (n as f64).powi(3) * reps as f64 / secs.max(1e-9) / 1e9);
        }
        n *= 2;
    }
}

/// Whether `device` runs bf16 matrix products (mixed precision needs them).
pub fn supports_bf16(device: &Device) -> bool {
    device.supports_dtype(DType::BF16)
}

impl std::str::FromStr for BurnDevice {
    type Err = String;

    /// `flex`, `wgpu`, `cuda` or `cuda:N`.
    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "flex" => Ok(BurnDevice::Flex),
            "wgpu" => Ok(BurnDevice::Wgpu),
            "cuda" => Ok(BurnDevice::Cuda(0)),
            _ => text
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(BurnDevice::Cuda)
                .ok_or_else(|| format!("'{text}' is not a device (flex, wgpu, cuda, cuda:N)")),
        }
    }
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(_index: usize) -> Result<Device, DeviceError> {
    Err(DeviceError::NoCudaFeature)
}

#[cfg(feature = "cuda")]
fn open_cuda(index: usize) -> Result<Device, DeviceError> {
    libraries::check_cuda(&libraries::loader_directories()).map_err(DeviceError::NoCudaDriver)?;
    probe(move || Device::cuda(index), "the CUDA backend").map_err(DeviceError::NoCudaDriver)
}

#[cfg(not(feature = "wgpu"))]
fn open_wgpu() -> Result<Device, DeviceError> {
    Err(DeviceError::NoWgpuFeature)
}

#[cfg(feature = "wgpu")]
fn open_wgpu() -> Result<Device, DeviceError> {
    // Only Linux's loader layout is known here; elsewhere the probe's own error stands.
    if cfg!(target_os = "linux") {
        libraries::check_vulkan(
            &libraries::loader_directories(),
            &libraries::vulkan_icd_directories(),
        )
        .map_err(DeviceError::NoWgpuAdapter)?;
    }
    probe(
        || Device::wgpu(burn::tensor::DeviceKind::DefaultDevice),
        "the wgpu backend",
    )
    .map_err(DeviceError::NoWgpuAdapter)
}

/// Makes a device and runs one tensor op on it, turning a backend's panic (no driver, no
/// adapter) into a reason.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
fn probe(
    make: impl FnOnce() -> Device + std::panic::UnwindSafe,
    backend: &str,
) -> Result<Device, String> {
    let probe = std::panic::catch_unwind(move || {
        let device = make();
        let link = Link::new(device.clone());
        let t = link.floats(&[1.0, 2.0], [2]);
        let sum = link.read(t.sum()).map_err(|e| e.to_string())?;
        if sum != [3.0] {
            return Err(format!("probe sum gave {sum:?}"));
        }
        Ok(device)
    });
    match probe {
        Ok(result) => result,
        Err(panic) => Err(panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| format!("{backend} panicked while starting"))),
    }
}

/// A parameter tensor of either rank.
enum Parameter<'a> {
    One(&'a Tensor<1>),
    Two(&'a Tensor<2>),
}

struct LayerTensors {
    norm_1: (Tensor<1>, Tensor<1>),
    query: (Tensor<2>, Tensor<1>),
    key: (Tensor<2>, Tensor<1>),
    value: (Tensor<2>, Tensor<1>),
    output: (Tensor<2>, Tensor<1>),
    norm_2: (Tensor<1>, Tensor<1>),
    inner: (Tensor<2>, Tensor<1>),
    outer: (Tensor<2>, Tensor<1>),
}

/// A model resident on a burn device.
pub struct BurnModel {
    config: ModelConfig,
    device: Device,
    /// Where every transfer goes through (shared with the engine that made this model).
    link: Arc<Link>,
    /// RoPE rows for positions `0..rows`, uploaded once and gathered by position.
    rope: Mutex<Option<RopeTable>>,
    /// The last SIGReg projection matrix uploaded, with its host copy: one upload per step.
    noise: Mutex<Option<(Vec<f32>, Tensor<2>)>>,
    /// SIGReg's quadrature (points, target characteristic function, weights) without t = 0.
    sigreg_grid: [Tensor<1>; 3],
    /// Mixed precision: matrix products in bf16 (weights cast from their f32 masters, results
    /// cast back), everything else (LayerNorm, softmax, GELU, the loss) in f32.
    bf16_matmuls: bool,
    timescales: Vec<f32>,
    embedding: Tensor<2>,
    layers: Vec<LayerTensors>,
    final_norm: (Tensor<1>, Tensor<1>),
    predictor: (Tensor<2>, Tensor<1>),
}

/// Cached RoPE tables `[rows, head_dim / 2]` for positions `0..rows`.
struct RopeTable {
    rows: usize,
    cos: Tensor<2>,
    sin: Tensor<2>,
}

/// Positions below this are served from the cached table (for V1, head_dim 128: 64 MiB of
/// cos and sin); a batch with a later position uploads its own tables.
const ROPE_CACHE_POSITIONS: usize = 1 << 17;

impl BurnModel {
    pub fn new(weights: &Weights, device: Device) -> Self {
        Self::with_link(weights, Link::new(device))
    }

    /// The model on `link`'s device, its uploads counted there.
    pub fn with_link(weights: &Weights, link: Arc<Link>) -> Self {
        let device = link.device().clone();
        let t1 = |data: &[f32], _: &Device| link.floats(data, [data.len()]);
        let t2 =
            |data: &[f32], rows: usize, cols: usize, _: &Device| link.floats(data, [rows, cols]);
        let c = weights.config;
        let (d, f, v) = (c.embedding_dim, c.pwff_hidden_dim, c.vocab_size);
        let layers = weights
            .layers
            .iter()
            .map(|w| LayerTensors {
                norm_1: (t1(&w.norm_1_gamma, &device), t1(&w.norm_1_beta, &device)),
                query: (t2(&w.query_w, d, d, &device), t1(&w.query_b, &device)),
                key: (t2(&w.key_w, d, d, &device), t1(&w.key_b, &device)),
                value: (t2(&w.value_w, d, d, &device), t1(&w.value_b, &device)),
                output: (t2(&w.output_w, d, d, &device), t1(&w.output_b, &device)),
                norm_2: (t1(&w.norm_2_gamma, &device), t1(&w.norm_2_beta, &device)),
                inner: (t2(&w.inner_w, d, f, &device), t1(&w.inner_b, &device)),
                outer: (t2(&w.outer_w, f, d, &device), t1(&w.outer_b, &device)),
            })
            .collect();
        BurnModel {
            config: c,
            bf16_matmuls: false,
            timescales: rope_timescales(c.head_dim()),
            embedding: t2(&weights.embedding, v, d, &device),
            layers,
            final_norm: (
                t1(&weights.final_norm_gamma, &device),
                t1(&weights.final_norm_beta, &device),
            ),
            predictor: (
                t2(&weights.predictor_w, d, v, &device),
                t1(&weights.predictor_b, &device),
            ),
            rope: Mutex::new(None),
            noise: Mutex::new(None),
            sigreg_grid: {
                let grid = somatrain_model::loss::SigRegGrid::new();
                [&grid.t, &grid.phi, &grid.weight].map(|v| t1(&v[1..], &device))
            },
            link: link.clone(),
            device,
        }
    }

    /// Final-norm representations `[B, T, D]` and logits `[B, T, V]`.
    ///
    /// # Shapes
    /// tokens and positions: `[B * T]` row-major.
    pub fn forward(
        &self,
        tokens: &[u32],
        positions: &[u32],
        batch: usize,
        seq: usize,
    ) -> (Tensor<3>, Tensor<3>) {
        self.forward_with_dropout(tokens, positions, batch, seq, None)
    }

    /// [`forward`](Self::forward) with the training pass's dropout: the masks are the CPU
    /// path's own (same counter-based hash, same sites and element order), drawn on the device
    /// from the site's key; see [`dropped_on_device`].
    pub fn forward_with_dropout(
        &self,
        tokens: &[u32],
        positions: &[u32],
        batch: usize,
        seq: usize,
        dropout: Option<&TrainOptions>,
    ) -> (Tensor<3>, Tensor<3>) {
        let c = &self.config;
        let (heads, hd) = (c.num_heads, c.head_dim());
        let half = hd / 2;
        let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
        let ids = self.link.ints(ids, [batch, seq]);
        let (cos, sin) = self.rope_rows(positions, batch, seq);
        // true above the diagonal: key j > query i is masked.
        let mask = Tensor::<2, Bool>::tril_mask([seq, seq], 0, &self.device)
            .reshape([1, 1, seq, seq])
            .expand([batch, heads, seq, seq]);
        let scale = (hd as f32).sqrt();

        let mut x = embedding(self.embedding.clone(), ids); // [B, T, D]
        for (index, l) in self.layers.iter().enumerate() {
            let h = layer_norm(
                x.clone(),
                l.norm_1.0.clone(),
                Some(l.norm_1.1.clone()),
                eps(),
            );
            let split = |t: Tensor<3>| t.reshape([batch, seq, heads, hd]).swap_dims(1, 2);
            let q = rope(split(self.lin(h.clone(), &l.query)), &cos, &sin, half);
            let k = rope(split(self.lin(h.clone(), &l.key)), &cos, &sin, half);
            let v = split(self.lin(h, &l.value)); // [B, H, T, h]
            let scores = self.matmul(q, k.swap_dims(2, 3)).div_scalar(scale);
            let weights = softmax(scores.mask_fill(mask.clone(), MASK_FILL), 3);
            let weights = apply_dropout(weights, dropout, index, SITE_ATTENTION);
            let ctx = self
                .matmul(weights, v)
                .swap_dims(1, 2)
                .reshape([batch, seq, heads * hd]);
            let delta = self.lin(ctx, &l.output);
            x = x + apply_dropout(delta, dropout, index, SITE_ATTENTION_OUT);
            let h = layer_norm(
                x.clone(),
                l.norm_2.0.clone(),
                Some(l.norm_2.1.clone()),
                eps(),
            );
            let act = gelu(self.lin(h, &l.inner));
            let act = apply_dropout(act, dropout, index, SITE_FFN_ACT);
            let delta = self.lin(act, &l.outer);
            x = x + apply_dropout(delta, dropout, index, SITE_FFN_OUT);
        }
        let reps = layer_norm(
            x,
            self.final_norm.0.clone(),
            Some(self.final_norm.1.clone()),
            eps(),
        );
        let logits = self.lin(reps.clone(), &self.predictor);
        (reps, logits)
    }
}

impl BurnModel {
    /// RoPE tables `[B, 1, T, h/2]` for `positions`, from the same exact routine as the CPU
    /// path: gathered on the device from a table of rows computed on the host once per
    /// position (grown as later positions appear), so a batch sends only its positions.
    fn rope_rows(&self, positions: &[u32], batch: usize, seq: usize) -> (Tensor<4>, Tensor<4>) {
        let half = self.timescales.len();
        let needed = positions.iter().max().map_or(0, |&p| p as usize + 1);
        if needed > ROPE_CACHE_POSITIONS {
            let (cos, sin) = rope_tables(positions, &self.timescales);
            return (
                self.link.floats(&cos, [batch, 1, seq, half]),
                self.link.floats(&sin, [batch, 1, seq, half]),
            );
        }
        let mut cache = self.rope.lock().unwrap_or_else(|e| e.into_inner());
        let have = cache.as_ref().map_or(0, |t| t.rows);
        if needed > have {
            let rows = needed.next_power_of_two().clamp(1024, ROPE_CACHE_POSITIONS);
            let fresh: Vec<u32> = (have as u32..rows as u32).collect();
            let (cos, sin) = rope_tables(&fresh, &self.timescales);
            let cos = self.link.floats(&cos, [fresh.len(), half]);
            let sin = self.link.floats(&sin, [fresh.len(), half]);
            *cache = Some(match cache.take() {
                Some(old) => RopeTable {
                    rows,
                    cos: Tensor::cat(vec![old.cos, cos], 0),
                    sin: Tensor::cat(vec![old.sin, sin], 0),
                },
                None => RopeTable { rows, cos, sin },
            });
        }
        let table = cache.as_ref().expect("filled above");
        let index: Vec<i64> = positions.iter().map(|&p| p as i64).collect();
        let index = self.link.ints(index, [positions.len()]);
        let gather = |t: &Tensor<2>| {
            t.clone()
                .select(0, index.clone())
                .reshape([batch, 1, seq, half])
        };
        (gather(&table.cos), gather(&table.sin))
    }

    /// The SIGReg projection matrix `[D, SLICES]` on the device; uploaded only when it differs
    /// from the last one (the trainer uses one per optimizer step).
    fn projections(&self, noise: &[f32]) -> Tensor<2> {
        let mut cache = self.noise.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((host, device)) = cache.as_ref()
            && host.as_slice() == noise
        {
            return device.clone();
        }
        let d = self.config.embedding_dim;
        let device = self.link.floats(noise, [d, SIGREG_SLICES]);
        *cache = Some((noise.to_vec(), device.clone()));
        device
    }

    /// The link this model's transfers go through.
    pub fn link(&self) -> &Arc<Link> {
        &self.link
    }
}

impl BurnModel {
    /// Every parameter, in the order of [`Weights::tensors`].
    fn visit_parameters(&self, mut visit: impl FnMut(Parameter<'_>)) {
        use Parameter::{One, Two};
        visit(Two(&self.embedding));
        for l in &self.layers {
            visit(One(&l.norm_1.0));
            visit(One(&l.norm_1.1));
            for (w, b) in [&l.query, &l.key, &l.value, &l.output] {
                visit(Two(w));
                visit(One(b));
            }
            visit(One(&l.norm_2.0));
            visit(One(&l.norm_2.1));
            for (w, b) in [&l.inner, &l.outer] {
                visit(Two(w));
                visit(One(b));
            }
        }
        visit(One(&self.final_norm.0));
        visit(One(&self.final_norm.1));
        visit(Two(&self.predictor.0));
        visit(One(&self.predictor.1));
    }

    /// Replaces every parameter by `f` of it, in the order of [`Weights::tensors`] (the
    /// order of [`visit_parameters`](Self::visit_parameters)).
    fn map_parameters(&mut self, mut f: impl FnMut(ParamTensor) -> ParamTensor) {
        let mut apply = |p: ParamMut<'_>| match p {
            ParamMut::One(t) => match f(ParamTensor::One(t.clone())) {
                ParamTensor::One(new) => *t = new,
                ParamTensor::Two(_) => unreachable!("a parameter keeps its rank"),
            },
            ParamMut::Two(t) => match f(ParamTensor::Two(t.clone())) {
                ParamTensor::Two(new) => *t = new,
                ParamTensor::One(_) => unreachable!("a parameter keeps its rank"),
            },
        };
        apply(ParamMut::Two(&mut self.embedding));
        for l in &mut self.layers {
            apply(ParamMut::One(&mut l.norm_1.0));
            apply(ParamMut::One(&mut l.norm_1.1));
            for (w, b) in [&mut l.query, &mut l.key, &mut l.value, &mut l.output] {
                apply(ParamMut::Two(w));
                apply(ParamMut::One(b));
            }
            apply(ParamMut::One(&mut l.norm_2.0));
            apply(ParamMut::One(&mut l.norm_2.1));
            for (w, b) in [&mut l.inner, &mut l.outer] {
                apply(ParamMut::Two(w));
                apply(ParamMut::One(b));
            }
        }
        apply(ParamMut::One(&mut self.final_norm.0));
        apply(ParamMut::One(&mut self.final_norm.1));
        apply(ParamMut::Two(&mut self.predictor.0));
        apply(ParamMut::One(&mut self.predictor.1));
    }
}

/// One parameter (or its gradient, or an optimizer moment) on the device, of either rank.
#[derive(Clone)]
pub(crate) enum ParamTensor {
    One(Tensor<1>),
    Two(Tensor<2>),
}

enum ParamMut<'a> {
    One(&'a mut Tensor<1>),
    Two(&'a mut Tensor<2>),
}

fn eps() -> f64 {
    LAYER_NORM_EPS as f64
}

impl BurnModel {
    /// Turns mixed precision on or off (see `bf16_matmuls`); master weights stay f32.
    pub fn with_bf16_matmuls(mut self, on: bool) -> Self {
        self.bf16_matmuls = on;
        self
    }

    fn lin<const D: usize>(&self, x: Tensor<D>, (w, b): &(Tensor<2>, Tensor<1>)) -> Tensor<D> {
        if self.bf16_matmuls {
            let (x, w) = (x.cast(DType::BF16), w.clone().cast(DType::BF16));
            linear(x, w, None).cast(DType::F32) + b.clone().unsqueeze()
        } else {
            linear(x, w.clone(), Some(b.clone()))
        }
    }

    fn matmul(&self, a: Tensor<4>, b: Tensor<4>) -> Tensor<4> {
        if self.bf16_matmuls {
            a.cast(DType::BF16)
                .matmul(b.cast(DType::BF16))
                .cast(DType::F32)
        } else {
            a.matmul(b)
        }
    }
}

/// `x` with the training pass's dropout of `site` in `layer` (none when `options` has none):
/// dropped elements zeroed, the rest scaled by `1 / (1 - rate)`, as the CPU path multiplies.
fn apply_dropout<const D: usize>(
    x: Tensor<D>,
    options: Option<&TrainOptions>,
    layer: usize,
    site: u64,
) -> Tensor<D> {
    match options.and_then(|o| TrainPass::dropout(o, layer, site)) {
        Some(drop) => {
            let dropped = dropped_on_device(&drop, x.dims(), &x.device());
            x.mask_fill(dropped, 0.0).mul_scalar(drop.keep_scale())
        }
        None => x,
    }
}

/// The CPU path's dropout mask ([`Dropout::drops`]) of a site shaped `dims`, computed on
/// `device` with integer tensor ops on `u32`: true where an element is dropped. Only scalars
/// (the key's two halves, the threshold) come from the host; the element indices are the
/// row-major positions the CPU path uses.
///
/// # Panics
/// When the site has 2^31 elements or more (int tensors may be 32-bit; a V1 attention site of
/// a 2 x 1024 micro-batch has 2^25).
pub fn dropped_on_device<const D: usize>(
    drop: &Dropout,
    dims: [usize; D],
    device: &Device,
) -> Tensor<D, Bool> {
    let count: usize = dims.iter().product();
    assert!(
        count < 1 << 31,
        "a dropout site of {count} elements is past the device's 2^31 index range"
    );
    let (low, high) = (drop.key as u32, (drop.key >> 32) as u32);
    let mut x = iota(count, device).cast(IntDType::U32);
    for step in Dropout::HASH_STEPS {
        x = match step {
            HashStep::XorKeyLow => x.bitwise_xor_scalar(low),
            HashStep::AddKeyHigh => x.add_scalar(high),
            HashStep::XorShift(n) => x.clone().bitwise_xor(x.bitwise_right_shift_scalar(n)),
            HashStep::Multiply(c) => x.mul_scalar(c),
        };
    }
    x.bitwise_right_shift_scalar(8u32)
        .lower_elem(drop.threshold())
        .reshape(dims)
}

/// `0..count` as an int tensor, built from ranges of at most 4096 by broadcast sums: with
/// burn 0.22's fusion on wgpu, `arange` of 65,536 or more elements returns wrong values from
/// element 65,535 on (found by the dropout-mask test; small ranges are right).
fn iota(count: usize, device: &Device) -> Tensor<1, Int> {
    const RADIX: usize = 4096;
    let mut len = count.clamp(1, RADIX);
    let mut t = Tensor::<1, Int>::arange(0..len as i64, device);
    while len < count {
        let blocks = count.div_ceil(len).min(RADIX);
        let starts = Tensor::<1, Int>::arange(0..blocks as i64, device)
            .mul_scalar(len as i64)
            .reshape([blocks, 1]);
        t = (starts + t.reshape([1, len])).reshape([blocks * len]);
        len *= blocks;
    }
    t.narrow(0, 0, count)
}

/// Half-split RoPE on `[B, H, T, h]` with tables `[B, 1, T, h/2]`.
fn rope(x: Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>, half: usize) -> Tensor<4> {
    let [b, h, t, _] = x.dims();
    let a = x.clone().slice([0..b, 0..h, 0..t, 0..half]);
    let bb = x.slice([0..b, 0..h, 0..t, half..2 * half]);
    let first = a.clone() * cos.clone() - bb.clone() * sin.clone();
    let second = bb * cos.clone() + a * sin.clone();
    Tensor::cat(vec![first, second], 3)
}

/// The largest attention-score tensor (`rows x heads x T x T` f32) one forward pass of scoring
/// builds: a batch with more rows runs in slices. Keeps peak device memory bounded, and under
/// the 256 MiB buffer limit of wgpu adapters.
const MAX_ATTENTION_BYTES: usize = 128 << 20;

impl BatchScorer for BurnModel {
    fn score_batch(&mut self, batch: &Batch, noise_seed: u64) -> Result<BatchOutput, ScoreError> {
        let (b, t) = (batch.batch, batch.seq_len);
        let (d, v) = (self.config.embedding_dim, self.config.vocab_size);
        let noise = somatrain_noise::unit_column_noise(noise_seed, d, SIGREG_SLICES);
        let noise = self.projections(&noise);
        let per_row = self.config.num_heads * t * t * 4;
        let rows_per_pass = (MAX_ATTENTION_BYTES / per_row.max(1)).clamp(1, b.max(1));
        let (mut logits, mut proj) = (Vec::with_capacity(b * t * v), Vec::new());
        let mut embedding_sum = vec![0f64; d];
        for first in (0..b).step_by(rows_per_pass) {
            let rows = rows_per_pass.min(b - first);
            let span = first * t..(first + rows) * t;
            let (reps, pass_logits) =
                self.forward(&batch.tokens[span.clone()], &batch.positions[span], rows, t);
            proj.extend(
                self.link.read(
                    reps.clone()
                        .reshape([rows * t, d])
                        .matmul(noise.clone())
                        .reshape([rows, t, SIGREG_SLICES]),
                )?,
            );
            let reps = self.link.read(reps)?;
            for token in reps.chunks_exact(d) {
                for (sum, x) in embedding_sum.iter_mut().zip(token) {
                    *sum += *x as f64;
                }
            }
            logits.extend(self.link.read(pass_logits)?);
        }
        let ce = (cross_entropy_sum(&logits, &batch.targets, v) / (b * t) as f64) as f32;
        let sigreg = sigreg_mean(&proj);
        Ok(BatchOutput {
            loss: ce + SIGREG_COEFFICIENT * sigreg,
            cross_entropy: ce,
            sigreg,
            embedding: embedding_sum
                .iter()
                .map(|s| (s / (b * t) as f64) as f32)
                .collect(),
        })
    }
}
