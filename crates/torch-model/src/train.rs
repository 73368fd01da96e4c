//! Training through libtorch: the network's loss computed on the device (PAD-inclusive
//! cross-entropy plus SIGReg over the step's random unit projections), gradients by autograd,
//! summed on the device across the step's micro-batches, and AdamW there ([`TorchEngine`]).
//!
//! Per micro-batch only the batch goes up (tokens, targets, positions) and nothing comes back:
//! the step's loss terms are read once, after its last micro-batch
//! ([`GradientEngine::step_losses`]), and the optimizer step reads its gradient norm and a
//! divergence check; the weights and moments come back only for a checkpoint or a round's
//! artifacts ([`GradientEngine::sync_to_host`]). Dropout is libtorch's, its generator
//! seeded from the micro-batch's key (seed, step, micro-batch): a resumed run draws the same
//! masks on the same device without any generator state in the checkpoint.

use somatrain_data::{Batch, PAD};
use somatrain_model::Weights;
use somatrain_model::config::SIGREG_SLICES;
use somatrain_model::cpu::train::TrainOptions;
use somatrain_model::loss::SigRegGrid;
use somatrain_model::score::{BatchOutput, BatchScorer, ScoreError};
use somatrain_train::optim::{AdamState, OptimConfig, StepStats};
use somatrain_train::trainer::{DeviceMemory, OutOfMemory, TransferStats, first_nonfinite};
use somatrain_train::{GradientEngine, TrainError};
use tch::{Kind, Tensor};

use crate::memory::MemoryMeter;
use crate::{DeviceBatch, Dropout, TorchModel, download, panic_message, upload};

/// Held while a micro-batch draws its dropout masks from libtorch's global generator.
static GENERATOR: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A [`GradientEngine`] on a libtorch device.
pub struct TorchEngine {
    device: tch::Device,
    bf16: bool,
    /// Under bf16, the linears' bf16 weights are copies cast once per optimizer step (the
    /// default) rather than casts inside every micro-batch's graph.
    bf16_copies: bool,
    /// The model, and the host weights' version it was loaded from while the host still owns
    /// the weights (`u64::MAX` once the device does).
    loaded: Option<(u64, TorchModel)>,
    /// Adam's moments, in [`Weights::tensors`] order, once the device owns them.
    moments: Option<Vec<(Tensor, Tensor)>>,
    /// Whether the parameters hold gradients not yet used by an optimizer step.
    pending_gradients: bool,
    /// The last SIGReg projection matrix uploaded (the trainer uses one per step).
    noise: Option<(Vec<f32>, Tensor)>,
    /// SIGReg's grid on the device, once uploaded.
    grid: Option<DeviceGrid>,
    /// A reduction over every weight after the last step, finite exactly when every weight
    /// is: read back as the divergence check.
    finite_check: Option<Tensor>,
    /// AdamW through libtorch's fused multi-tensor kernel (else tensor by tensor).
    fused_optimizer: bool,
    /// The loss terms `[cross-entropy, SIGReg]` of the step's micro-batches so far, with their
    /// SIGReg coefficient: read together at the step's end.
    pending_losses: Vec<(Tensor, f32)>,
    /// What crossed between host and device, and the time it took.
    traffic: TransferStats,
    /// The device's memory since the model was first loaded (CUDA only).
    memory: Option<MemoryMeter>,
}

impl TorchEngine {
    pub fn new(device: tch::Device) -> Self {
        TorchEngine {
            device,
            bf16: false,
            bf16_copies: true,
            loaded: None,
            moments: None,
            pending_gradients: false,
            noise: None,
            grid: None,
            finite_check: None,
            fused_optimizer: true,
            pending_losses: Vec::new(),
            traffic: TransferStats::default(),
            memory: None,
        }
    }

    /// Reads the device's memory into the meter (started at the first reading).
    fn sample_memory(&mut self) {
        let Some(reading) = crate::memory_reading(self.device) else {
            return;
        };
        match (reading, &mut self.memory) {
            (Ok(reading), Some(meter)) => meter.sample(reading),
            (Ok(reading), None) => self.memory = Some(MemoryMeter::start(reading)),
            (Err(why), _) => {
                static TOLD: std::sync::Once = std::sync::Once::new();
                TOLD.call_once(|| tracing::warn!("device memory is not reported: {why}"));
            }
        }
    }

    /// After a micro-batch of `batch` ran out of memory: the largest micro-batch of its first
    /// rows whose forward and backward passes run, with room held for Adam's moments where
    /// they are not on the device yet (`Some(0)`: not even one sequence fits). Found by
    /// bisection, each try on the same device; the gradients are dropped afterwards (the step
    /// fails either way).
    fn largest_fitting_micro_batch(
        &mut self,
        batch: &Batch,
        projections: &Tensor,
        options: &TrainOptions,
    ) -> Option<usize> {
        let device = self.device;
        let grid = &*self.grid.get_or_insert_with(|| DeviceGrid::upload(device));
        let (_, model) = self.loaded.as_ref()?;
        let fits = quietly(|| {
            let moments_room = match &self.moments {
                Some(_) => None,
                None => {
                    let elements = 2 * model.config().parameter_count() as i64;
                    match std::panic::catch_unwind(|| {
                        Tensor::empty([elements], (Kind::Float, device))
                    }) {
                        Ok(room) => Some(room),
                        Err(_) => return 0,
                    }
                }
            };
            let runs = |rows: usize| {
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    let part = first_rows(batch, rows);
                    let uploaded = model.upload_batch(&part);
                    let (loss, _, _) = {
                        let _generator = GENERATOR.lock().unwrap_or_else(|e| e.into_inner());
                        tch::manual_seed(options.dropout_key as i64);
                        device_loss(model, &uploaded, projections, grid, options)
                    };
                    loss.backward();
                    if let Err(why) = model.accumulate_copy_gradients() {
                        panic!("{why}");
                    }
                }))
                .is_ok()
            };
            let (mut fits, mut fails) = (0, batch.batch);
            while fails - fits > 1 {
                let rows = fits + (fails - fits) / 2;
                if runs(rows) {
                    fits = rows;
                } else {
                    fails = rows;
                }
            }
            drop(moments_room);
            fits
        });
        // What a failed try left in the bf16 copies goes to the masters, zeroed with theirs.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            model.accumulate_copy_gradients()
        }));
        tch::no_grad(|| {
            for p in model.parameters() {
                let grad = p.grad();
                if grad.defined() {
                    let _ = grad.shallow_clone().zero_();
                }
            }
        });
        self.pending_gradients = false;
        Some(fits)
    }

    /// Times an upload of `bytes` bytes.
    fn uploaded<T>(&mut self, bytes: u64, upload: impl FnOnce() -> T) -> T {
        let start = std::time::Instant::now();
        let value = upload();
        self.traffic.host_to_device_bytes += bytes;
        self.traffic.upload_seconds += start.elapsed().as_secs_f64();
        value
    }

    /// Times a read of `bytes` bytes (which waits for the device to finish what it reads).
    fn read<T>(&mut self, bytes: u64, read: impl FnOnce() -> T) -> T {
        let start = std::time::Instant::now();
        let value = read();
        self.traffic.device_to_host_bytes += bytes;
        self.traffic.read_seconds += start.elapsed().as_secs_f64();
        value
    }

    /// AdamW through libtorch's fused multi-tensor kernel (the default), or tensor by tensor
    /// (the first version, kept as the fallback and for comparison in `bench train`).
    pub fn with_fused_optimizer(mut self, on: bool) -> Self {
        self.fused_optimizer = on;
        self
    }

    /// Whether the optimizer runs fused: false where it was asked not to, or where libtorch
    /// refused the fused kernel and the engine fell back.
    pub fn uses_fused_optimizer(&self) -> bool {
        self.fused_optimizer
    }

    /// Mixed precision: bf16 matrix products, attention and the branch activations between
    /// them; f32 residual stream, master weights, gradients, moments and loss. Refused where
    /// the device has no bf16 products.
    pub fn with_bf16(mut self, on: bool) -> Result<Self, crate::DeviceError> {
        if on && !crate::supports_bf16(self.device) {
            return Err(crate::DeviceError::NoBf16);
        }
        self.bf16 = on;
        Ok(self)
    }

    /// Under bf16: bf16 copies of the linears' weights cast once per optimizer step, their
    /// gradients added into the f32 masters' after each micro-batch (the default), or the f32
    /// weights cast inside every micro-batch's graph, as autocast does. The same numbers either
    /// way; the copies spare each micro-batch the casts and their f32 gradients (about 17 GB of
    /// memory traffic per V1 micro-batch, `docs/gpu.md`), for 2 bytes a parameter of memory.
    pub fn with_bf16_copies(mut self, on: bool) -> Self {
        self.bf16_copies = on;
        self
    }

    fn load(&mut self, weights: &Weights, version: u64) {
        if self.memory.is_none() {
            self.sample_memory();
        }
        let (device, bf16) = (self.device, self.bf16);
        let bytes = 4 * weights.config.parameter_count();
        let mut model = self.uploaded(bytes, || TorchModel::new(weights, device).with_bf16(bf16));
        for p in model.parameters_mut() {
            *p = p.set_requires_grad(true);
        }
        if self.bf16_copies {
            model.cast_bf16_copies();
        }
        self.loaded = Some((version, model));
        self.pending_gradients = false;
    }

    fn projections(&mut self, noise: &[f32], d: usize) -> Tensor {
        if let Some((host, device)) = &self.noise
            && host.as_slice() == noise
        {
            return device.shallow_clone();
        }
        let on = self.device;
        let device = self.uploaded(4 * noise.len() as u64, || {
            upload(noise, &[d as i64, SIGREG_SLICES as i64], on)
        });
        self.noise = Some((noise.to_vec(), device.shallow_clone()));
        device
    }
}

/// What one AdamW step updates, and with what: the parameters (their gradients in `.grad`),
/// Adam's moments in the same order, the settings, this step's learning rate and its number
/// (1 for the first).
struct AdamWStep<'a> {
    params: &'a [Tensor],
    moments: &'a [(Tensor, Tensor)],
    config: &'a OptimConfig,
    lr: f32,
    step: u64,
    device: tch::Device,
}

/// One AdamW step through libtorch's fused kernels: the gradients' global norm in one
/// reduction, clipping as the kernel's gradient scale (`max(1, norm / max_norm)`, never read
/// back), the update in one multi-tensor kernel, and the gradients zeroed in one.
/// `(gradient norm, the weights' global norm)`; the latter is finite exactly when every weight is.
fn fused_adamw(update: &AdamWStep) -> Result<(Tensor, Tensor), FusedFailure> {
    let (params, config, device) = (update.params, update.config, update.device);
    let grads: Vec<Tensor> = params.iter().map(|p| p.grad()).collect();
    let norm = crate::fused::global_norm(&grads)
        .map_err(FusedFailure::BeforeUpdate)?
        .to_kind(Kind::Float);
    let scale = config
        .grad_clip
        .map(|max| (&norm / max as f64).clamp_min(1.0));
    let step = Tensor::full([0i64; 0], update.step as f64, (Kind::Float, device));
    let settings = crate::fused::AdamW {
        lr: update.lr as f64,
        beta1: config.beta1 as f64,
        beta2: config.beta2 as f64,
        weight_decay: config.weight_decay as f64,
        eps: config.eps as f64,
    };
    // libtorch checks the lists (devices, dtypes, lengths) before it launches the update.
    crate::fused::adamw(
        params,
        &grads,
        update.moments,
        &step,
        settings,
        scale.as_ref(),
    )
    .map_err(FusedFailure::BeforeUpdate)?;
    crate::fused::zero_all(&grads).map_err(FusedFailure::AfterUpdate)?;
    let weights_norm = crate::fused::global_norm(params).map_err(FusedFailure::AfterUpdate)?;
    Ok((norm, weights_norm))
}

/// Why the fused AdamW did not finish, and whether the weights had been updated by then (a
/// step that failed before may run tensor by tensor instead; one that failed after may not).
enum FusedFailure {
    BeforeUpdate(String),
    AfterUpdate(String),
}

/// One AdamW step tensor by tensor, with the scalars as the host optimizer computes them (in
/// f32): a dozen kernels per tensor. `(gradient norm, the sum of every weight)`.
fn per_tensor_adamw(update: &AdamWStep) -> (Tensor, Tensor) {
    let (params, moments, config) = (update.params, update.moments, update.config);
    let (lr, device, t) = (update.lr, update.device, update.step as i32);
    let (b1, b2, eps, wd) = (config.beta1, config.beta2, config.eps, config.weight_decay);
    let (bias1, bias2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
    let (one_minus_b1, one_minus_b2) = (1.0 - b1, 1.0 - b2);
    let grads: Vec<Tensor> = params.iter().map(|p| p.grad()).collect();
    let squares = grads
        .iter()
        .map(|g| g.to_kind(Kind::Double).square().sum(Kind::Double))
        .fold(Tensor::zeros([], (Kind::Double, device)), |a, b| a + b);
    let norm = squares.sqrt().to_kind(Kind::Float);
    let factor = config
        .grad_clip
        .map(|max| (norm.reciprocal() * max as f64).clamp_max(1.0));
    let mut total = Tensor::zeros([], (Kind::Float, device));
    for ((param, grad), (m, v)) in params.iter().zip(&grads).zip(moments) {
        let g = match &factor {
            Some(f) => grad * f,
            None => grad.shallow_clone(),
        };
        let (mut m, mut v) = (m.shallow_clone(), v.shallow_clone());
        let _ = m
            .g_mul_scalar_(b1 as f64)
            .g_add_(&(&g * one_minus_b1 as f64));
        let _ = v
            .g_mul_scalar_(b2 as f64)
            .g_add_(&(&g * &g * one_minus_b2 as f64));
        let (m, v) = (&m, &v);
        let update = (m / bias1 as f64) / ((v / bias2 as f64).sqrt() + eps as f64);
        let step = (update + param * wd as f64) * lr as f64;
        let mut param = param.shallow_clone();
        let _ = param.g_sub_(&step);
        total += param.sum(Kind::Float);
        let _ = grad.shallow_clone().zero_();
    }
    (norm, total)
}

/// SIGReg's trapezoid grid on the device, without `t = 0` (it adds nothing: cos 0 = phi(0),
/// sin 0 = 0): the same constants for every micro-batch, so uploaded once per engine.
struct DeviceGrid {
    t: Tensor,
    phi: Tensor,
    weight: Tensor,
}

impl DeviceGrid {
    fn upload(device: tch::Device) -> Self {
        let grid = SigRegGrid::new();
        let points = grid.t.len() as i64 - 1;
        DeviceGrid {
            t: upload(&grid.t[1..], &[1, 1, points], device),
            phi: upload(&grid.phi[1..], &[1, points], device),
            weight: upload(&grid.weight[1..], &[1, points], device),
        }
    }
}

/// The network's training loss of one micro-batch on the device: `(loss, ce, sigreg)`.
fn device_loss(
    model: &TorchModel,
    batch: &DeviceBatch,
    projections: &Tensor,
    grid: &DeviceGrid,
    options: &TrainOptions,
) -> (Tensor, Tensor, Tensor) {
    let c = model.config();
    let (rows, d, v) = (
        batch.batch * batch.seq,
        c.embedding_dim as i64,
        c.vocab_size as i64,
    );
    let (reps, logits) = model.forward_uploaded(
        batch,
        Some(Dropout {
            rate: options.dropout as f64,
        }),
    );
    // Cross-entropy: PAD targets count in the mean's denominator but add nothing.
    let targets = &batch.targets;
    let keep = targets.ne(PAD as i64).to_kind(Kind::Float);
    let targets = targets.where_scalarother(&targets.ne(PAD as i64), 0);
    let log_probs = logits
        .reshape([rows, v])
        .log_softmax(1, Kind::Float)
        .gather(1, &targets.unsqueeze(1), false)
        .squeeze_dim(1);
    let ce = -(log_probs * keep).sum(Kind::Float) / rows as f64;
    // SIGReg on the trapezoid grid.
    let proj = reps.reshape([rows, d]).matmul(projections);
    let angles = proj.reshape([rows, SIGREG_SLICES as i64, 1]) * &grid.t;
    let mean_c = angles.cos().mean_dim(1, false, Kind::Float);
    let mean_s = angles.sin().mean_dim(1, false, Kind::Float);
    let gap = mean_c - &grid.phi;
    let stat = (&gap * &gap + &mean_s * &mean_s) * &grid.weight;
    let sigreg = stat.sum(Kind::Float) * (SIGREG_SLICES as f64 / rows as f64);
    let loss = &ce + &sigreg * options.sigreg_coefficient as f64;
    (loss, ce, sigreg)
}

/// Whether libtorch's words say an allocator ran out: CUDA's caching allocator ("CUDA out of
/// memory") or the CPU's ("DefaultCPUAllocator: can't allocate memory", or "not enough
/// memory" in older releases).
pub fn is_out_of_memory(message: &str) -> bool {
    let lower = message.to_lowercase();
    [
        "out of memory",
        "not enough memory",
        "can't allocate memory",
    ]
    .iter()
    .any(|words| lower.contains(words))
}

/// libtorch's own first sentence out of a tch panic (`called Result::unwrap() on an Err
/// value: Torch("…\nframe #0 …")`), without the unwrap's wording or the C++ frames.
pub fn libtorch_words(message: &str) -> &str {
    let inner = message
        .split_once("Torch(\"")
        .map_or(message, |(_, rest)| rest);
    let first = inner.split("\\n").next().unwrap_or(inner);
    first
        .lines()
        .next()
        .unwrap_or(first)
        .trim_end_matches("\")")
}

/// The first `rows` sequences of `batch`.
fn first_rows(batch: &Batch, rows: usize) -> Batch {
    let cells = rows * batch.seq_len;
    Batch {
        batch: rows,
        seq_len: batch.seq_len,
        tokens: batch.tokens[..cells].to_vec(),
        targets: batch.targets[..cells].to_vec(),
        positions: batch.positions[..cells].to_vec(),
    }
}

thread_local! {
    /// Set while this thread tries work expected to fail (the micro-batch probes).
    static QUIET_PANICS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `work` with this thread's panic messages unprinted, for work whose panics (tch's way
/// of failing) are caught and returned as errors: the message would only say it twice.
fn quietly<T>(work: impl FnOnce() -> T) -> T {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET_PANICS.with(std::cell::Cell::get) {
                previous(info);
            }
        }));
    });
    struct Loud;
    impl Drop for Loud {
        fn drop(&mut self) {
            QUIET_PANICS.with(|q| q.set(false));
        }
    }
    QUIET_PANICS.with(|q| q.set(true));
    let _loud = Loud;
    work()
}

impl GradientEngine for TorchEngine {
    /// Refuses a model whose weights, gradients and Adam's moments (16 bytes a parameter) alone
    /// exceed what the CUDA device has free; what the micro-batch needs on top is found out by
    /// running it (an out-of-memory error then names a micro-batch that fits).
    fn check_fits(&self, settings: &somatrain_train::TrainSettings) -> Result<(), String> {
        let Some(Ok(reading)) = crate::memory_reading(self.device) else {
            return Ok(());
        };
        let (copies, with_copies) = match self.bf16_weights() {
            "copies" => (2, " and their bf16 copies"),
            _ => (0, ""),
        };
        let state = (16 + copies) * settings.model.parameter_count();
        if state <= reading.free {
            return Ok(());
        }
        Err(format!(
            "the model's weights{with_copies}, gradients and Adam's moments alone take {:.1} GB, \
             and {:?} has {:.1} GB free of {:.1} GB: free the device, or train on one with more \
             memory",
            state as f64 / 1e9,
            self.device,
            reading.free as f64 / 1e9,
            reading.total as f64 / 1e9
        ))
    }

    fn scorer(&self, weights: &Weights) -> Option<Box<dyn BatchScorer>> {
        Some(Box::new(
            TorchModel::new(weights, self.device).with_bf16(false),
        ))
    }

    fn start_run(&mut self) {
        self.loaded = None;
        self.moments = None;
        self.pending_gradients = false;
        self.pending_losses.clear();
        self.finite_check = None;
    }

    fn loss_and_grad(
        &mut self,
        weights: &Weights,
        version: u64,
        batch: &Batch,
        noise: &[f32],
        options: TrainOptions,
        // The gradients stay on the device; `optimizer_step` uses them there.
        _grads: &mut Weights,
    ) -> Result<BatchOutput, TrainError> {
        let host_owns = self.moments.is_none();
        if host_owns && self.loaded.as_ref().is_none_or(|(v, _)| *v != version) {
            if self.pending_gradients {
                return Err(TrainError::Settings(
                    "the weights changed while gradients of the previous ones were held on the \
                     device (flush_gradients was not called before the optimizer step)"
                        .into(),
                ));
            }
            self.load(weights, version);
        }
        let d = weights.config.embedding_dim;
        let projections = self.projections(noise, d);
        let (_, model) = self.loaded.as_ref().expect("just loaded");
        let start = std::time::Instant::now();
        let uploaded = model.upload_batch(batch);
        self.traffic.host_to_device_bytes += uploaded.bytes();
        self.traffic.upload_seconds += start.elapsed().as_secs_f64();
        let device = self.device;
        let grid = &*self.grid.get_or_insert_with(|| DeviceGrid::upload(device));
        let (_, model) = self.loaded.as_ref().expect("just loaded");
        // A failure is returned as an error with libtorch's words, so tch's panic is not
        // printed as well.
        let attempt = quietly(|| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                // libtorch's generator is global: seeded for this micro-batch and held until its
                // masks are drawn (the backward pass reuses them), so that another engine in the
                // process cannot draw in between.
                let (loss, ce, sigreg) = {
                    let _generator = GENERATOR.lock().unwrap_or_else(|e| e.into_inner());
                    tch::manual_seed(options.dropout_key as i64);
                    if let tch::Device::Cuda(_) = device {
                        tch::Cuda::manual_seed_all(options.dropout_key);
                    }
                    device_loss(model, &uploaded, &projections, grid, &options)
                };
                (loss * options.grad_scale as f64).backward();
                if let Err(why) = model.accumulate_copy_gradients() {
                    panic!("{why}");
                }
                // The loss terms stay on the device until the step ends (`step_losses`).
                Tensor::stack(&[ce.detach(), sigreg.detach()], 0)
            }))
        });
        let terms = match attempt {
            Ok(terms) => terms,
            Err(panic) => {
                self.pending_losses.clear();
                let message = panic_message(panic.as_ref());
                if !is_out_of_memory(&message) {
                    return Err(TrainError::Score(ScoreError::Backend(format!(
                        "libtorch failed during a micro-batch: {message}"
                    ))));
                }
                let largest_fitting =
                    self.largest_fitting_micro_batch(batch, &projections, &options);
                return Err(TrainError::OutOfMemory(OutOfMemory {
                    micro_batch: batch.batch,
                    seq_len: batch.seq_len,
                    largest_fitting,
                    accumulation: None,
                    detail: libtorch_words(&message).to_string(),
                }));
            }
        };
        self.pending_gradients = true;
        self.pending_losses
            .push((terms, options.sigreg_coefficient));
        Ok(BatchOutput {
            loss: f32::NAN,
            cross_entropy: f32::NAN,
            sigreg: f32::NAN,
            embedding: Vec::new(),
        })
    }

    fn step_losses(&mut self, outputs: &mut [BatchOutput]) -> Result<(), TrainError> {
        let pending = std::mem::take(&mut self.pending_losses);
        if pending.len() != outputs.len() {
            return Err(TrainError::Settings(format!(
                "{} micro-batches' losses asked for, {} held on the device",
                outputs.len(),
                pending.len()
            )));
        }
        if pending.is_empty() {
            return Ok(());
        }
        let terms: Vec<&Tensor> = pending.iter().map(|(terms, _)| terms).collect();
        let all = Tensor::stack(&terms, 0);
        // One read for the whole step, which waits for its last micro-batch.
        let values = self.read(8 * pending.len() as u64, || download(&all))?;
        for ((out, (_, coefficient)), pair) in
            outputs.iter_mut().zip(&pending).zip(values.chunks_exact(2))
        {
            let (ce, sigreg) = (pair[0], pair[1]);
            *out = BatchOutput {
                loss: ce + coefficient * sigreg,
                cross_entropy: ce,
                sigreg,
                embedding: Vec::new(),
            };
        }
        Ok(())
    }

    fn flush_gradients(&mut self, grads: &mut Weights) -> Result<(), TrainError> {
        if !self.pending_gradients {
            return Ok(());
        }
        let Some((_, model)) = &self.loaded else {
            return Ok(());
        };
        self.traffic.device_to_host_bytes += 4 * grads.config.parameter_count();
        for (param, (_, dest)) in model.parameters().iter().zip(grads.tensors_mut()) {
            let grad = download(&param.grad())?;
            for (d, g) in dest.iter_mut().zip(&grad) {
                *d += g;
            }
            let _ = param.grad().zero_();
        }
        self.pending_gradients = false;
        Ok(())
    }

    fn optimizer_step(
        &mut self,
        config: &OptimConfig,
        weights: &mut Weights,
        adam: &mut AdamState,
        _grads: &mut Weights,
    ) -> Result<StepStats, TrainError> {
        if !self.pending_gradients {
            return Err(TrainError::Settings(
                "an optimizer step without gradients".into(),
            ));
        }
        // The step is over: loss terms its caller did not ask for are not kept.
        self.pending_losses.clear();
        let device = self.device;
        let moments = match self.moments.take() {
            Some(m) => m,
            None => {
                let start = std::time::Instant::now();
                let (_, model) = self.loaded.as_ref().expect("gradients imply a model");
                let moments: Vec<(Tensor, Tensor)> = adam
                    .m
                    .tensors()
                    .into_iter()
                    .zip(adam.v.tensors())
                    .zip(model.parameters())
                    .map(|(((_, m), (_, v)), p)| {
                        let shape = p.size();
                        (upload(m, &shape, device), upload(v, &shape, device))
                    })
                    .collect();
                self.traffic.host_to_device_bytes += 8 * adam.m.config.parameter_count();
                self.traffic.upload_seconds += start.elapsed().as_secs_f64();
                moments
            }
        };
        let (version, model) = self.loaded.as_mut().expect("gradients imply a model");
        let lr = config.lr_at(adam.step);
        adam.step += 1;
        let step = adam.step;
        let fused = self.fused_optimizer;
        let updated = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            tch::no_grad(|| {
                let update = AdamWStep {
                    params: model.parameters(),
                    moments: &moments,
                    config,
                    lr,
                    step,
                    device,
                };
                if fused {
                    match fused_adamw(&update) {
                        Ok(values) => return Ok((values, true)),
                        Err(FusedFailure::BeforeUpdate(why)) => tracing::warn!(
                            "the fused AdamW cannot run here ({why}); this run updates tensor by \
                             tensor"
                        ),
                        Err(FusedFailure::AfterUpdate(why)) => {
                            return Err(format!("libtorch failed after the AdamW update: {why}"));
                        }
                    }
                }
                Ok((per_tensor_adamw(&update), false))
            })
        }));
        let ((norm, total), fused) = match updated {
            Ok(Ok(values)) => values,
            Ok(Err(why)) => {
                self.moments = Some(moments);
                return Err(TrainError::Score(ScoreError::Backend(why)));
            }
            Err(panic) => {
                self.moments = Some(moments);
                let message = panic_message(panic.as_ref());
                let parameters = model.config().parameter_count();
                return Err(TrainError::Score(ScoreError::Backend(
                    if is_out_of_memory(&message) {
                        format!(
                            "the device ran out of memory in the optimizer step: the weights, \
                             their gradients and Adam's two moments alone take {:.1} GB ({}); \
                             this model needs a device with more memory",
                            16.0 * parameters as f64 / 1e9,
                            libtorch_words(&message)
                        )
                    } else {
                        format!("libtorch failed in the optimizer step: {message}")
                    },
                )));
            }
        };
        if model.has_bf16_copies() {
            let cast =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| model.cast_bf16_copies()));
            if let Err(panic) = cast {
                self.moments = Some(moments);
                return Err(TrainError::Score(ScoreError::Backend(format!(
                    "libtorch failed casting the updated weights to bf16: {}",
                    libtorch_words(&panic_message(panic.as_ref()))
                ))));
            }
        }
        // The host's weights are stale from here; this version is never uploaded again.
        *version = u64::MAX;
        self.moments = Some(moments);
        self.finite_check = Some(total);
        self.fused_optimizer = fused;
        self.pending_gradients = false;
        let grad_norm = self.read(4, || norm.double_value(&[]) as f32);
        self.sample_memory();
        let _ = weights;
        Ok(StepStats { lr, grad_norm })
    }

    fn first_nonfinite_parameter(
        &mut self,
        weights: &Weights,
    ) -> Result<Option<String>, TrainError> {
        if let Some(check) = self.finite_check.take()
            && self
                .read(check.kind().elt_size_in_bytes() as u64, || {
                    check.double_value(&[])
                })
                .is_finite()
        {
            return Ok(None);
        }
        let mut host = weights.clone();
        let mut adam = AdamState::new(weights);
        self.sync_to_host(&mut host, &mut adam)?;
        Ok(first_nonfinite(&host).or_else(|| Some("(a reduction over all weights)".into())))
    }

    fn sync_to_host(
        &mut self,
        weights: &mut Weights,
        adam: &mut AdamState,
    ) -> Result<(), TrainError> {
        let Some(moments) = &self.moments else {
            return Ok(()); // the host owns the state
        };
        let start = std::time::Instant::now();
        let (_, model) = self.loaded.as_ref().expect("moments imply a model");
        model.read_into(weights)?;
        let dests = adam.m.tensors_mut().into_iter().zip(adam.v.tensors_mut());
        for ((m, v), ((_, dm), (_, dv))) in moments.iter().zip(dests) {
            dm.copy_from_slice(&download(m)?);
            dv.copy_from_slice(&download(v)?);
        }
        self.traffic.device_to_host_bytes += 12 * weights.config.parameter_count();
        self.traffic.read_seconds += start.elapsed().as_secs_f64();
        Ok(())
    }

    fn transfers(&self) -> Option<TransferStats> {
        Some(self.traffic)
    }

    fn bf16_weights(&self) -> &'static str {
        match (self.bf16, self.bf16_copies) {
            (false, _) => "f32",
            (true, true) => "copies",
            (true, false) => "casts",
        }
    }

    fn optimizer_kind(&self) -> &'static str {
        if self.fused_optimizer {
            "fused"
        } else {
            "per-tensor"
        }
    }

    fn device_memory(&self) -> Option<DeviceMemory> {
        self.memory.map(|meter| meter.report())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libtorchs_first_sentence_is_kept_and_the_frames_are_not() {
        // As tch panics on a failed allocation (the CPU one, as this machine's libtorch words it).
        let cpu = "called `Result::unwrap()` on an `Err` value: Torch(\"[enforce fail at \
                   alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you \
                   tried to allocate 33554432 bytes. Error code 12 (Cannot allocate memory)\\nframe \
                   #0: c10::ThrowEnforceNotMet(char const*, int)\\nframe #1: c10::alloc_cpu\")";
        let words = libtorch_words(cpu);
        assert!(words.starts_with("[enforce fail"), "{words}");
        assert!(words.ends_with("(Cannot allocate memory)"), "{words}");
        assert!(is_out_of_memory(cpu));
        let cuda = "called `Result::unwrap()` on an `Err` value: Torch(\"CUDA out of memory. Tried \
                    to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB\")";
        assert_eq!(
            libtorch_words(cuda),
            "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB"
        );
        assert!(is_out_of_memory(cuda));
        assert!(!is_out_of_memory(
            "shape '[2, 3]' is invalid for input of size 5"
        ));
        assert_eq!(libtorch_words("plain words"), "plain words");
    }
}
