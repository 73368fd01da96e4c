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
    /// `grad_scale`). `noise` is the
    /// `[D, SLICES]` projection matrix of this step.
    pub fn loss_and_grad(
        &self,
        batch: &Batch,
        noise: &[f32],
        options: &TrainOptions,
        grads: &mut Weights,
    ) -> Result<BatchOutput, ScoreError> {
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
        let mut missing = None;
        let mut outputs: Vec<Result<Vec<f32>, ScoreError>> = Vec::new();
        self.visit_parameters(|p| {
            let data = match p {
                Parameter::One(t) => t.grad(&gradients).map(|g| g.into_data()),
                Parameter::Two(t) => t.grad(&gradients).map(|g| g.into_data()),
            };
            outputs.push(data.map_or(Ok(Vec::new()), |d| d.try_to_vec().map_err(backend)));
        });
        for ((name, dest), grad) in grads.tensors_mut().into_iter().zip(outputs) {
            let grad = grad?;
            if grad.is_empty() {
                missing = Some(name);
                continue;
            }
            for (d, g) in dest.iter_mut().zip(&grad) {
                *d += g;
            }
        }
        if let Some(name) = missing {
            return Err(ScoreError::Backend(format!("no gradient reached {name}")));
        }
        Ok(output)
    }
}

/// A [`GradientEngine`] on a burn device: weights are uploaded once per optimizer step and the
/// gradients come back per micro-batch.
pub struct BurnEngine {
    device: Device,
    bf16_matmuls: bool,
    loaded: Option<(u64, BurnModel)>,
    peak_bytes_reserved: u64,
}

impl BurnEngine {
    pub fn new(device: Device) -> Self {
        BurnEngine {
            device,
            bf16_matmuls: false,
            loaded: None,
            peak_bytes_reserved: 0,
        }
    }

    /// Mixed precision: bf16 matrix products, f32 master weights, gradients and optimizer.
    pub fn with_bf16_matmuls(mut self, on: bool) -> Self {
        self.bf16_matmuls = on;
        self
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
        grads: &mut Weights,
    ) -> Result<BatchOutput, TrainError> {
        if self.loaded.as_ref().is_none_or(|(v, _)| *v != version) {
            let model = BurnModel::trainable(weights, self.device.clone())
                .with_bf16_matmuls(self.bf16_matmuls);
            self.loaded = Some((version, model));
        }
        let (_, model) = self.loaded.as_ref().expect("just loaded");
        let output = model.loss_and_grad(batch, noise, &options, grads)?;
        // The micro-batch's activations are still reserved: this is the step's high-water mark.
        if let Some(usage) = self.device.memory_pool_usage() {
            self.peak_bytes_reserved = self.peak_bytes_reserved.max(usage.bytes_reserved);
        }
        Ok(output)
    }

    fn device_memory(&self) -> Option<DeviceMemory> {
        let usage = self.device.memory_pool_usage()?;
        Some(DeviceMemory {
            bytes_in_use: usage.bytes_in_use,
            peak_bytes_reserved: self.peak_bytes_reserved.max(usage.bytes_reserved),
        })
    }
}
