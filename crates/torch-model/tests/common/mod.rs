//! The device the libtorch tests run on: libtorch's CPU device, or the one named by
//! `SOMATRAIN_TORCH_DEVICE` (`cuda`, `cuda:N`), so the same checks run on a GPU wherever one
//! is; and the small model shape the tests share.

#![allow(dead_code)]

use somatrain_model::ModelConfig;
use somatrain_torch::{LibtorchDevice, TorchDevice, open};

pub fn device() -> LibtorchDevice {
    let choice: TorchDevice = std::env::var("SOMATRAIN_TORCH_DEVICE")
        .map(|name| {
            name.parse()
                .unwrap_or_else(|e| panic!("SOMATRAIN_TORCH_DEVICE: {e}"))
        })
        .unwrap_or(TorchDevice::Cpu);
    open(choice).unwrap_or_else(|e| panic!("{choice:?}: {e}"))
}

/// A model small enough for exact checks: width 16, 4 heads, FFN 32, `num_layers` layers.
pub fn small_model(num_layers: usize) -> ModelConfig {
    ModelConfig {
        embedding_dim: 16,
        num_layers,
        num_heads: 4,
        pwff_hidden_dim: 32,
        vocab_size: 264,
    }
}
