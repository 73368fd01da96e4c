//! One module per subcommand, plus what they share: reading inputs and choosing a device.

pub mod bench;
pub mod score;

use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result, bail};
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
    bail!(
        "this somatrain was built without CUDA support; rebuild with `cargo build --release --features cuda`"
    )
}

#[cfg(feature = "cuda")]
fn cuda_scorer(_weights: Weights) -> Result<Box<dyn BatchScorer>> {
    bail!("the CUDA scorer is not available in this build yet")
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
