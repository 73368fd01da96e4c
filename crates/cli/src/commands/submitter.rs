//! `somatrain submitter`: the long-running data submitter (`somatrain-submitter`), with its
//! flags, signals, `/metrics` and the summary it prints when it stops.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use somatrain_protocol::SHANNONS_PER_SOMA;
use somatrain_submitter::metrics::Metrics;
use somatrain_submitter::{Limits, Settings, Submitter};

use super::model::parse_soma;
use super::publish::NetworkOptions;
use super::train::CorpusOptions;

#[derive(Args)]
pub struct SubmitterArgs {
    /// Journal, corpus cursor and queued pieces (one per wallet and chain).
    #[arg(long, default_value = ".somatrain/submitter")]
    state_dir: PathBuf,
    #[command(flatten)]
    corpus: CorpusOptions,
    /// Bytes per piece (at most the chain's submission size, 1 MiB).
    #[arg(long, default_value_t = 64 * 1024)]
    piece_bytes: usize,
    /// Pieces held in the shuffle buffer.
    #[arg(long, default_value_t = 64)]
    shuffle_buffer: usize,
    /// Seed of the corpus order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Where the models score: cpu, or through libtorch (a build with --features torch):
    /// cuda, cuda:N or torch-cpu.
    #[arg(long, default_value = "cpu")]
    device: super::Device,
    /// Where downloaded weights are kept, by checksum (default $HOME/.somatrain/cache/weights).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Evict the least recently used weights above this many GB on disk.
    #[arg(long, default_value_t = 50.0)]
    cache_max_gb: f64,
    /// Bond sent per epoch at most, in SOMA.
    #[arg(long, default_value = "10")]
    max_bond_per_epoch: String,
    /// Fees paid per epoch at most, in SOMA.
    #[arg(long, default_value = "1")]
    max_fees_per_epoch: String,
    /// Submissions per epoch at most.
    #[arg(long, default_value_t = 1000)]
    max_submissions_per_epoch: u64,
    /// Refresh the open targets after this many pieces (also after every hit and epoch).
    #[arg(long, default_value_t = 50)]
    refresh_every: u64,
    /// Merge coins when the wallet holds more than this many.
    #[arg(long, default_value_t = 16)]
    merge_coins_above: usize,
    /// Score and log hits; upload and submit nothing.
    #[arg(long)]
    dry_run: bool,
    /// Stop scoring after N pieces, settle every submission (claims included), then exit.
    #[arg(long, value_name = "N")]
    max_pieces: Option<u64>,
    /// A progress line every this many seconds.
    #[arg(long, default_value_t = 60)]
    progress_secs: u64,
    /// How often the chain is looked at while waiting (claims, new epochs), in milliseconds.
    #[arg(long, default_value_t = 2000)]
    poll_ms: u64,
    /// Serve Prometheus metrics at /metrics here (port 0 picks one, printed at start).
    #[arg(long)]
    metrics_addr: Option<SocketAddr>,
    #[command(flatten)]
    network: NetworkOptions,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run_submitter(args: SubmitterArgs) -> Result<()> {
    if args.piece_bytes == 0 {
        bail!("--piece-bytes must be positive");
    }
    if !(args.cache_max_gb.is_finite() && args.cache_max_gb > 0.0) {
        bail!("--cache-max-gb must be a positive number");
    }
    let corpus = args
        .corpus
        .config(0, args.shuffle_buffer.max(1), args.seed, args.piece_bytes)?;
    let limits = Limits {
        bond_per_epoch: parse_soma(&args.max_bond_per_epoch)?,
        fees_per_epoch: parse_soma(&args.max_fees_per_epoch)?,
        submissions_per_epoch: args.max_submissions_per_epoch,
    };
    let scorers = super::device_scorers(args.device)?;
    super::publish::runtime()?.block_on(async {
        let chain = args.network.chain.client()?;
        let max = chain.epoch_view().await?.params.max_submission_data_size;
        if args.piece_bytes as u64 > max {
            bail!(
                "--piece-bytes {} is over the chain's submission limit of {max} bytes",
                args.piece_bytes
            );
        }
        let keypair = super::wallet::load_keypair(args.network.keystore.as_deref())?;
        let storage = if args.dry_run {
            None
        } else {
            Some(args.network.storage.open()?)
        };
        let cache = somatrain_submit::ModelCache::with_scorers(
            &super::submit::weights_cache_dir(args.cache_dir.as_deref()),
            scorers,
        )
        .with_disk_limit((args.cache_max_gb * 1e9) as u64);
        let metrics = Arc::new(Metrics::default());
        if let Some(addr) = args.metrics_addr {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding {addr}"))?;
            let bound = listener.local_addr()?;
            println!("metrics http://{bound}/metrics");
            let router = somatrain_submitter::metrics::router(metrics.clone());
            tokio::spawn(async move { axum::serve(listener, router).await });
        }
        let stop = Arc::new(AtomicBool::new(false));
        {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                        .expect("a SIGTERM handler");
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
                tracing::info!("stopping after the current piece and transaction");
                stop.store(true, Ordering::Relaxed);
            });
        }
        let settings = Settings {
            state_dir: args.state_dir.clone(),
            corpus,
            limits,
            refresh_every: args.refresh_every.max(1),
            merge_coins_above: args.merge_coins_above,
            dry_run: args.dry_run,
            max_pieces: args.max_pieces,
            exit_when_scored: false,
            progress_every: Duration::from_secs(args.progress_secs.max(1)),
            poll: Duration::from_millis(args.poll_ms.max(10)),
        };
        let submitter =
            Submitter::open(chain, keypair, storage, cache, settings, metrics, stop).await?;
        let summary = submitter.run().await?;
        if args.json {
            println!("{}", serde_json::to_string(&summary)?);
        } else {
            println!(
                "{} pieces scored, {} hits: {} submitted, {} refused, {} dropped; {} claims \
                 brought {:.9} SOMA; {:.9} SOMA of bond outstanding; {} weights downloads",
                summary.pieces_scored,
                summary.hits,
                summary.submissions,
                summary.refused,
                summary.dropped,
                summary.claims,
                summary.claimed_shannons as f64 / SHANNONS_PER_SOMA as f64,
                summary.bond_outstanding as f64 / SHANNONS_PER_SOMA as f64,
                summary.weights_downloads
            );
        }
        Ok(())
    })
}
