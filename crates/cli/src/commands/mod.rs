//! One module per subcommand, plus what they share: reading inputs and choosing a device.

pub mod bench;
pub mod crypto;
pub mod model;
pub mod net;
pub mod publish;
pub mod score;
pub mod submit;
pub mod train;
pub mod wallet;

use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result};
use somatrain_model::Weights;
use somatrain_model::cpu::CpuModel;
use somatrain_model::score::BatchScorer;

/// Where the model runs. CUDA needs a build with `--features cuda` and a driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Device {
    Cpu,
    Cuda,
}

/// A scorer for `weights` on `device`.
pub fn scorer_for(device: Device, weights: Weights) -> Result<Box<dyn BatchScorer>> {
    match device {
        Device::Cpu => Ok(Box::new(CpuModel::new(weights))),
        Device::Cuda => cuda_scorer(weights),
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda_scorer(_weights: Weights) -> Result<Box<dyn BatchScorer>> {
    anyhow::bail!(
        "this somatrain was built without CUDA support; rebuild with `cargo build --release --features cuda`"
    )
}

#[cfg(feature = "cuda")]
fn cuda_scorer(weights: Weights) -> Result<Box<dyn BatchScorer>> {
    use somatrain_burn::{BurnDevice, BurnModel, open_device};
    let device = open_device(BurnDevice::Cuda(0))?;
    tracing::info!("running on CUDA device 0");
    Ok(Box::new(BurnModel::new(&weights, device)))
}

/// Training gradients on CUDA device 0 through burn's autodiff.
#[cfg(not(feature = "cuda"))]
pub fn cuda_gradient_engine(_bf16: bool) -> Result<Box<dyn somatrain_train::GradientEngine>> {
    anyhow::bail!(
        "this somatrain was built without CUDA support; rebuild with `cargo build --release --features cuda`"
    )
}

#[cfg(feature = "cuda")]
pub fn cuda_gradient_engine(bf16: bool) -> Result<Box<dyn somatrain_train::GradientEngine>> {
    use somatrain_burn::{BurnDevice, open_device};
    let device = open_device(BurnDevice::Cuda(0))?;
    tracing::info!("training on CUDA device 0 (burn autodiff, bf16 products: {bf16})");
    Ok(Box::new(
        somatrain_burn::train::BurnEngine::new(device).with_bf16_matmuls(bf16)?,
    ))
}

/// Writes a secret (a key, a token) atomically into a file only its owner can read (0600).
pub fn write_private_file(path: &Path, contents: &[u8]) -> Result<()> {
    somatrain_daemon::write_private_file(path, contents)
        .with_context(|| format!("writing {}", path.display()))
}

/// Reads a whole input file, or standard input for `-`.
pub fn read_input(path: &Path) -> Result<Vec<u8>> {
    if path == Path::new("-") {
        let mut data = Vec::new();
        std::io::stdin()
            .read_to_end(&mut data)
            .context("reading data from standard input")?;
        Ok(data)
    } else {
        std::fs::read(path).with_context(|| format!("reading {}", path.display()))
    }
}
