//! `somatrain bench`: throughput of the hot paths, each run ending with one JSON line.
//!
//! Every bench also measures the f32 matrix-multiply peak of this machine with the same `gemm`
//! library the model uses, so a result can be read as a fraction of what the hardware gives.

use somatrain_protocol::transaction::TransferCoin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use serde::Serialize;
use somatrain_model::score::{ScoreOptions, score_data};
use somatrain_model::{ModelConfig, Preset, Weights};

use somatrain_train::trainer::peak_rss_bytes;

use super::{Device, scorer_for};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Scoring throughput (forward, cross-entropy, SIGReg) on random weights of a preset.
    Score(ScoreBenchArgs),
    /// Training throughput: forward, backward and an AdamW update per micro-batch.
    Train(TrainBenchArgs),
    /// Weights encryption + commitment throughput (AES-256-CTR and Blake2b-256, streamed).
    Crypto(CryptoBenchArgs),
    /// Localnet load: many accounts sending signed transfers concurrently over gRPC, each waited
    /// for in its checkpoint.
    Localnet(LocalnetBenchArgs),
    /// Corpus streaming: sequences per second out of a JSON Lines file, and the time to reopen
    /// the stream half-way (from a checkpoint's cursor, and by replaying the epoch).
    Corpus(CorpusBenchArgs),
    /// The host's share of a device training step, timed on this machine: the work the GPU path
    /// still does on the CPU per micro-batch and per optimizer step (see docs/gpu.md).
    Host(HostBenchArgs),
    /// The data submitter against an embedded localnet with one revealed model of the preset:
    /// pieces and tokens per second, and the scoring loop's time not spent scoring.
    Submitter(super::submitter_bench::SubmitterBenchArgs),
}

#[derive(Args)]
pub struct HostBenchArgs {
    #[arg(long, default_value = "v1")]
    preset: Preset,
    #[arg(long, default_value_t = 2)]
    micro_batch: usize,
    #[arg(long, default_value_t = 1024)]
    seq_len: usize,
    /// Repetitions of each timed piece (the median is reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
}

#[derive(Args)]
pub struct CorpusBenchArgs {
    /// A JSON Lines file with a `content` field (default: a synthetic one of --size-mb).
    #[arg(long)]
    jsonl: Option<std::path::PathBuf>,
    #[arg(long, default_value_t = 256)]
    size_mb: u64,
    #[arg(long, default_value_t = 512)]
    shuffle_buffer: usize,
    /// Stream instead a synthetic dataset laid out as The Stack v2 (rows naming gzip blobs in
    /// a bucket) from a loopback fake Hub and bucket, with --latency-ms added to each request.
    #[arg(long, conflicts_with_all = ["jsonl", "hf_dataset"])]
    hub_fake: bool,
    #[arg(long, default_value_t = 20)]
    latency_ms: u64,
    /// Or stream a Hub dataset (HF_ENDPOINT and HF_TOKEN as for `train`).
    #[command(flatten)]
    hub: super::train::HubArgs,
    /// Megabytes of text to stream from the Hub before stopping.
    #[arg(long, default_value_t = 16)]
    max_mb: u64,
}

#[derive(Args)]
pub struct LocalnetBenchArgs {
    #[arg(long, default_value_t = 1000)]
    accounts: usize,
    /// Transfers each account sends, one after another.
    #[arg(long, default_value_t = 5)]
    transactions_per_account: u64,
}

#[derive(Args)]
pub struct CryptoBenchArgs {
    /// Megabytes streamed per run.
    #[arg(long, default_value_t = 1024)]
    size_mb: u64,
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

/// A reader of `remaining` pseudo-random bytes that holds only one small buffer.
struct SyntheticReader {
    remaining: u64,
    state: u64,
}

impl std::io::Read for SyntheticReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (buf.len() as u64).min(self.remaining) as usize;
        for chunk in buf[..n].chunks_mut(8) {
            self.state = self
                .state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let bytes = self.state.to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}

#[derive(Args)]
pub struct TrainBenchArgs {
    #[arg(long, default_value = "medium")]
    preset: Preset,
    #[arg(long, default_value_t = 2)]
    micro_batch: usize,
    /// Micro-batches per optimizer step (the reference recipe uses 64).
    #[arg(long, default_value_t = 1)]
    accumulation: usize,
    #[arg(long, default_value_t = 1024)]
    seq_len: usize,
    /// Timed optimizer steps after one warm-up step.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Dropout rate, as in the reference trainer.
    #[arg(long, default_value_t = 0.1)]
    dropout: f32,
    /// cpu: the hand-written kernels; cuda, cuda:N or torch-cpu: libtorch's autograd and AdamW
    /// on the device (a build with --features torch).
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// Mixed precision (bf16 products, f32 masters) on a device with bf16 products.
    #[arg(long)]
    bf16: bool,
    /// On a libtorch device, AdamW tensor by tensor instead of the fused kernel (to compare).
    #[arg(long)]
    per_tensor_optimizer: bool,
    /// With --bf16, cast the f32 weights to bf16 inside every micro-batch, as autocast does,
    /// instead of bf16 copies made once per optimizer step (to compare).
    #[arg(long)]
    bf16_casts: bool,
}

#[derive(Args)]
pub struct ScoreBenchArgs {
    #[arg(long, default_value = "medium")]
    preset: Preset,
    /// Sequences of data scored per timed run.
    #[arg(long, default_value_t = 2)]
    sequences: usize,
    #[arg(long, default_value_t = 2)]
    batch_size: usize,
    #[arg(long, default_value_t = 1024)]
    seq_len: usize,
    /// Timed runs after one warm-up run.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    #[arg(long, default_value = "cpu")]
    device: Device,
}

#[derive(Serialize)]
struct BenchReport {
    bench: &'static str,
    preset: String,
    tokens: usize,
    seconds_per_run: f64,
    tokens_per_s: f64,
    gflops_per_s: f64,
    matmul_peak_gflops_per_s: f64,
    fraction_of_peak: f64,
    peak_rss_bytes: u64,
    threads: usize,
}

pub fn run(command: BenchCommand) -> Result<()> {
    match command {
        BenchCommand::Score(args) => bench_score(args),
        BenchCommand::Train(args) => bench_train(args),
        BenchCommand::Crypto(args) => bench_crypto(args),
        BenchCommand::Localnet(args) => bench_localnet(args),
        BenchCommand::Corpus(args) => bench_corpus(args),
        BenchCommand::Host(args) => bench_host(args),
        BenchCommand::Submitter(args) => super::submitter_bench::bench_submitter(args),
    }
}

/// Writes `size_mb` of JSON lines whose documents are 1–8 KiB of printable text.
pub fn synthetic_jsonl(path: &std::path::Path, size_mb: u64) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut state = 7u64;
    let mut written = 0u64;
    let mut text = String::new();
    while written < size_mb << 20 {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let len = 1024 + (state >> 33) as usize % 7168;
        text.clear();
        for i in 0..len {
            text.push((b'a' + ((state >> (i % 48)) as u8 ^ i as u8) % 26) as char);
        }
        let line = format!("{{\"content\": \"{text}\"}}\n");
        out.write_all(line.as_bytes())?;
        written += line.len() as u64;
    }
    out.flush()?;
    Ok(())
}

/// A Stack-v2-like dataset on a loopback fake Hub: `files` Parquet files of blob ids (250 rows
/// per row group) and their 1–8 KiB documents, gzip-compressed, in bucket `swh` under
/// `content/`. Returns the server and the text bytes it holds.
fn fake_stack(
    files: usize,
    rows: usize,
    latency: std::time::Duration,
) -> (somatrain_hub::fake::FakeHub, u64) {
    use somatrain_hub::fake::{FakeDataset, FakeHub, gzip, parquet_of_strings};
    let fake = FakeHub::start(None, latency);
    let mut state = 11u64;
    let mut text_bytes = 0;
    let mut parquet = std::collections::BTreeMap::new();
    for file in 0..files {
        let mut table = Vec::with_capacity(rows);
        for row in 0..rows {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let len = 1024 + (state >> 33) as usize % 7168;
            let text: String = (0..len)
                .map(|i| {
                    if i % 64 == 63 {
                        '\n'
                    } else {
                        (b'a' + ((state >> (i % 48)) as u8 ^ i as u8) % 26) as char
                    }
                })
                .collect();
            text_bytes += len as u64;
            let id = format!("{:040x}", (file as u128) << 64 | row as u128);
            fake.put_object(&format!("swh/content/{id}"), gzip(text.as_bytes()));
            table.push(vec![Some(id), Some("UTF-8".to_string())]);
        }
        parquet.insert(
            format!("data/Synthetic/train-{file:05}.parquet"),
            bytes_of(parquet_of_strings(
                &["blob_id", "src_encoding"],
                &table,
                250,
            )),
        );
    }
    fake.add_dataset(FakeDataset {
        repo: "bench/stack-like".into(),
        commit: "0000000000000000000000000000000000000001".into(),
        files: parquet,
        configs: None,
    });
    (fake, text_bytes)
}

fn bytes_of(bytes: Vec<u8>) -> somatrain_hub::fake::Bytes {
    somatrain_hub::fake::Bytes::from(bytes)
}

/// Text streamed from a Hub dataset (the fake one or a real one): MB/s of document bytes
/// delivered as sequences, and requests per MB.
fn bench_corpus_hub(args: CorpusBenchArgs) -> Result<()> {
    use somatrain_hub::{BlobSource, Content, DatasetRef};
    use somatrain_train::corpus::{CorpusConfig, Position, Source, TrainStream};
    let latency = std::time::Duration::from_millis(args.latency_ms);
    let mb = args.max_mb.max(1);
    let fake = args
        .hub_fake
        .then(|| fake_stack(4, (mb as usize * 1000 / 4 / 4).max(50) + 50, latency));
    let source = match &fake {
        Some((fake, _)) => Source::Hub {
            dataset: DatasetRef {
                repo: "bench/stack-like".into(),
                config: None,
                split: "train".into(),
                revision: "main".into(),
                endpoint: Some(fake.endpoint()),
            },
            content: Content::Blobs(BlobSource {
                location: "s3://swh/content".into(),
                endpoint: Some(fake.endpoint()),
                in_flight: args.hub.blobs_in_flight.max(1),
            }),
        },
        None => args.hub.source()?.expect("checked by the caller"),
    };
    let Source::Hub { content, .. } = &source else {
        unreachable!("a Hub source")
    };
    let blobs = matches!(content, Content::Blobs(_));
    let mut config = CorpusConfig::new(vec![source.clone()]);
    config.shuffle_buffer = args.shuffle_buffer;
    config.heldout_per_mille = 0;
    let traffic_before = somatrain_hub::traffic();
    let start = Instant::now();
    let mut stream = TrainStream::open(config, Position::default())?;
    let mut text = 0u64;
    let mut sequences = 0u64;
    while text < mb << 20 && stream.epoch() == 0 {
        let sequence = stream.next_sequence()?;
        text += sequence.tokens.iter().filter(|&&t| t < 256).count() as u64;
        sequences += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    let traffic = somatrain_hub::traffic();
    let requests = traffic.requests - traffic_before.requests;
    let mb_delivered = text as f64 / 1e6;
    let out = serde_json::json!({
        "bench": "corpus-hub",
        "source": if args.hub_fake { "fake Hub and bucket on loopback" } else { "the Hub" },
        "blob_id": blobs,
        "latency_ms_added": if args.hub_fake { args.latency_ms } else { 0 },
        "blobs_in_flight": args.hub.blobs_in_flight,
        "text_bytes": text,
        "sequences": sequences,
        "seconds": secs,
        "mb_per_s": mb_delivered / secs,
        "goal_mb_per_s": 0.64,
        "requests": requests,
        "requests_per_mb": requests as f64 / mb_delivered,
        "bytes_fetched": traffic.bytes - traffic_before.bytes,
        "peak_rss_bytes": peak_rss_bytes(),
    });
    println!("{out}");
    Ok(())
}

fn bench_corpus(args: CorpusBenchArgs) -> Result<()> {
    use somatrain_train::corpus::{CorpusConfig, Position, Source, TrainStream};
    if args.jsonl.is_some() && args.hub.hf_dataset.is_some() {
        bail!("give --jsonl or --hf-dataset, not both");
    }
    if args.hub_fake || args.hub.hf_dataset.is_some() {
        return bench_corpus_hub(args);
    }
    let scratch = tempfile::tempdir()?;
    let path = match args.jsonl {
        Some(path) => path,
        None => {
            let path = scratch.path().join("synthetic.jsonl");
            synthetic_jsonl(&path, args.size_mb)?;
            path
        }
    };
    let bytes = std::fs::metadata(&path)?.len();
    let mut config = CorpusConfig::new(vec![Source::Jsonl {
        path,
        field: "content".into(),
    }]);
    config.shuffle_buffer = args.shuffle_buffer;
    let start = Instant::now();
    let mut stream = TrainStream::open(config.clone(), Position::default())?;
    let mut sequences = 0u64;
    while stream.epoch() == 0 {
        stream.next_sequence()?;
        sequences += 1;
    }
    // The loop's last sequence was the first of the next epoch.
    sequences -= 1;
    let epoch_secs = start.elapsed().as_secs_f64();
    let half = sequences / 2;
    let mut stream = TrainStream::open(config.clone(), Position::default())?;
    for _ in 0..half {
        stream.next_sequence()?;
    }
    let position = stream.position();
    let saved = position.to_bytes();
    let start = Instant::now();
    let restored = Position::from_bytes(&saved).map_err(anyhow::Error::msg)?;
    let mut from_cursor = TrainStream::open(config.clone(), restored)?;
    let first = from_cursor.next_sequence()?;
    let cursor_secs = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let mut replayed =
        TrainStream::open(config, Position::replay(position.epoch, position.sequences))?;
    let same = replayed.next_sequence()? == first;
    let replay_secs = start.elapsed().as_secs_f64();
    if !same {
        bail!("the stream reopened from its cursor differs from the replayed one");
    }
    let out = serde_json::json!({
        "bench": "corpus",
        "bytes": bytes,
        "sequences_per_epoch": sequences,
        "sequences_per_s": sequences as f64 / epoch_secs,
        "mb_per_s": bytes as f64 / epoch_secs / 1e6,
        "cursor_bytes": saved.len(),
        "reopen_from_cursor_s": cursor_secs,
        "reopen_by_replay_s": replay_secs,
        "peak_rss_bytes": peak_rss_bytes(),
    });
    println!("{out}");
    Ok(())
}

fn bench_score(args: ScoreBenchArgs) -> Result<()> {
    if args.sequences == 0 || args.runs == 0 || args.batch_size == 0 || args.seq_len == 0 {
        bail!("--sequences, --runs, --batch-size and --seq-len must be positive");
    }
    let config = args.preset.config();
    eprintln!(
        "bench score: preset {} ({} parameters), {} sequences of {} in batches of {}, {} threads",
        args.preset,
        config.parameter_count(),
        args.sequences,
        args.seq_len,
        args.batch_size,
        rayon::current_num_threads()
    );
    let peak = super::matmul_peak_for(args.device, false)?;
    let memory_before = super::device_memory_reading(args.device);
    let weights = Weights::init(config, 0);
    let mut scorer = scorer_for(args.device, weights)?;
    // Source-like bytes: the data's content does not change the work done.
    let line = b"fn main() { let x = 42; }\n";
    let data: Vec<u8> = (0..args.sequences * args.seq_len)
        .map(|i| line[i % line.len()])
        .collect();
    let options = ScoreOptions {
        max_seq_len: args.seq_len,
        batch_size: args.batch_size,
        seed: 0,
    };
    score_data(scorer.as_mut(), &data, options, &mut |_, _| {})?;
    let mut times = Vec::new();
    for run in 0..args.runs {
        let start = Instant::now();
        let score = score_data(scorer.as_mut(), &data, options, &mut |_, _| {})?;
        let secs = start.elapsed().as_secs_f64();
        eprintln!(
            "run {run}: {secs:.3} s, {:.0} tokens/s (loss {:.4})",
            score.tokens as f64 / secs,
            score.loss
        );
        times.push(secs);
    }
    let tokens = args.sequences * args.seq_len;
    let flops = config.forward_flops(tokens as u64, args.seq_len as u64);
    let mut report = model_report("score", args.preset, tokens, flops, &mut times, peak);
    let memory = scoring_memory(memory_before, super::device_memory_reading(args.device));
    report["device_memory"] = serde_json::json!(memory);
    report["batch_uploads"] = serde_json::json!(super::batch_uploads(args.device));
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// The device memory a scoring bench added, from readings (`(free, total)`) before its model
/// was loaded and after its runs: libtorch's caching allocator keeps what it reserved, so the
/// difference is its peak. `None` on the CPU devices (see `peak_rss_bytes`), or where the
/// driver could not be read (said on stderr).
fn scoring_memory(
    before: Option<Result<(u64, u64), String>>,
    after: Option<Result<(u64, u64), String>>,
) -> Option<somatrain_train::trainer::DeviceMemory> {
    match (before?, after?) {
        (Ok((free_before, total)), Ok((free_after, _))) => {
            let memory = somatrain_train::trainer::DeviceMemory {
                bytes_in_use: total.saturating_sub(free_after),
                total_bytes: total,
                peak_bytes_reserved: free_before.saturating_sub(free_after),
            };
            eprintln!("{}", describe_memory(&memory));
            Some(memory)
        }
        (Err(why), _) | (_, Err(why)) => {
            eprintln!("device memory is not reported: {why}");
            None
        }
    }
}

fn describe_memory(memory: &somatrain_train::trainer::DeviceMemory) -> String {
    format!(
        "device memory: {:.2} of {:.2} GB in use, this bench's peak {:.2} GB",
        memory.bytes_in_use as f64 / 1e9,
        memory.total_bytes as f64 / 1e9,
        memory.peak_bytes_reserved as f64 / 1e9
    )
}

/// The JSON report of a model bench from the runs' durations (median taken).
fn model_report(
    bench: &'static str,
    preset: Preset,
    tokens: usize,
    flops_per_run: f64,
    times: &mut [f64],
    peak: f64,
) -> serde_json::Value {
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let gflops = flops_per_run / median / 1e9;
    let report = BenchReport {
        bench,
        preset: preset.to_string(),
        tokens,
        seconds_per_run: median,
        tokens_per_s: tokens as f64 / median,
        gflops_per_s: gflops,
        matmul_peak_gflops_per_s: peak,
        fraction_of_peak: gflops / peak,
        peak_rss_bytes: peak_rss_bytes(),
        threads: rayon::current_num_threads(),
    };
    serde_json::to_value(report).expect("a report serialises")
}

fn bench_train(args: TrainBenchArgs) -> Result<()> {
    use somatrain_model::config::SIGREG_SLICES;
    use somatrain_model::cpu::train::{TrainOptions, TrainPass};
    use somatrain_train::optim::{AdamState, OptimConfig};
    if args.runs == 0 || args.micro_batch == 0 || args.seq_len == 0 || args.accumulation == 0 {
        bail!("--runs, --micro-batch, --accumulation and --seq-len must be positive");
    }
    let config = args.preset.config();
    eprintln!(
        "bench train: preset {} ({} parameters), micro-batch {} x {}, accumulation {}, dropout {}, {} threads",
        args.preset,
        config.parameter_count(),
        args.micro_batch,
        args.seq_len,
        args.accumulation,
        args.dropout,
        rayon::current_num_threads()
    );
    let peak = super::matmul_peak_for(args.device, args.bf16)?;
    // MFU is quoted against both precisions where the device has bf16 products.
    let other_peak = match args.device {
        Device::Cpu => None,
        device => super::device_supports_bf16(device)?
            .then(|| super::matmul_peak_for(device, !args.bf16))
            .transpose()?,
    };
    let (peak_f32, peak_bf16) = if args.bf16 {
        (other_peak, Some(peak))
    } else {
        (Some(peak), other_peak)
    };
    let mut weights = Weights::init(config, 0);
    let mut grads = Weights::zeros(config);
    let mut adam = AdamState::new(&weights);
    let optim = OptimConfig::default();
    let line = b"fn main() { let x = 42; }\n";
    let data: Vec<u8> = (0..args.micro_batch * args.seq_len)
        .map(|i| line[i % line.len()])
        .collect();
    let batch = somatrain_data::batches(&data, args.seq_len, args.micro_batch)
        .next()
        .expect("one batch");
    if args.bf16_casts && !args.bf16 {
        bail!("--bf16-casts compares two ways of making bf16 weights: give --bf16 too");
    }
    let mut engine: Box<dyn somatrain_train::GradientEngine> = match args.device {
        Device::Cpu => Box::new(TrainPass::new()),
        other => super::device_gradient_engine_variant(
            other,
            args.bf16,
            super::EngineVariant {
                fused_optimizer: !args.per_tensor_optimizer,
                bf16_copies: !args.bf16_casts,
            },
        )?,
    };
    engine.start_run();
    // One optimizer step: its loss, and the seconds spent in the micro-batches and in the
    // optimizer (with its divergence check).
    let mut step =
        |engine: &mut dyn somatrain_train::GradientEngine, i: u64| -> Result<(f32, f64, f64)> {
            for (_, g) in grads.tensors_mut() {
                g.fill(0.0);
            }
            let noise = somatrain_noise::unit_column_noise(i, config.embedding_dim, SIGREG_SLICES);
            let start = Instant::now();
            let mut outputs = Vec::with_capacity(args.accumulation);
            for micro in 0..args.accumulation {
                let options = TrainOptions {
                    dropout: args.dropout,
                    dropout_key: i * args.accumulation as u64 + micro as u64,
                    grad_scale: 1.0 / args.accumulation as f32,
                    ..TrainOptions::default()
                };
                let out = engine
                    .loss_and_grad(&weights, i, &batch, &noise, options, &mut grads)
                    .map_err(|e| e.with_accumulation(args.accumulation))?;
                outputs.push(out);
            }
            // The step's losses, read once as the trainer reads them.
            engine.step_losses(&mut outputs)?;
            let loss = outputs
                .iter()
                .map(|out| out.loss / args.accumulation as f32)
                .sum::<f32>();
            let micro_secs = start.elapsed().as_secs_f64();
            let start = Instant::now();
            let stats = engine.optimizer_step(&optim, &mut weights, &mut adam, &mut grads)?;
            if let Some(name) = engine.first_nonfinite_parameter(&weights)? {
                bail!("step {i}: {name} is not finite (|g| {})", stats.grad_norm);
            }
            Ok((loss, micro_secs, start.elapsed().as_secs_f64()))
        };
    step(engine.as_mut(), 0)?;
    let transfers_before = engine.transfers().unwrap_or_default();
    let mut times = Vec::new();
    let (mut micro_total, mut optimizer_total) = (0f64, 0f64);
    for run in 0..args.runs {
        let start = Instant::now();
        let (loss, micro_secs, optimizer_secs) = step(engine.as_mut(), run as u64 + 1)?;
        let secs = start.elapsed().as_secs_f64();
        micro_total += micro_secs;
        optimizer_total += optimizer_secs;
        eprintln!(
            "step {run}: {secs:.3} s ({micro_secs:.3} s micro-batches, {optimizer_secs:.3} s optimizer), {:.0} tokens/s (loss {loss:.4})",
            (batch.token_count() * args.accumulation) as f64 / secs
        );
        times.push(secs);
    }
    let memory = engine.device_memory();
    if let Some(memory) = &memory {
        eprintln!("{}", describe_memory(memory));
    }
    let tokens = batch.token_count() * args.accumulation;
    // Backward costs about twice the forward: 3x the forward FLOPs per step.
    let flops = 3.0 * config.forward_flops(tokens as u64, args.seq_len as u64);
    let runs = args.runs as f64;
    let split = engine.transfers().map(|after| {
        let up = after.upload_seconds - transfers_before.upload_seconds;
        let read = after.read_seconds - transfers_before.read_seconds;
        let micro = micro_total / runs;
        serde_json::json!({
            // Per optimizer step, averaged over the timed steps.
            "micro_batches_s": micro,
            "optimizer_s": optimizer_total / runs,
            "uploads_s": up / runs,
            "waiting_for_device_s": read / runs,
            "host_dispatch_s": (micro_total + optimizer_total - up - read).max(0.0) / runs,
            "host_to_device_bytes": (after.host_to_device_bytes - transfers_before.host_to_device_bytes) as f64 / runs,
            "device_to_host_bytes": (after.device_to_host_bytes - transfers_before.device_to_host_bytes) as f64 / runs,
        })
    });
    let mut report = model_report("train", args.preset, tokens, flops, &mut times, peak);
    let gflops = report["gflops_per_s"].as_f64().unwrap_or(0.0);
    report["precision"] = serde_json::json!(if args.bf16 { "bf16" } else { "f32" });
    // After the steps: a fused optimizer that libtorch refused reads "per-tensor".
    report["optimizer"] = serde_json::json!(engine.optimizer_kind());
    report["bf16_weights"] = serde_json::json!(engine.bf16_weights());
    // After the steps too: "waiting" where libtorch refused to queue a batch's copy.
    report["batch_uploads"] = serde_json::json!(super::batch_uploads(args.device));
    report["micro_batch"] = serde_json::json!(args.micro_batch);
    report["accumulation"] = serde_json::json!(args.accumulation);
    report["matmul_peak_f32_gflops_per_s"] = serde_json::json!(peak_f32);
    report["matmul_peak_bf16_gflops_per_s"] = serde_json::json!(peak_bf16);
    report["mfu_f32"] = serde_json::json!(peak_f32.map(|p| gflops / p));
    report["mfu_bf16"] = serde_json::json!(peak_bf16.map(|p| gflops / p));
    report["time_split"] = serde_json::json!(split);
    report["device_memory"] = serde_json::json!(memory);
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// Median seconds of `runs` calls of `work`.
fn median_secs(runs: usize, mut work: impl FnMut()) -> f64 {
    let mut times: Vec<f64> = (0..runs.max(1))
        .map(|_| {
            let start = Instant::now();
            work();
            start.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn bench_host(args: HostBenchArgs) -> Result<()> {
    use somatrain_model::config::SIGREG_SLICES;
    use somatrain_model::cpu::kernels::{Dropout, rope_tables, rope_timescales};
    use somatrain_train::corpus::{CorpusConfig, Position, Source, TrainStream};
    if args.runs == 0 || args.micro_batch == 0 || args.seq_len == 0 {
        bail!("--runs, --micro-batch and --seq-len must be positive");
    }
    let config = args.preset.config();
    let (b, t) = (args.micro_batch, args.seq_len);
    let scratch = tempfile::tempdir()?;
    let corpus = scratch.path().join("corpus.jsonl");
    synthetic_jsonl(&corpus, 16)?;
    let mut stream = TrainStream::open(
        CorpusConfig {
            max_seq_len: t,
            ..CorpusConfig::new(vec![Source::Jsonl {
                path: corpus,
                field: "content".into(),
            }])
        },
        Position::default(),
    )?;
    let mut batch = stream.next_batch(b)?;
    let next_batch = median_secs(args.runs, || {
        batch = stream.next_batch(b).expect("the synthetic corpus streams");
    });
    // What goes up per micro-batch: ids, positions and targets widened to i64.
    let widen = median_secs(args.runs, || {
        let ids: Vec<i64> = batch.tokens.iter().map(|&x| x as i64).collect();
        let pos: Vec<i64> = batch.positions.iter().map(|&x| x as i64).collect();
        let tgt: Vec<i64> = batch.targets.iter().map(|&x| x as i64).collect();
        std::hint::black_box((ids, pos, tgt));
    });
    let noise = median_secs(args.runs, || {
        std::hint::black_box(somatrain_noise::unit_column_noise(
            1,
            config.embedding_dim,
            SIGREG_SLICES,
        ));
    });
    // RoPE rows are made on the host once per position: 1024 of them, once per run.
    let timescales = rope_timescales(config.head_dim());
    let positions: Vec<u32> = (0..t as u32).collect();
    let rope = median_secs(args.runs, || {
        std::hint::black_box(rope_tables(&positions, &timescales));
    });
    // What the device path no longer does: one micro-batch's dropout masks on the host.
    let (h, d, f, layers) = (
        config.num_heads,
        config.embedding_dim,
        config.pwff_hidden_dim,
        config.num_layers,
    );
    let mask_elements = layers * (b * h * t * t + 2 * b * t * d + b * t * f);
    let drop = Dropout { rate: 0.1, key: 3 };
    let per_layer = mask_elements / layers;
    let host_masks = median_secs(1, || {
        for _ in 0..layers {
            std::hint::black_box(drop.dropped(per_layer));
        }
    });
    let dispatch = match libtorch_graph_dispatch(config, args.runs) {
        Ok(measured) => measured,
        Err(e) => {
            eprintln!("libtorch's dispatch is not measured: {e:#}");
            serde_json::Value::Null
        }
    };
    let report = serde_json::json!({
        "bench": "host",
        "preset": args.preset.to_string(),
        "micro_batch": b,
        "seq_len": t,
        "threads": rayon::current_num_threads(),
        "per_micro_batch_s": {
            "next_batch": next_batch,
            "widen_batch_to_i64": widen,
        },
        "per_step_s": { "sigreg_projections": noise },
        "per_run_s": { "rope_rows_for_1024_positions": rope },
        "libtorch_dispatch": dispatch,
        "replaced": {
            "host_dropout_masks_per_micro_batch_s": host_masks,
            "mask_elements_per_micro_batch": mask_elements,
            "mask_elements_per_s": mask_elements as f64 / host_masks,
        },
    });
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// The host's own work per micro-batch and per optimizer step of `config`'s op graph on a
/// libtorch device, measured on libtorch's CPU with the same layers and heads at a width and
/// length so small (8 per head, 8 tokens) that the arithmetic is negligible: what remains is
/// dispatching each op, autograd's bookkeeping and allocation, which a GPU's host pays as well
/// (before the driver's launch of each kernel). f32, bf16 (with the weights' bf16 copies) and
/// bf16 with casts in every micro-batch; each with dropout 0.1, where libtorch's CPU attention
/// falls back to its unfused kernel (more ops than CUDA's flash kernel, which takes dropout
/// inside), and with dropout 0 (fused attention, as on CUDA, but without the three other
/// dropout ops a layer has there). Medians of `runs` steps of 4 micro-batches.
fn libtorch_graph_dispatch(config: ModelConfig, runs: usize) -> Result<serde_json::Value> {
    use somatrain_model::config::SIGREG_SLICES;
    use somatrain_model::cpu::train::TrainOptions;
    let shape = ModelConfig {
        embedding_dim: 8 * config.num_heads,
        pwff_hidden_dim: 32 * config.num_heads,
        ..config
    };
    let (seq_len, micro_batch, accumulation) = (8, 1, 4);
    let data: Vec<u8> = (0..(seq_len * micro_batch) as u32)
        .map(|i| (i * 37 + 11) as u8)
        .collect();
    let batch = somatrain_data::batches(&data, seq_len, micro_batch)
        .next()
        .expect("one batch");
    let noise = somatrain_noise::unit_column_noise(1, shape.embedding_dim, SIGREG_SLICES);
    let optim = somatrain_train::optim::OptimConfig::default();
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut report = serde_json::json!({
        "layers": shape.num_layers,
        "heads": shape.num_heads,
        "measured_on": "libtorch's CPU, 8 tokens of width 8 per head",
    });
    for (dropout, label) in [(0.1f32, "dropout_0.1"), (0.0, "dropout_0")] {
        for (name, bf16, bf16_copies) in [
            ("f32", false, true),
            ("bf16", true, true),
            ("bf16_casts", true, false),
        ] {
            let variant = super::EngineVariant {
                bf16_copies,
                ..Default::default()
            };
            let mut engine =
                super::device_gradient_engine_variant(Device::TorchCpu, bf16, variant)?;
            engine.start_run();
            let mut weights = Weights::init(shape, 7);
            let mut adam = somatrain_train::optim::AdamState::new(&weights);
            let mut grads = Weights::zeros(shape);
            let (mut micro, mut optimizer) = (Vec::new(), Vec::new());
            // One warm-up step, then `runs` timed ones.
            for step in 0..=runs as u64 {
                let mut outputs = Vec::new();
                for m in 0..accumulation as u64 {
                    let options = TrainOptions {
                        dropout,
                        dropout_key: step * accumulation as u64 + m,
                        grad_scale: 1.0 / accumulation as f32,
                        ..TrainOptions::default()
                    };
                    let start = Instant::now();
                    outputs.push(
                        engine
                            .loss_and_grad(&weights, step, &batch, &noise, options, &mut grads)?,
                    );
                    if step > 0 {
                        micro.push(start.elapsed().as_secs_f64());
                    }
                }
                engine.step_losses(&mut outputs)?;
                let start = Instant::now();
                engine.optimizer_step(&optim, &mut weights, &mut adam, &mut grads)?;
                if step > 0 {
                    optimizer.push(start.elapsed().as_secs_f64());
                }
            }
            report[label][name] = serde_json::json!({
                "micro_batch_s": median(micro),
                "optimizer_step_s": median(optimizer),
            });
        }
    }
    Ok(report)
}

fn bench_crypto(args: CryptoBenchArgs) -> Result<()> {
    use somatrain_protocol::EncryptionKey;
    use somatrain_protocol::crypto::encrypt_stream;
    if args.size_mb == 0 || args.runs == 0 {
        bail!("--size-mb and --runs must be positive");
    }
    let bytes = args.size_mb << 20;
    let key = EncryptionKey::generate();
    // Time the input generation alone, to subtract it from the measurement.
    let start = Instant::now();
    std::io::copy(
        &mut SyntheticReader {
            remaining: bytes,
            state: 1,
        },
        &mut std::io::sink(),
    )?;
    let generate_secs = start.elapsed().as_secs_f64();
    let mut times = Vec::new();
    for run in 0..args.runs {
        let start = Instant::now();
        let reader = SyntheticReader {
            remaining: bytes,
            state: 1,
        };
        let summary = encrypt_stream(&key, reader, std::io::sink())?;
        let secs = (start.elapsed().as_secs_f64() - generate_secs).max(1e-9);
        eprintln!(
            "run {run}: {:.2} GB/s (commitment {})",
            bytes as f64 / secs / 1e9,
            summary.output_commitment
        );
        times.push(secs);
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let out = serde_json::json!({
        "bench": "crypto",
        "bytes": bytes,
        "seconds_per_run": median,
        "gb_per_s": bytes as f64 / median / 1e9,
        "peak_rss_bytes": peak_rss_bytes(),
    });
    println!("{out}");
    Ok(())
}

fn bench_localnet(args: LocalnetBenchArgs) -> Result<()> {
    use somatrain_client::chain::{ChainClient, Endpoints};
    use somatrain_node::grpc::{Services, serve};
    use somatrain_node::ledger::Params;
    use somatrain_node::localnet::{Localnet, LocalnetConfig};
    use somatrain_protocol::{
        Keypair, ObjectRef, ObjectType, SignedTransaction, TransactionData, TransactionKind,
    };
    if args.accounts == 0 || args.transactions_per_account == 0 {
        bail!("--accounts and --transactions-per-account must be positive");
    }
    let dir = tempfile::tempdir()?;
    let config = LocalnetConfig {
        validators: 1,
        data_dir: dir.path().to_path_buf(),
        genesis: Params::default(),
    };
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    };
    let node = Localnet::open(&config, now())?;
    let keys: Vec<Keypair> = (0..args.accounts).map(|_| Keypair::generate()).collect();
    let mut gas: Vec<ObjectRef> = Vec::with_capacity(keys.len());
    for k in &keys {
        node.faucet(k.address(), now())?;
        let coin = node.read(|l| {
            l.owned_objects(&k.address(), Some(ObjectType::Coin))
                .next()
                .map(|o| o.reference())
        });
        gas.push(anyhow::Context::context(coin, "the faucet paid no coin")??);
    }
    // The node on the runtime `somatrain localnet` runs it on; the load on another, as its
    // clients would be elsewhere.
    let node_runtime = somatrain_node::limits::runtime()?;
    let rpc = node_runtime.block_on(async {
        let mut listeners = Vec::new();
        for _ in 0..4 {
            listeners.push(tokio::net::TcpListener::bind("127.0.0.1:0").await?);
        }
        let rpc = format!("http://{}", listeners[0].local_addr()?);
        let listeners: [tokio::net::TcpListener; 4] = listeners
            .try_into()
            .map_err(|_| anyhow::anyhow!("four listeners"))?;
        let services = Services {
            node: node.clone(),
            scorer: None,
            verify_submissions: false,
            weight_checks: None,
            closing: Default::default(),
            connection_limits: somatrain_node::limits::ConnectionLimits::for_this_process(),
            execution_slots: Default::default(),
        };
        tokio::spawn(serve(services, listeners, std::future::pending()));
        anyhow::Ok(rpc)
    })?;
    // A reader apart from the writers: one balance query every 5 ms on its own connection, for
    // as long as the writes run. Its latency is what a reader sees while writes run at full
    // rate; the writers' own reads also wait behind their clients' queue.
    let writing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let probe = {
        let writing = writing.clone();
        let rpc = rpc.clone();
        let watched = keys[0].address();
        std::thread::spawn(move || -> Result<Vec<f64>> {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let client = ChainClient::new(Endpoints::parse(&rpc)?)?;
                let mut latencies = Vec::new();
                while writing.load(std::sync::atomic::Ordering::Relaxed) {
                    let start = Instant::now();
                    client.balance(&watched).await?;
                    latencies.push(start.elapsed().as_secs_f64());
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Ok(latencies)
            })
        })
    };
    let runtime = tokio::runtime::Runtime::new()?;
    let (latencies, acknowledged, secs) = runtime.block_on(async {
        // A few connections, as a few client processes would open.
        let clients: Vec<ChainClient> = (0..8)
            .map(|_| ChainClient::new(Endpoints::parse(&rpc)?))
            .collect::<Result<_, _>>()?;
        let sink = Keypair::generate().address();
        let start = Instant::now();
        let mut tasks = Vec::new();
        for (i, (k, mut coin)) in keys.into_iter().zip(gas).enumerate() {
            let client = clients[i % clients.len()].clone();
            let n = args.transactions_per_account;
            tasks.push(tokio::spawn(async move {
                let mut out = Vec::new();
                for _ in 0..n {
                    let tx = SignedTransaction::sign(
                        &k,
                        TransactionData::new(
                            TransactionKind::TransferCoin(TransferCoin {
                                coin,
                                amount: Some(1),
                                recipient: sink,
                            }),
                            k.address(),
                            vec![coin],
                        ),
                    );
                    let t0 = Instant::now();
                    let result = client.execute(&tx).await;
                    let ok = matches!(&result, Ok(e) if e.status().is_success());
                    let write = t0.elapsed().as_secs_f64();
                    // A read beside the writes: the sender's balance.
                    let t1 = Instant::now();
                    let read = client
                        .balance(&k.address())
                        .await
                        .ok()
                        .map(|_| t1.elapsed().as_secs_f64());
                    out.push((write, read, ok, tx.digest()));
                    // The coin's next reference, read from the effects.
                    let Some(next) = result.ok().and_then(|e| {
                        e.effects
                            .changed_objects
                            .iter()
                            .find(|c| c.id == coin.id)
                            .and_then(|c| c.output)
                            .map(|o| ObjectRef {
                                id: coin.id,
                                version: o.version,
                                digest: o.digest,
                            })
                    }) else {
                        break;
                    };
                    coin = next;
                }
                out
            }));
        }
        let mut latencies = Vec::new();
        let mut reads = Vec::new();
        let mut acknowledged = Vec::new();
        for t in tasks {
            for (latency, read, ok, digest) in t.await? {
                latencies.push(latency);
                reads.extend(read);
                if ok {
                    acknowledged.push(digest);
                }
            }
        }
        anyhow::Ok((
            (latencies, reads),
            acknowledged,
            start.elapsed().as_secs_f64(),
        ))
    })?;
    writing.store(false, std::sync::atomic::Ordering::Relaxed);
    let probe_reads = probe
        .join()
        .map_err(|_| anyhow::anyhow!("the reader thread panicked"))?
        .context("the reader beside the writes")?;
    let (latencies, reads) = latencies;
    let total = args.accounts * args.transactions_per_account as usize;
    let lost = acknowledged
        .iter()
        .filter(|d| node.transaction(d).ok().flatten().is_none())
        .count();
    let quantile = |values: &[f64], q: f64| {
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        sorted
            .get(((sorted.len() as f64 * q) as usize).min(sorted.len().saturating_sub(1)))
            .map_or(f64::NAN, |v| v * 1e3)
    };
    let p = |q: f64| quantile(&latencies, q);
    let conserved = node.read(|l| l.accounted_supply() == l.system.total_supply as u128);
    let out = serde_json::json!({
        "bench": "localnet",
        "protocol": "grpc",
        "accounts": args.accounts,
        "transactions": total,
        "acknowledged": acknowledged.len(),
        "lost": lost,
        "supply_conserved": conserved,
        "seconds": secs,
        "tx_per_s": acknowledged.len() as f64 / secs,
        "p50_ms": p(0.5),
        "p99_ms": p(0.99),
        "reads": probe_reads.len(),
        "read_p50_ms": quantile(&probe_reads, 0.5),
        "read_p99_ms": quantile(&probe_reads, 0.99),
        "read_max_ms": quantile(&probe_reads, 1.0),
        "writer_reads": reads.len(),
        "writer_read_p50_ms": quantile(&reads, 0.5),
        "writer_read_p99_ms": quantile(&reads, 0.99),
        "peak_rss_bytes": peak_rss_bytes(),
    });
    println!("{out}");
    if lost > 0 || !conserved || acknowledged.len() != total {
        bail!(
            "{lost} acknowledged transactions lost, {} not executed, supply conserved: {conserved}",
            total - acknowledged.len()
        );
    }
    Ok(())
}

/// Best GFLOP/s of a square f32 product over a few repetitions, all threads.
pub fn matmul_peak_gflops() -> f64 {
    let n = 1536;
    let a: Vec<f32> = (0..n * n)
        .map(|i| ((i % 97) as f32 - 48.0) / 97.0)
        .collect();
    let b: Vec<f32> = (0..n * n)
        .map(|i| ((i % 89) as f32 - 44.0) / 89.0)
        .collect();
    let mut c = vec![0f32; n * n];
    let mut best = 0f64;
    for _ in 0..6 {
        let start = Instant::now();
        // SAFETY: all three buffers are n x n row-major.
        unsafe {
            gemm::gemm(
                n,
                n,
                n,
                c.as_mut_ptr(),
                1,
                n as isize,
                false,
                a.as_ptr(),
                1,
                n as isize,
                b.as_ptr(),
                1,
                n as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(0),
            );
        }
        let secs = start.elapsed().as_secs_f64();
        best = best.max(2.0 * (n as f64).powi(3) / secs / 1e9);
    }
    std::hint::black_box(&c);
    best
}
