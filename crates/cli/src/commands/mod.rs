//! One module per subcommand, plus what they share: reading inputs and choosing a device.

pub mod bench;
pub mod crypto;
pub mod localnet;
pub mod model;
pub mod net;
pub mod network;
pub mod plot;
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

/// Where the model runs. CUDA needs a build with `--features cuda` and a driver; wgpu (burn's
/// WebGPU backend: Vulkan, Metal, or a software Vulkan driver) a build with `--features wgpu`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Device {
    Cpu,
    Cuda,
    Wgpu,
}

/// A scorer for `weights` on `device`.
pub fn scorer_for(device: Device, weights: Weights) -> Result<Box<dyn BatchScorer>> {
    match device {
        Device::Cpu => Ok(Box::new(CpuModel::new(weights))),
        other => burn_path::scorer(other, weights),
    }
}

/// The matrix-multiply peak a bench on `device` is measured against: this CPU's f32 `gemm`
/// rate, or the device's own (bf16 when `bf16`).
pub fn matmul_peak_for(device: Device, bf16: bool) -> Result<f64> {
    let (peak, what) = match device {
        Device::Cpu => (
            bench::matmul_peak_gflops(),
            "f32 matmul peak (gemm, 1536^3)".to_string(),
        ),
        other => (
            burn_path::matmul_peak(other, bf16)?,
            format!(
                "{} matmul peak ({other:?}, square products)",
                if bf16 { "bf16" } else { "f32" }
            ),
        ),
    };
    eprintln!("{what}: {peak:.1} GFLOP/s");
    Ok(peak)
}

/// Whether `device` multiplies in bf16.
pub fn device_supports_bf16(device: Device) -> Result<bool> {
    match device {
        Device::Cpu => Ok(false),
        other => burn_path::supports_bf16(other),
    }
}

/// Training gradients through burn's autodiff on `device` (not the CPU, which has its own
/// hand-written backward).
pub fn device_gradient_engine(
    device: Device,
    bf16: bool,
) -> Result<Box<dyn somatrain_train::GradientEngine>> {
    burn_path::engine(device, bf16)
}

/// The devices burn runs: CUDA and wgpu, each behind its feature.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
mod burn_path {
    use anyhow::{Result, bail};
    use somatrain_burn::{BurnDevice, BurnModel, open_device};
    use somatrain_model::Weights;
    use somatrain_model::score::BatchScorer;

    use super::Device;

    fn open(device: Device) -> Result<somatrain_burn::Device> {
        let which = match device {
            Device::Cuda => BurnDevice::Cuda(0),
            Device::Wgpu => BurnDevice::Wgpu,
            Device::Cpu => bail!("the CPU path does not run on burn"),
        };
        let opened = open_device(which)?;
        tracing::info!("running on {which:?}");
        Ok(opened)
    }

    pub fn scorer(device: Device, weights: Weights) -> Result<Box<dyn BatchScorer>> {
        Ok(Box::new(BurnModel::new(&weights, open(device)?)))
    }

    /// The device's matrix-multiply rate (GFLOP/s), bf16 or f32 operands.
    pub fn matmul_peak(device: Device, bf16: bool) -> Result<f64> {
        Ok(somatrain_burn::matmul_peak_gflops(&open(device)?, bf16)?)
    }

    pub fn supports_bf16(device: Device) -> Result<bool> {
        Ok(somatrain_burn::supports_bf16(&open(device)?))
    }

    pub fn engine(device: Device, bf16: bool) -> Result<Box<dyn somatrain_train::GradientEngine>> {
        let engine = somatrain_burn::train::BurnEngine::new(open(device)?);
        tracing::info!("training with burn autodiff (bf16 products: {bf16})");
        Ok(Box::new(engine.with_bf16_matmuls(bf16)?))
    }
}

#[cfg(not(any(feature = "cuda", feature = "wgpu")))]
mod burn_path {
    use anyhow::Result;
    use somatrain_model::Weights;
    use somatrain_model::score::BatchScorer;

    use super::Device;

    fn missing(device: Device) -> anyhow::Error {
        let (name, feature) = match device {
            Device::Wgpu => ("wgpu", "wgpu"),
            _ => ("CUDA", "cuda"),
        };
        anyhow::anyhow!(
            "this somatrain was built without {name} support; rebuild with `cargo build --release --features {feature}`"
        )
    }

    pub fn scorer(device: Device, _weights: Weights) -> Result<Box<dyn BatchScorer>> {
        Err(missing(device))
    }

    pub fn matmul_peak(device: Device, _bf16: bool) -> Result<f64> {
        Err(missing(device))
    }

    pub fn supports_bf16(device: Device) -> Result<bool> {
        Err(missing(device))
    }

    pub fn engine(device: Device, _bf16: bool) -> Result<Box<dyn somatrain_train::GradientEngine>> {
        Err(missing(device))
    }
}

/// Writes a secret (a key, a token) atomically into a file only its owner can read (0600).
pub fn write_private_file(path: &Path, contents: &[u8]) -> Result<()> {
    somatrain_daemon::write_private_file(path, contents)
        .with_context(|| format!("writing {}", path.display()))
}

/// The most data `score`, `eval` and `embed` read (1 GiB): enough for any evaluation, and a
/// clear error instead of an unbounded read from something like `/dev/zero`.
pub const MAX_DATA_BYTES: u64 = 1 << 30;

/// The most a small text input may hold (a key file, a keystore): 64 KiB.
pub const MAX_KEY_FILE_BYTES: u64 = 64 << 10;

/// The most an embedding's JSON may hold (64 MiB; V1's 2,048 values take about 50 KB).
pub const MAX_EMBEDDING_JSON_BYTES: u64 = 64 << 20;

/// The most an encrypted weights file read whole may hold (16 GiB: V1 is 4.8 GB in f32).
pub const MAX_WEIGHTS_FILE_BYTES: u64 = 16 << 30;

/// Opens `path` for a streamed read, refusing what is not a regular file: a directory, or a
/// device or pipe such as `/dev/zero` that may never end.
pub fn open_regular_file(path: &Path) -> Result<std::fs::File> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let meta = file
        .metadata()
        .with_context(|| format!("reading {}", path.display()))?;
    if meta.is_dir() {
        anyhow::bail!("{} is a directory; give a file", path.display());
    }
    if !meta.is_file() {
        anyhow::bail!(
            "{} is not a regular file (a device, pipe or socket, which may never end); give a file",
            path.display()
        );
    }
    Ok(file)
}

/// Reads a whole text file of at most `max_bytes` (see [`read_input`]).
pub fn read_text(path: &Path, max_bytes: u64) -> Result<String> {
    let bytes = read_input(path, max_bytes)?;
    String::from_utf8(bytes).with_context(|| format!("{} is not UTF-8 text", path.display()))
}

/// Reads a whole input file, or standard input for `-`, refusing more than `max_bytes`.
pub fn read_input(path: &Path, max_bytes: u64) -> Result<Vec<u8>> {
    let name = if path == Path::new("-") {
        "standard input".to_string()
    } else {
        path.display().to_string()
    };
    if path != Path::new("-") {
        // `stat` opens nothing, so a FIFO without a writer cannot make this wait.
        let meta = std::fs::metadata(path).with_context(|| format!("reading {name}"))?;
        if meta.is_dir() {
            anyhow::bail!("{name} is a directory, not a data file");
        }
        if !meta.is_file() {
            anyhow::bail!(
                "{name} is not a regular file (a FIFO, device or socket, which may block or never \
                 end); give a file, or - for standard input"
            );
        }
        // A regular file says its size: refuse it before reading any of it.
        if meta.len() > max_bytes {
            anyhow::bail!(
                "{name} holds {} bytes, more than {max_bytes}, the most this command reads",
                meta.len()
            );
        }
    }
    let reader: Box<dyn Read> = if path == Path::new("-") {
        Box::new(std::io::stdin())
    } else {
        Box::new(std::fs::File::open(path).with_context(|| format!("reading {name}"))?)
    };
    let mut data = Vec::new();
    reader
        .take(max_bytes.saturating_add(1))
        .read_to_end(&mut data)
        .with_context(|| format!("reading {name}"))?;
    if data.len() as u64 > max_bytes {
        anyhow::bail!("{name} holds more than {max_bytes} bytes, the most this command reads");
    }
    Ok(data)
}
