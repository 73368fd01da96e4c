//! The training loop: resume, step, log, checkpoint, and write the round's artifacts.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use somatrain_model::config::{SIGREG_COEFFICIENT, SIGREG_SLICES};
use somatrain_model::cpu::CpuModel;
use somatrain_model::cpu::kernels::Dropout;
use somatrain_model::cpu::train::{TrainOptions, TrainPass};
use somatrain_model::io::{LoadOptions, load_file, save_file};
use somatrain_model::score::{BatchScorer, ScoreOptions, score_data};
use somatrain_model::{ModelConfig, Weights};

use crate::checkpoint;
use crate::corpus::{
    CorpusConfig, CorpusStats, Position, Split, TrainStream, heldout_sample, sample,
};
use crate::optim::{AdamState, OptimConfig, StepStats};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Corpus(#[from] crate::corpus::CorpusError),
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::CheckpointError),
    #[error(transparent)]
    Weights(#[from] somatrain_model::io::WeightsError),
    #[error(transparent)]
    Score(#[from] somatrain_model::score::ScoreError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Settings(String),
    /// The run diverged: nothing of this step was saved; the last checkpoint is the last good
    /// state.
    #[error(
        "training diverged at step {step}: {what}; nothing of this step was saved (lower --lr, or resume from the last checkpoint)"
    )]
    Diverged { step: u64, what: String },
    /// A stop was asked for ([`StopRequest`]): the step in progress was finished and saved.
    #[error(
        "stopped after step {step} as asked, with its checkpoint saved; the same command resumes from there"
    )]
    Stopped { step: u64 },
    /// The device ran out of memory in a micro-batch; nothing of the step was saved.
    #[error("{}", out_of_memory_advice(self))]
    OutOfMemory(OutOfMemory),
}

/// What is known when a micro-batch did not fit on its device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutOfMemory {
    pub micro_batch: usize,
    pub seq_len: usize,
    /// The largest micro-batch whose forward and backward passes ran on the same device right
    /// after (with the optimizer's moments in place): `Some(0)` when not even one sequence fits,
    /// `None` when the engine could not try.
    pub largest_fitting: Option<usize>,
    /// The run's micro-batches per step, where the caller knows them.
    pub accumulation: Option<usize>,
    /// The device's own words.
    pub detail: String,
}

impl TrainError {
    /// The error with the run's accumulation filled in, so that its advice keeps the
    /// sequences per step.
    pub fn with_accumulation(self, accumulation: usize) -> Self {
        match self {
            TrainError::OutOfMemory(mut oom) => {
                oom.accumulation = Some(accumulation);
                TrainError::OutOfMemory(oom)
            }
            other => other,
        }
    }
}

/// The micro-batch and accumulation to suggest after `micro_batch x accumulation` ran out of
/// memory and micro-batches up to `fits` were seen to fit: the largest micro-batch no larger
/// than `fits` that divides the step's sequences, so the step keeps its size.
pub fn fitting_split(
    micro_batch: usize,
    accumulation: usize,
    fits: usize,
) -> Option<(usize, usize)> {
    let sequences = micro_batch * accumulation;
    (1..=fits.min(sequences))
        .rev()
        .find(|m| sequences.is_multiple_of(*m))
        .map(|m| (m, sequences / m))
}

fn out_of_memory_advice(error: &TrainError) -> String {
    let TrainError::OutOfMemory(oom) = error else {
        return String::new();
    };
    let detail = oom.detail.lines().next().unwrap_or_default();
    let head = format!(
        "the device ran out of memory in a micro-batch of {} x {} ({detail}); nothing of this \
         step was saved",
        oom.micro_batch, oom.seq_len
    );
    match (oom.largest_fitting, oom.accumulation) {
        (Some(0), _) => format!(
            "{head}. Not even one sequence fits beside the model and its optimizer state: \
             shorter sequences, or a device with more memory, are needed"
        ),
        (Some(fits), Some(accumulation)) => {
            let (micro, accumulation) = fitting_split(oom.micro_batch, accumulation, fits)
                .expect("a micro-batch of 1 divides every step");
            format!(
                "{head}. A micro-batch of {fits} was tried and fits: resume with \
                 --micro-batch {micro} --accumulation {accumulation} to keep {} sequences per step",
                micro * accumulation
            )
        }
        (Some(fits), None) => format!(
            "{head}. A micro-batch of {fits} was tried and fits: lower --micro-batch to it \
             (and raise --accumulation to keep the sequences per step)"
        ),
        (None, _) => format!(
            "{head}. Try a smaller --micro-batch (and a larger --accumulation to keep the \
             sequences per step)"
        ),
    }
}

/// The largest learning rate accepted; V1 trains around 1e-4.
pub const MAX_LR: f32 = 1.0;

/// Everything that decides what a run computes. Saved as `settings.json` in the run directory
/// on the first start; a resumed run must agree on all of it except the optimizer settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSettings {
    pub model: ModelConfig,
    pub corpus: CorpusConfig,
    pub optim: OptimConfig,
    /// Sequences per forward/backward pass.
    pub micro_batch: usize,
    /// Micro-batches per optimizer step.
    pub accumulation: usize,
    pub dropout: f32,
    pub sigreg_coefficient: f32,
    pub seed: u64,
    /// Save a checkpoint every this many optimizer steps (and always at the end of a run).
    pub checkpoint_every: u64,
    /// And no sooner than this many minutes after the last one (0: at every such step). A GPU
    /// writes V1's 14.5 GB of state slower than it takes a step.
    #[serde(default)]
    pub checkpoint_minutes: f64,
    pub keep_checkpoints: usize,
    pub log_every: u64,
    /// Start from these weights instead of a fresh initialisation.
    pub init_weights: Option<PathBuf>,
    /// Bytes of held-out data scored at the end of a run.
    pub heldout_bytes: usize,
    /// Data for the registry embedding; the held-out sample when empty.
    pub embedding_data: Vec<PathBuf>,
    /// When checkpoints exist and none verifies: set them aside and start from step 0 (without
    /// it, training stops and says what it found). Never stored.
    #[serde(skip)]
    pub restart_from_scratch: bool,
    /// Where a signal handler asks the run to stop after its current step. Never stored.
    #[serde(skip)]
    pub stop: StopRequest,
}

/// A request, from another thread (a signal handler), that a run stop after the step in
/// progress, once that step's checkpoint is saved; the run then ends with
/// [`TrainError::Stopped`]. Clones share the request. Equal to every other, so that it never
/// makes two settings differ.
#[derive(Clone, Default)]
pub struct StopRequest(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl StopRequest {
    pub fn request(&self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn requested(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl std::fmt::Debug for StopRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StopRequest({})", self.requested())
    }
}

impl PartialEq for StopRequest {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl TrainSettings {
    /// The reference trainer's recipe for `model` on `corpus`.
    pub fn reference(model: ModelConfig, corpus: CorpusConfig) -> Self {
        TrainSettings {
            model,
            corpus,
            optim: OptimConfig::default(),
            micro_batch: 2,
            accumulation: 64,
            dropout: 0.1,
            sigreg_coefficient: SIGREG_COEFFICIENT,
            seed: 0,
            checkpoint_every: 1,
            checkpoint_minutes: 0.0,
            keep_checkpoints: 3,
            log_every: 1,
            init_weights: None,
            heldout_bytes: 1 << 20,
            embedding_data: Vec::new(),
            restart_from_scratch: false,
            stop: StopRequest::default(),
        }
    }

    /// Refuses settings no sane run uses, before anything is written: a non-finite or
    /// out-of-range rate, dropout, SIGReg weight, beta, epsilon or clip, and zero lengths.
    pub fn validate(&self) -> Result<(), String> {
        let o = &self.optim;
        let check = |ok: bool, what: &str, value: f32, range: &str| {
            if ok {
                Ok(())
            } else {
                Err(format!(
                    "{what} {value} is out of range: it must be {range}"
                ))
            }
        };
        let finite = |v: f32| v.is_finite();
        check(
            finite(o.lr) && o.lr > 0.0 && o.lr <= MAX_LR,
            "--lr",
            o.lr,
            "in (0, 1]",
        )?;
        check(
            finite(self.dropout) && (0.0..1.0).contains(&self.dropout),
            "--dropout",
            self.dropout,
            "in [0, 1)",
        )?;
        check(
            finite(self.sigreg_coefficient) && self.sigreg_coefficient >= 0.0,
            "--sigreg-coefficient",
            self.sigreg_coefficient,
            "finite and >= 0",
        )?;
        for (name, beta) in [("beta1", o.beta1), ("beta2", o.beta2)] {
            check(
                finite(beta) && (0.0..1.0).contains(&beta),
                name,
                beta,
                "in [0, 1)",
            )?;
        }
        check(finite(o.eps) && o.eps > 0.0, "eps", o.eps, "finite and > 0")?;
        check(
            finite(o.weight_decay) && o.weight_decay >= 0.0,
            "--weight-decay",
            o.weight_decay,
            "finite and >= 0",
        )?;
        check(
            finite(o.min_lr_ratio) && (0.0..=1.0).contains(&o.min_lr_ratio),
            "--min-lr-ratio",
            o.min_lr_ratio,
            "in [0, 1]",
        )?;
        if let Some(clip) = o.grad_clip {
            check(
                finite(clip) && clip > 0.0,
                "--grad-clip",
                clip,
                "finite and > 0",
            )?;
        }
        if self.corpus.max_seq_len == 0 {
            return Err("--seq-len must be positive".into());
        }
        if self.micro_batch == 0 || self.accumulation == 0 {
            return Err("micro-batch and accumulation must be positive".into());
        }
        if self.heldout_bytes == 0 {
            // The round's score and embedding are computed on this many bytes.
            return Err("--heldout-bytes must be positive".into());
        }
        self.model.validate()
    }

    /// Whether a run with `self` can continue one started with `stored`.
    fn compatible_with(&self, stored: &TrainSettings) -> Result<(), String> {
        let mut a = self.clone();
        let b = stored;
        a.optim = b.optim;
        a.checkpoint_every = b.checkpoint_every;
        a.checkpoint_minutes = b.checkpoint_minutes;
        a.keep_checkpoints = b.keep_checkpoints;
        a.log_every = b.log_every;
        a.heldout_bytes = b.heldout_bytes;
        a.embedding_data = b.embedding_data.clone();
        a.init_weights = b.init_weights.clone();
        a.restart_from_scratch = b.restart_from_scratch;
        a.corpus.skip_dir = b.corpus.skip_dir.clone();
        // The step's sequences are fixed; how they are split into micro-batches may change
        // (after running out of device memory, or on another device).
        if a.micro_batch * a.accumulation == b.micro_batch * b.accumulation {
            a.micro_batch = b.micro_batch;
            a.accumulation = b.accumulation;
        }
        if &a != b {
            return Err(
                "the run directory was started with different settings (model, corpus, \
                 sequences per step (micro-batch x accumulation), dropout, SIGReg or seed); use \
                 a new --run-dir"
                    .into(),
            );
        }
        Ok(())
    }

    /// Whether `self` splits each step into micro-batches other than `stored` does.
    fn splits_steps_unlike(&self, stored: &TrainSettings) -> bool {
        (self.micro_batch, self.accumulation) != (stored.micro_batch, stored.accumulation)
    }
}

/// One logged optimizer step.
#[derive(Debug, Clone, Serialize)]
pub struct StepLog {
    pub step: u64,
    /// The step this invocation trains until.
    pub until_step: u64,
    pub loss: f32,
    pub cross_entropy: f32,
    pub bits_per_byte: f32,
    pub lr: f32,
    pub grad_norm: f32,
    pub tokens_per_s: f64,
    pub gflops_per_s: f64,
    /// High-water mark of resident memory so far.
    pub peak_rss_bytes: u64,
    /// The training device's memory, where the engine has one that reports it.
    pub device_memory: Option<DeviceMemory>,
}

/// A training device's memory, as its driver counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceMemory {
    /// Bytes in use on the device now, by every process on it.
    pub bytes_in_use: u64,
    /// The device's size.
    pub total_bytes: u64,
    /// The most bytes this run has added on the device since its engine loaded the model
    /// (libtorch's caching allocator keeps what it reserves: its peak reservation).
    pub peak_bytes_reserved: u64,
}

/// What an engine on a device has moved between host and device so far, and the time spent
/// doing it (reads include waiting for the device to finish what the value depends on).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct TransferStats {
    pub host_to_device_bytes: u64,
    pub device_to_host_bytes: u64,
    pub upload_seconds: f64,
    pub read_seconds: f64,
}

/// High-water mark of this process's resident memory, from the kernel (0 where unavailable).
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|kb| kb.parse::<u64>().ok())
            })
        })
        .map_or(0, |kb| kb * 1024)
}

/// The held-out evaluation of a round's weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeldoutScore {
    pub bytes: usize,
    pub loss: f32,
    pub cross_entropy: f32,
    pub bits_per_byte: f32,
}

/// What a round leaves for publishing: `round/weights.safetensors` and `round/round.json`.
///
/// The round is bound to its run directory: `weights` is relative to it (so the directory can
/// move, and a command run from anywhere finds the same file), and `weights_blake2b256` is the
/// hash of the weights written with it, so weights that another run or a later round put there
/// are never published with this round's embedding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundArtifacts {
    pub step: u64,
    /// Relative to the run directory (absolute in rounds written before the hash was added).
    pub weights: PathBuf,
    /// Blake2b-256 (Base58) of the weights file; absent in rounds written before it was.
    #[serde(default)]
    pub weights_blake2b256: Option<String>,
    pub heldout: Option<HeldoutScore>,
    pub embedding: Vec<f32>,
    pub embedding_source: String,
}

/// Name of the round's weights inside the run directory.
pub const ROUND_WEIGHTS: &str = "round/weights.safetensors";

impl RoundArtifacts {
    /// The weights file of a round of the run in `run_dir`.
    pub fn weights_path(&self, run_dir: &Path) -> PathBuf {
        run_dir.join(&self.weights)
    }

    /// Checks that the weights file holds what this round wrote (by its Blake2b-256); returns
    /// the path.
    pub fn verified_weights(&self, run_dir: &Path) -> Result<PathBuf, TrainError> {
        let path = self.weights_path(run_dir);
        let Some(expected) = &self.weights_blake2b256 else {
            return Err(TrainError::Settings(format!(
                "{} was written by an older somatrain and does not bind its weights; train at \
                 least one more step to write a round that does",
                run_dir.join("round/round.json").display()
            )));
        };
        let found = file_blake2b256(&path).map_err(io_err(&path))?;
        if &found != expected {
            return Err(TrainError::Settings(format!(
                "{} is not the file this round wrote (its Blake2b-256 is {found}, the round's is \
                 {expected}): another run or a later round replaced it, and it is not published \
                 with this round's embedding. Train again to write a new round",
                path.display()
            )));
        }
        Ok(path)
    }
}

/// Blake2b-256 (Base58) of a file, streamed.
pub fn file_blake2b256(path: &Path) -> std::io::Result<String> {
    use blake2::Digest;
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = blake2::Blake2b::<blake2::digest::consts::U32>::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(bs58::encode(hasher.finalize()).into_string())
}

#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    pub start_step: u64,
    pub end_step: u64,
    pub resumed_from: Option<PathBuf>,
    pub rejected_checkpoints: Vec<String>,
    pub last_loss: f32,
    /// The epoch of the corpus being read when the run stopped (from 0).
    pub corpus_epoch: u64,
    /// What reading met so far in that epoch.
    pub corpus: CorpusStats,
    /// What the last complete epoch met, once one has completed.
    pub last_epoch_corpus: Option<CorpusStats>,
    pub round: RoundArtifacts,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn write_json_atomic(path: &Path, value: &impl Serialize) -> Result<(), TrainError> {
    let tmp = somatrain_model::io::temp_path_for(path);
    let text = serde_json::to_string_pretty(value).expect("serialisable");
    std::fs::write(&tmp, text).map_err(io_err(&tmp))?;
    somatrain_model::io::finish_atomic(&tmp, path).map_err(io_err(path))
}

/// How long a run trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Until {
    /// This many more optimizer steps than the run directory holds.
    MoreSteps(u64),
    /// Until this many optimizer steps are done in total.
    Step(u64),
}

/// Computes one micro-batch's training loss and adds its gradient into `grads`: the CPU's
/// hand-written backward ([`TrainPass`]), or autograd on a device (`somatrain-torch`). An engine
/// may hold gradients back (summed on its device) until [`GradientEngine::flush_gradients`]:
/// callers flush before they read `grads`.
pub trait GradientEngine {
    /// `version` changes exactly when `weights` change (once per optimizer step), so an engine
    /// that keeps weights on a device uploads them once per step.
    fn loss_and_grad(
        &mut self,
        weights: &Weights,
        version: u64,
        batch: &somatrain_data::Batch,
        noise: &[f32],
        options: TrainOptions,
        grads: &mut Weights,
    ) -> Result<somatrain_model::score::BatchOutput, TrainError>;

    /// Fills in the loss terms of the step's micro-batches (`outputs`, one per
    /// [`GradientEngine::loss_and_grad`] since the last call, in order) for an engine that
    /// leaves them on its device until the step ends, so that a step reads its losses once
    /// instead of waiting for the device after every micro-batch; such an engine returns NaN
    /// from `loss_and_grad`. Callers call it after the last micro-batch of every step. The
    /// default has nothing to fill.
    fn step_losses(
        &mut self,
        _outputs: &mut [somatrain_model::score::BatchOutput],
    ) -> Result<(), TrainError> {
        Ok(())
    }

    /// A scorer on the same device for the round's held-out score and embedding; None scores
    /// them on the CPU.
    fn scorer(&self, _weights: &Weights) -> Option<Box<dyn BatchScorer>> {
        None
    }

    /// Adds every gradient still held back into `grads`.
    fn flush_gradients(&mut self, _grads: &mut Weights) -> Result<(), TrainError> {
        Ok(())
    }

    /// The device's memory, for engines on a device whose allocator reports it (host memory is
    /// reported separately, as peak RSS).
    fn device_memory(&self) -> Option<DeviceMemory> {
        None
    }

    /// How the optimizer step runs, for reports: the host's AdamW by default.
    fn optimizer_kind(&self) -> &'static str {
        "host"
    }

    /// How a mixed-precision engine makes its bf16 weights, for reports: `copies` cast once
    /// per optimizer step, or `casts` inside every micro-batch; `f32` where the products run
    /// in f32 (the default).
    fn bf16_weights(&self) -> &'static str {
        "f32"
    }

    /// Bytes and time moved between host and device so far, for engines on a device.
    fn transfers(&self) -> Option<TransferStats> {
        None
    }

    /// Refuses, before anything is written, settings whose micro-batch cannot fit the memory
    /// the engine trains in. The default checks nothing: a device reports its own
    /// out-of-memory, with what it asked for.
    fn check_fits(&self, _settings: &TrainSettings) -> Result<(), String> {
        Ok(())
    }

    /// Forgets whatever the engine holds of an earlier run: from here the host's `weights` and
    /// `adam` are the state. Called when a run starts.
    fn start_run(&mut self) {}

    /// One AdamW step from the gradients of this step's micro-batches: clipped by global
    /// norm, with the schedule's rate for `adam.step`, then `adam.step` advanced. The default
    /// runs it on the host; an engine with its own optimizer keeps weights and moments where
    /// they are, and `weights` and `adam`'s moments go stale until [`sync_to_host`].
    ///
    /// [`sync_to_host`]: GradientEngine::sync_to_host
    fn optimizer_step(
        &mut self,
        config: &OptimConfig,
        weights: &mut Weights,
        adam: &mut AdamState,
        grads: &mut Weights,
    ) -> Result<StepStats, TrainError> {
        self.flush_gradients(grads)?;
        Ok(adam.update(config, weights, grads))
    }

    /// The name of a parameter holding a non-finite value after the last step, if any.
    fn first_nonfinite_parameter(
        &mut self,
        weights: &Weights,
    ) -> Result<Option<String>, TrainError> {
        Ok(first_nonfinite(weights))
    }

    /// Makes `weights` and `adam` current: an engine with its own optimizer copies its weights
    /// and moments back. Called before a checkpoint or the round's artifacts are written.
    fn sync_to_host(
        &mut self,
        _weights: &mut Weights,
        _adam: &mut AdamState,
    ) -> Result<(), TrainError> {
        Ok(())
    }
}

/// The first tensor of `weights` holding a NaN or an infinity.
pub fn first_nonfinite(weights: &Weights) -> Option<String> {
    weights
        .tensors()
        .into_iter()
        .find(|(_, t)| t.iter().any(|v| !v.is_finite()))
        .map(|(name, _)| name.to_string())
}

impl GradientEngine for TrainPass {
    fn check_fits(&self, settings: &TrainSettings) -> Result<(), String> {
        let Some(limit) = crate::host_memory::limit() else {
            return Ok(());
        };
        let (batch, seq_len) = (settings.micro_batch, settings.corpus.max_seq_len);
        let needed = TrainPass::memory_bytes(&settings.model, batch, seq_len);
        if needed <= limit as f64 {
            return Ok(());
        }
        Err(format!(
            "a micro-batch of {batch} x {seq_len} needs about {:.1} GB on the CPU (weights, \
             gradients, Adam moments and activations), and this machine has {:.1} GB: use a \
             smaller --micro-batch (and a larger --accumulation to keep the tokens per step) or \
             a shorter --seq-len",
            needed / 1e9,
            limit as f64 / 1e9
        ))
    }

    fn loss_and_grad(
        &mut self,
        weights: &Weights,
        _version: u64,
        batch: &somatrain_data::Batch,
        noise: &[f32],
        options: TrainOptions,
        grads: &mut Weights,
    ) -> Result<somatrain_model::score::BatchOutput, TrainError> {
        Ok(TrainPass::loss_and_grad(
            self, weights, batch, noise, options, grads,
        ))
    }
}

/// Trains on the CPU (resuming whatever the run directory holds) until `until`, then writes
/// the round artifacts. `on_step` sees every logged step.
pub fn run(
    run_dir: &Path,
    settings: &TrainSettings,
    until: Until,
    on_step: &mut dyn FnMut(&StepLog),
) -> Result<RunSummary, TrainError> {
    run_with(run_dir, settings, until, &mut TrainPass::new(), on_step)
}

/// [`run`] with the gradients computed by `engine`.
pub fn run_with(
    run_dir: &Path,
    settings: &TrainSettings,
    until: Until,
    engine: &mut dyn GradientEngine,
    on_step: &mut dyn FnMut(&StepLog),
) -> Result<RunSummary, TrainError> {
    settings.validate().map_err(TrainError::Settings)?;
    engine.check_fits(settings).map_err(TrainError::Settings)?;
    let settings = &TrainSettings {
        corpus: crate::corpus::CorpusConfig {
            skip_dir: Some(run_dir.to_path_buf()),
            ..settings.corpus.clone()
        },
        ..settings.clone()
    };
    let settings_path = run_dir.join("settings.json");
    // A new run lists its corpus before it writes anything, so that a mistyped or unreadable
    // corpus path does not leave a `settings.json` that pins the run directory to it.
    let mut fresh_stream = if settings_path.exists() {
        None
    } else {
        Some(TrainStream::open(
            settings.corpus.clone(),
            Position::default(),
        )?)
    };
    {
        // A new run directory is private; an existing one (the user's) keeps its mode, since
        // what needs privacy lives in `checkpoints/`, `round/` and `publish/`, each 0700.
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(run_dir)
            .map_err(io_err(run_dir))?;
    }
    if settings_path.exists() {
        let text = std::fs::read_to_string(&settings_path).map_err(io_err(&settings_path))?;
        let stored: TrainSettings = serde_json::from_str(&text)
            .map_err(|e| TrainError::Settings(format!("{}: {e}", settings_path.display())))?;
        settings
            .compatible_with(&stored)
            .map_err(TrainError::Settings)?;
        if settings.splits_steps_unlike(&stored) {
            tracing::warn!(
                "each step's {} sequences now run as {} micro-batches of {} (they ran as {} of {})",
                settings.micro_batch * settings.accumulation,
                settings.accumulation,
                settings.micro_batch,
                stored.accumulation,
                stored.micro_batch
            );
            write_json_atomic(&settings_path, settings)?;
        }
    } else {
        write_json_atomic(&settings_path, settings)?;
    }

    let ckpt_root = run_dir.join("checkpoints");
    let (loaded, rejected) = checkpoint::load_latest(&ckpt_root);
    for r in &rejected {
        tracing::warn!("skipping checkpoint: {r}");
    }
    if loaded.is_none() && !rejected.is_empty() {
        // Starting over here would throw away the run, and pruning would then delete
        // directories that may only need a file put back.
        let found: Vec<String> = rejected.iter().map(|r| format!("  {r}")).collect();
        if !settings.restart_from_scratch {
            return Err(TrainError::Settings(format!(
                "no checkpoint in {} verifies, so training cannot resume; nothing was changed. \
                 What was found:\n{}\nRepair them, or pass --restart-from-scratch to start \
                 from step 0 with the old checkpoints kept aside",
                ckpt_root.display(),
                found.join("\n")
            )));
        }
        let aside = run_dir.join(format!(
            "checkpoints.set-aside-{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        ));
        std::fs::rename(&ckpt_root, &aside).map_err(io_err(&ckpt_root))?;
        tracing::warn!(
            "no checkpoint verified; they are kept in {} and training starts from step 0",
            aside.display()
        );
    }
    let (mut weights, mut adam, position, resumed_from, mut last_loss) = match loaded {
        Some(l) => {
            tracing::info!("resuming from {} (step {})", l.path.display(), l.state.step);
            (l.weights, l.adam, l.corpus, Some(l.path), l.state.last_loss)
        }
        None => {
            let weights = match &settings.init_weights {
                Some(path) => {
                    let options = LoadOptions {
                        num_heads: Some(settings.model.num_heads),
                        preset: None,
                    };
                    let w = load_file(path, options)?;
                    if w.config != settings.model {
                        return Err(TrainError::Settings(format!(
                            "{} has shape {:?}, the run trains {:?}",
                            path.display(),
                            w.config,
                            settings.model
                        )));
                    }
                    w
                }
                None => Weights::init(settings.model, settings.seed),
            };
            let adam = AdamState::new(&weights);
            (weights, adam, Position::default(), None, f32::NAN)
        }
    };
    engine.start_run();
    let start_step = adam.step;
    let until_step = match until {
        Until::MoreSteps(n) => start_step + n,
        Until::Step(s) => s,
    };
    let mut stream = match fresh_stream.take() {
        // Nothing was loaded, so the stream starts where the one already open stands.
        Some(stream) if resumed_from.is_none() => stream,
        _ => TrainStream::open(settings.corpus.clone(), position)?,
    };
    let mut grads = Weights::zeros(settings.model);
    let d = settings.model.embedding_dim;
    let seq = settings.corpus.max_seq_len;
    let mut window_start = Instant::now();
    let mut last_checkpoint = Instant::now();
    let mut window_tokens = 0u64;
    let history_path = run_dir.join(crate::history::HISTORY_FILE);
    let mut history =
        crate::history::History::open(run_dir, start_step).map_err(io_err(&history_path))?;

    while adam.step < until_step {
        let step = adam.step;
        let step_started = Instant::now();
        let mut step_tokens = 0u64;
        for (_, g) in grads.tensors_mut() {
            g.fill(0.0);
        }
        let noise =
            somatrain_noise::unit_column_noise(settings.seed.wrapping_add(step), d, SIGREG_SLICES);
        let mut outputs = Vec::with_capacity(settings.accumulation);
        let mut token_counts = Vec::with_capacity(settings.accumulation);
        let mut targets = 0u64;
        for micro in 0..settings.accumulation {
            let batch = stream.next_batch(settings.micro_batch)?;
            let options = TrainOptions {
                dropout: settings.dropout,
                dropout_key: Dropout::derive(settings.seed, &[step, micro as u64]),
                sigreg_coefficient: settings.sigreg_coefficient,
                grad_scale: 1.0 / settings.accumulation as f32,
            };
            let out = engine
                .loss_and_grad(&weights, step, &batch, &noise, options, &mut grads)
                .map_err(|e| e.with_accumulation(settings.accumulation))?;
            outputs.push(out);
            token_counts.push(batch.token_count());
            targets += batch.real_target_count() as u64;
            window_tokens += batch.token_count() as u64;
            step_tokens += batch.token_count() as u64;
        }
        engine.step_losses(&mut outputs)?;
        let (mut loss_sum, mut ce_sum, mut nll_bits) = (0f64, 0f64, 0f64);
        for (out, tokens) in outputs.iter().zip(&token_counts) {
            loss_sum += out.loss as f64;
            ce_sum += out.cross_entropy as f64;
            nll_bits += out.cross_entropy as f64 * *tokens as f64 / std::f64::consts::LN_2;
        }
        let step_loss = (loss_sum / settings.accumulation as f64) as f32;
        if !step_loss.is_finite() {
            return Err(TrainError::Diverged {
                step: step + 1,
                what: format!("the loss is {step_loss}"),
            });
        }
        let stats = engine.optimizer_step(&settings.optim, &mut weights, &mut adam, &mut grads)?;
        if !stats.grad_norm.is_finite() {
            return Err(TrainError::Diverged {
                step: step + 1,
                what: format!("the gradient norm is {}", stats.grad_norm),
            });
        }
        if let Some(name) = engine.first_nonfinite_parameter(&weights)? {
            return Err(TrainError::Diverged {
                step: step + 1,
                what: format!("tensor {name} holds a non-finite value after the update"),
            });
        }
        last_loss = step_loss;
        history
            .append(&crate::history::StepRecord {
                step: adam.step,
                loss: step_loss,
                cross_entropy: (ce_sum / settings.accumulation as f64) as f32,
                bits_per_byte: (nll_bits / targets.max(1) as f64) as f32,
                lr: stats.lr,
                grad_norm: stats.grad_norm,
                tokens_per_s: step_tokens as f64 / step_started.elapsed().as_secs_f64().max(1e-9),
                mfu: None,
                time_ms: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64),
            })
            .map_err(io_err(&history_path))?;
        if adam.step % settings.log_every.max(1) == 0 || adam.step == until_step {
            let secs = window_start.elapsed().as_secs_f64();
            let flops = 3.0 * settings.model.forward_flops(window_tokens, seq as u64);
            let log = StepLog {
                step: adam.step,
                until_step,
                loss: last_loss,
                cross_entropy: (ce_sum / settings.accumulation as f64) as f32,
                bits_per_byte: (nll_bits / targets.max(1) as f64) as f32,
                lr: stats.lr,
                grad_norm: stats.grad_norm,
                tokens_per_s: window_tokens as f64 / secs,
                gflops_per_s: flops / secs / 1e9,
                peak_rss_bytes: peak_rss_bytes(),
                device_memory: engine.device_memory(),
            };
            let device = log.device_memory.map_or(String::new(), |m| {
                format!(
                    ", device {:.0} of {:.0} MB in use, this run's peak {:.0} MB",
                    m.bytes_in_use as f64 / 1e6,
                    m.total_bytes as f64 / 1e6,
                    m.peak_bytes_reserved as f64 / 1e6
                )
            });
            tracing::info!(
                "step {} loss {:.4} bpb {:.3} lr {:.2e} |g| {:.3} {:.0} tok/s {:.1} GFLOP/s peak rss {:.0} MB{device}",
                log.step,
                log.loss,
                log.bits_per_byte,
                log.lr,
                log.grad_norm,
                log.tokens_per_s,
                log.gflops_per_s,
                log.peak_rss_bytes as f64 / 1e6
            );
            on_step(&log);
            window_start = Instant::now();
            window_tokens = 0;
        }
        let due = adam.step % settings.checkpoint_every.max(1) == 0
            && last_checkpoint.elapsed().as_secs_f64() >= settings.checkpoint_minutes * 60.0;
        let stopping = settings.stop.requested() && adam.step < until_step;
        if due || adam.step == until_step || stopping {
            engine.sync_to_host(&mut weights, &mut adam)?;
            let dir = checkpoint::save(&ckpt_root, &weights, &adam, &stream.position(), last_loss)?;
            checkpoint::prune(&ckpt_root, settings.keep_checkpoints, &dir);
            last_checkpoint = Instant::now();
        }
        if stopping {
            return Err(TrainError::Stopped { step: adam.step });
        }
    }
    engine.sync_to_host(&mut weights, &mut adam)?;
    let round = write_round(run_dir, settings, &weights, adam.step, &*engine)?;
    Ok(RunSummary {
        start_step,
        end_step: adam.step,
        resumed_from,
        rejected_checkpoints: rejected.iter().map(|e| e.to_string()).collect(),
        last_loss,
        corpus_epoch: stream.epoch(),
        corpus: stream.stats.clone(),
        last_epoch_corpus: stream.last_epoch_stats.clone(),
        round,
    })
}

/// Writes `round/weights.safetensors`, scores the held-out sample with the network's procedure
/// and computes the registry embedding, then `round/round.json`.
fn write_round(
    run_dir: &Path,
    settings: &TrainSettings,
    weights: &Weights,
    step: u64,
    engine: &dyn GradientEngine,
) -> Result<RoundArtifacts, TrainError> {
    let round_dir = run_dir.join("round");
    somatrain_model::io::create_private_dir(&round_dir).map_err(io_err(&round_dir))?;
    let weights_path = run_dir.join(ROUND_WEIGHTS);
    let mut scorer = match engine.scorer(weights) {
        Some(device) => RoundScorer::Device(device),
        None => RoundScorer::Cpu(Box::new(CpuModel::new(weights.clone()))),
    };
    let (heldout_data, _) = heldout_sample(&settings.corpus, settings.heldout_bytes)?;
    let heldout = if heldout_data.is_empty() {
        tracing::warn!("the corpus has no held-out documents: no held-out score this round");
        None
    } else {
        let score = score_data(
            scorer.as_scorer(),
            &heldout_data,
            ScoreOptions::default(),
            &mut |_, _| {},
        )?;
        let eval = scorer.evaluate(&heldout_data)?;
        let heldout = HeldoutScore {
            bytes: heldout_data.len(),
            loss: score.loss,
            cross_entropy: eval.cross_entropy,
            bits_per_byte: eval.bits_per_byte,
        };
        Some((heldout, score.embedding))
    };
    let model = scorer.as_scorer();
    let (embedding, embedding_source) = match (&heldout, settings.embedding_data.is_empty()) {
        (Some((_, embedding)), true) => (embedding.clone(), "heldout".to_string()),
        (None, true) => {
            tracing::warn!("embedding the start of the training split instead of held-out data");
            let (data, _) = sample(&settings.corpus, Split::Train, settings.heldout_bytes)?;
            let score = score_data(model, &data, ScoreOptions::default(), &mut |_, _| {})?;
            (score.embedding, "train-sample".to_string())
        }
        (_, false) => {
            let mut data = Vec::new();
            for p in &settings.embedding_data {
                let room = crate::corpus::MAX_LISTED_BYTES - data.len() as u64;
                data.extend(crate::corpus::read_bounded(p, room).map_err(io_err(p))?);
            }
            let score = score_data(model, &data, ScoreOptions::default(), &mut |_, _| {})?;
            let names: Vec<String> = settings
                .embedding_data
                .iter()
                .map(|p| p.display().to_string())
                .collect();
            (score.embedding, names.join(","))
        }
    };
    // Nothing non-finite may become a round that could be published.
    if let Some((h, _)) = &heldout
        && !(h.loss.is_finite() && h.cross_entropy.is_finite() && h.bits_per_byte.is_finite())
    {
        return Err(TrainError::Diverged {
            step,
            what: format!("the held-out loss is {}", h.loss),
        });
    }
    if embedding.iter().any(|v| !v.is_finite()) {
        return Err(TrainError::Diverged {
            step,
            what: "the registry embedding holds a non-finite value".into(),
        });
    }
    // The weights are written only once their round is known to be sound.
    save_file(weights, &weights_path)?;
    let round = RoundArtifacts {
        step,
        weights_blake2b256: Some(file_blake2b256(&weights_path).map_err(io_err(&weights_path))?),
        weights: PathBuf::from(ROUND_WEIGHTS),
        heldout: heldout.map(|(h, _)| h),
        embedding,
        embedding_source,
    };
    write_json_atomic(&round_dir.join("round.json"), &round)?;
    Ok(round)
}

/// Cross-entropy over real targets only, in bits per byte, with the network's data contract.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Evaluation {
    pub cross_entropy: f32,
    pub bits_per_byte: f32,
    pub bytes: usize,
}

/// What scores a round: the CPU kernels, or the training engine's device.
enum RoundScorer {
    Cpu(Box<CpuModel>),
    Device(Box<dyn BatchScorer>),
}

impl RoundScorer {
    fn as_scorer(&mut self) -> &mut dyn BatchScorer {
        match self {
            RoundScorer::Cpu(model) => model.as_mut(),
            RoundScorer::Device(scorer) => scorer.as_mut(),
        }
    }

    fn evaluate(&mut self, data: &[u8]) -> Result<Evaluation, TrainError> {
        match self {
            RoundScorer::Cpu(model) => evaluate(model, data),
            RoundScorer::Device(scorer) => evaluate_scorer(scorer.as_mut(), data),
        }
    }
}

/// [`evaluate`] with any scorer: the scorer's PAD-inclusive mean cross-entropy of each batch,
/// times its rows, is the batch's summed negative log-likelihood over real targets.
pub fn evaluate_scorer(model: &mut dyn BatchScorer, data: &[u8]) -> Result<Evaluation, TrainError> {
    let mut nll = 0f64;
    let mut count = 0u64;
    for batch in somatrain_data::batches(data, 1024, 16) {
        let out = model.score_batch(&batch, 0)?;
        nll += out.cross_entropy as f64 * (batch.batch * batch.seq_len) as f64;
        count += batch.real_target_count() as u64;
    }
    evaluation(nll, count, data.len())
}

/// Mean next-byte cross-entropy of `model` on `data` over non-PAD targets (the per-byte loss a
/// trainer watches; the network's score divides by PAD positions too).
pub fn evaluate(model: &mut CpuModel, data: &[u8]) -> Result<Evaluation, TrainError> {
    let mut nll = 0f64;
    let mut count = 0u64;
    let vocab = model.weights().config.vocab_size;
    for batch in somatrain_data::batches(data, 1024, 16) {
        let (_, logits) =
            model.forward(&batch.tokens, &batch.positions, batch.batch, batch.seq_len);
        nll += somatrain_model::loss::cross_entropy_sum(logits, &batch.targets, vocab);
        count += batch.real_target_count() as u64;
    }
    evaluation(nll, count, data.len())
}

/// Summed negative log-likelihood over `count` real targets, as nats and bits per byte.
fn evaluation(nll: f64, count: u64, bytes: usize) -> Result<Evaluation, TrainError> {
    if count == 0 {
        return Err(TrainError::Score(
            somatrain_model::score::ScoreError::EmptyData,
        ));
    }
    let ce = nll / count as f64;
    Ok(Evaluation {
        cross_entropy: ce as f32,
        bits_per_byte: (ce / std::f64::consts::LN_2) as f32,
        bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_suggested_split_keeps_the_step_and_fits() {
        // 8 x 4 = 32 sequences; 5 fit, and the largest divisor of 32 below that is 4.
        assert_eq!(fitting_split(8, 4, 5), Some((4, 8)));
        assert_eq!(fitting_split(8, 4, 7), Some((4, 8)));
        assert_eq!(fitting_split(6, 1, 5), Some((3, 2)));
        assert_eq!(fitting_split(2, 64, 1), Some((1, 128)));
        assert_eq!(fitting_split(8, 4, 0), None);
    }

    #[test]
    fn out_of_memory_names_what_fits_and_keeps_the_step() {
        let oom = |largest_fitting| {
            TrainError::OutOfMemory(OutOfMemory {
                micro_batch: 8,
                seq_len: 1024,
                largest_fitting,
                accumulation: None,
                detail: "CUDA out of memory. Tried to allocate 2.00 GiB\nmore".into(),
            })
        };
        let told = oom(Some(5)).with_accumulation(4).to_string();
        assert!(told.contains("micro-batch of 8 x 1024"), "{told}");
        assert!(told.contains("Tried to allocate 2.00 GiB"), "{told}");
        assert!(
            !told.contains("more"),
            "only the first line of the device's words: {told}"
        );
        assert!(
            told.contains("--micro-batch 4 --accumulation 8 to keep 32 sequences"),
            "{told}"
        );
        let told = oom(Some(0)).with_accumulation(4).to_string();
        assert!(told.contains("Not even one sequence fits"), "{told}");
        let told = oom(None).to_string();
        assert!(told.contains("Try a smaller --micro-batch"), "{told}");
    }
}
