//! One module per subcommand, plus what they share: reading inputs and choosing a device.

pub mod bench;
pub mod crypto;
pub mod net;
pub mod score;
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

/// Writes a secret (a key, a token) atomically into a file only its owner can read: created with
/// mode 0600 under a temporary name, synced, then renamed over `path`.
pub fn write_private_file(path: &Path, contents: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = somatrain_model::io::temp_path_for(path);
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    file.write_all(contents)?;
    file.sync_all()?;
    somatrain_model::io::finish_atomic(&tmp, path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
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
