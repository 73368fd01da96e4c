//! `somatrain score`: the network's scoring procedure on local files.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{ArgMatches, Args};
use serde::Serialize;
use somatrain_data::batch_count;
use somatrain_model::Preset;
use somatrain_model::io::{LoadOptions, load_bytes, load_file};
use somatrain_model::score::{ScoreOptions, cosine_distance, score_data, select_best};
use somatrain_protocol::crypto::apply_keystream;

use super::{Device, read_input, scorer_for};
use crate::progress::Progress;

#[derive(Args)]
pub struct ScoreArgs {
    /// A weights file (safetensors). Repeat to score several models on the same data.
    #[arg(long = "weights", value_name = "FILE")]
    weights: Vec<PathBuf>,
    /// An encrypted weights file (AES-256-CTR, zero IV). Each needs a matching --key.
    #[arg(long = "encrypted-weights", value_name = "FILE")]
    encrypted: Vec<PathBuf>,
    /// Base58 key of the n-th --encrypted-weights, or @FILE to read it from a file.
    #[arg(long = "key", value_name = "BASE58|@FILE")]
    keys: Vec<String>,
    /// Data to score; `-` reads standard input.
    #[arg(long, value_name = "FILE")]
    data: PathBuf,
    /// Base seed of the SIGReg noise (batch b uses seed + b).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 1024)]
    max_seq_len: usize,
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Head count, for files that do not record it (V1 width 2048 implies 8).
    #[arg(long)]
    num_heads: Option<usize>,
    /// Require every model to have this preset's shape (v1, medium, small, tiny).
    #[arg(long)]
    preset: Option<Preset>,
    /// A JSON array of floats: print the cosine distance of the winner's embedding to it.
    #[arg(long, value_name = "EMBEDDING.json")]
    distance_to: Option<PathBuf>,
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct ModelReport {
    weights: String,
    loss: f32,
    embedding: Vec<f32>,
}

#[derive(Serialize)]
struct Report {
    winner: usize,
    models: Vec<ModelReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    distance: Option<f32>,
}

enum Source {
    Plain(PathBuf),
    Encrypted(PathBuf, String),
}

impl Source {
    fn path(&self) -> &Path {
        match self {
            Source::Plain(p) | Source::Encrypted(p, _) => p,
        }
    }
}

/// Models in command-line order, plain and encrypted interleaved as the user wrote them: on a
/// tie the first listed wins, so order matters.
fn sources(args: &ScoreArgs, matches: &ArgMatches) -> Result<Vec<Source>> {
    if args.keys.len() != args.encrypted.len() {
        bail!(
            "{} --encrypted-weights but {} --key: give one key per encrypted file",
            args.encrypted.len(),
            args.keys.len()
        );
    }
    let mut ordered: Vec<(usize, Source)> = Vec::new();
    if let Some(indices) = matches.indices_of("weights") {
        ordered.extend(
            indices
                .zip(&args.weights)
                .map(|(i, p)| (i, Source::Plain(p.clone()))),
        );
    }
    if let Some(indices) = matches.indices_of("encrypted") {
        ordered.extend(
            indices
                .zip(args.encrypted.iter().zip(&args.keys))
                .map(|(i, (p, k))| (i, Source::Encrypted(p.clone(), k.clone()))),
        );
    }
    ordered.sort_by_key(|(i, _)| *i);
    if ordered.is_empty() {
        bail!("give at least one --weights FILE (or --encrypted-weights FILE --key KEY)");
    }
    Ok(ordered.into_iter().map(|(_, s)| s).collect())
}

fn load(source: &Source, options: LoadOptions) -> Result<somatrain_model::Weights> {
    if source.path().is_dir() {
        bail!(
            "{} is a directory, not a weights file",
            source.path().display()
        );
    }
    match source {
        Source::Plain(path) => {
            load_file(path, options).with_context(|| format!("loading {}", path.display()))
        }
        Source::Encrypted(path, key) => {
            let key = super::crypto::parse_key(key)?;
            // Weights are files; a device such as /dev/zero would only fill memory.
            super::open_regular_file(path)?;
            let mut bytes = super::read_input(path, super::MAX_WEIGHTS_FILE_BYTES)?;
            apply_keystream(&key, &mut bytes);
            load_bytes(&bytes, options).with_context(|| {
                format!(
                    "loading {} (decrypted; a wrong key also shows as a bad header)",
                    path.display()
                )
            })
        }
    }
}

fn read_embedding(path: &Path) -> Result<Vec<f32>> {
    let text = super::read_text(path, super::MAX_EMBEDDING_JSON_BYTES)?;
    let values: Vec<f32> = serde_json::from_str(&text)
        .with_context(|| format!("{}: expected a JSON array of numbers", path.display()))?;
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        bail!("{}: value {i} is not finite", path.display());
    }
    if values.iter().all(|v| *v == 0.0) {
        bail!(
            "{}: a zero (or empty) vector has no direction, so no cosine distance",
            path.display()
        );
    }
    Ok(values)
}

/// Longest sequence and largest batch `score` accepts: far past the network's 1024 x 16, and
/// small enough that a typo cannot ask for terabytes of activations.
const MAX_SEQ_LEN_LIMIT: usize = 65_536;
const MAX_BATCH_LIMIT: usize = 4_096;

pub fn run(args: ScoreArgs, matches: &ArgMatches) -> Result<()> {
    if !(1..=MAX_SEQ_LEN_LIMIT).contains(&args.max_seq_len) {
        bail!(
            "--max-seq-len {} is out of range: 1 to {MAX_SEQ_LEN_LIMIT} (the network uses 1024)",
            args.max_seq_len
        );
    }
    if !(1..=MAX_BATCH_LIMIT).contains(&args.batch_size) {
        bail!(
            "--batch-size {} is out of range: 1 to {MAX_BATCH_LIMIT} (the network uses 16)",
            args.batch_size
        );
    }
    let sources = sources(&args, matches)?;
    let data = read_input(&args.data, super::MAX_DATA_BYTES)?;
    if data.is_empty() {
        bail!("the data is empty: nothing to score");
    }
    let target = args
        .distance_to
        .as_deref()
        .map(read_embedding)
        .transpose()?;
    let options = ScoreOptions {
        max_seq_len: args.max_seq_len,
        batch_size: args.batch_size,
        seed: args.seed,
    };
    let load_options = LoadOptions {
        num_heads: args.num_heads,
        preset: args.preset,
    };

    let mut reports = Vec::new();
    for source in &sources {
        let weights = load(source, load_options)?;
        let label = source.path().display().to_string();
        // Any model may win, so each must be comparable with the target, and that is known
        // before any scoring time is spent.
        if let Some(t) = &target
            && t.len() != weights.config.embedding_dim
        {
            bail!(
                "--distance-to has {} values, but {label} embeds into {}",
                t.len(),
                weights.config.embedding_dim
            );
        }
        tracing::info!(
            "scoring {label}: {} layers, width {}, {} heads, {} bytes of data",
            weights.config.num_layers,
            weights.config.embedding_dim,
            weights.config.num_heads,
            data.len()
        );
        let mut scorer = scorer_for(args.device, weights)?;
        let total = batch_count(data.len(), options.max_seq_len, options.batch_size);
        let mut progress = Progress::new(label.clone(), total as u64);
        let score = score_data(scorer.as_mut(), &data, options, &mut |d, t| {
            progress.update(d, t)
        })
        .with_context(|| format!("scoring {label}"))?;
        progress.finish();
        reports.push(ModelReport {
            weights: label,
            loss: score.loss,
            embedding: score.embedding,
        });
    }
    let losses: Vec<f32> = reports.iter().map(|r| r.loss).collect();
    let winner = select_best(&losses).expect("at least one model");
    let distance = target
        .as_ref()
        .map(|t| cosine_distance(&reports[winner].embedding, t));
    let report = Report {
        winner,
        models: reports,
        distance,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        for (i, m) in report.models.iter().enumerate() {
            let mark = if i == report.winner {
                "  <- winner"
            } else {
                ""
            };
            println!("{i}  loss {:.7}  {}{mark}", m.loss, m.weights);
        }
        if let Some(d) = report.distance {
            println!("cosine distance of the winner to the target: {d:.7}");
        }
    }
    Ok(())
}
