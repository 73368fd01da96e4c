//! `somatrain bench submitter`: the data submitter's throughput against an embedded localnet
//! with one revealed model of the preset: pieces and tokens per second, and the share of the
//! scoring loop's time spent on anything but scoring, once the weights are cached.

use somatrain_protocol::transaction::{CommitModel, CreateModel, RevealModel};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use somatrain_client::chain::ChainClient;
use somatrain_model::Preset;
use somatrain_protocol::crypto::{EncryptionKey, embedding_commitment, encrypt_stream};
use somatrain_protocol::{
    Digest, Keypair, ObjectId, SHANNONS_PER_SOMA, SomaTensor, TransactionKind,
};
use somatrain_submitter::{Limits, Settings, Submitter, Summary};
use somatrain_train::corpus::{CorpusConfig, Source};

use super::Device;

#[derive(Args)]
pub struct SubmitterBenchArgs {
    #[arg(long, default_value = "medium")]
    preset: Preset,
    /// Pieces scored in the timed run (after one that fills the weights cache).
    #[arg(long, default_value_t = 4)]
    pieces: u64,
    #[arg(long, default_value_t = 8192)]
    piece_bytes: usize,
    #[arg(long, default_value = "cpu")]
    device: Device,
}

async fn run_tx(chain: &ChainClient, kp: &Keypair, kind: TransactionKind) -> Result<ObjectId> {
    let executed = chain
        .sign_and_execute(kp, |_| kind.clone())
        .await?
        .success()
        .map_err(|f| anyhow::anyhow!("{}: {}", f.kind.name(), f.description))?;
    Ok(ObjectId::derive(&executed.digest, 0))
}

/// Random weights of the preset, encrypted, hosted, committed and revealed: an active model
/// for the targets of the next epoch.
async fn reveal_model(
    chain: &ChainClient,
    storage: &somatrain_storage::Storage,
    preset: Preset,
    dir: &std::path::Path,
) -> Result<()> {
    let owner = Keypair::generate();
    chain.faucet(&owner.address()).await?;
    let config = preset.config();
    let plain = dir.join("weights.safetensors");
    somatrain_model::io::save_file(&somatrain_model::Weights::init(config, 7), &plain)?;
    let key = EncryptionKey::generate();
    let encrypted = dir.join("weights.enc");
    encrypt_stream(
        &key,
        std::io::BufReader::new(std::fs::File::open(&plain)?),
        std::io::BufWriter::new(std::fs::File::create(&encrypted)?),
    )
    .map_err(|e| anyhow::anyhow!("encrypting: {e}"))?;
    let manifest = storage.upload_file("bench-weights.enc", &encrypted).await?;
    let embedding = somatrain_protocol::assignment::target_embedding(11, config.embedding_dim);
    let model_id = run_tx(
        chain,
        &owner,
        TransactionKind::CreateModel(CreateModel {
            stake_amount: SHANNONS_PER_SOMA,
            commission_rate: 0,
            architecture_version: 1,
        }),
    )
    .await?;
    run_tx(
        chain,
        &owner,
        TransactionKind::CommitModel(CommitModel {
            model_id,
            manifest: manifest.clone(),
            weights_commitment: manifest.checksum,
            embedding_commitment: embedding_commitment(&embedding),
            decryption_key_commitment: key.commitment(),
        }),
    )
    .await?;
    chain.advance_epoch().await?;
    run_tx(
        chain,
        &owner,
        TransactionKind::RevealModel(RevealModel {
            model_id,
            decryption_key: Digest(*key.as_bytes()),
            embedding: SomaTensor::vector(&embedding),
        }),
    )
    .await?;
    chain.advance_epoch().await?;
    Ok(())
}

pub fn bench_submitter(args: SubmitterBenchArgs) -> Result<()> {
    if args.pieces == 0 || args.piece_bytes == 0 {
        bail!("--pieces and --piece-bytes must be positive");
    }
    let scorers = super::device_scorers(args.device)?;
    let scratch = tempfile::tempdir()?;
    let corpus_file = scratch.path().join("corpus.jsonl");
    super::bench::synthetic_jsonl(&corpus_file, 8)?;
    let config = args.preset.config();
    super::publish::runtime()?.block_on(async move {
        let ports = super::localnet::loopback_ports();
        let genesis = somatrain_node::ledger::Params {
            embedding_dim: config.embedding_dim as u64,
            faucet_amount: 1000 * SHANNONS_PER_SOMA,
            ..Default::default()
        };
        let localnet = super::localnet::start(
            &scratch.path().join("node"),
            super::localnet::ChainSetup::new(genesis),
            false,
            scorers.clone(),
            ports,
            Some(super::localnet::BlobHost::new(
                tokio::net::TcpListener::bind("127.0.0.1:0").await?,
            )),
            std::future::pending(),
        )
        .await?;
        let chain = ChainClient::new(localnet.endpoints())?;
        let blobs = localnet.blobs.clone().context("the localnet hosts blobs")?;
        let backend = somatrain_storage::Backend::BlobHost { base: blobs };
        let storage = somatrain_storage::Storage::open(&backend)?;
        reveal_model(&chain, &storage, args.preset, scratch.path()).await?;
        let submitter = Keypair::generate();
        chain.faucet(&submitter.address()).await?;
        let corpus = CorpusConfig {
            heldout_per_mille: 0,
            shuffle_buffer: 16,
            max_seq_len: args.piece_bytes,
            ..CorpusConfig::new(vec![Source::Jsonl {
                path: corpus_file.clone(),
                field: "content".into(),
            }])
        };
        let run = |pieces: u64| {
            let settings = Settings {
                state_dir: scratch.path().join("state"),
                corpus: corpus.clone(),
                limits: Limits {
                    bond_per_epoch: u64::MAX,
                    fees_per_epoch: u64::MAX,
                    submissions_per_epoch: u64::MAX,
                },
                refresh_every: 50,
                merge_coins_above: 16,
                dry_run: false,
                max_pieces: Some(pieces),
                exit_when_scored: true,
                progress_every: Duration::from_secs(3600),
                poll: Duration::from_millis(200),
            };
            let cache = somatrain_submit::ModelCache::with_scorers(
                &scratch.path().join("cache"),
                scorers.clone(),
            );
            let (chain, kp) = (chain.clone(), submitter.clone());
            let storage = somatrain_storage::Storage::open(&backend);
            async move {
                let storage = storage?;
                let metrics = Arc::new(somatrain_submitter::metrics::Metrics::default());
                let stop = Arc::new(AtomicBool::new(false));
                let service =
                    Submitter::open(chain, kp, Some(storage), cache, settings, metrics, stop)
                        .await?;
                anyhow::Ok(service.run().await?)
            }
        };
        // The first piece downloads and decrypts the weights into the cache.
        let warm: Summary = run(1).await?;
        let timed: Summary = run(args.pieces).await?;
        let r = timed.run;
        let report = serde_json::json!({
            "bench": "submitter",
            "preset": format!("{:?}", args.preset).to_lowercase(),
            "device": format!("{:?}", args.device),
            "piece_bytes": args.piece_bytes,
            "pieces": r.pieces,
            "pieces_per_s": r.pieces as f64 / r.loop_seconds.max(1e-9),
            "tokens_per_s": r.tokens as f64 / r.loop_seconds.max(1e-9),
            "scoring_tokens_per_s": r.tokens as f64 / r.scoring_seconds.max(1e-9),
            "other_time_fraction": 1.0 - (r.scoring_seconds / r.loop_seconds.max(1e-9)).min(1.0),
            "loop_seconds": r.loop_seconds,
            // After the first piece, whose loop time includes loading the model from the disk
            // cache (decrypting and parsing the weights), once per process.
            "other_time_fraction_after_first_piece": 1.0
                - ((r.scoring_seconds - r.first_piece_scoring_seconds)
                    / (r.loop_seconds - r.first_piece_loop_seconds).max(1e-9))
                .min(1.0),
            "first_piece_loop_seconds": r.first_piece_loop_seconds,
            "hits": timed.hits - warm.hits,
            "submissions": timed.submissions - warm.submissions,
            "weights_downloads_first_run": warm.weights_downloads,
            "weights_downloads_timed_run": timed.weights_downloads,
        });
        println!("{report}");
        Ok(())
    })
}
