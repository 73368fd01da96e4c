//! `somatrain commit`, `reveal`, `run` (the unattended loop) and `localnet-cycle` (the whole
//! loop on an embedded localnet, in one command).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use somatrain_client::Client;
use somatrain_daemon::journal::Phase;
use somatrain_daemon::{EngineFactory, EpochAdvance, LoopConfig, Metrics, Publisher, RevealWindow};
use somatrain_protocol::Keypair;
use somatrain_protocol::tx::SHANNONS_PER_SOMA;
use somatrain_storage::{Backend, S3Config, Storage};
use somatrain_train::trainer::RoundArtifacts;

use super::train::TrainingOptions;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum StorageKind {
    /// S3 when S3_BUCKET is set, else the node's blob host.
    Auto,
    /// The localnet's blob host (`NODE/v1/blobs`).
    Node,
    /// A local directory served at --public-url.
    Dir,
    /// The bucket named by S3_BUCKET, S3_ACCESS_KEY_ID, S3_SECRET_ACCESS_KEY, S3_ENDPOINT_URL, S3_PUBLIC_URL.
    S3,
}

/// The node, the wallet and where encrypted weights are uploaded.
#[derive(Args, Clone)]
pub struct NetworkOptions {
    /// The node's URL.
    #[arg(long, env = "SOMATRAIN_NODE", default_value = "http://127.0.0.1:9000")]
    pub node: String,
    /// Keystore file (default: $HOME/.somatrain/keystore.json; SOMA_SECRET_KEY wins).
    #[arg(long, env = "SOMATRAIN_KEYSTORE")]
    pub keystore: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "auto")]
    pub storage: StorageKind,
    /// With --storage dir: the directory to write into.
    #[arg(long)]
    pub storage_dir: Option<PathBuf>,
    /// With --storage dir: the URL at which that directory is served.
    #[arg(long)]
    pub public_url: Option<String>,
}

impl NetworkOptions {
    pub fn backend(&self) -> Result<Backend> {
        let s3 = S3Config::from_env()?;
        Ok(match (self.storage, s3) {
            (StorageKind::Auto | StorageKind::S3, Some(s3)) => Backend::S3(s3),
            (StorageKind::S3, None) => {
                bail!("--storage s3 needs S3_BUCKET and its keys in the environment")
            }
            (StorageKind::Auto | StorageKind::Node, _) => Backend::Node {
                url: self.node.clone(),
            },
            (StorageKind::Dir, _) => Backend::Dir {
                dir: self
                    .storage_dir
                    .clone()
                    .context("--storage dir needs --storage-dir")?,
                public_base: self
                    .public_url
                    .clone()
                    .context("--storage dir needs --public-url")?,
            },
        })
    }

    fn publisher(&self, run_dir: &Path) -> Result<Publisher> {
        let keypair = super::wallet::load_keypair(self.keystore.as_deref())?;
        let storage = Storage::open(&self.backend()?)?;
        Ok(Publisher::open(
            Client::new(&self.node),
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
}

impl ModelOptions {
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
        let model_id = publisher
            .ensure_model(args.model.stake_shannons()?, args.model.commission_bps, args.model.architecture_version)
            .await?;
        if let Some(p) = &publisher.journal.pending
            && let Some(epoch) = p.commit_epoch
        {
            bail!(
                "round {} was committed in epoch {epoch} and is not revealed yet: run `somatrain reveal --run-dir {}` in epoch {}",
                p.round,
                args.run_dir.display(),
                epoch + 1
            );
        }
        if publisher.journal.pending.is_none() {
            let round_json = args.run_dir.join("round").join("round.json");
            let artifacts: Option<RoundArtifacts> = match std::fs::read(&round_json) {
                Ok(bytes) => Some(serde_json::from_slice(&bytes).with_context(|| format!("reading {}", round_json.display()))?),
                Err(_) => None,
            };
            let weights = match (&args.weights, &artifacts) {
                (Some(w), _) => w.clone(),
                (None, Some(a)) => a.weights.clone(),
                (None, None) => bail!("no --weights and no {} (run `somatrain train` first)", round_json.display()),
            };
            let embedding: Vec<f32> = match (&args.embedding, &artifacts) {
                (Some(path), _) => serde_json::from_slice(&std::fs::read(path).with_context(|| format!("reading {}", path.display()))?)
                    .with_context(|| format!("{} is not a JSON array of numbers", path.display()))?,
                (None, Some(a)) => a.embedding.clone(),
                (None, None) => bail!("give --embedding FILE.json"),
            };
            let step = artifacts.as_ref().map_or(0, |a| a.step);
            let heldout = artifacts.and_then(|a| a.heldout);
            let round = publisher.journal.rounds_revealed + 1;
            publisher.prepare(round, step, &weights, embedding, heldout).await?;
        }
        let epoch = publisher.commit_pending().await?;
        let pending = publisher.journal.pending.as_ref().expect("committed round");
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
    #[command(flatten)]
    network: NetworkOptions,
}

pub fn run_reveal(args: RevealArgs) -> Result<()> {
    runtime()?.block_on(async {
        let mut publisher = args.network.publisher(&args.run_dir)?;
        publisher.resolve_inflight().await?;
        loop {
            if publisher.journal.pending.is_none() {
                match &publisher.journal.last_revealed {
                    Some(r) => println!("round {} is revealed (epoch {}); nothing pending", r.round, r.reveal_epoch),
                    None => println!("nothing committed yet"),
                }
                return Ok(());
            }
            match publisher.reveal_window().await? {
                RevealWindow::Open { .. } => break,
                RevealWindow::NotYet { opens_ms } if args.wait => {
                    let now = somatrain_protocol::chain::now_ms();
                    tokio::time::sleep(Duration::from_millis(opens_ms.saturating_sub(now) + 25).min(Duration::from_secs(2))).await;
                }
                RevealWindow::NotYet { opens_ms } => {
                    let left = opens_ms.saturating_sub(somatrain_protocol::chain::now_ms()) / 1000;
                    bail!("the reveal window opens with the next epoch, in {left} s (pass --wait to wait for it)");
                }
                RevealWindow::Missed => {
                    publisher.abandon_pending()?;
                    bail!("the reveal window has closed; the commit is lost");
                }
            }
        }
        let epoch = publisher.reveal_pending().await?;
        let last = publisher.journal.last_revealed.as_ref().expect("just revealed");
        println!("round {} revealed in epoch {epoch}", last.round);
        Ok(())
    })
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
    /// Advance epochs through the node's admin endpoint as soon as a commit is in (localnet).
    #[arg(long)]
    advance_epochs: bool,
    #[arg(long, env = "SOMATRAIN_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Ask the node's faucet for funds when the balance cannot cover the stake (localnet).
    #[arg(long)]
    faucet: bool,
    /// Longest wait between looks at the node, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    poll_ms: u64,
    /// Warn when the reveal has not landed this many seconds before its deadline.
    #[arg(long, default_value_t = 600)]
    warn_before_s: u64,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9184).
    #[arg(long)]
    metrics_addr: Option<SocketAddr>,
    /// Where rounds train: cpu, or cuda (burn autodiff on GPU 0; build with --features cuda).
    #[arg(long, value_enum, default_value = "cpu")]
    device: super::Device,
    /// Mixed precision on CUDA: bf16 products, f32 master weights.
    #[arg(long)]
    bf16: bool,
}

pub fn run_loop(args: RunArgs) -> Result<()> {
    let settings = args.training.settings()?;
    let engine = match args.device {
        super::Device::Cpu if args.bf16 => bail!("--bf16 (mixed precision) needs --device cuda"),
        super::Device::Cpu => EngineFactory::cpu(),
        device => {
            // Fail now, not at the first round, when the device is unavailable.
            drop(super::device_gradient_engine(device, args.bf16)?);
            let bf16 = args.bf16;
            EngineFactory(Arc::new(move || {
                super::device_gradient_engine(device, bf16).map_err(|e| format!("{e:#}"))
            }))
        }
    };
    runtime()?.block_on(async {
        let mut publisher = args.network.publisher(&args.run_dir)?;
        if let Some(token) = &args.admin_token {
            publisher.client = publisher.client.clone().with_admin_token(token.clone());
        }
        let stake = args.model.stake_shannons()?;
        if args.faucet {
            fund(&publisher.client, publisher.keypair(), stake).await?;
        }
        let metrics = Arc::new(Metrics::default());
        if let Some(addr) = args.metrics_addr {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding {addr}"))?;
            tracing::info!("metrics on http://{}/metrics", listener.local_addr()?);
            let router = somatrain_daemon::metrics::router(metrics.clone());
            tokio::spawn(async move { axum::serve(listener, router).await });
        }
        let config = LoopConfig {
            run_dir: args.run_dir.clone(),
            train: settings,
            engine,
            steps_per_round: args.steps_per_round,
            rounds: args.rounds,
            stake,
            commission_bps: args.model.commission_bps,
            architecture_version: args.model.architecture_version,
            advance: if args.advance_epochs {
                EpochAdvance::Admin
            } else {
                EpochAdvance::Wait
            },
            poll: Duration::from_millis(args.poll_ms.max(10)),
            warn_before: Duration::from_secs(args.warn_before_s),
        };
        somatrain_daemon::run_loop::run(&mut publisher, &config, metrics).await?;
        print_loop_summary(&publisher).await
    })
}

/// Tops the wallet up from the localnet faucet until it covers `stake` plus fees.
async fn fund(client: &Client, keypair: &Keypair, stake: u64) -> Result<()> {
    let address = keypair.address();
    for _ in 0..100 {
        let balance = client.account(&address).await?.balance;
        if balance >= stake + SHANNONS_PER_SOMA / 10 {
            return Ok(());
        }
        client
            .faucet(&address)
            .await
            .context("asking the faucet for funds")?;
    }
    bail!("the faucet did not cover a stake of {stake} shannons")
}

async fn print_loop_summary(publisher: &Publisher) -> Result<()> {
    let journal = &publisher.journal;
    let Some(model_id) = journal.model_id else {
        return Ok(());
    };
    let model = publisher.client.model(&model_id).await?;
    println!(
        "model {model_id}: {:?}, stake {} SOMA",
        model.status,
        super::net::soma(model.stake)
    );
    println!(
        "rounds revealed: {} (missed reveals: {})",
        journal.rounds_revealed, journal.missed_reveals
    );
    if let Some(r) = &journal.last_revealed {
        print!(
            "last round {}: step {}, committed in epoch {}, revealed in epoch {}",
            r.round, r.step, r.commit_epoch, r.reveal_epoch
        );
        if let Some(h) = &r.heldout {
            print!(
                ", held-out loss {:.4} ({:.3} bits/byte)",
                h.loss, h.bits_per_byte
            );
        }
        println!("\nweights: {}", r.url);
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

/// The quickstart's localnet experience: an embedded node, a funded wallet, a few training
/// steps, commit, epoch change, reveal, and the model active.
pub fn run_cycle(args: CycleArgs) -> Result<()> {
    let settings = args.training()?.settings()?;
    let node_dir = args.dir.join("node");
    let run_dir = args.dir.join("run");
    std::fs::create_dir_all(&node_dir)
        .with_context(|| format!("creating {}", node_dir.display()))?;
    let token = somatrain_protocol::EncryptionKey::generate().to_base58();
    let node = somatrain_node::Node::open(&somatrain_node::NodeConfig {
        data_dir: node_dir.clone(),
        genesis: somatrain_protocol::chain::Params {
            embedding_dim: settings.model.embedding_dim,
            ..Default::default()
        },
        admin_token: Some(token.clone()),
    })
    .context("opening the embedded localnet")?;
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
    runtime()?.block_on(async move {
        let listener = bind_cycle_port(&node_dir, args.port).await?;
        let url = format!("http://{}", listener.local_addr()?);
        tokio::spawn(somatrain_node::serve(
            node,
            listener,
            std::future::pending(),
        ));
        eprintln!("localnet at {url} (data in {})", node_dir.display());
        let client = Client::new(&url).with_admin_token(token);
        let stake = SHANNONS_PER_SOMA;
        fund(&client, &keypair, stake).await?;
        println!("wallet {} funded", keypair.address());
        let storage = Storage::open(&Backend::Dir {
            dir: node_dir.join("blobs"),
            public_base: format!("{url}/v1/blobs"),
        })?;
        let mut publisher = Publisher::open(client.clone(), keypair, storage, &run_dir)?;
        let config = LoopConfig {
            run_dir: run_dir.clone(),
            train: settings,
            engine: EngineFactory::cpu(),
            steps_per_round: args.steps_per_round,
            rounds: Some(publisher.journal.rounds_revealed + args.rounds),
            stake,
            commission_bps: 0,
            architecture_version: 1,
            advance: EpochAdvance::Admin,
            poll: Duration::from_millis(200),
            warn_before: Duration::from_secs(60),
        };
        somatrain_daemon::run_loop::run(&mut publisher, &config, Arc::new(Metrics::default()))
            .await?;
        print_loop_summary(&publisher).await?;
        let model_id = publisher
            .journal
            .model_id
            .expect("the loop created a model");
        let model = client.model(&model_id).await?;
        if model.status != somatrain_protocol::chain::ModelStatus::Active {
            bail!("model {model_id} ended {:?}, not active", model.status);
        }
        println!(
            "epoch {}: model active. Run again to train further.",
            client.status().await?.epoch
        );
        debug_assert_eq!(publisher.journal.phase, Phase::Stopped);
        Ok(())
    })
}
