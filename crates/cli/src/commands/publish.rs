//! `somatrain commit`, `reveal`, `run` (the unattended loop) and `localnet-cycle` (the whole
//! loop on an embedded localnet, in one command). The loop itself is `somatrain_daemon::rounds`
//! and the cycle's flow `somatrain_daemon::cycle`; these commands parse, start and print.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use somatrain_client::chain::ChainClient;
use somatrain_daemon::{
    Adopt, EpochAdvance, LoopConfig, Metrics, NewModel, Publisher, RevealWindow, Served, now_ms,
    serve_once,
};
use somatrain_protocol::SHANNONS_PER_SOMA;
use somatrain_protocol::{Keypair, ObjectId};
use somatrain_train::trainer::RoundArtifacts;

use super::network::{ChainOptions, StorageOptions};
use super::train::TrainingOptions;

/// The chain, the wallet and where encrypted weights are uploaded.
#[derive(Args, Clone)]
pub struct NetworkOptions {
    #[command(flatten)]
    pub chain: ChainOptions,
    /// Keystore file (default: $HOME/.somatrain/keystore.json; SOMA_SECRET_KEY wins).
    #[arg(long, env = "SOMATRAIN_KEYSTORE")]
    pub keystore: Option<PathBuf>,
    #[command(flatten)]
    pub storage: StorageOptions,
}

impl NetworkOptions {
    fn publisher(&self, run_dir: &Path) -> Result<Publisher> {
        let keypair = super::wallet::load_keypair(self.keystore.as_deref())?;
        let storage = self.storage.open()?;
        Ok(Publisher::open(
            self.chain.client()?,
            keypair,
            storage,
            run_dir,
        )?)
    }
}

/// How a new model is created.
#[derive(Args, Clone)]
pub struct ModelOptions {
    /// Stake of a new model, in SOMA (the network's minimum is 1).
    #[arg(long, default_value_t = 1.0)]
    pub stake: f64,
    /// Commission of a new model, in basis points.
    #[arg(long, default_value_t = 0)]
    pub commission_bps: u64,
    #[arg(long, default_value_t = 1)]
    pub architecture_version: u64,
    /// Use this existing model of the wallet (created or active) when the journal names none.
    #[arg(long, conflicts_with = "new_model")]
    pub model_id: Option<String>,
    /// Create a new model even though the wallet has unfinished (created or pending) ones.
    #[arg(long)]
    pub new_model: bool,
}

impl ModelOptions {
    fn new_model(&self) -> Result<NewModel> {
        Ok(NewModel {
            stake: self.stake_shannons()?,
            commission_bps: self.commission_bps,
            architecture_version: self.architecture_version,
        })
    }

    fn adopt(&self) -> Result<Adopt> {
        Ok(match (&self.model_id, self.new_model) {
            (Some(id), _) => Adopt::Model(
                id.parse::<ObjectId>()
                    .map_err(|e| anyhow::anyhow!("--model-id: {e}"))?,
            ),
            (None, true) => Adopt::CreateNew,
            (None, false) => Adopt::Refuse,
        })
    }

    fn stake_shannons(&self) -> Result<u64> {
        if !(self.stake.is_finite() && self.stake > 0.0) {
            bail!("--stake must be a positive number of SOMA");
        }
        Ok((self.stake * SHANNONS_PER_SOMA as f64).round() as u64)
    }
}

#[derive(Args)]
pub struct CommitArgs {
    /// The run directory (its `round/` holds what `train` produced; the journal goes here).
    #[arg(long)]
    run_dir: PathBuf,
    /// Weights to publish (default: RUN_DIR/round/weights.safetensors).
    #[arg(long)]
    weights: Option<PathBuf>,
    /// The embedding, a JSON array (default: the one in RUN_DIR/round/round.json).
    #[arg(long)]
    embedding: Option<PathBuf>,
    #[command(flatten)]
    network: NetworkOptions,
    #[command(flatten)]
    model: ModelOptions,
}

pub fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Runtime::new()?)
}

pub fn run_commit(args: CommitArgs) -> Result<()> {
    runtime()?.block_on(async {
        let mut publisher = args.network.publisher(&args.run_dir)?;
        publisher.resolve_inflight().await?;
        if let Some(p) = &publisher.journal().pending
            && let Some(epoch) = p.commit_epoch
        {
            bail!(
                "round {} was committed in epoch {epoch} and is not revealed yet: run `somatrain reveal --run-dir {}` in epoch {}",
                p.round,
                args.run_dir.display(),
                epoch + 1
            );
        }
        if publisher.journal().pending.is_none() {
            // Everything is read and checked before the first on-chain action.
            let round_json = args.run_dir.join("round").join("round.json");
            let artifacts: Option<RoundArtifacts> = match std::fs::read(&round_json) {
                Ok(bytes) => Some(serde_json::from_slice(&bytes).with_context(|| format!("reading {}", round_json.display()))?),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => return Err(e).with_context(|| format!("reading {}", round_json.display())),
            };
            let weights = match (&args.weights, &artifacts) {
                (Some(w), _) => w.clone(),
                // Only the very file this round wrote, wherever the run directory now is.
                (None, Some(a)) => a.verified_weights(&args.run_dir)?,
                (None, None) => bail!("no --weights and no {} (run `somatrain train` first)", round_json.display()),
            };
            let embedding: Vec<f32> = match (&args.embedding, &artifacts) {
                (Some(path), _) => serde_json::from_slice(&super::read_input(path, super::MAX_EMBEDDING_JSON_BYTES)?)
                    .with_context(|| format!("{} is not a JSON array of numbers", path.display()))?,
                (None, Some(a)) => a.embedding.clone(),
                (None, None) => bail!("give --embedding FILE.json"),
            };
            let step = artifacts.as_ref().map_or(0, |a| a.step);
            let heldout = artifacts.and_then(|a| a.heldout);
            publisher.check_round(&weights, &embedding, heldout.as_ref()).await?;
            publisher.ensure_model(args.model.new_model()?, args.model.adopt()?).await?;
            let round = publisher.journal().rounds_revealed + 1;
            publisher.prepare(round, step, &weights, embedding, heldout).await?;
        }
        let model_id = publisher.journal().model_id.context("the journal names no model")?;
        let epoch = publisher.commit_pending().await?;
        let pending = publisher.journal().pending.as_ref().expect("committed round");
        println!("model {model_id}");
        println!("round {} committed in epoch {epoch}: {}", pending.round, pending.manifest.url);
        println!(
            "reveal in epoch {} with `somatrain reveal --run-dir {}` (a missed first reveal costs half the stake)",
            epoch + 1,
            args.run_dir.display()
        );
        Ok(())
    })
}

#[derive(Args)]
pub struct RevealArgs {
    #[arg(long)]
    run_dir: PathBuf,
    /// Wait for the reveal window to open instead of failing before it.
    #[arg(long)]
    wait: bool,
    /// With the journal lost: the model whose commit to reveal (default: the wallet's only one).
    #[arg(long)]
    model_id: Option<String>,
    /// With the journal lost: the commit's decryption key (Base58, or @FILE).
    #[arg(long)]
    decryption_key: Option<String>,
    /// With the journal lost: the committed embedding, a JSON array (default: the one in
    /// RUN_DIR/round/round.json).
    #[arg(long)]
    embedding: Option<PathBuf>,
    #[command(flatten)]
    network: NetworkOptions,
}

/// Attempts at serving the weights again after a reveal before `reveal` gives up (each is a
/// look at the URL and an upload with the storage's own retries).
const REVEAL_REUPLOAD_ATTEMPTS: u32 = 3;

pub fn run_reveal(args: RevealArgs) -> Result<()> {
    runtime()?.block_on(async {
        let mut publisher = args.network.publisher(&args.run_dir)?;
        publisher.resolve_inflight().await?;
        loop {
            let Some(pending) = publisher.journal().pending.clone() else {
                if publisher.journal().reupload.is_none() {
                    return reveal_without_journal(&mut publisher, &args).await;
                }
                return confirm_served(&mut publisher, &args.run_dir).await;
            };
            match publisher.reveal_window().await? {
                RevealWindow::Open { .. } => break,
                RevealWindow::NotYet { opens_ms } if args.wait => {
                    let now = now_ms();
                    tokio::time::sleep(Duration::from_millis(opens_ms.saturating_sub(now) + 25).min(Duration::from_secs(2))).await;
                }
                RevealWindow::NotYet { opens_ms } => {
                    let left = opens_ms.saturating_sub(now_ms()) / 1000;
                    bail!("the reveal window opens with the next epoch, in {left} s (pass --wait to wait for it)");
                }
                RevealWindow::Missed => {
                    publisher.abandon_pending()?;
                    let epoch = pending.commit_epoch.unwrap_or_default();
                    bail!(
                        "the reveal window of round {} (committed in epoch {epoch}) closed with epoch {}; the commit is lost",
                        pending.round,
                        epoch + 1
                    );
                }
            }
        }
        let epoch = publisher.reveal_pending().await?;
        let last = publisher.journal().last_revealed.as_ref().expect("just revealed");
        println!("round {} revealed in epoch {epoch}", last.round);
        confirm_served(&mut publisher, &args.run_dir).await
    })
}

/// After a reveal (or for one whose weights were left unserved): looks at the URL and uploads
/// the weights again until they read back whole, a few times; fails loudly if they do not.
async fn confirm_served(publisher: &mut Publisher, run_dir: &Path) -> Result<()> {
    let Some(upload) = publisher.journal().reupload.clone() else {
        return Ok(());
    };
    let storage = publisher.storage();
    let mut last = None;
    for attempt in 1..=REVEAL_REUPLOAD_ATTEMPTS {
        match serve_once(&storage, &upload).await {
            Served::Whole => {
                publisher.upload_confirmed(&upload)?;
                println!(
                    "the weights of round {} read back whole at {}",
                    upload.round, upload.manifest.url
                );
                return Ok(());
            }
            Served::Missing(e) if attempt < REVEAL_REUPLOAD_ATTEMPTS => {
                tokio::time::sleep(Duration::from_secs(2)).await;
                last = Some(e.to_string());
            }
            Served::Missing(e) | Served::Impossible(e) => {
                last = Some(e.to_string());
                break;
            }
        }
    }
    publisher.upload_missing(&upload)?;
    bail!(
        "round {} is revealed, but its weights are not served at {} ({}): validators that cannot fetch them report the model, and a quorum of reports slashes 95% of its stake. Run `somatrain reveal --run-dir {}` again (or keep `somatrain run` going) to upload them again from {}",
        upload.round,
        upload.manifest.url,
        last.unwrap_or_default(),
        run_dir.display(),
        upload.encrypted.display()
    )
}

/// `reveal` with no commit in the journal: a commit of this wallet's may still await its
/// reveal on chain (the journal was lost). It is revealed if its key is given, and named if not.
async fn reveal_without_journal(publisher: &mut Publisher, args: &RevealArgs) -> Result<()> {
    let on_chain = publisher.commits_on_chain().await?;
    if on_chain.is_empty() {
        match &publisher.journal().last_revealed {
            Some(r) => println!(
                "round {} is revealed (epoch {}); nothing pending",
                r.round, r.reveal_epoch
            ),
            None => println!("nothing committed yet"),
        }
        return Ok(());
    }
    let describe = |m: &somatrain_client::view::ModelView| {
        let epoch = m.pending.as_ref().map_or(0, |p| p.commit_epoch);
        format!(
            "model {} ({}, committed in epoch {epoch}, reveal in epoch {})",
            m.id,
            m.state.name(),
            epoch + 1
        )
    };
    let list: Vec<String> = on_chain.iter().map(describe).collect();
    let Some(key) = &args.decryption_key else {
        bail!(
            "this run directory's journal holds no commit, but this wallet has a commit awaiting its reveal on chain: {}. Its decryption key was only in the journal that committed it and is not at hand here: give it with --decryption-key KEY|@FILE (and --embedding FILE.json unless {} holds the committed round) to reveal it. A missed first reveal costs half the stake",
            list.join(", "),
            args.run_dir.join("round/round.json").display()
        );
    };
    let model = match &args.model_id {
        Some(id) => {
            let id: ObjectId = id.parse().map_err(|e| anyhow::anyhow!("--model-id: {e}"))?;
            on_chain.iter().find(|m| m.id == id).with_context(|| {
                format!(
                    "model {id} has no commit of this wallet awaiting a reveal; these do: {}",
                    list.join(", ")
                )
            })?
        }
        None if on_chain.len() == 1 => &on_chain[0],
        None => bail!(
            "several commits await a reveal: {}; pick one with --model-id",
            list.join(", ")
        ),
    };
    let key = super::crypto::parse_key(key)?;
    let embedding: Vec<f32> = match &args.embedding {
        Some(path) => {
            serde_json::from_slice(&super::read_input(path, super::MAX_EMBEDDING_JSON_BYTES)?)
                .with_context(|| format!("{} is not a JSON array of numbers", path.display()))?
        }
        None => {
            let round_json = args.run_dir.join("round").join("round.json");
            let bytes = super::read_input(&round_json, super::MAX_EMBEDDING_JSON_BYTES)
                .with_context(|| {
                    "give the committed embedding with --embedding FILE.json".to_string()
                })?;
            serde_json::from_slice::<RoundArtifacts>(&bytes)
                .with_context(|| format!("reading {}", round_json.display()))?
                .embedding
        }
    };
    let epoch = publisher
        .reveal_unjournaled(model, &key, &embedding)
        .await?;
    println!("model {} revealed in epoch {epoch}", model.id);
    Ok(())
}

#[derive(Args)]
pub struct RunArgs {
    /// The run directory: checkpoints, rounds, the journal and encrypted files.
    #[arg(long)]
    run_dir: PathBuf,
    #[command(flatten)]
    training: TrainingOptions,
    #[command(flatten)]
    network: NetworkOptions,
    #[command(flatten)]
    model: ModelOptions,
    /// Optimizer steps per round.
    #[arg(long, default_value_t = 100)]
    steps_per_round: u64,
    /// Stop after this many rounds are revealed in total (default: run until stopped).
    #[arg(long)]
    rounds: Option<u64>,
    /// Advance epochs through the localnet's admin service as soon as a commit is in.
    #[arg(long)]
    advance_epochs: bool,
    /// Ask the node's faucet for funds when the balance cannot cover the stake (localnet).
    #[arg(long)]
    faucet: bool,
    /// Longest wait between looks at the node, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    poll_ms: u64,
    /// Warn when the reveal has not landed this many seconds before its deadline.
    #[arg(long, default_value_t = 600)]
    warn_before_s: u64,
    /// Commit a round only if its held-out loss is at least this much below the last revealed
    /// round's; otherwise keep training (needs held-out data).
    #[arg(long)]
    min_improvement: Option<f32>,
    /// Serve the status page (`/`, `/status.json`, `/chart.svg`, `/metrics`) here; port 0
    /// picks a free port, printed at start. Loopback by default: the page names the model,
    /// its deadlines and the wallet's balance.
    #[arg(long, default_value = "127.0.0.1:0")]
    status_addr: SocketAddr,
    /// Serve the same on a second address too (e.g. 127.0.0.1:9184 for a Prometheus scraper).
    #[arg(long)]
    metrics_addr: Option<SocketAddr>,
    /// Where rounds train: cpu, or through libtorch (autograd and AdamW on the device; a build
    /// with --features torch): cuda, cuda:N or torch-cpu.
    #[arg(long, default_value = "cpu")]
    device: super::Device,
    /// Mixed precision on a libtorch device: bf16 products, f32 master weights.
    #[arg(long)]
    bf16: bool,
}

pub fn run_loop(args: RunArgs) -> Result<()> {
    let settings = args.training.settings(args.device)?;
    let engine = super::device_engines(args.device, args.bf16)?;
    super::stop_on_signals(
        settings.stop.clone(),
        "asked to stop: the round in training stops after its step in progress with its \
         checkpoint saved, nothing new is committed, and a committed round is revealed in its \
         window first (again to stop at once)",
    )?;
    runtime()?.block_on(async {
        let mut publisher = args.network.publisher(&args.run_dir)?;
        let new_model = args.model.new_model()?;
        if args.faucet {
            somatrain_daemon::cycle::fund(publisher.chain(), publisher.keypair(), new_model.stake)
                .await?;
        }
        let metrics = Arc::new(Metrics::default());
        let source = somatrain_daemon::status::StatusSource {
            run_dir: args.run_dir.clone(),
            metrics: metrics.clone(),
        };
        for addr in [Some(args.status_addr), args.metrics_addr]
            .into_iter()
            .flatten()
        {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding {addr}"))?;
            let bound = listener.local_addr()?;
            tracing::info!("status page on http://{bound}/ (also /status.json and /metrics)");
            let router = somatrain_daemon::status::router(source.clone());
            tokio::spawn(async move { axum::serve(listener, router).await });
        }
        let config = LoopConfig {
            run_dir: args.run_dir.clone(),
            train: settings,
            engine,
            steps_per_round: args.steps_per_round,
            rounds: args.rounds,
            new_model,
            adopt: args.model.adopt()?,
            advance: if args.advance_epochs {
                EpochAdvance::Admin
            } else {
                EpochAdvance::Wait
            },
            poll: Duration::from_millis(args.poll_ms.max(10)),
            warn_before: Duration::from_secs(args.warn_before_s),
            min_improvement: match args.min_improvement {
                Some(x) if !(x.is_finite() && x >= 0.0) => {
                    bail!("--min-improvement {x}: give a finite loss difference >= 0")
                }
                other => other,
            },
        };
        somatrain_daemon::rounds::run(&mut publisher, &config, metrics).await?;
        print_loop_summary(&publisher).await
    })
}

async fn print_loop_summary(publisher: &Publisher) -> Result<()> {
    for line in
        somatrain_daemon::cycle::loop_summary(publisher.chain(), publisher.journal()).await?
    {
        println!("{line}");
    }
    Ok(())
}

#[derive(Args)]
pub struct CycleArgs {
    /// Where the embedded localnet, the wallet and the run live (kept between invocations: a
    /// second invocation trains the same model further).
    #[arg(long, default_value = ".somatrain/cycle")]
    dir: PathBuf,
    /// Model shape (v1, medium, small, tiny).
    #[arg(long, default_value = "small")]
    preset: String,
    /// Corpus directories (default: the current directory's .rs, .md, .py and .txt files).
    #[arg(long = "corpus-dir")]
    corpus_dirs: Vec<PathBuf>,
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    #[arg(long, default_value_t = 4)]
    accumulation: usize,
    /// Optimizer steps per round.
    #[arg(long, default_value_t = 4)]
    steps_per_round: u64,
    /// Rounds to train, commit and reveal in this invocation.
    #[arg(long, default_value_t = 1)]
    rounds: u64,
    /// Port of the embedded localnet (0: the port this directory's localnet had last time, so
    /// the weights URLs of earlier rounds keep working, or any free port).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Where the rounds train and everything is scored (the localnet's scoring service and the
    /// submitter): cpu, or through libtorch (a build with --features torch): cuda, cuda:N or
    /// torch-cpu.
    #[arg(long, default_value = "cpu")]
    device: super::Device,
    /// Mixed precision on a libtorch device: bf16 products, f32 master weights.
    #[arg(long)]
    bf16: bool,
}

impl CycleArgs {
    fn training(&self) -> Result<TrainingOptions> {
        let mut argv: Vec<String> = ["--preset", &self.preset, "--seq-len"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        argv.push(self.seq_len.to_string());
        argv.extend(["--accumulation".into(), self.accumulation.to_string()]);
        argv.extend([
            "--lr".into(),
            "1e-3".into(),
            "--heldout-bytes".into(),
            "65536".into(),
        ]);
        argv.extend([
            "--heldout-per-mille".into(),
            "100".into(),
            "--log-every".into(),
            "1".into(),
        ]);
        if self.corpus_dirs.is_empty() {
            argv.extend(["--corpus-dir".into(), ".".into()]);
            for glob in ["**/*.rs", "**/*.md", "**/*.py", "**/*.txt"] {
                argv.extend(["--include".into(), glob.into()]);
            }
            for glob in ["target/**", ".git/**", ".somatrain/**", "node_modules/**"] {
                argv.extend(["--exclude".into(), glob.into()]);
            }
        }
        for dir in &self.corpus_dirs {
            argv.extend(["--corpus-dir".into(), dir.display().to_string()]);
        }
        TrainingOptions::from_flags(&argv)
    }
}

/// Binds the embedded localnet's port: `port`, or else the one recorded in `node_dir` by the
/// last run (published weights URLs name it), or else any free port; records the result.
async fn bind_cycle_port(node_dir: &Path, port: u16) -> Result<tokio::net::TcpListener> {
    let record = node_dir.join("port");
    let previous: Option<u16> = std::fs::read_to_string(&record)
        .ok()
        .and_then(|t| t.trim().parse().ok());
    let listener = match (port, previous) {
        (0, Some(previous)) => match tokio::net::TcpListener::bind(("127.0.0.1", previous)).await {
            Ok(listener) => listener,
            Err(e) => {
                eprintln!(
                    "port {previous} of the last run is taken ({e}); using another, so weights \
                     published in earlier rounds are not served under their URLs"
                );
                tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?
            }
        },
        _ => tokio::net::TcpListener::bind(("127.0.0.1", port)).await?,
    };
    let bound = listener.local_addr()?.port();
    if previous != Some(bound) {
        somatrain_daemon::write_private_file(&record, format!("{bound}\n").as_bytes())?;
    }
    Ok(listener)
}

/// The quickstart's localnet experience: an embedded localnet, a funded wallet, a few training
/// steps, commit, epoch change, reveal, and the model active.
pub fn run_cycle(args: CycleArgs) -> Result<()> {
    let settings = args.training()?.settings(args.device)?;
    let node_dir = args.dir.join("node");
    let run_dir = args.dir.join("run");
    std::fs::create_dir_all(&node_dir)
        .with_context(|| format!("creating {}", node_dir.display()))?;
    let wallet_path = args.dir.join("wallet.json");
    let keypair = match std::fs::read_to_string(&wallet_path) {
        Ok(text) => Keypair::from_secret_text(text.trim())
            .map_err(|_| anyhow::anyhow!("{} holds no valid key", wallet_path.display()))?,
        Err(_) => {
            let kp = Keypair::generate();
            somatrain_daemon::write_private_file(&wallet_path, kp.secret_hex().as_bytes())?;
            kp
        }
    };
    let engine = super::device_engines(args.device, args.bf16)?;
    let scorers = super::device_scorers(args.device)?;
    super::stop_on_signals(
        settings.stop.clone(),
        "asked to stop: the round in training stops after its step in progress with its \
         checkpoint saved, a committed round is revealed first, and the cycle ends there \
         (again to stop at once)",
    )?;
    runtime()?.block_on(async move {
        let blob_listener = bind_cycle_port(&node_dir, args.port).await?;
        let ports = super::localnet::loopback_ports();
        let genesis = somatrain_node::ledger::Params {
            embedding_dim: settings.model.embedding_dim as u64,
            ..Default::default()
        };
        let localnet = super::localnet::start(
            &node_dir,
            super::localnet::ChainSetup::new(genesis),
            false,
            scorers.clone(),
            ports,
            Some(super::localnet::BlobHost::new(blob_listener)),
            std::future::pending(),
        )
        .await?;
        let endpoints = localnet.endpoints();
        let blobs = localnet
            .blobs
            .clone()
            .expect("the cycle's localnet hosts blobs");
        eprintln!(
            "localnet at {} (blobs at {blobs}, data in {})",
            endpoints.rpc,
            node_dir.display()
        );
        let corpus = if args.corpus_dirs.is_empty() {
            vec![PathBuf::from(".")]
        } else {
            args.corpus_dirs.clone()
        };
        let cycle = somatrain_daemon::cycle::Cycle {
            chain: ChainClient::new(endpoints)?,
            keypair,
            blobs,
            run_dir,
            cache_dir: args.dir.join("cache"),
            corpus,
            train: settings,
            steps_per_round: args.steps_per_round,
            rounds: args.rounds,
            engine,
            scorers,
        };
        somatrain_daemon::cycle::run(cycle, &mut |line| println!("{line}")).await?;
        Ok(())
    })
}
