//! Training on a burn device, the GPU path: the network's loss computed entirely there
//! (PAD-inclusive cross-entropy plus SIGReg over the same random unit projections as the CPU
//! path), its gradients by burn's autodiff, the dropout masks drawn there with the CPU path's
//! hash, and AdamW there ([`BurnEngine`]). Per micro-batch only the batch goes up and three loss
//! scalars come back; weights and moments come back for checkpoints and rounds.

use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Tensor};
use somatrain_data::{Batch, PAD};
use somatrain_model::Weights;
use somatrain_model::config::SIGREG_SLICES;
use somatrain_model::cpu::train::TrainOptions;
use somatrain_model::score::{BatchOutput, BatchScorer, ScoreError};
use somatrain_train::optim::{AdamState, OptimConfig, StepStats};
use somatrain_train::trainer::{DeviceMemory, TransferStats, first_nonfinite};
use somatrain_train::{GradientEngine, TrainError};

use crate::transfer::{Link, Traffic};
use crate::{BurnModel, ParamTensor, Parameter};
use std::sync::Arc;

impl BurnModel {
    /// A model whose every parameter tracks gradients, on `device` with autodiff enabled.
    pub fn trainable(weights: &Weights, device: Device) -> Self {
        Self::trainable_on(weights, Link::new(device))
    }

    /// [`trainable`](Self::trainable) with its transfers counted on `link`.
    pub fn trainable_on(weights: &Weights, link: Arc<Link>) -> Self {
        let mut model = BurnModel::with_link(weights, link);
        model.map_parameters(ParamTensor::leaf);
        model
    }

    /// The network's training loss of one micro-batch, `ce + sigreg_coefficient * sigreg`
    /// (returned with its two terms), and its gradient added into `grads` (scaled by
    /// `grad_scale`). `noise` is the `[D, SLICES]` projection matrix of this step.
    pub fn loss_and_grad(
        &self,
        batch: &Batch,
        noise: &[f32],
        options: &TrainOptions,
        grads: &mut Weights,
    ) -> Result<BatchOutput, ScoreError> {
        let (output, device_grads) = self.loss_and_device_grads(batch, noise, options)?;
        add_to_host(&self.link, device_grads, grads)?;
        Ok(output)
    }

    /// [`loss_and_grad`](Self::loss_and_grad) with the gradients left on the device, one per
    /// parameter in the order of [`Weights::tensors`].
    fn loss_and_device_grads(
        &self,
        batch: &Batch,
        noise: &[f32],
        options: &TrainOptions,
    ) -> Result<(BatchOutput, Vec<ParamTensor>), ScoreError> {
        let (sigreg_coefficient, grad_scale) = (options.sigreg_coefficient, options.grad_scale);
        let (b, t) = (batch.batch, batch.seq_len);
        let (d, v) = (self.config.embedding_dim, self.config.vocab_size);
        let (reps, logits) =
            self.forward_with_dropout(&batch.tokens, &batch.positions, b, t, Some(options));
        // Cross-entropy: PAD targets count in the mean's denominator but add nothing. The
        // targets go up as they are; which to keep is worked out on the device.
        let rows = b * t;
        let targets: Vec<i64> = batch.targets.iter().map(|&x| x as i64).collect();
        let targets = self.link.ints(targets, [rows, 1]);
        let pad = targets.clone().equal_elem(PAD as i64);
        let keep = pad.clone().bool_not().float();
        let targets = targets.mask_fill(pad, 0);
        let log_probs = log_softmax(logits.reshape([rows, v]), 1).gather(1, targets);
        let ce = (log_probs * keep).sum().neg().div_scalar(rows as f32);
        // SIGReg: per token, the squared distance of the slices' empirical characteristic
        // function to the standard normal's, on the trapezoid grid; averaged over tokens.
        let [ts, phi, weight] = self.sigreg_grid.clone();
        let points = ts.dims()[0];
        let proj = reps.reshape([rows, d]).matmul(self.projections(noise));
        let angles = proj.reshape([rows, SIGREG_SLICES, 1]) * ts.reshape([1, 1, points]);
        let mean_c = angles.clone().cos().mean_dim(1).reshape([rows, points]);
        let mean_s = angles.sin().mean_dim(1).reshape([rows, points]);
        let gap = mean_c - phi.reshape([1, points]);
        let stat = (gap.clone() * gap + mean_s.clone() * mean_s) * weight.reshape([1, points]);
        let sigreg = stat.sum().mul_scalar(SIGREG_SLICES as f32 / rows as f32);
        let loss = ce.clone() + sigreg.clone().mul_scalar(sigreg_coefficient);
        // The three scalars come back in one read.
        let values = self.link.read(Tensor::cat(
            vec![loss.clone().detach(), ce.detach(), sigreg.detach()],
            0,
        ))?;
        let output = BatchOutput {
            loss: values[0],
            cross_entropy: values[1],
            sigreg: values[2],
            embedding: Vec::new(),
        };
        let gradients = loss.mul_scalar(grad_scale).backward();
        let mut found = Vec::new();
        let mut missing = None;
        self.visit_parameters(|p| {
            let grad = match p {
                Parameter::One(t) => t.grad(&gradients).map(ParamTensor::One),
                Parameter::Two(t) => t.grad(&gradients).map(ParamTensor::Two),
            };
            match grad {
                Some(g) => found.push(g),
                None => {
                    missing.get_or_insert(found.len());
                }
            }
        });
        if let Some(index) = missing {
            let name = &Weights::specs(&self.config)[index].name;
            return Err(ScoreError::Backend(format!("no gradient reached {name}")));
        }
        Ok((output, found))
    }
}

impl ParamTensor {
    /// A parameter the next backward pass differentiates by.
    fn leaf(self) -> ParamTensor {
        match self {
            ParamTensor::One(t) => ParamTensor::One(t.autodiff().require_grad()),
            ParamTensor::Two(t) => ParamTensor::Two(t.autodiff().require_grad()),
        }
    }

    /// The values as a flat vector on the device, without autodiff.
    fn flat(self) -> Tensor<1> {
        match self {
            ParamTensor::One(t) => t.inner(),
            ParamTensor::Two(t) => t.inner().flatten(0, 1),
        }
    }

    /// `flat` given this tensor's rank and shape back.
    fn shaped_like(&self, flat: Tensor<1>) -> ParamTensor {
        match self {
            ParamTensor::One(_) => ParamTensor::One(flat),
            ParamTensor::Two(t) => ParamTensor::Two(flat.reshape(t.dims())),
        }
    }

    fn add(self, other: ParamTensor) -> ParamTensor {
        match (self, other) {
            (ParamTensor::One(a), ParamTensor::One(b)) => ParamTensor::One(a + b),
            (ParamTensor::Two(a), ParamTensor::Two(b)) => ParamTensor::Two(a + b),
            _ => unreachable!("gradients are summed parameter by parameter"),
        }
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "the device backend panicked".into())
}

/// The error for a backend panic during a micro-batch: out of memory names the activations the
/// micro-batch asks for and what to lower; anything else is passed on as the backend said it.
pub fn device_failure(
    message: &str,
    config: &somatrain_model::ModelConfig,
    batch: &Batch,
) -> ScoreError {
    let lower = message.to_lowercase();
    let out_of_memory = ["out of memory", "outofmemory", "out_of_memory"]
        .iter()
        .any(|m| lower.contains(m));
    if !out_of_memory {
        return ScoreError::Backend(format!("the device failed during a micro-batch: {message}"));
    }
    let (b, t) = (batch.batch as f64, batch.seq_len as f64);
    let (d, f, h, l) = (
        config.embedding_dim as f64,
        config.pwff_hidden_dim as f64,
        config.num_heads as f64,
        config.num_layers as f64,
    );
    // What autodiff keeps per layer, roughly: the attention scores and probabilities (with
    // their mask) and about a dozen token-by-width tensors, in f32.
    let activations = 4.0 * l * (3.0 * b * h * t * t + b * t * (12.0 * d + 3.0 * f));
    ScoreError::Backend(format!(
        "the device ran out of memory ({message}); a micro-batch of {} x {} keeps about {:.1} GB \
         of activations besides 5 x {:.1} GB of weights, gradients and moments: try a smaller \
         --micro-batch (and a larger --accumulation to keep the tokens per step)",
        batch.batch,
        batch.seq_len,
        activations / 1e9,
        4.0 * config.parameter_count() as f64 / 1e9
    ))
}

/// Downloads device gradients (in [`Weights::tensors`] order) and adds them into `grads`.
fn add_to_host(
    link: &Link,
    device_grads: Vec<ParamTensor>,
    grads: &mut Weights,
) -> Result<(), ScoreError> {
    for ((_, dest), grad) in grads.tensors_mut().into_iter().zip(device_grads) {
        let values = link.read(grad.flat())?;
        for (d, g) in dest.iter_mut().zip(&values) {
            *d += g;
        }
    }
    Ok(())
}

/// A [`GradientEngine`] on a burn device that also runs the optimizer there: the weights go up
/// once when a run starts, the micro-batches' gradients are summed on the device, and AdamW
/// (f32 master weights and moments, the schedule, clipping by global norm, weight decay) updates
/// them in place. Weights and moments come back only for a checkpoint or the round's artifacts
/// ([`GradientEngine::sync_to_host`]); per step, two scalars do (the gradient norm and a
/// finiteness check).
pub struct BurnEngine {
    device: Device,
    link: Arc<Link>,
    bf16_matmuls: bool,
    /// The model, and the host weights' version it was loaded from while the host still owns
    /// the weights.
    loaded: Option<(u64, BurnModel)>,
    /// Adam's moments, flat, in [`Weights::tensors`] order; present once the device owns the
    /// optimizer state (after its first step in a run).
    moments: Option<Vec<(Tensor<1>, Tensor<1>)>>,
    accumulated: Option<Vec<ParamTensor>>,
    /// The sum of every weight after the last step, read back as the finiteness check.
    finite_sum: Option<Tensor<1>>,
    peak_bytes_reserved: u64,
}

impl BurnEngine {
    pub fn new(device: Device) -> Self {
        BurnEngine {
            link: Link::new(device.clone()),
            device,
            bf16_matmuls: false,
            loaded: None,
            moments: None,
            accumulated: None,
            finite_sum: None,
            peak_bytes_reserved: 0,
        }
    }

    /// Mixed precision: bf16 matrix products, f32 master weights, gradients and optimizer.
    /// Refused on a device without bf16 products.
    pub fn with_bf16_matmuls(mut self, on: bool) -> Result<Self, crate::DeviceError> {
        if on && !crate::supports_bf16(&self.device) {
            return Err(crate::DeviceError::NoBf16);
        }
        self.bf16_matmuls = on;
        Ok(self)
    }

    /// Adds gradients computed elsewhere (on the host, by another engine) to those summed on
    /// the device for the next optimizer step.
    pub fn add_gradients(&mut self, grads: &Weights) {
        let uploaded: Vec<ParamTensor> = grads
            .tensors()
            .into_iter()
            .zip(Weights::specs(&grads.config))
            .map(|((_, g), spec)| {
                let flat = self.link.floats(g, [g.len()]);
                match spec.shape.as_slice() {
                    [rows, cols] => ParamTensor::Two(flat.reshape([*rows, *cols])),
                    _ => ParamTensor::One(flat),
                }
            })
            .collect();
        self.accumulate(uploaded);
    }

    /// Adds one set of gradients (in [`Weights::tensors`] order) to the sum on the device.
    fn accumulate(&mut self, grads: Vec<ParamTensor>) {
        self.accumulated = Some(match self.accumulated.take() {
            None => grads,
            Some(sum) => sum.into_iter().zip(grads).map(|(a, b)| a.add(b)).collect(),
        });
    }

    /// Uploads `weights` as the trainable model, remembered as `version`.
    fn load(&mut self, weights: &Weights, version: u64) {
        let model = BurnModel::trainable_on(weights, self.link.clone())
            .with_bf16_matmuls(self.bf16_matmuls);
        self.loaded = Some((version, model));
    }

    /// Bytes moved between host and device by this engine and its models so far.
    pub fn traffic(&self) -> Traffic {
        self.link.traffic()
    }

    fn model(&self) -> Result<&BurnModel, TrainError> {
        self.loaded
            .as_ref()
            .map(|(_, m)| m)
            .ok_or_else(|| TrainError::Settings("no weights are on the device yet".into()))
    }

    fn parameters(&self) -> Result<Vec<ParamTensor>, TrainError> {
        let mut out = Vec::new();
        self.model()?.visit_parameters(|p| {
            out.push(match p {
                Parameter::One(t) => ParamTensor::One(t.clone()),
                Parameter::Two(t) => ParamTensor::Two(t.clone()),
            })
        });
        Ok(out)
    }
}

fn to_host(link: &Link, t: Tensor<1>, dest: &mut [f32]) -> Result<(), ScoreError> {
    let values = link.read(t)?;
    if values.len() != dest.len() {
        return Err(ScoreError::Backend(format!(
            "the device returned {} values for a tensor of {}",
            values.len(),
            dest.len()
        )));
    }
    dest.copy_from_slice(&values);
    Ok(())
}

fn scalar(link: &Link, t: Tensor<1>) -> Result<f32, ScoreError> {
    let v = link.read(t)?;
    v.first()
        .copied()
        .ok_or_else(|| ScoreError::Backend("the device returned an empty scalar".into()))
}

impl GradientEngine for BurnEngine {
    fn scorer(&self, weights: &Weights) -> Option<Box<dyn BatchScorer>> {
        Some(Box::new(BurnModel::with_link(weights, self.link.clone())))
    }

    fn start_run(&mut self) {
        self.loaded = None;
        self.moments = None;
        self.accumulated = None;
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
        // Once the device owns the optimizer state its weights are the current ones; until
        // then the host's are, and a new version is uploaded.
        let host_owns = self.moments.is_none();
        if host_owns && self.loaded.as_ref().is_none_or(|(v, _)| *v != version) {
            if self.accumulated.take().is_some() {
                return Err(TrainError::Settings(
                    "the weights changed while gradients of the previous ones were held on the \
                     device (flush_gradients was not called before the optimizer step)"
                        .into(),
                ));
            }
            self.load(weights, version);
        }
        let (_, model) = self.loaded.as_ref().expect("just loaded");
        // A backend panics when the device runs out of memory; that becomes an error saying
        // what was asked for. The engine is not used again after an error.
        let attempt = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            model.loss_and_device_grads(batch, noise, &options)
        }));
        let (output, device_grads) = match attempt {
            Ok(result) => result?,
            Err(panic) => {
                return Err(TrainError::Score(device_failure(
                    &panic_message(panic.as_ref()),
                    &model.config,
                    batch,
                )));
            }
        };
        self.accumulate(device_grads);
        // The micro-batch's activations are still reserved: this is the step's high-water mark.
        if let Some(usage) = self.device.memory_pool_usage() {
            self.peak_bytes_reserved = self.peak_bytes_reserved.max(usage.bytes_reserved);
        }
        Ok(output)
    }

    fn flush_gradients(&mut self, grads: &mut Weights) -> Result<(), TrainError> {
        if let Some(sum) = self.accumulated.take() {
            add_to_host(&self.link, sum, grads)?;
        }
        Ok(())
    }

    fn optimizer_step(
        &mut self,
        config: &OptimConfig,
        weights: &mut Weights,
        adam: &mut AdamState,
        _grads: &mut Weights,
    ) -> Result<StepStats, TrainError> {
        let grads: Vec<Tensor<1>> = self
            .accumulated
            .take()
            .ok_or_else(|| TrainError::Settings("an optimizer step without gradients".into()))?
            .into_iter()
            .map(ParamTensor::flat)
            .collect();
        if self.loaded.is_none() {
            // Gradients added from elsewhere, with no micro-batch run here: the host's weights
            // are the current ones.
            self.load(weights, u64::MAX);
        }
        let params = self.parameters()?;
        // The moments go up from the host the first time (a fresh run or a resumed one).
        let moments = match self.moments.take() {
            Some(m) => m,
            None => adam
                .m
                .tensors()
                .into_iter()
                .zip(adam.v.tensors())
                .map(|((_, m), (_, v))| {
                    (
                        self.link.floats(m, [m.len()]),
                        self.link.floats(v, [v.len()]),
                    )
                })
                .collect(),
        };
        // Global norm over every gradient, then the clip as a device-side factor (no host
        // round trip before the update).
        let squares = grads
            .iter()
            .map(|g| (g.clone() * g.clone()).sum())
            .reduce(|a, b| a + b)
            .expect("a model has parameters");
        let norm = squares.sqrt();
        let clip = config
            .grad_clip
            .map(|max| norm.clone().recip().mul_scalar(max).clamp_max(1.0));
        let lr = config.lr_at(adam.step);
        adam.step += 1;
        let t = adam.step as i32;
        let (b1, b2, eps, wd) = (config.beta1, config.beta2, config.eps, config.weight_decay);
        let bias1 = 1.0 - b1.powi(t);
        let bias2 = 1.0 - b2.powi(t);
        let mut new_moments = Vec::with_capacity(moments.len());
        let mut new_params = Vec::with_capacity(params.len());
        let mut total: Option<Tensor<1>> = None;
        for ((param, g), (m, v)) in params.iter().zip(grads).zip(moments) {
            let g = match &clip {
                Some(factor) => g * factor.clone(),
                None => g,
            };
            let m = m.mul_scalar(b1) + g.clone().mul_scalar(1.0 - b1);
            let v = v.mul_scalar(b2) + (g.clone() * g).mul_scalar(1.0 - b2);
            let update =
                m.clone().div_scalar(bias1) / (v.clone().div_scalar(bias2).sqrt().add_scalar(eps));
            let w = param.clone().flat();
            let w = w.clone() - (update + w.mul_scalar(wd)).mul_scalar(lr);
            let sum = w.clone().sum();
            total = Some(match total {
                Some(t) => t + sum,
                None => sum,
            });
            new_params.push(param.shaped_like(w));
            new_moments.push((m, v));
        }
        let mut fresh = new_params.into_iter();
        let (version, model) = self.loaded.as_mut().expect("parameters() checked");
        model.map_parameters(|_| fresh.next().expect("one value per parameter").leaf());
        // The host's weights are stale from here; this version is never uploaded again.
        *version = u64::MAX;
        self.moments = Some(new_moments);
        self.finite_sum = total;
        let grad_norm = scalar(&self.link, norm)?;
        Ok(StepStats { lr, grad_norm })
    }

    fn first_nonfinite_parameter(
        &mut self,
        weights: &Weights,
    ) -> Result<Option<String>, TrainError> {
        // One scalar per step: the sum of every weight is finite unless some weight is not
        // (or they are too large to sum, which is divergence too). Only then are they read.
        if let Some(sum) = self.finite_sum.take()
            && scalar(&self.link, sum)?.is_finite()
        {
            return Ok(None);
        }
        let mut host = weights.clone();
        let mut adam = AdamState::new(weights);
        self.sync_to_host(&mut host, &mut adam)?;
        Ok(first_nonfinite(&host).or_else(|| Some("(the sum of all weights)".into())))
    }

    fn sync_to_host(
        &mut self,
        weights: &mut Weights,
        adam: &mut AdamState,
    ) -> Result<(), TrainError> {
        let Some(moments) = &self.moments else {
            return Ok(()); // the host owns the state
        };
        let params = self.parameters()?;
        let dests = weights.tensors_mut().into_iter();
        for (param, (_, dest)) in params.into_iter().zip(dests) {
            to_host(&self.link, param.flat(), dest)?;
        }
        let dests = adam.m.tensors_mut().into_iter().zip(adam.v.tensors_mut());
        for ((m, v), ((_, dm), (_, dv))) in moments.iter().zip(dests) {
            to_host(&self.link, m.clone(), dm)?;
            to_host(&self.link, v.clone(), dv)?;
        }
        Ok(())
    }

    fn transfers(&self) -> Option<TransferStats> {
        let traffic = self.link.traffic();
        let (upload_seconds, read_seconds) = self.link.seconds();
        Some(TransferStats {
            host_to_device_bytes: traffic.host_to_device,
            device_to_host_bytes: traffic.device_to_host,
            upload_seconds,
            read_seconds,
        })
    }

    fn device_memory(&self) -> Option<DeviceMemory> {
        let usage = self.device.memory_pool_usage()?;
        Some(DeviceMemory {
            bytes_in_use: usage.bytes_in_use,
            peak_bytes_reserved: self.peak_bytes_reserved.max(usage.bytes_reserved),
        })
    }
}
