//! The device the burn tests run on: burn's flex CPU backend, or the one named by
//! `SOMATRAIN_BURN_DEVICE` (`wgpu`, `cuda`, `cuda:N`; the build needs that feature), so the same
//! checks run against a GPU backend wherever one is.

use burn::tensor::Device;
use somatrain_burn::{BurnDevice, open_device};

pub fn device() -> Device {
    let choice: BurnDevice = std::env::var("SOMATRAIN_BURN_DEVICE")
        .map(|name| {
            name.parse()
                .unwrap_or_else(|e| panic!("SOMATRAIN_BURN_DEVICE: {e}"))
        })
        .unwrap_or(BurnDevice::Flex);
    open_device(choice).unwrap_or_else(|e| panic!("{choice:?}: {e}"))
}
