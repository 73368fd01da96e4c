//! The V1 model through libtorch (tch 0.24, PyTorch 2.11): the GPU path, and the same code on
//! libtorch's CPU device, where CI runs it.
//!
//! Owns the translation of [`somatrain_model::Weights`] into libtorch tensors (canonical order
//! and layout, linear weights `[in, out]`), the forward pass written with libtorch's ops
//! (`scaled_dot_product_attention` for attention, so CUDA runs its flash kernel in bf16), the
//! scorer ([`TorchModel`] as a [`BatchScorer`]) and the trainer's engine ([`train::TorchEngine`]:
//! autograd, AdamW on the device through libtorch's fused kernel, which tch does not bind:
//! [`fused`] calls it through `cpp/optimizer.cpp`; under bf16 the linears' bf16 weight copies,
//! made once per optimizer step), and reading a CUDA device's memory
//! ([`memory`]). The scoring procedure's host parts (cross-entropy, SIGReg
//! and the embedding of the scorer's read-back outputs, the RoPE tables, the noise) come from
//! `somatrain-model` and `somatrain-noise`, so this path is held to the same conformance cases as
//! the CPU kernels, which stay the default on a CPU and this path's test oracle.

pub mod fused;
pub mod memory;
pub mod train;

/// libtorch's device handle, for callers that do not depend on tch themselves.
pub use tch::Device as LibtorchDevice;

use std::sync::Mutex;

use somatrain_data::Batch;
use somatrain_model::config::{LAYER_NORM_EPS, SIGREG_COEFFICIENT, SIGREG_SLICES};
use somatrain_model::cpu::kernels::{rope_tables, rope_timescales};
use somatrain_model::loss::{cross_entropy_sum, sigreg_mean};
use somatrain_model::score::{BatchOutput, BatchScorer, ScoreError};
use somatrain_model::{ModelConfig, Weights};
use tch::{Kind, Tensor};

/// Where libtorch runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TorchDevice {
    /// libtorch's CPU device (CI runs the GPU path's code here).
    Cpu,
    /// A CUDA GPU by index.
    Cuda(usize),
}

impl std::str::FromStr for TorchDevice {
    type Err = String;

    /// `torch-cpu`, `cuda` or `cuda:N`.
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "torch-cpu" => Ok(TorchDevice::Cpu),
            "cuda" => Ok(TorchDevice::Cuda(0)),
            other => match other.strip_prefix("cuda:").map(str::parse) {
                Some(Ok(index)) => Ok(TorchDevice::Cuda(index)),
                _ => Err(format!(
                    "'{other}' is not a libtorch device: torch-cpu, cuda or cuda:N"
                )),
            },
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error(
        "no usable CUDA device {index}: {reason}. The GPU path needs NVIDIA's driver and PyTorch \
         2.11's CUDA libraries: point LD_LIBRARY_PATH at torch/lib of a PyTorch 2.11 install \
         (e.g. /opt/torch/.venv/lib/python3.X/site-packages/torch/lib) and its nvidia/*/lib"
    )]
    NoCuda { index: usize, reason: String },
    #[error("this device cannot multiply in bf16; train without --bf16")]
    NoBf16,
}

/// Opens `device`: for CUDA, loads libtorch's CUDA library (the binary links only what the CPU
/// needs, so that it starts on machines without CUDA) and checks the device is there.
pub fn open(device: TorchDevice) -> Result<tch::Device, DeviceError> {
    match device {
        TorchDevice::Cpu => Ok(tch::Device::Cpu),
        TorchDevice::Cuda(index) => {
            load_cuda_library().map_err(|reason| DeviceError::NoCuda { index, reason })?;
            let count = tch::Cuda::device_count();
            if count <= index as i64 {
                // The CUDA runtime says why (no driver, too old a driver, no such ordinal).
                let runtime = match memory::cuda_free_and_total(index) {
                    Err(why) => format!(" ({why})"),
                    Ok(_) => String::new(),
                };
                return Err(DeviceError::NoCuda {
                    index,
                    reason: format!("libtorch sees {count} CUDA devices{runtime}"),
                });
            }
            Ok(tch::Device::Cuda(index))
        }
    }
}

/// Loads `libtorch_cuda.so` once for the process, so that libtorch registers its CUDA backend
/// (tch-rs #980: a binary linked with `--as-needed` drops the library otherwise).
fn load_cuda_library() -> Result<(), String> {
    static LOADED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    LOADED
        .get_or_init(|| {
            // SAFETY: loading libtorch's own CUDA library runs its static initialisers, which
            // register the CUDA backend with the libtorch already loaded; it is never unloaded.
            match unsafe { libloading::Library::new("libtorch_cuda.so") } {
                Ok(library) => {
                    std::mem::forget(library);
                    Ok(())
                }
                Err(e) => Err(format!("libtorch_cuda.so cannot be loaded ({e})")),
            }
        })
        .clone()
}

/// What `device` has free and in all, where it is a CUDA device (`None` on libtorch's CPU,
/// whose memory is the host's: peak RSS).
pub fn memory_reading(device: tch::Device) -> Option<Result<memory::Reading, String>> {
    match device {
        tch::Device::Cuda(index) => Some(
            memory::cuda_free_and_total(index).map(|(free, total)| memory::Reading { free, total }),
        ),
        _ => None,
    }
}

/// Whether `device` runs bf16 matrix products.
pub fn supports_bf16(device: tch::Device) -> bool {
    match device {
        tch::Device::Cpu => true,
        tch::Device::Cuda(_) => tch::utils::has_cuda() && cuda_bf16(device),
        _ => false,
    }
}

fn cuda_bf16(device: tch::Device) -> bool {
    // A bf16 product that runs is the test: libtorch refuses bf16 kernels on older GPUs.
    std::panic::catch_unwind(|| {
        let a = Tensor::ones([8, 8], (Kind::BFloat16, device));
        let _ = a
            .matmul(&a)
            .to_kind(Kind::Float)
            .sum(Kind::Float)
            .double_value(&[]);
    })
    .is_ok()
}

/// The device's dense matrix-multiply rate in GFLOP/s (bf16 operands when `bf16`): square
/// products of up to 8192, repeated until the timed run lasts 0.2 s, synchronised by reading a
/// value back.
pub fn matmul_peak_gflops(device: tch::Device, bf16: bool) -> f64 {
    let kind = if bf16 { Kind::BFloat16 } else { Kind::Float };
    let timed = |a: &Tensor, reps: usize| {
        let start = std::time::Instant::now();
        let mut total = Tensor::zeros([], (Kind::Float, device));
        for _ in 0..reps {
            total += a.matmul(a).to_kind(Kind::Float).sum(Kind::Float);
        }
        let _ = total.double_value(&[]);
        start.elapsed().as_secs_f64()
    };
    let mut n = 256i64;
    loop {
        let a = Tensor::randn([n, n], (Kind::Float, device)).to_kind(kind);
        timed(&a, 1);
        let once = timed(&a, 1);
        if once >= 0.05 || n >= 8192 {
            let reps = ((0.2 / once.max(1e-6)).ceil() as usize).clamp(1, 1000);
            let secs = timed(&a, reps);
            return 2.0 * (n as f64).powi(3) * reps as f64 / secs.max(1e-9) / 1e9;
        }
        n *= 2;
    }
}

/// Set once libtorch has refused a queued copy; later batches are then copied as tch does.
static QUEUED_UPLOADS_REFUSED: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// A micro-batch's host tensor on `device`. On CUDA the copy is queued behind the device's
/// earlier work without the host waiting for it ([`fused::queued_upload`]), so the host
/// records the next micro-batch while the device still runs the last one. Where libtorch
/// refuses that, it is said once and copies wait, as tch's `to_device` does. Only for small
/// per-micro-batch tensors: the page-locked blocks stay in libtorch's cache, so weights go
/// through [`upload`].
fn send_batch_tensor(host: Tensor, device: tch::Device) -> Tensor {
    use std::sync::atomic::Ordering::Relaxed;
    if let tch::Device::Cuda(index) = device
        && !QUEUED_UPLOADS_REFUSED.load(Relaxed)
    {
        match fused::queued_upload(&host, index) {
            Ok(on_device) => return on_device,
            Err(why) => {
                if !QUEUED_UPLOADS_REFUSED.swap(true, Relaxed) {
                    tracing::warn!(
                        "libtorch refused a queued copy to the device ({why}); each \
                         micro-batch's upload now waits for the device"
                    );
                }
            }
        }
    }
    host.to_device(device)
}

/// How micro-batches reach `device` in this process so far: `"queued"` (CUDA, from page-locked
/// memory without waiting), `"waiting"` (CUDA, after libtorch refused a queued copy) or
/// `"host"` (libtorch's CPU device: the batch stays in host memory).
pub fn batch_uploads(device: TorchDevice) -> &'static str {
    match device {
        TorchDevice::Cpu => "host",
        TorchDevice::Cuda(_)
            if QUEUED_UPLOADS_REFUSED.load(std::sync::atomic::Ordering::Relaxed) =>
        {
            "waiting"
        }
        TorchDevice::Cuda(_) => "queued",
    }
}

/// A libtorch tensor from host floats with `shape`, on `device`.
pub(crate) fn upload(values: &[f32], shape: &[i64], device: tch::Device) -> Tensor {
    Tensor::from_slice(values).reshape(shape).to_device(device)
}

/// A tensor's values on the host, flattened.
pub(crate) fn download(t: &Tensor) -> Result<Vec<f32>, ScoreError> {
    Vec::<f32>::try_from(
        t.to_kind(Kind::Float)
            .to_device(tch::Device::Cpu)
            .flatten(0, -1),
    )
    .map_err(|e| ScoreError::Backend(format!("reading a tensor back: {e}")))
}

/// Positions the RoPE table on the device covers before it grows (for V1, head dim 256: 64 MiB
/// of cos and sin at 2^15 rows).
const ROPE_MIN_ROWS: usize = 1024;

/// The model's parameters in the order of [`Weights::tensors`], in their canonical shapes.
pub struct TorchModel {
    config: ModelConfig,
    device: tch::Device,
    /// Mixed precision: the linears, attention and the branch activations between them (GELU,
    /// dropout) in bf16; the residual stream, LayerNorm, RoPE, the loss and the weights in f32.
    bf16: bool,
    params: Vec<Tensor>,
    /// In bf16 training, bf16 copies of the linears' weights and biases, by parameter index,
    /// cast once per optimizer step ([`TorchModel::cast_bf16_copies`]) where autocast casts
    /// them in every micro-batch's forward pass; a layer's q, k and v projections are one
    /// fused copy, `[D, 3D]` at q's weight's index and `[3D]` at q's bias's. Autograd gives the
    /// copies their gradients; [`TorchModel::accumulate_copy_gradients`] adds those into the f32
    /// masters'. Empty: each linear casts its f32 parameters where it uses them.
    bf16_copies: Vec<Option<Tensor>>,
    timescales: Vec<f32>,
    /// `[cos, cos]` and `[-sin, sin]` of every position below its row count, `[rows, head_dim]`.
    rope: Mutex<Option<(usize, Tensor, Tensor)>>,
}

/// A micro-batch on the device: tokens `[B, T]`, positions and targets `[B * T]`, as i64.
pub struct DeviceBatch {
    pub batch: i64,
    pub seq: i64,
    pub tokens: Tensor,
    pub positions: Tensor,
    pub targets: Tensor,
    pub max_position: usize,
}

impl DeviceBatch {
    /// Bytes this batch took to the device.
    pub fn bytes(&self) -> u64 {
        3 * 8 * (self.batch * self.seq) as u64
    }
}

/// Indices of one layer's parameters in the canonical order.
const PER_LAYER: usize = 16;
/// Where a layer's q, k and v weights sit among its parameters (each bias just after its
/// weight): fused into one product under bf16.
const QKV_OFFSETS: [usize; 3] = [2, 4, 6];
/// Where a layer's other linear weights and biases sit: the attention output and the MLP's two.
const OTHER_LINEAR_OFFSETS: [usize; 6] = [8, 9, 12, 13, 14, 15];

/// Dropout of a training pass: the rate on every site, and libtorch's generator seeded for
/// this micro-batch.
#[derive(Debug, Clone, Copy)]
pub struct Dropout {
    pub rate: f64,
}

impl TorchModel {
    /// `weights` uploaded to `device`.
    pub fn new(weights: &Weights, device: tch::Device) -> Self {
        let params = weights
            .tensors()
            .into_iter()
            .zip(Weights::specs(&weights.config))
            .map(|((_, values), spec)| {
                let shape: Vec<i64> = spec.shape.iter().map(|&d| d as i64).collect();
                upload(values, &shape, device)
            })
            .collect();
        TorchModel {
            config: weights.config,
            device,
            bf16: false,
            params,
            bf16_copies: Vec::new(),
            timescales: rope_timescales(weights.config.head_dim()),
            rope: Mutex::new(None),
        }
    }

    pub fn with_bf16(mut self, on: bool) -> Self {
        self.bf16 = on;
        self
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn device(&self) -> tch::Device {
        self.device
    }

    /// Every parameter, in [`Weights::tensors`] order.
    pub fn parameters(&self) -> &[Tensor] {
        &self.params
    }

    pub(crate) fn parameters_mut(&mut self) -> &mut Vec<Tensor> {
        &mut self.params
    }

    /// The parameters' values into `weights` (same config).
    pub fn read_into(&self, weights: &mut Weights) -> Result<(), ScoreError> {
        for (param, (_, dest)) in self.params.iter().zip(weights.tensors_mut()) {
            let values = download(param)?;
            if values.len() != dest.len() {
                return Err(ScoreError::Backend(format!(
                    "the device returned {} values for a tensor of {}",
                    values.len(),
                    dest.len()
                )));
            }
            dest.copy_from_slice(&values);
        }
        Ok(())
    }

    /// `x · params[weight] + params[bias]`, through [`TorchModel::bf16_product`] under bf16.
    fn linear(&self, x: &Tensor, weight: usize, bias: usize) -> Tensor {
        let p = &self.params;
        if self.bf16 {
            let bf16 = |i: usize| match self.bf16_copies.get(i) {
                Some(Some(copy)) => copy.shallow_clone(),
                _ => p[i].to_kind(Kind::BFloat16),
            };
            self.bf16_product(x, &bf16(weight), &bf16(bias))
        } else {
            x.matmul(&p[weight]) + &p[bias]
        }
    }

    /// A layer's q, k and v projections of `x` under bf16 as one product, `[.., 3D]`: the fused
    /// copy where there is one, else the f32 weights joined and cast (the same numbers).
    fn fused_qkv(&self, x: &Tensor, first: usize) -> Tensor {
        let p = &self.params;
        let joined = |offset: usize, dim: i64| {
            let parts: Vec<&Tensor> = QKV_OFFSETS.iter().map(|o| &p[first + o + offset]).collect();
            Tensor::cat(&parts, dim).to_kind(Kind::BFloat16)
        };
        let copy = |i: usize| self.bf16_copies.get(i).and_then(Option::as_ref);
        match (copy(first + 2), copy(first + 3)) {
            (Some(weight), Some(bias)) => self.bf16_product(x, weight, bias),
            _ => self.bf16_product(x, &joined(0, 1), &joined(1, 0)),
        }
    }

    /// `x · weight + bias` with bf16 `weight` and `bias`: one bf16 GEMM (the bias in its
    /// epilogue) whose result stays bf16, as autocast leaves it, so the branch activations
    /// after it (attention inputs, GELU, dropout) move half the bytes; adding a branch into the
    /// f32 residual stream promotes it back.
    fn bf16_product(&self, x: &Tensor, weight: &Tensor, bias: &Tensor) -> Tensor {
        let mut shape = x.size();
        let inputs = *shape.last().expect("a linear's input has a last dimension");
        let rows = x.reshape([-1, inputs]).to_kind(Kind::BFloat16);
        let out = bias.addmm(&rows, weight);
        *shape.last_mut().expect("as above") = weight.size()[1];
        out.reshape(shape)
    }

    /// Casts the bf16 copies of the linears' parameters afresh from the f32 masters (after an
    /// optimizer step changed them), as leaves autograd gives gradients to; a model without
    /// bf16 gets none. The old copies are dropped first, so the device never holds two sets.
    pub(crate) fn cast_bf16_copies(&mut self) {
        self.bf16_copies.clear();
        if !self.bf16 {
            return;
        }
        let p = &self.params;
        let mut copies: Vec<Option<Tensor>> = (0..p.len()).map(|_| None).collect();
        let leaf = |t: Tensor| Some(t.to_kind(Kind::BFloat16).set_requires_grad(true));
        tch::no_grad(|| {
            for layer in 0..self.config.num_layers {
                let first = 1 + layer * PER_LAYER;
                for offset in [0, 1] {
                    let parts: Vec<Tensor> = QKV_OFFSETS
                        .iter()
                        .map(|o| p[first + o + offset].detach())
                        .collect();
                    copies[first + 2 + offset] = leaf(Tensor::cat(&parts, 1 - offset as i64));
                }
                for offset in OTHER_LINEAR_OFFSETS {
                    copies[first + offset] = leaf(p[first + offset].detach());
                }
            }
        });
        self.bf16_copies = copies;
    }

    /// Whether the linears use bf16 copies cast once per optimizer step.
    pub fn has_bf16_copies(&self) -> bool {
        !self.bf16_copies.is_empty()
    }

    /// Adds the gradients the bf16 copies received in the last backward pass into their f32
    /// masters' `.grad` (f32 sums of the bf16 values, what autograd computes through a cast in
    /// the graph; a fused q, k, v copy's in three slices) and drops the copies'. Nothing to do
    /// without copies.
    pub(crate) fn accumulate_copy_gradients(&self) -> Result<(), String> {
        let (mut masters, mut grads, mut copies) = (Vec::new(), Vec::new(), Vec::new());
        let width = self.config.embedding_dim as i64;
        for (i, copy) in self.bf16_copies.iter().enumerate() {
            let Some(copy) = copy else { continue };
            copies.push(copy.shallow_clone());
            let grad = copy.grad();
            if !grad.defined() {
                continue;
            }
            let offset = (i - 1) % PER_LAYER;
            if offset == 2 || offset == 3 {
                // The fused q, k, v weight (slices along its columns) or bias.
                let dim = if offset == 2 { 1 } else { 0 };
                for (part, o) in QKV_OFFSETS.iter().enumerate() {
                    masters.push(self.params[i - 2 + o].shallow_clone());
                    grads.push(grad.narrow(dim, part as i64 * width, width));
                }
            } else {
                masters.push(self.params[i].shallow_clone());
                grads.push(grad);
            }
        }
        if copies.is_empty() {
            return Ok(());
        }
        crate::fused::accumulate_copy_grads(&masters, &grads, &copies)
    }

    fn layer_norm(&self, x: &Tensor, gamma: &Tensor, beta: &Tensor) -> Tensor {
        x.layer_norm(
            [self.config.embedding_dim as i64],
            Some(gamma),
            Some(beta),
            LAYER_NORM_EPS as f64,
            true,
        )
    }

    /// `[cos, cos]` and `[-sin, sin]` `[B, 1, T, h]` for `positions` (`[B * T]`), gathered from
    /// a table on the device that grows as later positions appear: only the positions cross per
    /// batch.
    fn rope_rows(
        &self,
        positions: &Tensor,
        max_position: usize,
        batch: i64,
        seq: i64,
    ) -> (Tensor, Tensor) {
        let half = self.timescales.len() as i64;
        let mut table = self.rope.lock().unwrap_or_else(|e| e.into_inner());
        let have = table.as_ref().map_or(0, |(rows, _, _)| *rows);
        if max_position >= have {
            let rows = (max_position + 1).next_power_of_two().max(ROPE_MIN_ROWS);
            let all: Vec<u32> = (0..rows as u32).collect();
            let (cos, sin) = rope_tables(&all, &self.timescales);
            let half = half as usize;
            let (mut cos_twice, mut sin_signed) = (Vec::new(), Vec::new());
            for (c, s) in cos.chunks_exact(half).zip(sin.chunks_exact(half)) {
                cos_twice.extend_from_slice(c);
                cos_twice.extend_from_slice(c);
                sin_signed.extend(s.iter().map(|v| -v));
                sin_signed.extend_from_slice(s);
            }
            let shape = [rows as i64, 2 * half as i64];
            *table = Some((
                rows,
                upload(&cos_twice, &shape, self.device),
                upload(&sin_signed, &shape, self.device),
            ));
        }
        let (_, cos, sin) = table.as_ref().expect("filled above");
        let gather = |t: &Tensor| {
            t.index_select(0, positions)
                .reshape([batch, 1, seq, 2 * half])
        };
        (gather(cos), gather(sin))
    }

    /// `batch` on the device: all that crosses per micro-batch.
    pub fn upload_batch(&self, batch: &Batch) -> DeviceBatch {
        let widen = |v: &[u32]| -> Vec<i64> { v.iter().map(|&x| x as i64).collect() };
        let (b, t) = (batch.batch as i64, batch.seq_len as i64);
        DeviceBatch {
            batch: b,
            seq: t,
            tokens: send_batch_tensor(Tensor::from_slice(&widen(&batch.tokens)), self.device)
                .reshape([b, t]),
            positions: send_batch_tensor(Tensor::from_slice(&widen(&batch.positions)), self.device),
            targets: send_batch_tensor(Tensor::from_slice(&widen(&batch.targets)), self.device),
            max_position: batch.positions.iter().copied().max().unwrap_or(0) as usize,
        }
    }

    /// Final-norm representations `[B, T, D]` and logits `[B, T, V]` of `batch`'s tokens, with
    /// `dropout` in training.
    pub fn forward(&self, batch: &Batch, dropout: Option<Dropout>) -> (Tensor, Tensor) {
        self.forward_uploaded(&self.upload_batch(batch), dropout)
    }

    /// [`forward`](Self::forward) of a batch already on the device.
    pub fn forward_uploaded(
        &self,
        batch: &DeviceBatch,
        dropout: Option<Dropout>,
    ) -> (Tensor, Tensor) {
        let c = &self.config;
        let (b, t) = (batch.batch, batch.seq);
        let (heads, hd) = (c.num_heads as i64, c.head_dim() as i64);
        let half = hd / 2;
        let tokens = &batch.tokens;
        let (cos, sin) = self.rope_rows(&batch.positions, batch.max_position, b, t);
        let rate = dropout.map_or(0.0, |d| d.rate);
        let train = dropout.is_some() && rate > 0.0;
        let drop = |x: Tensor| if train { x.dropout(rate, true) } else { x };
        // Half-split RoPE, `a' = a cos - b sin`, `b' = b cos + a sin`, as `x [cos, cos] +
        // [b, a] [-sin, sin]`: four ops where the halves taken apart take nine, and the same
        // numbers bit for bit (negating is exact, and each output adds the same two products).
        let rope = |x: Tensor| &x * &cos + x.roll([half], [-1]) * &sin;
        let p = &self.params;
        let mut x = Tensor::embedding(&p[0], tokens, -1, false, false);
        for layer in 0..c.num_layers {
            let first = 1 + layer * PER_LAYER;
            let w = &p[first..first + PER_LAYER];
            let h = self.layer_norm(&x, &w[0], &w[1]);
            let split = |y: Tensor| y.reshape([b, t, heads, hd]).transpose(1, 2);
            let [q, k, v] = if self.bf16 {
                let qkv = self.fused_qkv(&h, first);
                let mut parts = qkv.split(heads * hd, -1).into_iter();
                [(); 3].map(|_| parts.next().expect("three projections"))
            } else {
                [2, 4, 6].map(|o| self.linear(&h, first + o, first + o + 1))
            };
            let [q, k, v] = [rope(split(q)), rope(split(k)), split(v)];
            let attention_kind = if self.bf16 {
                Kind::BFloat16
            } else {
                Kind::Float
            };
            // Under bf16 the context stays bf16 into the output projection.
            let ctx = Tensor::scaled_dot_product_attention::<Tensor>(
                &q.to_kind(attention_kind),
                &k.to_kind(attention_kind),
                &v.to_kind(attention_kind),
                None,
                if train { rate } else { 0.0 },
                true,
                None,
                false,
            )
            .transpose(1, 2)
            .reshape([b, t, heads * hd]);
            // Not `+=`: that adds in place into a tensor autograd saved for LayerNorm.
            x = &x + drop(self.linear(&ctx, first + 8, first + 9));
            let h = self.layer_norm(&x, &w[10], &w[11]);
            let act = drop(self.linear(&h, first + 12, first + 13).gelu("none"));
            x = &x + drop(self.linear(&act, first + 14, first + 15));
        }
        let n = p.len();
        let reps = self.layer_norm(&x, &p[n - 4], &p[n - 3]);
        // The output head stays f32 even under bf16: its product is a small part of the step
        // (264 columns), and bf16 logits would round the loss itself.
        let logits = reps.matmul(&p[n - 2]) + &p[n - 1];
        (reps, logits)
    }
}

/// Scoring reads the final representations' projections and the logits back and computes the
/// loss terms with the CPU path's own routines, so the numbers are the network's.
impl BatchScorer for TorchModel {
    fn score_batch(&mut self, batch: &Batch, noise_seed: u64) -> Result<BatchOutput, ScoreError> {
        let (b, t) = (batch.batch, batch.seq_len);
        let (d, v) = (self.config.embedding_dim, self.config.vocab_size);
        let noise = somatrain_noise::unit_column_noise(noise_seed, d, SIGREG_SLICES);
        let outputs = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            tch::no_grad(|| {
                let (reps, logits) = self.forward(batch, None);
                let reps = reps.reshape([(b * t) as i64, d as i64]);
                let noise = upload(&noise, &[d as i64, SIGREG_SLICES as i64], self.device);
                let proj = reps.matmul(&noise);
                let embedding = reps
                    .to_kind(Kind::Double)
                    .sum_dim_intlist(0, false, Kind::Double);
                (download(&logits), download(&proj), download(&embedding))
            })
        }))
        .map_err(|panic| ScoreError::Backend(panic_message(panic.as_ref())))?;
        let (logits, proj, embedding_sum) = (outputs.0?, outputs.1?, outputs.2?);
        let ce = (cross_entropy_sum(&logits, &batch.targets, v) / (b * t) as f64) as f32;
        let sigreg = sigreg_mean(&proj);
        Ok(BatchOutput {
            loss: ce + SIGREG_COEFFICIENT * sigreg,
            cross_entropy: ce,
            sigreg,
            embedding: embedding_sum
                .iter()
                .map(|s| (*s as f64 / (b * t) as f64) as f32)
                .collect(),
        })
    }
}

/// A libtorch error or panic as text (tch panics on a failed op; out-of-memory among them).
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "libtorch failed".into())
}
