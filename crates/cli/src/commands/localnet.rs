//! `somatrain localnet`: the single-node network over the SOMA network's own protocol (gRPC),
//! with the SDK's localnet ports as defaults, and the scorer behind its scoring service.

use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::Args;
use somatrain_model::score::{ScoreOptions, cosine_distance, score_data};
use somatrain_node::grpc::{Ports, ScoringBackend, Services};
use somatrain_node::ledger::Params;
use somatrain_node::localnet::{Localnet, LocalnetConfig};
use somatrain_node::weight_checks::{RevealedWeights, WeightChecker, WeightChecks};
use somatrain_protocol::Manifest;
use somatrain_protocol::crypto::{Commitment, EncryptionKey, decrypt_stream};
use somatrain_rpc::side::{ScoreRequest, ScoreResponse, from_bits, to_bits};
use tonic::Status;

#[derive(Args)]
pub struct LocalnetArgs {
    /// Where the chain's database, hosted blobs and the scorer's cache live.
    #[arg(long, default_value = ".somatrain/localnet")]
    data_dir: PathBuf,
    /// Embedding length models must reveal (2048 for V1; smaller for small-model localnets).
    #[arg(long, default_value_t = 2048)]
    embedding_dim: u64,
    /// Epoch length of a new chain (default 24 h; the admin service advances at once).
    #[arg(long, default_value_t = 86_400_000)]
    epoch_duration_ms: u64,
    /// Fullnode gRPC port (ledger, state, execution, checkpoints).
    #[arg(long, default_value_t = 9000)]
    rpc_port: u16,
    #[arg(long, default_value_t = 9123)]
    faucet_port: u16,
    #[arg(long, default_value_t = 9124)]
    scoring_port: u16,
    /// The admin service (AdvanceEpoch) always listens on 127.0.0.1 and takes no token.
    #[arg(long, default_value_t = 9125)]
    admin_port: u16,
    /// HTTP blob host for weights and data (`PUT`/`GET /v1/blobs/NAME`); off unless given.
    #[arg(long)]
    blob_port: Option<u16>,
    /// What all blobs together may take on disk, in GB (uploads past it are refused with 507,
    /// so they never fill the disk the chain writes to).
    #[arg(long, default_value_t = DEFAULT_BLOB_QUOTA_GB)]
    blob_quota_gb: f64,
    /// Shannons per faucet request (one coin).
    #[arg(long, default_value_t = 2_000_000_000)]
    faucet_amount: u64,
    /// Validators of a new chain, each with 20,000 SOMA of stake and keys in
    /// `<data dir>/validators/` (as the network's own localnet, one by default).
    #[arg(long, default_value_t = 1)]
    validators: usize,
    /// Do not have the validators check revealed weights (by default each model revealed in
    /// an epoch is fetched, verified, decrypted and loaded before the epoch closes, and one
    /// that fails is reported by every validator and slashed 95% at the change).
    #[arg(long)]
    no_weight_checks: bool,
    /// Address for every service but admin. Anything but a loopback address also needs
    /// `--allow-remote`.
    #[arg(long, default_value = "127.0.0.1")]
    bind: IpAddr,
    /// Allow a non-loopback `--bind` (the localnet has no authentication).
    #[arg(long)]
    allow_remote: bool,
    /// Re-score every data submission with this project's scorer before it executes (data and
    /// weights downloaded and checked) and refuse one whose claimed model, loss, embedding or
    /// distance disagree. The public network does not; this is for testing submitters.
    #[arg(long)]
    verify_submissions: bool,
    /// Where the scoring service runs the models: cpu, or through libtorch (a build with
    /// --features torch): cuda, cuda:N or torch-cpu.
    #[arg(long, default_value = "cpu")]
    device: super::Device,
}

/// Scores with this project's scorer on the chosen device: downloads the data and every model's
/// weights (size and checksum checked), decrypts, and applies the network's procedure.
struct Scoring {
    http: reqwest::Client,
    cache_dir: PathBuf,
    scorers: somatrain_submit::ScorerFactory,
}

fn invalid(message: impl Into<String>) -> Status {
    Status::invalid_argument(message.into())
}

impl Scoring {
    async fn fetch(
        &self,
        url: &str,
        checksum: &str,
        size: u64,
        what: &str,
    ) -> Result<PathBuf, Status> {
        let checksum = Commitment::from_base58(checksum)
            .map_err(|e| invalid(format!("{what} checksum: {e}")))?;
        let manifest = Manifest {
            url: url.to_string(),
            checksum,
            size,
        };
        let path = self.cache_dir.join(format!("{checksum}.bin"));
        let cached = std::fs::File::open(&path).ok().is_some_and(|f| {
            Commitment::of_reader(std::io::BufReader::new(f))
                .is_ok_and(|(c, n)| c == checksum && n == size)
        });
        if !cached {
            somatrain_storage::download_verified(&self.http, &manifest, &path)
                .await
                .map_err(|e| invalid(format!("{what}: {e}")))?;
        }
        Ok(path)
    }
}

fn load_weights(path: &std::path::Path) -> Result<somatrain_model::weights::Weights, String> {
    somatrain_model::io::load_file_any_width(path).map_err(|e| e.to_string())
}

fn load_model(
    path: &std::path::Path,
    key: Option<&str>,
) -> Result<somatrain_model::weights::Weights, String> {
    let weights = match key {
        Some(key) => {
            let key =
                EncryptionKey::from_base58(key).map_err(|e| format!("decryption key: {e}"))?;
            let plain = path.with_extension(format!("plain-{}", std::process::id()));
            let result = (|| {
                let input = std::fs::File::open(path).map_err(|e| e.to_string())?;
                let output = std::fs::File::create(&plain).map_err(|e| e.to_string())?;
                decrypt_stream(
                    &key,
                    std::io::BufReader::new(input),
                    std::io::BufWriter::new(output),
                )
                .map_err(|e| e.to_string())?;
                load_weights(&plain).map_err(|e| format!("the decrypted weights do not load: {e}"))
            })();
            let _ = std::fs::remove_file(&plain);
            result?
        }
        None => load_weights(path).map_err(|e| format!("the weights do not load: {e}"))?,
    };
    Ok(weights)
}

#[tonic::async_trait]
impl ScoringBackend for Scoring {
    async fn score(&self, request: ScoreRequest) -> Result<ScoreResponse, Status> {
        if request.model_manifests.is_empty() {
            return Err(invalid("no models to score"));
        }
        let data_path = self
            .fetch(
                &request.data_url,
                &request.data_checksum,
                request.data_size,
                "data",
            )
            .await?;
        let mut weights = Vec::new();
        for (i, m) in request.model_manifests.iter().enumerate() {
            let path = self
                .fetch(&m.url, &m.checksum, m.size, &format!("model {i}"))
                .await?;
            weights.push((path, m.decryption_key.clone()));
        }
        let target = from_bits(&request.target_embedding);
        let seed = request.seed;
        let scorers = self.scorers.clone();
        tokio::task::spawn_blocking(move || {
            let data = std::fs::read(&data_path).map_err(|e| Status::internal(e.to_string()))?;
            let mut losses = Vec::new();
            let mut embeddings = Vec::new();
            for (i, (path, key)) in weights.iter().enumerate() {
                let mut model = load_model(path, key.as_deref())
                    .and_then(|weights| scorers(weights))
                    .map_err(|e| invalid(format!("model {i}: {e}")))?;
                let options = ScoreOptions {
                    seed,
                    ..ScoreOptions::default()
                };
                let score = score_data(model.as_mut(), &data, options, &mut |_, _| {})
                    .map_err(|e| invalid(format!("model {i}: {e}")))?;
                losses.push(score.loss);
                embeddings.push(score.embedding);
            }
            let winner = losses
                .iter()
                .enumerate()
                .fold(0, |best, (i, l)| if *l < losses[best] { i } else { best });
            let distance: Vec<f32> = embeddings
                .iter()
                .map(|e| {
                    if e.len() == target.len() {
                        cosine_distance(e, &target)
                    } else {
                        f32::NAN
                    }
                })
                .collect();
            Ok(ScoreResponse {
                winner: winner as u64,
                loss_score: to_bits(&losses),
                embedding: to_bits(&embeddings[winner]),
                distance: to_bits(&distance),
            })
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
    }
}

/// A localnet serving on its ports in this process.
pub struct RunningLocalnet {
    pub rpc: SocketAddr,
    pub faucet: SocketAddr,
    pub scoring: SocketAddr,
    pub admin: SocketAddr,
    /// The blob host's base URL (`http://ADDR/v1/blobs`), when one was asked for.
    pub blobs: Option<String>,
    pub served: tokio::task::JoinHandle<Result<()>>,
}

impl RunningLocalnet {
    /// Our client's view of it.
    pub fn endpoints(&self) -> somatrain_client::chain::Endpoints {
        somatrain_client::chain::Endpoints {
            rpc: format!("http://{}", self.rpc),
            faucet: Some(format!("http://{}", self.faucet)),
            scoring: Some(format!("http://{}", self.scoring)),
            admin: Some(format!("http://{}", self.admin)),
        }
    }
}

/// Opens the chain in `data_dir` (created with `genesis` the first time) and serves it on
/// `ports`, with a blob host on `blob` when given, until `shutdown` resolves.
/// What the blob host's files may take on disk unless told otherwise: twenty V1 weights files.
pub const DEFAULT_BLOB_QUOTA_GB: f64 = 100.0;

/// The blob host of an embedded localnet: where it listens and its disk quota in bytes.
pub struct BlobHost {
    pub listener: tokio::net::TcpListener,
    pub quota: u64,
}

impl BlobHost {
    /// On `listener`, with the default quota.
    pub fn new(listener: tokio::net::TcpListener) -> Self {
        BlobHost {
            listener,
            quota: (DEFAULT_BLOB_QUOTA_GB * 1e9) as u64,
        }
    }
}

/// Every service on a free loopback port (embedded localnets: `localnet-cycle`, benches).
pub fn loopback_ports() -> somatrain_node::grpc::Ports {
    let any = || std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    somatrain_node::grpc::Ports {
        rpc: any(),
        faucet: any(),
        scoring: any(),
        admin: any(),
    }
}

/// What a new chain starts with (an existing data directory keeps its own), and whether its
/// validators check revealed weights.
pub struct ChainSetup {
    pub genesis: Params,
    /// Validators at genesis; the network's own localnet starts with one.
    pub validators: usize,
    pub weight_checks: bool,
}

impl ChainSetup {
    pub fn new(genesis: Params) -> Self {
        ChainSetup {
            genesis,
            validators: 1,
            weight_checks: true,
        }
    }
}

/// The validators' check of revealed weights: downloaded within the network's deadline (size
/// and checksum checked), decrypted with the revealed key, loaded as V1 of the chain's width.
struct WeightCheck {
    http: reqwest::Client,
    scratch: PathBuf,
}

#[tonic::async_trait]
impl WeightChecker for WeightCheck {
    async fn check(
        &self,
        weights: &RevealedWeights,
        _deadline: std::time::Duration,
    ) -> Result<(), String> {
        std::fs::create_dir_all(&self.scratch).map_err(|e| e.to_string())?;
        let path = self.scratch.join(format!("{}.bin", weights.model_id));
        let result = async {
            somatrain_storage::download_verified(&self.http, &weights.manifest, &path)
                .await
                .map_err(|e| e.to_string())?;
            let key = EncryptionKey::from_bytes(weights.decryption_key.0).to_base58();
            let (path, dim) = (path.clone(), weights.embedding_dim);
            tokio::task::spawn_blocking(move || {
                let loaded = load_model(&path, Some(&key))?;
                if loaded.config.embedding_dim as u64 != dim {
                    return Err(format!(
                        "the weights are {} wide; the chain's models are {dim}",
                        loaded.config.embedding_dim
                    ));
                }
                Ok(())
            })
            .await
            .map_err(|e| e.to_string())?
        }
        .await;
        let _ = std::fs::remove_file(&path);
        result
    }

    async fn check_data(
        &self,
        target_id: somatrain_protocol::ObjectId,
        data: &somatrain_protocol::Manifest,
        _deadline: std::time::Duration,
    ) -> Result<(), String> {
        std::fs::create_dir_all(&self.scratch).map_err(|e| e.to_string())?;
        // One file per target: the same data may have filled several, checked at once.
        let path = self.scratch.join(format!("data-{target_id}.bin"));
        let result = somatrain_storage::download_verified(&self.http, data, &path)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string());
        let _ = std::fs::remove_file(&path);
        result
    }
}

pub async fn start(
    data_dir: &std::path::Path,
    chain: ChainSetup,
    verify_submissions: bool,
    scorers: somatrain_submit::ScorerFactory,
    ports: Ports,
    blob: Option<BlobHost>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<RunningLocalnet> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let config = LocalnetConfig {
        data_dir: data_dir.to_path_buf(),
        genesis: chain.genesis,
        validators: chain.validators,
    };
    let node =
        Localnet::open(&config, somatrain_daemon::now_ms()).context("opening the localnet")?;
    let scorer = Scoring {
        http: somatrain_client::http_client(),
        cache_dir: data_dir.join("scoring-cache"),
        scorers,
    };
    let weight_checks = if chain.weight_checks {
        let keys = somatrain_node::validator_keys::load(data_dir)
            .context("reading the validators' keys")?;
        let checker = WeightCheck {
            http: somatrain_client::http_client(),
            scratch: data_dir.join("weight-checks"),
        };
        Some(Arc::new(WeightChecks::new(keys, Arc::new(checker))))
    } else {
        None
    };
    let services = Services {
        node,
        scorer: Some(Arc::new(scorer)),
        verify_submissions,
        weight_checks,
        closing: Default::default(),
        connection_limits: somatrain_node::limits::ConnectionLimits::for_this_process(),
        execution_slots: Default::default(),
    };
    let bind = |addr: SocketAddr, what: &'static str| async move {
        tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the {what} service to {addr}"))
    };
    let listeners = [
        bind(ports.rpc, "fullnode").await?,
        bind(ports.faucet, "faucet").await?,
        bind(ports.scoring, "scoring").await?,
        bind(ports.admin, "admin").await?,
    ];
    let addrs: Vec<SocketAddr> = listeners
        .iter()
        .map(|l| l.local_addr())
        .collect::<std::io::Result<_>>()?;
    let blobs = match blob {
        Some(BlobHost { listener, quota }) => {
            let addr = listener.local_addr()?;
            let router = somatrain_node::blobs::router_with_quota(
                data_dir.join("blobs"),
                somatrain_node::blobs::DEFAULT_MAX_BLOB_BYTES,
                quota,
            )?;
            tokio::spawn(somatrain_node::blobs::serve(
                listener,
                router,
                somatrain_node::idle::CONNECTION_IDLE_TIMEOUT,
            ));
            Some(format!("http://{addr}/v1/blobs"))
        }
        None => None,
    };
    let served = tokio::spawn(async move {
        somatrain_node::grpc::serve(services, listeners, shutdown).await?;
        Ok(())
    });
    Ok(RunningLocalnet {
        rpc: addrs[0],
        faucet: addrs[1],
        scoring: addrs[2],
        admin: addrs[3],
        blobs,
        served,
    })
}

pub fn run_localnet(args: LocalnetArgs) -> Result<()> {
    if !args.bind.is_loopback() {
        if !args.allow_remote {
            bail!(
                "--bind {} is not a loopback address: the localnet has no authentication; add --allow-remote to serve it anyway",
                args.bind
            );
        }
        tracing::warn!(
            "serving the localnet on {} (reachable from other machines; the admin service stays on 127.0.0.1)",
            args.bind
        );
    }
    let genesis = Params {
        epoch_duration_ms: args.epoch_duration_ms,
        embedding_dim: args.embedding_dim,
        faucet_amount: args.faucet_amount,
        ..Params::default()
    };
    let loopback = IpAddr::from([127, 0, 0, 1]);
    let ports = Ports {
        rpc: SocketAddr::new(args.bind, args.rpc_port),
        faucet: SocketAddr::new(args.bind, args.faucet_port),
        scoring: SocketAddr::new(args.bind, args.scoring_port),
        admin: SocketAddr::new(loopback, args.admin_port),
    };
    let scorers = super::device_scorers(args.device)?;
    let runtime = somatrain_node::limits::runtime()?;
    runtime.block_on(async move {
        if !(args.blob_quota_gb.is_finite() && args.blob_quota_gb > 0.0) {
            bail!("--blob-quota-gb must be a positive number");
        }
        let blob = match args.blob_port {
            Some(port) => {
                let addr = SocketAddr::new(args.bind, port);
                Some(BlobHost {
                    listener: tokio::net::TcpListener::bind(addr)
                        .await
                        .with_context(|| format!("binding the blob host to {addr}"))?,
                    quota: (args.blob_quota_gb * 1e9) as u64,
                })
            }
            None => None,
        };
        let shutdown = async {
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("shutting down");
        };
        let running = start(
            &args.data_dir,
            ChainSetup {
                genesis,
                validators: args.validators,
                weight_checks: !args.no_weight_checks,
            },
            args.verify_submissions,
            scorers,
            ports,
            blob,
            shutdown,
        )
        .await?;
        // Lines scripts can wait for and parse.
        println!("rpc http://{}", running.rpc);
        println!("faucet http://{}", running.faucet);
        println!("scoring http://{}", running.scoring);
        println!("admin http://{}", running.admin);
        if let Some(blobs) = &running.blobs {
            println!("blobs {blobs}");
        }
        println!("localnet ready (data in {})", args.data_dir.display());
        std::io::stdout().flush()?;
        running.served.await??;
        Ok(())
    })
}
