//! `somatrain train`, `eval` and `embed`.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use somatrain_model::Preset;
use somatrain_model::io::{LoadOptions, load_file};
use somatrain_model::score::{ScoreOptions, score_data};
use somatrain_train::corpus::{CorpusConfig, Source};
use somatrain_train::optim::{OptimConfig, Schedule};
use somatrain_train::trainer::evaluate_scorer;
use somatrain_train::{TrainSettings, Until};

use super::{Device, read_input};

#[derive(Args)]
pub struct TrainArgs {
    /// Directory of the run: settings, checkpoints and the round's artifacts.
    #[arg(long)]
    run_dir: PathBuf,
    #[command(flatten)]
    training: TrainingOptions,
    /// Optimizer steps to train in this invocation.
    #[arg(long, conflicts_with = "until_step")]
    steps: Option<u64>,
    /// Train until this many optimizer steps are done in total.
    #[arg(long)]
    until_step: Option<u64>,
    /// cpu (the hand-written kernels), or through libtorch (a build with --features torch):
    /// cuda, cuda:N or torch-cpu.
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// Matrix products in bf16 with f32 master weights (mixed precision; a libtorch device).
    #[arg(long)]
    bf16: bool,
    /// Print the run summary as JSON.
    #[arg(long)]
    json: bool,
}

/// Where documents come from (shared by `train`, `run` and `submitter`).
#[derive(Args, Clone)]
pub struct CorpusOptions {
    /// A directory tree of documents (repeatable).
    #[arg(long = "corpus-dir")]
    corpus_dirs: Vec<PathBuf>,
    /// A JSON Lines file with one document per line, plain, .gz or .zst (repeatable); a
    /// directory means every .jsonl, .ndjson, .jsonl.gz and .jsonl.zst file under it.
    #[arg(long)]
    jsonl: Vec<PathBuf>,
    /// Field of each JSON line that holds the text.
    #[arg(long, default_value = "content")]
    text_field: String,
    /// A Parquet file with one document per row (repeatable); a directory means every
    /// .parquet file under it.
    #[arg(long)]
    parquet: Vec<PathBuf>,
    /// Column of each Parquet row that holds the text.
    #[arg(long, default_value = "content")]
    parquet_column: String,
    #[command(flatten)]
    hub: HubArgs,
    /// A file listing document paths, one per line (repeatable).
    #[arg(long = "file-list")]
    file_lists: Vec<PathBuf>,
    /// Only files whose path under a directory source matches (repeatable glob).
    #[arg(long)]
    include: Vec<String>,
    /// Leave out files whose path under a directory source matches (repeatable glob).
    #[arg(long)]
    exclude: Vec<String>,
    /// Documents larger than this are skipped (and counted).
    #[arg(long, default_value_t = 1 << 20)]
    max_document_bytes: u64,
}

impl CorpusOptions {
    /// The sources named, or an error naming the flags when there are none.
    pub fn sources(&self) -> Result<Vec<Source>> {
        let mut sources: Vec<Source> = self
            .corpus_dirs
            .iter()
            .map(|p| Source::Dir { path: p.clone() })
            .collect();
        sources.extend(self.jsonl.iter().map(|p| Source::Jsonl {
            path: p.clone(),
            field: self.text_field.clone(),
        }));
        sources.extend(
            self.file_lists
                .iter()
                .map(|p| Source::List { path: p.clone() }),
        );
        sources.extend(self.parquet.iter().map(|p| Source::Parquet {
            path: p.clone(),
            column: self.parquet_column.clone(),
        }));
        sources.extend(self.hub.source()?);
        if sources.is_empty() {
            bail!(
                "give a corpus: --corpus-dir DIR, --jsonl FILE, --parquet FILE, --file-list FILE \
                 or --hf-dataset OWNER/NAME"
            );
        }
        Ok(sources)
    }

    /// A corpus of these sources, its documents cut at `max_seq_len` bytes.
    pub fn config(
        &self,
        heldout_per_mille: u32,
        shuffle_buffer: usize,
        seed: u64,
        max_seq_len: usize,
    ) -> Result<CorpusConfig> {
        Ok(CorpusConfig {
            sources: self.sources()?,
            include: self.include.clone(),
            exclude: self.exclude.clone(),
            max_document_bytes: self.max_document_bytes,
            heldout_per_mille,
            shuffle_buffer,
            seed,
            max_seq_len,
            skip_dir: None,
        })
    }
}

/// The model, corpus and optimizer of a training run (shared by `train` and `run`).
#[derive(Args, Clone)]
pub struct TrainingOptions {
    /// Model shape (v1, medium, small, tiny).
    #[arg(long, default_value = "tiny")]
    preset: Preset,
    #[command(flatten)]
    pub corpus: CorpusOptions,
    /// Documents held out of training, per mille (by a hash of their path or line).
    #[arg(long, default_value_t = 20)]
    heldout_per_mille: u32,
    /// Sequences held in the shuffle buffer.
    #[arg(long, default_value_t = 512)]
    shuffle_buffer: usize,
    #[arg(long, default_value_t = 1024)]
    pub seq_len: usize,
    #[arg(long, default_value_t = 2)]
    micro_batch: usize,
    #[arg(long, default_value_t = 64)]
    accumulation: usize,
    #[arg(long, default_value_t = 1e-4)]
    lr: f32,
    #[arg(long, default_value_t = 0.9)]
    beta1: f32,
    #[arg(long, default_value_t = 0.999)]
    beta2: f32,
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f32,
    #[arg(long, default_value_t = 0)]
    warmup_steps: u64,
    #[arg(long, default_value = "constant")]
    schedule: ScheduleArg,
    #[arg(long, default_value_t = 10_000)]
    decay_steps: u64,
    /// Clip the global gradient norm (0 disables).
    #[arg(long, default_value_t = 1.0)]
    grad_clip: f32,
    #[arg(long, default_value_t = 0.1)]
    dropout: f32,
    #[arg(long, default_value_t = 0.02)]
    sigreg_coefficient: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 1)]
    checkpoint_every: u64,
    /// And at least this many minutes apart (the last step of a run is always saved). Default:
    /// 0 on the CPU devices, where a step takes longer than a checkpoint, and 10 on CUDA, where
    /// writing V1's 14.5 GB of weights and moments takes longer than a step.
    #[arg(long)]
    checkpoint_minutes: Option<f64>,
    #[arg(long, default_value_t = 3)]
    keep_checkpoints: usize,
    /// When checkpoints exist and none verifies: keep them aside (checkpoints.set-aside-TIME)
    /// and start from step 0. Without it, training stops and lists what it found.
    #[arg(long)]
    restart_from_scratch: bool,
    #[arg(long, default_value_t = 1)]
    log_every: u64,
    /// Start from these weights instead of a fresh initialisation.
    #[arg(long)]
    init_weights: Option<PathBuf>,
    #[arg(long, default_value_t = 1 << 20)]
    heldout_bytes: usize,
    /// Data for the registry embedding (default: the held-out split).
    #[arg(long)]
    embedding_data: Vec<PathBuf>,
}

/// A dataset on the Hugging Face Hub as a corpus source (`train`, `run`, `submit --auto`,
/// `bench corpus`).
#[derive(Args, Clone)]
pub struct HubArgs {
    /// A dataset on the Hugging Face Hub (OWNER/NAME), streamed: its Parquet files are read by
    /// HTTP range requests, row group by row group. HF_TOKEN for gated datasets, HF_ENDPOINT
    /// for a mirror.
    #[arg(long, value_name = "OWNER/NAME")]
    pub hf_dataset: Option<String>,
    /// The dataset's config (its card's config_name; default: the card's default).
    #[arg(long, requires = "hf_dataset")]
    pub hf_config: Option<String>,
    #[arg(long, default_value = "train")]
    pub hf_split: String,
    /// A branch, tag or commit; a branch is pinned to its commit when the dataset is listed.
    #[arg(long, default_value = "main")]
    pub hf_revision: String,
    /// Column of each row that holds the text (without --content-from-blob-id).
    #[arg(long, default_value = "content")]
    pub hf_column: String,
    /// Rows name their file by blob_id (and src_encoding), as The Stack v2 does: fetch each
    /// from this bucket, gzip-compressed, without credentials, e.g.
    /// s3://softwareheritage/content.
    #[arg(long, value_name = "s3://BUCKET/PREFIX", requires = "hf_dataset")]
    pub content_from_blob_id: Option<String>,
    /// An S3 endpoint for --content-from-blob-id instead of AWS's (a mirror or a local server).
    #[arg(long, requires = "content_from_blob_id")]
    pub blob_endpoint: Option<String>,
    /// Blob fetches in flight.
    #[arg(long, default_value_t = 32)]
    pub blobs_in_flight: usize,
}

impl HubArgs {
    /// The Hub source these flags name, if any (the blob location checked).
    pub fn source(&self) -> Result<Option<Source>> {
        let Some(repo) = &self.hf_dataset else {
            return Ok(None);
        };
        let content = match &self.content_from_blob_id {
            Some(location) => {
                let blobs = somatrain_hub::BlobSource {
                    location: location.clone(),
                    endpoint: self.blob_endpoint.clone(),
                    in_flight: self.blobs_in_flight.max(1),
                };
                blobs.base_url()?;
                somatrain_hub::Content::Blobs(blobs)
            }
            None => somatrain_hub::Content::Column {
                name: self.hf_column.clone(),
            },
        };
        Ok(Some(Source::Hub {
            dataset: somatrain_hub::DatasetRef {
                repo: repo.clone(),
                config: self.hf_config.clone(),
                split: self.hf_split.clone(),
                revision: self.hf_revision.clone(),
                endpoint: None,
            },
            content,
        }))
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ScheduleArg {
    Constant,
    Cosine,
}

impl TrainingOptions {
    /// Options from command-line flags, with every other option at its default.
    pub fn from_flags(flags: &[String]) -> Result<Self> {
        #[derive(clap::Parser)]
        struct Flags {
            #[command(flatten)]
            options: TrainingOptions,
        }
        let argv = std::iter::once("somatrain".to_string()).chain(flags.iter().cloned());
        Ok(<Flags as clap::Parser>::try_parse_from(argv)?.options)
    }

    /// The run's settings; `device` picks the default `--checkpoint-minutes`.
    pub fn settings(&self, device: super::Device) -> Result<TrainSettings> {
        let args = self;
        let checkpoint_minutes = match (args.checkpoint_minutes, device) {
            (Some(minutes), _) if !(minutes >= 0.0 && minutes.is_finite()) => {
                bail!("--checkpoint-minutes must be 0 or more, not {minutes}")
            }
            (Some(minutes), _) => minutes,
            (None, super::Device::Cuda(_)) => CUDA_CHECKPOINT_MINUTES,
            (None, super::Device::Cpu | super::Device::TorchCpu) => 0.0,
        };
        let corpus = args.corpus.config(
            args.heldout_per_mille,
            args.shuffle_buffer,
            args.seed,
            args.seq_len,
        )?;
        let settings = TrainSettings {
            model: args.preset.config(),
            corpus,
            optim: OptimConfig {
                lr: args.lr,
                beta1: args.beta1,
                beta2: args.beta2,
                eps: 1e-8,
                weight_decay: args.weight_decay,
                warmup_steps: args.warmup_steps,
                schedule: match args.schedule {
                    ScheduleArg::Constant => Schedule::Constant,
                    ScheduleArg::Cosine => Schedule::Cosine,
                },
                decay_steps: args.decay_steps,
                min_lr_ratio: 0.1,
                grad_clip: (args.grad_clip > 0.0).then_some(args.grad_clip),
            },
            micro_batch: args.micro_batch,
            accumulation: args.accumulation,
            dropout: args.dropout,
            sigreg_coefficient: args.sigreg_coefficient,
            seed: args.seed,
            checkpoint_every: args.checkpoint_every,
            checkpoint_minutes,
            keep_checkpoints: args.keep_checkpoints,
            log_every: args.log_every,
            init_weights: args.init_weights.clone(),
            heldout_bytes: args.heldout_bytes,
            embedding_data: args.embedding_data.clone(),
            restart_from_scratch: args.restart_from_scratch,
            stop: somatrain_train::StopRequest::default(),
        };
        Ok(settings)
    }
}

/// The default `--checkpoint-minutes` on CUDA: a V1 checkpoint (14.5 GB read back and written)
/// takes longer than a step there, so saving every step would spend most of the run on disk.
const CUDA_CHECKPOINT_MINUTES: f64 = 10.0;

pub fn run_train(args: TrainArgs) -> Result<()> {
    let settings = args.training.settings(args.device)?;
    let mut engine: Box<dyn somatrain_train::GradientEngine> = match args.device {
        Device::Cpu if args.bf16 => {
            bail!(
                "--bf16 (mixed precision) needs a libtorch device (--device cuda or torch-cpu); the CPU path trains in f32"
            )
        }
        Device::Cpu => Box::new(somatrain_model::cpu::train::TrainPass::new()),
        other => super::device_gradient_engine(other, args.bf16)?,
    };
    let until = match (args.steps, args.until_step) {
        (_, Some(s)) => Until::Step(s),
        (Some(n), None) => Until::MoreSteps(n),
        (None, None) => bail!("say how long to train: --steps N or --until-step N"),
    };
    super::stop_on_signals(
        settings.stop.clone(),
        "stopping after the step in progress, once its checkpoint is saved (again to stop at once)",
    )?;
    let mut progress = crate::progress::TrainProgress::new();
    let summary = somatrain_train::run_with(
        &args.run_dir,
        &settings,
        until,
        engine.as_mut(),
        &mut |log| progress.step(log),
    )
    .with_context(|| format!("training in {}", args.run_dir.display()));
    progress.finish();
    if let Err(e) = &summary
        && let Some(stopped @ somatrain_train::TrainError::Stopped { .. }) = e.downcast_ref()
    {
        eprintln!("{stopped}");
        return Ok(());
    }
    let summary = summary?;
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        if summary.end_step == summary.start_step {
            println!(
                "no steps to train (the run is at step {}); weights: {}",
                summary.end_step,
                summary.round.weights_path(&args.run_dir).display()
            );
        } else {
            println!(
                "trained steps {} -> {} (last loss {:.4}); weights: {}",
                summary.start_step,
                summary.end_step,
                summary.last_loss,
                summary.round.weights_path(&args.run_dir).display()
            );
        }
        if let Some(full) = &summary.last_epoch_corpus {
            println!("corpus, last full epoch: {full}");
        }
        println!(
            "corpus, epoch {} so far: {}",
            summary.corpus_epoch, summary.corpus
        );
        if let Some(h) = &summary.round.heldout {
            println!(
                "held-out ({} bytes): network loss {:.4}, {:.3} bits/byte",
                h.bytes, h.loss, h.bits_per_byte
            );
        }
        println!(
            "embedding ({}): {} values in round/round.json",
            summary.round.embedding_source,
            summary.round.embedding.len()
        );
    }
    Ok(())
}

/// Weights and data, shared by `eval` and `embed`.
#[derive(Args)]
pub struct ModelOnData {
    #[arg(long)]
    weights: PathBuf,
    /// Data files (concatenated); `-` reads standard input.
    #[arg(long, required = true)]
    data: Vec<PathBuf>,
    #[arg(long)]
    num_heads: Option<usize>,
    #[arg(long)]
    preset: Option<Preset>,
    /// cpu (the hand-written kernels), or through libtorch (a build with --features torch):
    /// cuda, cuda:N or torch-cpu.
    #[arg(long, default_value = "cpu")]
    device: Device,
}

impl ModelOnData {
    fn load(&self) -> Result<(Box<dyn somatrain_model::score::BatchScorer>, Vec<u8>)> {
        let weights = load_model(&self.weights, self.num_heads, self.preset)?;
        let scorer = super::scorer_for(self.device, weights)?;
        Ok((scorer, read_all(&self.data)?))
    }
}

#[derive(Args)]
pub struct EvalArgs {
    #[command(flatten)]
    input: ModelOnData,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long)]
    json: bool,
}

fn load_model(
    weights: &std::path::Path,
    num_heads: Option<usize>,
    preset: Option<Preset>,
) -> Result<somatrain_model::Weights> {
    if weights.is_dir() {
        bail!("{} is a directory, not a weights file", weights.display());
    }
    load_file(weights, LoadOptions { num_heads, preset })
        .with_context(|| format!("loading {}", weights.display()))
}

fn read_all(paths: &[PathBuf]) -> Result<Vec<u8>> {
    let mut data = Vec::new();
    for p in paths {
        data.extend(read_input(p, super::MAX_DATA_BYTES)?);
    }
    if data.is_empty() {
        bail!("the data is empty");
    }
    Ok(data)
}

pub fn run_eval(args: EvalArgs) -> Result<()> {
    let (mut model, data) = args.input.load()?;
    let options = ScoreOptions {
        seed: args.seed,
        ..ScoreOptions::default()
    };
    let score = score_data(model.as_mut(), &data, options, &mut |_, _| {})?;
    let eval = evaluate_scorer(model.as_mut(), &data)?;
    if args.json {
        let out = serde_json::json!({
            "bytes": data.len(),
            "network_loss": score.loss,
            "cross_entropy": eval.cross_entropy,
            "bits_per_byte": eval.bits_per_byte,
        });
        println!("{out}");
    } else {
        println!(
            "{} bytes: network loss {:.5}, cross-entropy {:.5} nats/byte, {:.4} bits/byte",
            data.len(),
            score.loss,
            eval.cross_entropy,
            eval.bits_per_byte
        );
    }
    Ok(())
}

#[derive(Args)]
pub struct EmbedArgs {
    #[command(flatten)]
    input: ModelOnData,
    /// Write the embedding (a JSON array) here instead of standard output.
    #[arg(long)]
    out: Option<PathBuf>,
}

pub fn run_embed(args: EmbedArgs) -> Result<()> {
    let (mut model, data) = args.input.load()?;
    let score = score_data(
        model.as_mut(),
        &data,
        ScoreOptions::default(),
        &mut |_, _| {},
    )?;
    let text = serde_json::to_string(&score.embedding)?;
    match args.out {
        Some(path) => {
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?
        }
        None => println!("{text}"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::Device;

    fn minutes(flags: &[&str], device: Device) -> Result<f64> {
        let mut all: Vec<String> = vec!["--corpus-dir".into(), ".".into()];
        all.extend(flags.iter().map(|f| f.to_string()));
        Ok(TrainingOptions::from_flags(&all)?
            .settings(device)?
            .checkpoint_minutes)
    }

    #[test]
    fn checkpoints_are_spaced_by_minutes_on_cuda_and_every_step_elsewhere() {
        assert_eq!(
            minutes(&[], Device::Cuda(0)).unwrap(),
            CUDA_CHECKPOINT_MINUTES
        );
        assert_eq!(minutes(&[], Device::Cpu).unwrap(), 0.0);
        assert_eq!(minutes(&[], Device::TorchCpu).unwrap(), 0.0);
        let asked = ["--checkpoint-minutes", "2.5"];
        assert_eq!(minutes(&asked, Device::Cuda(1)).unwrap(), 2.5);
        assert_eq!(minutes(&asked, Device::Cpu).unwrap(), 2.5);
        let error = minutes(&["--checkpoint-minutes=-1"], Device::Cpu).unwrap_err();
        assert!(error.to_string().contains("must be 0 or more"), "{error}");
    }
}
