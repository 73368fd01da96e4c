//! One module per subcommand, plus what they share: reading inputs and choosing a device.

pub mod account;
pub mod bench;
pub mod crypto;
pub mod localnet;
pub mod model;
pub mod net;
pub mod network;
pub mod plot;
pub mod publish;
pub mod score;
pub mod stake;
pub mod strategy;
pub mod submit;
pub mod submitter;
pub mod submitter_bench;
pub mod train;
pub mod wallet;

use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result};
use somatrain_model::Weights;
use somatrain_model::cpu::CpuModel;
use somatrain_model::score::BatchScorer;

/// Where the model runs: `cpu` (the hand-written kernels, the default and the test oracle),
/// or through libtorch (a build with `--features torch`): `cuda`, `cuda:N`, or `torch-cpu`
/// (libtorch's CPU device: the GPU path's code where there is no GPU).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    TorchCpu,
    Cuda(usize),
}

impl std::str::FromStr for Device {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "torch-cpu" => Ok(Device::TorchCpu),
            "cuda" => Ok(Device::Cuda(0)),
            other => match other.strip_prefix("cuda:").map(str::parse) {
                Some(Ok(index)) => Ok(Device::Cuda(index)),
                _ => Err(format!(
                    "'{other}' is not a device: cpu, torch-cpu, cuda or cuda:N"
                )),
            },
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::TorchCpu => write!(f, "torch-cpu"),
            Device::Cuda(index) => write!(f, "cuda:{index}"),
        }
    }
}

/// A scorer for `weights` on `device`.
pub fn scorer_for(device: Device, weights: Weights) -> Result<Box<dyn BatchScorer>> {
    match device {
        Device::Cpu => Ok(Box::new(CpuModel::new(weights))),
        other => Ok(torch_path::scorer(other, weights)?),
    }
}

/// The matrix-multiply peak a bench on `device` is measured against: this CPU's f32 `gemm`
/// rate, or the device's own through libtorch (bf16 when `bf16`).
pub fn matmul_peak_for(device: Device, bf16: bool) -> Result<f64> {
    let (peak, what) = match device {
        Device::Cpu => (
            bench::matmul_peak_gflops(),
            "f32 matmul peak (gemm, 1536^3)".to_string(),
        ),
        other => (
            torch_path::matmul_peak(other, bf16)?,
            format!(
                "{} matmul peak ({other}, libtorch square products)",
                if bf16 { "bf16" } else { "f32" }
            ),
        ),
    };
    eprintln!("{what}: {peak:.1} GFLOP/s");
    Ok(peak)
}

/// Whether `device` multiplies in bf16 (the hand-written CPU kernels do not).
pub fn device_supports_bf16(device: Device) -> Result<bool> {
    match device {
        Device::Cpu => Ok(false),
        other => torch_path::supports_bf16(other),
    }
}

/// `(free, total)` bytes of `device` as its driver counts them, where it is a CUDA device
/// (`None` for the CPU devices, whose memory is the host's: peak RSS).
pub fn device_memory_reading(device: Device) -> Option<Result<(u64, u64), String>> {
    match device {
        Device::Cpu | Device::TorchCpu => None,
        cuda => torch_path::memory_reading(cuda),
    }
}

/// How micro-batches have reached `device` in this process (`somatrain_torch::batch_uploads`);
/// `None` for the hand-written CPU path and in a build without libtorch.
pub fn batch_uploads(device: Device) -> Option<&'static str> {
    match device {
        Device::Cpu => None,
        libtorch => torch_path::batch_uploads(libtorch),
    }
}

/// Training gradients through libtorch's autograd on `device` (not `cpu`, which has its own
/// hand-written backward).
pub fn device_gradient_engine(
    device: Device,
    bf16: bool,
) -> Result<Box<dyn somatrain_train::GradientEngine>> {
    let engine = torch_path::engine(device, bf16, EngineVariant::default())?;
    if let Device::Cuda(_) = device
        && !bf16
    {
        static TOLD: std::sync::Once = std::sync::Once::new();
        TOLD.call_once(|| {
            tracing::warn!(
                "training in f32 on CUDA: a GPU's tensor cores multiply in bf16 many times \
                 faster (an H100: 989 against 67 TFLOP/s); --bf16 trains with f32 master \
                 weights, gradients and moments"
            )
        });
    }
    Ok(engine)
}

/// The ways of running a libtorch training step that `bench train` compares; the default is
/// what every other command runs.
#[derive(Debug, Clone, Copy)]
// Read only by the libtorch engine, which a build without the feature does not have.
#[cfg_attr(not(feature = "torch"), allow(dead_code))]
pub struct EngineVariant {
    /// AdamW through libtorch's fused kernel, else tensor by tensor.
    pub fused_optimizer: bool,
    /// Under bf16, bf16 copies of the weights made once per optimizer step, else casts inside
    /// every micro-batch (as autocast does).
    pub bf16_copies: bool,
}

impl Default for EngineVariant {
    fn default() -> Self {
        EngineVariant {
            fused_optimizer: true,
            bf16_copies: true,
        }
    }
}

/// [`device_gradient_engine`] in another [`EngineVariant`] (`bench train`, to compare).
pub fn device_gradient_engine_variant(
    device: Device,
    bf16: bool,
    variant: EngineVariant,
) -> Result<Box<dyn somatrain_train::GradientEngine>> {
    torch_path::engine(device, bf16, variant)
}

/// What makes scorers on `device` for the submitter's weights cache and the localnet's scoring
/// service; the device is opened now, so an unavailable one fails before any work.
pub fn device_scorers(device: Device) -> Result<somatrain_submit::ScorerFactory> {
    if device == Device::Cpu {
        return Ok(somatrain_submit::cpu_scorers());
    }
    // Fail now rather than at the first model.
    device_supports_bf16(device)?;
    Ok(std::sync::Arc::new(move |weights| {
        torch_path::scorer(device, weights)
            .map(|scorer| scorer as Box<dyn BatchScorer + Send>)
            .map_err(|e| format!("{e:#}"))
    }))
}

/// On the first SIGINT or SIGTERM, logs `first` and asks `stop`: a training run finishes the
/// step in progress, saves its checkpoint and ends (what a crash would lose, with checkpoints
/// minutes apart on CUDA); `run`'s loop also reveals a committed round first. A second signal
/// ends the process at once, as the first would have. The handlers are in place when this
/// returns.
pub fn stop_on_signals(stop: somatrain_train::StopRequest, first: &'static str) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the signal watcher")?;
    let (mut interrupt, mut terminate) = runtime
        .block_on(async {
            Ok::<_, std::io::Error>((
                signal(SignalKind::interrupt())?,
                signal(SignalKind::terminate())?,
            ))
        })
        .context("watching for SIGINT and SIGTERM")?;
    std::thread::spawn(move || {
        runtime.block_on(async move {
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
            tracing::warn!("{first}");
            stop.request();
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
            std::process::exit(130);
        })
    });
    Ok(())
}

/// What makes the training engine of each round on `device` (`run`, `localnet-cycle`).
pub fn device_engines(device: Device, bf16: bool) -> Result<somatrain_daemon::EngineFactory> {
    match device {
        Device::Cpu if bf16 => {
            anyhow::bail!(
                "--bf16 (mixed precision) needs a libtorch device (--device cuda or torch-cpu)"
            )
        }
        Device::Cpu => Ok(somatrain_daemon::EngineFactory::cpu()),
        device => {
            // Fail now, not at the first round, when the device is unavailable.
            drop(device_gradient_engine(device, bf16)?);
            Ok(somatrain_daemon::EngineFactory(std::sync::Arc::new(
                move || device_gradient_engine(device, bf16).map_err(|e| format!("{e:#}")),
            )))
        }
    }
}

/// The libtorch devices, behind the `torch` feature.
#[cfg(feature = "torch")]
mod torch_path {
    use anyhow::{Result, bail};
    use somatrain_model::Weights;
    use somatrain_model::score::BatchScorer;
    use somatrain_torch::{TorchDevice, TorchModel};

    use super::Device;

    fn open(device: Device) -> Result<tch_device::Device> {
        let which = match device {
            Device::TorchCpu => TorchDevice::Cpu,
            Device::Cuda(index) => TorchDevice::Cuda(index),
            Device::Cpu => bail!("the hand-written CPU path does not run on libtorch"),
        };
        let opened = somatrain_torch::open(which)?;
        tracing::info!("running on libtorch's {which:?} device");
        Ok(opened)
    }

    mod tch_device {
        pub type Device = somatrain_torch::LibtorchDevice;
    }

    pub fn scorer(device: Device, weights: Weights) -> Result<Box<dyn BatchScorer + Send>> {
        Ok(Box::new(TorchModel::new(&weights, open(device)?)))
    }

    pub fn matmul_peak(device: Device, bf16: bool) -> Result<f64> {
        Ok(somatrain_torch::matmul_peak_gflops(open(device)?, bf16))
    }

    pub fn supports_bf16(device: Device) -> Result<bool> {
        Ok(somatrain_torch::supports_bf16(open(device)?))
    }

    pub fn batch_uploads(device: Device) -> Option<&'static str> {
        match device {
            Device::TorchCpu => Some(somatrain_torch::batch_uploads(TorchDevice::Cpu)),
            Device::Cuda(index) => Some(somatrain_torch::batch_uploads(TorchDevice::Cuda(index))),
            Device::Cpu => None,
        }
    }

    pub fn memory_reading(device: Device) -> Option<Result<(u64, u64), String>> {
        let opened = match open(device) {
            Ok(opened) => opened,
            Err(e) => return Some(Err(format!("{e:#}"))),
        };
        somatrain_torch::memory_reading(opened).map(|reading| reading.map(|r| (r.free, r.total)))
    }

    pub fn engine(
        device: Device,
        bf16: bool,
        variant: super::EngineVariant,
    ) -> Result<Box<dyn somatrain_train::GradientEngine>> {
        let (fused, copies) = (variant.fused_optimizer, variant.bf16_copies);
        let engine = somatrain_torch::train::TorchEngine::new(open(device)?)
            .with_fused_optimizer(fused)
            .with_bf16_copies(copies);
        tracing::info!(
            "training with libtorch autograd (bf16 products: {bf16}, fused AdamW: {fused}{})",
            if bf16 {
                format!(
                    ", bf16 weights: {}",
                    if copies { "copies" } else { "casts" }
                )
            } else {
                String::new()
            }
        );
        Ok(Box::new(engine.with_bf16(bf16)?))
    }
}

#[cfg(not(feature = "torch"))]
mod torch_path {
    use anyhow::Result;
    use somatrain_model::Weights;
    use somatrain_model::score::BatchScorer;

    use super::Device;

    fn missing(device: Device) -> anyhow::Error {
        anyhow::anyhow!(
            "--device {device} runs through libtorch, and this somatrain was built without it; \
             rebuild with `eval \"$(scripts/setup-torch)\" && cargo build --release --features \
             torch` (README: Devices)"
        )
    }

    pub fn scorer(device: Device, _weights: Weights) -> Result<Box<dyn BatchScorer + Send>> {
        Err(missing(device))
    }

    pub fn matmul_peak(device: Device, _bf16: bool) -> Result<f64> {
        Err(missing(device))
    }

    pub fn memory_reading(device: Device) -> Option<Result<(u64, u64), String>> {
        Some(Err(missing(device).to_string()))
    }

    pub fn supports_bf16(device: Device) -> Result<bool> {
        Err(missing(device))
    }

    pub fn batch_uploads(_device: Device) -> Option<&'static str> {
        None
    }

    pub fn engine(
        device: Device,
        _bf16: bool,
        _variant: super::EngineVariant,
    ) -> Result<Box<dyn somatrain_train::GradientEngine>> {
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
