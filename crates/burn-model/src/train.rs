//! The training loss on a burn device and its gradients by burn's autodiff: the GPU path of
//! training. The loss is the network's, computed entirely on the device (PAD-inclusive
//! cross-entropy plus SIGReg over the same random unit projections as the CPU path), so only
//! the scalar loss and the gradients come back to the host. Dropout uses the CPU path's masks,
//! drawn on the host in parallel and uploaded as booleans (exact and resumable; still costly at
//! V1 size: about 1 G mask elements per micro-batch).

use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};
use somatrain_data::{Batch, PAD};
use somatrain_model::Weights;
use somatrain_model::config::SIGREG_SLICES;
use somatrain_model::cpu::train::TrainOptions;
use somatrain_model::loss::SigRegGrid;
use somatrain_model::score::{BatchOutput, BatchScorer, ScoreError};
use somatrain_train::trainer::DeviceMemory;
use somatrain_train::{GradientEngine, TrainError};

use crate::{BurnModel, Parameter, t2};

fn backend(e: impl std::fmt::Debug) -> ScoreError {
    ScoreError::Backend(format!("{e:?}"))
}

impl BurnModel {
    /// A model whose every parameter tracks gradients, on `device` with autodiff enabled.
    pub fn trainable(weights: &Weights, device: Device) -> Self {
        let mut model = BurnModel::new(weights, device.autodiff());
        model.map_parameters(|t| t.require_grad(), |t| t.require_grad());
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
        add_to_host(device_grads, grads)?;
        Ok(output)
    }

    /// [`loss_and_grad`](Self::loss_and_grad) with the gradients left on the device, one per
    /// parameter in the order of [`Weights::tensors`].
    fn loss_and_device_grads(
        &self,
        batch: &Batch,
        noise: &[f32],
        options: &TrainOptions,
    ) -> Result<(BatchOutput, Vec<DeviceGrad>), ScoreError> {
        let (sigreg_coefficient, grad_scale) = (options.sigreg_coefficient, options.grad_scale);
        let (b, t) = (batch.batch, batch.seq_len);
        let (d, v) = (self.config.embedding_dim, self.config.vocab_size);
        let device = &self.device;
        let (reps, logits) =
            self.forward_with_dropout(&batch.tokens, &batch.positions, b, t, Some(options));
        // Cross-entropy: PAD targets count in the mean's denominator but add nothing.
        let rows = b * t;
        let targets: Vec<i64> = batch
            .targets
            .iter()
            .map(|&x| if x == PAD { 0 } else { x as i64 })
            .collect();
        let keep: Vec<f32> = batch
            .targets
            .iter()
            .map(|&x| f32::from(u8::from(x != PAD)))
            .collect();
        let targets = Tensor::<2, Int>::from_data(TensorData::new(targets, [rows, 1]), device);
        let keep = Tensor::<2>::from_data(TensorData::new(keep, [rows, 1]), device);
        let log_probs = log_softmax(logits.reshape([rows, v]), 1).gather(1, targets);
        let ce = (log_probs * keep).sum().neg().div_scalar(rows as f32);
        // SIGReg: per token, the squared distance of the slices' empirical characteristic
        // function to the standard normal's, on the trapezoid grid; averaged over tokens.
        let grid = SigRegGrid::new();
        let points = grid.t.len() - 1; // t = 0 contributes nothing
        let proj = reps
            .reshape([rows, d])
            .matmul(t2(noise, d, SIGREG_SLICES, device));
        let ts = Tensor::<1>::from_data(TensorData::new(grid.t[1..].to_vec(), [points]), device);
        let phi = Tensor::<1>::from_data(TensorData::new(grid.phi[1..].to_vec(), [points]), device);
        let weight =
            Tensor::<1>::from_data(TensorData::new(grid.weight[1..].to_vec(), [points]), device);
        let angles = proj.reshape([rows, SIGREG_SLICES, 1]) * ts.reshape([1, 1, points]);
        let mean_c = angles.clone().cos().mean_dim(1).reshape([rows, points]);
        let mean_s = angles.sin().mean_dim(1).reshape([rows, points]);
        let gap = mean_c - phi.reshape([1, points]);
        let stat = (gap.clone() * gap + mean_s.clone() * mean_s) * weight.reshape([1, points]);
        let sigreg = stat.sum().mul_scalar(SIGREG_SLICES as f32 / rows as f32);
        let loss = ce.clone() + sigreg.clone().mul_scalar(sigreg_coefficient);
        let scalar = |t: Tensor<1>| -> Result<f32, ScoreError> {
            let v: Vec<f32> = t.into_data().try_to_vec().map_err(backend)?;
            Ok(v[0])
        };
        let output = BatchOutput {
            loss: scalar(loss.clone())?,
            cross_entropy: scalar(ce.detach())?,
            sigreg: scalar(sigreg.detach())?,
            embedding: Vec::new(),
        };
        let gradients = loss.mul_scalar(grad_scale).backward();
        let mut found = Vec::new();
        let mut missing = None;
        self.visit_parameters(|p| {
            let grad = match p {
                Parameter::One(t) => t.grad(&gradients).map(DeviceGrad::One),
                Parameter::Two(t) => t.grad(&gradients).map(DeviceGrad::Two),
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

/// One parameter's gradient, still on the device.
enum DeviceGrad {
    One(Tensor<1>),
    Two(Tensor<2>),
}

impl DeviceGrad {
    fn add(self, other: DeviceGrad) -> DeviceGrad {
        match (self, other) {
            (DeviceGrad::One(a), DeviceGrad::One(b)) => DeviceGrad::One(a + b),
            (DeviceGrad::Two(a), DeviceGrad::Two(b)) => DeviceGrad::Two(a + b),
            _ => unreachable!("gradients are summed parameter by parameter"),
        }
    }
}

/// Downloads device gradients (in [`Weights::tensors`] order) and adds them into `grads`.
fn add_to_host(device_grads: Vec<DeviceGrad>, grads: &mut Weights) -> Result<(), ScoreError> {
    for ((_, dest), grad) in grads.tensors_mut().into_iter().zip(device_grads) {
        let data = match grad {
            DeviceGrad::One(t) => t.into_data(),
            DeviceGrad::Two(t) => t.into_data(),
        };
        let values: Vec<f32> = data.try_to_vec().map_err(backend)?;
        for (d, g) in dest.iter_mut().zip(&values) {
            *d += g;
        }
    }
    Ok(())
}

/// A [`GradientEngine`] on a burn device: weights go up once per optimizer step, the
/// micro-batches' gradients are summed on the device, and the sum comes back once per step
/// (for V1, 4.8 GB each way per step, instead of 4.8 GB down per micro-batch).
pub struct BurnEngine {
    device: Device,
    bf16_matmuls: bool,
    loaded: Option<(u64, BurnModel)>,
    accumulated: Option<Vec<DeviceGrad>>,
    peak_bytes_reserved: u64,
}

impl BurnEngine {
    pub fn new(device: Device) -> Self {
        BurnEngine {
            device,
            bf16_matmuls: false,
            loaded: None,
            accumulated: None,
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
}

impl GradientEngine for BurnEngine {
    fn scorer(&self, weights: &Weights) -> Option<Box<dyn BatchScorer>> {
        Some(Box::new(BurnModel::new(weights, self.device.clone())))
    }

    fn loss_and_grad(
        &mut self,
        weights: &Weights,
        version: u64,
        batch: &Batch,
        noise: &[f32],
        options: TrainOptions,
        // The gradients stay on the device; `flush_gradients` hands their sum over.
        _grads: &mut Weights,
    ) -> Result<BatchOutput, TrainError> {
        if self.loaded.as_ref().is_none_or(|(v, _)| *v != version) {
            if self.accumulated.take().is_some() {
                return Err(TrainError::Settings(
                    "the weights changed while gradients of the previous ones were held on the \
                     device (flush_gradients was not called before the optimizer step)"
                        .into(),
                ));
            }
            let model = BurnModel::trainable(weights, self.device.clone())
                .with_bf16_matmuls(self.bf16_matmuls);
            self.loaded = Some((version, model));
        }
        let (_, model) = self.loaded.as_ref().expect("just loaded");
        let (output, device_grads) = model.loss_and_device_grads(batch, noise, &options)?;
        self.accumulated = Some(match self.accumulated.take() {
            None => device_grads,
            Some(sum) => sum
                .into_iter()
                .zip(device_grads)
                .map(|(a, b)| a.add(b))
                .collect(),
        });
        // The micro-batch's activations are still reserved: this is the step's high-water mark.
        if let Some(usage) = self.device.memory_pool_usage() {
            self.peak_bytes_reserved = self.peak_bytes_reserved.max(usage.bytes_reserved);
        }
        Ok(output)
    }

    fn flush_gradients(&mut self, grads: &mut Weights) -> Result<(), TrainError> {
        if let Some(sum) = self.accumulated.take() {
            add_to_host(sum, grads)?;
        }
        Ok(())
    }

    fn device_memory(&self) -> Option<DeviceMemory> {
        let usage = self.device.memory_pool_usage()?;
        Some(DeviceMemory {
            bytes_in_use: usage.bytes_in_use,
            peak_bytes_reserved: self.peak_bytes_reserved.max(usage.bytes_reserved),
        })
    }
}
