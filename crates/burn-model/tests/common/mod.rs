//! The device the burn tests run on: burn's flex CPU backend, or the one named by
//! `SOMATRAIN_BURN_DEVICE` (`wgpu`, `cuda`, `cuda:N`; the build needs that feature), so the same
//! checks run against a GPU backend wherever one is; and the small model shape the tests share.

#![allow(dead_code)]

use burn::tensor::Device;
use somatrain_burn::{BurnDevice, open_device};
use somatrain_model::ModelConfig;

pub fn device() -> Device {
    let choice: BurnDevice = std::env::var("SOMATRAIN_BURN_DEVICE")
        .map(|name| {
            name.parse()
                .unwrap_or_else(|e| panic!("SOMATRAIN_BURN_DEVICE: {e}"))
        })
        .unwrap_or(BurnDevice::Flex);
    open_device(choice).unwrap_or_else(|e| panic!("{choice:?}: {e}"))
}

/// A model small enough for finite checks: width 16, 4 heads, FFN 32, `num_layers` layers.
pub fn small_model(num_layers: usize) -> ModelConfig {
    ModelConfig {
        embedding_dim: 16,
        num_layers,
        num_heads: 4,
        pwff_hidden_dim: 32,
        vocab_size: 264,
    }
}
