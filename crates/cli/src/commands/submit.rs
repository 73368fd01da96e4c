//! `somatrain targets`, `submit` (one file, or `--auto` over a corpus) and `claim`.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use somatrain_client::chain::{ChainClient, Executed};
use somatrain_client::view::TargetView;
use somatrain_protocol::ObjectId;
use somatrain_protocol::effects::ExecutionStatus;
use somatrain_submit::{
    Hit, ModelCache, SubmitError, choose_hits, claim_all, corpus_chunks, evaluate, pending_claims,
    precheck, score_with_models, submit_hit,
};

use super::network::{ChainOptions, soma};
use super::publish::NetworkOptions;

/// "submitted in DIGEST", or why the executed transaction failed.
fn outcome(executed: &Executed) -> Result<String, String> {
    match executed.status() {
        ExecutionStatus::Success => Ok(executed.digest.to_string()),
        ExecutionStatus::Failure(f) => Err(format!(
            "transaction {} executed and failed ({}): {}",
            executed.digest,
            f.kind.name(),
            f.description
        )),
    }
}

/// A target by id: open ones are listed; others are looked for among every status.
async fn find_target(chain: &ChainClient, id: &ObjectId) -> Result<TargetView> {
    for status in ["open", "filled", "claimed", "expired"] {
        if let Some(t) = chain
            .target_views(status)
            .await?
            .into_iter()
            .find(|t| t.id == *id)
        {
            return Ok(t);
        }
    }
    bail!("no target {id} on chain")
}

#[derive(Args)]
pub struct TargetsArgs {
    #[command(flatten)]
    chain: ChainOptions,
    /// open, filled, claimed, expired or claimable.
    #[arg(long, default_value = "open")]
    status: String,
    #[arg(long)]
    json: bool,
}

pub fn run_targets(args: TargetsArgs) -> Result<()> {
    super::publish::runtime()?.block_on(async {
        let chain = args.chain.client()?;
        let targets = chain.target_views(&args.status).await?;
        if args.json {
            println!("{}", serde_json::to_string(&targets)?);
            return Ok(());
        }
        println!("{} {} targets", targets.len(), args.status);
        println!(
            "{:<68} {:>9} {:>14} {:>6}  models",
            "target", "threshold", "reward (SOMA)", "epoch"
        );
        for t in &targets {
            let models: Vec<String> = t
                .model_ids
                .iter()
                .map(|m| m.to_string()[..12].to_string())
                .collect();
            println!(
                "{:<68} {:>9.4} {:>14} {:>6}  {}",
                t.id.to_string(),
                t.distance_threshold,
                soma(t.reward_pool),
                t.generation_epoch,
                models.join(",")
            );
        }
        Ok(())
    })
}

#[derive(Args)]
pub struct SubmitArgs {
    /// The target to hit (with --data).
    #[arg(long, required_unless_present = "auto", conflicts_with = "auto")]
    target: Option<ObjectId>,
    /// The data to submit (at most the network's limit, 1 MiB).
    #[arg(long, required_unless_present = "auto")]
    data: Option<PathBuf>,
    /// Submit with this model instead of the lowest-loss assigned one (the chain checks it).
    #[arg(long)]
    model: Option<ObjectId>,
    /// Score and report without uploading or submitting.
    #[arg(long)]
    dry_run: bool,
    /// Scan a corpus (--corpus DIR or --hf-dataset) for hits against every open target.
    #[arg(long)]
    auto: bool,
    #[arg(long, conflicts_with = "hf_dataset")]
    corpus: Option<PathBuf>,
    /// A Hub dataset as the corpus (training split's documents, in order).
    #[command(flatten)]
    hub: super::train::HubArgs,
    /// Size of the pieces the corpus is cut into (at most 1 MiB).
    #[arg(long, default_value_t = 64 * 1024)]
    chunk_bytes: usize,
    /// Chunks scanned at most.
    #[arg(long, default_value_t = 64)]
    max_chunks: usize,
    /// Submissions at most (--auto).
    #[arg(long, default_value_t = 10)]
    max_submissions: usize,
    /// Total bond at most, in SOMA (--auto).
    #[arg(long, default_value_t = 1.0)]
    max_bond: f64,
    /// Where the models score the data: cpu, or through libtorch (a build with --features
    /// torch): cuda, cuda:N or torch-cpu.
    #[arg(long, default_value = "cpu")]
    device: super::Device,
    /// Where downloaded weights are kept, by checksum (default $HOME/.somatrain/cache/weights).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    #[command(flatten)]
    network: NetworkOptions,
    #[arg(long)]
    json: bool,
}

/// `--cache-dir`, else `$HOME/.somatrain/cache/weights` (shared by `submit` and `submitter`).
pub fn weights_cache_dir(given: Option<&std::path::Path>) -> PathBuf {
    given.map(PathBuf::from).unwrap_or_else(|| {
        let home = std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("."));
        home.join(".somatrain/cache/weights")
    })
}

pub fn run_submit(args: SubmitArgs) -> Result<()> {
    super::publish::runtime()?.block_on(async {
        let client = args.network.chain.client()?;
        let mut cache = ModelCache::with_scorers(&weights_cache_dir(args.cache_dir.as_deref()), super::device_scorers(args.device)?);
        if args.auto {
            return submit_auto(&args, &client, &mut cache).await;
        }
        let target_id = args.target.expect("clap requires --target");
        let path = args.data.clone().expect("clap requires --data");
        let epoch = client.epoch_view().await?;
        let max = epoch.params.max_submission_data_size;
        let data = super::read_input(&path, max).with_context(|| {
            format!("submissions hold at most {max} bytes")
        })?;
        let target = find_target(&client, &target_id).await?;
        precheck(&target, data.len() as u64, epoch.params.max_submission_data_size)?;
        let scores = score_with_models(&client, &mut cache, &target.model_ids, &data).await?;
        let mut evaluation = evaluate(&target, &scores).context("none of the target's models is active")?;
        if let Some(model) = args.model {
            if !target.model_ids.contains(&model) {
                bail!("model {model} is not assigned to target {target_id}; the chain would refuse it (model_not_in_target)");
            }
            // Forced model: its own score, as the chain will see it.
            let forced = score_with_models(&client, &mut cache, &[model], &data).await?;
            let forced_target = TargetView {
                model_ids: vec![model],
                ..target.clone()
            };
            evaluation = evaluate(&forced_target, &forced).context("the chosen model is not active")?;
        }
        let report = serde_json::json!({
            "target_id": evaluation.target_id.to_string(),
            "model_id": evaluation.model_id.to_string(),
            "loss": evaluation.loss,
            "distance": evaluation.distance,
            "threshold": evaluation.threshold,
            "hit": evaluation.hit,
            "losses": evaluation.losses.iter().map(|(m, l)| serde_json::json!({"model_id": m.to_string(), "loss": l})).collect::<Vec<_>>(),
        });
        let mut submitted = None;
        if evaluation.hit && !args.dry_run {
            let keypair = super::wallet::load_keypair(args.network.keystore.as_deref())?;
            let storage = args.network.storage.open()?;
            let executed = submit_hit(&client, &keypair, &storage, &evaluation, &data).await?;
            submitted = Some(outcome(&executed).map_err(anyhow::Error::msg)?);
        }
        if args.json {
            let mut report = report;
            report["submitted"] = serde_json::json!(submitted);
            println!("{report}");
        } else {
            for (m, l) in &evaluation.losses {
                println!("model {m}: loss {l:.5}");
            }
            println!(
                "best model {} (loss {:.5}): distance {:.5} to target {}, threshold {:.5}",
                evaluation.model_id, evaluation.loss, evaluation.distance, evaluation.target_id, evaluation.threshold
            );
            match (&submitted, evaluation.hit) {
                (Some(digest), _) => println!("hit: submitted in transaction {digest}"),
                (None, true) => println!("hit (dry run: nothing submitted)"),
                (None, false) => println!("miss: outside the threshold, nothing submitted"),
            }
        }
        Ok(())
    })
}

/// The first `max_chunks` pieces of `chunk_bytes` of a Hub dataset's training documents, read
/// in order (the corpus stream's unshuffled sample).
fn hub_chunks(
    source: somatrain_train::corpus::Source,
    chunk_bytes: usize,
    max_chunks: usize,
) -> Result<Vec<somatrain_submit::Chunk>> {
    use somatrain_train::corpus::{CorpusConfig, Split, sample};
    let name = match &source {
        somatrain_train::corpus::Source::Hub { dataset, .. } => format!("hf://{}", dataset.repo),
        _ => "corpus".to_string(),
    };
    let config = CorpusConfig {
        heldout_per_mille: 0,
        ..CorpusConfig::new(vec![source])
    };
    let (bytes, stats) = sample(
        &config,
        Split::Train,
        chunk_bytes.saturating_mul(max_chunks),
    )?;
    tracing::info!("{name}: {} bytes read ({stats})", bytes.len());
    Ok(bytes
        .chunks(chunk_bytes.max(1))
        .enumerate()
        .map(|(i, piece)| somatrain_submit::Chunk {
            source: PathBuf::from(&name),
            offset: (i * chunk_bytes) as u64,
            data: piece.to_vec(),
        })
        .collect())
}

async fn submit_auto(
    args: &SubmitArgs,
    client: &ChainClient,
    cache: &mut ModelCache,
) -> Result<()> {
    let epoch = client.epoch_view().await?;
    let max = epoch.params.max_submission_data_size.min(usize::MAX as u64) as usize;
    if args.chunk_bytes == 0 || args.chunk_bytes > max {
        bail!("--chunk-bytes must be between 1 and {max}");
    }
    let targets = client.target_views("open").await?;
    if targets.is_empty() {
        println!("no open targets");
        return Ok(());
    }
    let mut models: Vec<ObjectId> = targets
        .iter()
        .flat_map(|t| t.model_ids.iter().copied())
        .collect();
    models.sort();
    models.dedup();
    let chunks = match (&args.corpus, args.hub.source()?) {
        (Some(corpus), _) => corpus_chunks(corpus, args.chunk_bytes, args.max_chunks)?,
        (None, Some(source)) => {
            let (chunk_bytes, max_chunks) = (args.chunk_bytes, args.max_chunks);
            tokio::task::spawn_blocking(move || hub_chunks(source, chunk_bytes, max_chunks))
                .await??
        }
        (None, None) => {
            bail!("--auto scans a corpus: give --corpus DIR or --hf-dataset OWNER/NAME")
        }
    };
    tracing::info!(
        "{} chunks against {} open targets and {} models",
        chunks.len(),
        targets.len(),
        models.len()
    );
    let mut candidates = Vec::new();
    let mut scanned = 0usize;
    for (i, chunk) in chunks.iter().enumerate() {
        // One pass of each model over the chunk serves every target.
        let scores = score_with_models(client, cache, &models, &chunk.data).await?;
        let by_target: HashMap<ObjectId, _> = targets
            .iter()
            .filter_map(|t| evaluate(t, &scores).map(|e| (t.id, e)))
            .collect();
        let hits = by_target.values().filter(|e| e.hit).count();
        tracing::info!(
            "chunk {}/{} ({} @ {}): {hits} hits",
            i + 1,
            chunks.len(),
            chunk.source.display(),
            chunk.offset
        );
        candidates.extend(
            by_target
                .into_values()
                .filter(|e| e.hit)
                .map(|evaluation| Hit {
                    chunk: i,
                    evaluation,
                }),
        );
        scanned += 1;
    }
    let sizes: Vec<u64> = chunks.iter().map(|c| c.data.len() as u64).collect();
    let budget = (args.max_bond * somatrain_protocol::SHANNONS_PER_SOMA as f64) as u64;
    let chosen = choose_hits(
        candidates,
        &sizes,
        epoch.params.submission_bond_per_byte,
        args.max_submissions,
        budget,
    );
    let mut submitted = Vec::new();
    if !args.dry_run && !chosen.is_empty() {
        let keypair = super::wallet::load_keypair(args.network.keystore.as_deref())?;
        let storage = args.network.storage.open()?;
        for hit in &chosen {
            match submit_hit(
                client,
                &keypair,
                &storage,
                &hit.evaluation,
                &chunks[hit.chunk].data,
            )
            .await
            {
                Ok(executed) => match outcome(&executed) {
                    Ok(digest) => submitted.push((hit, digest)),
                    Err(why) => tracing::warn!("target {}: {why}", hit.evaluation.target_id),
                },
                Err(SubmitError::Network(e)) => {
                    tracing::warn!("target {}: {e}", hit.evaluation.target_id)
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    if args.json {
        let list: Vec<_> = submitted
            .iter()
            .map(|(h, d)| serde_json::json!({"target_id": h.evaluation.target_id.to_string(), "distance": h.evaluation.distance, "chunk": chunks[h.chunk].source, "offset": chunks[h.chunk].offset, "digest": d}))
            .collect();
        println!(
            "{}",
            serde_json::json!({"chunks": scanned, "hits": chosen.len(), "submitted": list})
        );
    } else {
        println!(
            "scanned {scanned} chunks: {} hits chosen, {} submitted",
            chosen.len(),
            submitted.len()
        );
        for (h, digest) in &submitted {
            println!(
                "  target {} at distance {:.4}: {digest}",
                h.evaluation.target_id, h.evaluation.distance
            );
        }
    }
    Ok(())
}

#[derive(Args)]
pub struct ClaimArgs {
    #[command(flatten)]
    chain: ChainOptions,
    #[arg(long, env = "SOMATRAIN_KEYSTORE")]
    keystore: Option<PathBuf>,
    /// Also settle expired open targets (anyone may; the claimer earns 0.5%).
    #[arg(long)]
    expired: bool,
}

pub fn run_claim(args: ClaimArgs) -> Result<()> {
    super::publish::runtime()?.block_on(async {
        let client = args.chain.client()?;
        let keypair = super::wallet::load_keypair(args.keystore.as_deref())?;
        let before = client.balance(&keypair.address()).await?;
        let outcomes = claim_all(&client, &keypair, args.expired).await?;
        let mut claimed = 0;
        for o in &outcomes {
            match o.result.as_ref().map(outcome) {
                Ok(Ok(_)) => {
                    claimed += 1;
                    println!(
                        "claimed target {} (pool {} SOMA{})",
                        o.target_id,
                        soma(o.reward_pool),
                        if o.expired { ", expired" } else { "" }
                    );
                }
                Ok(Err(why)) => println!("target {}: {why}", o.target_id),
                Err(e) => println!("target {}: {e}", o.target_id),
            }
        }
        for (id, epoch) in pending_claims(&client, &keypair).await? {
            println!("target {id}: claimable from epoch {epoch}");
        }
        let after = client.balance(&keypair.address()).await?;
        println!(
            "{claimed} claimed; balance {} SOMA (was {} SOMA, {}{} SOMA)",
            soma(after),
            soma(before),
            if after >= before { "+" } else { "-" },
            soma(after.abs_diff(before))
        );
        Ok(())
    })
}

#[derive(clap::Subcommand)]
pub enum TargetCommand {
    /// The data that filled a target, verified against the chain's manifest (size and
    /// Blake2b-256), written atomically; its model, loss and distance are printed.
    Download {
        /// The target's id.
        target: String,
        #[command(flatten)]
        chain: ChainOptions,
        /// Where the data goes (never over a directory).
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

pub fn run_target(command: TargetCommand) -> Result<()> {
    let TargetCommand::Download {
        target,
        chain,
        out,
        json,
    } = command;
    let id: ObjectId = target
        .parse()
        .map_err(|e| anyhow::anyhow!("target {target}: {e}"))?;
    if out.is_dir() {
        bail!("{} is a directory; give a file", out.display());
    }
    super::publish::runtime()?.block_on(async {
        let chain = chain.client()?;
        let Some(object) = chain.object(&id).await? else {
            bail!(
                "no target {id} on chain: it never existed, or it was claimed (a claim deletes \
                 the target, and its data is no longer named on chain)"
            );
        };
        let target = object
            .target()
            .map_err(|e| anyhow::anyhow!("object {id} is not a target: {e}"))?;
        let Some(manifest) = target.winning_data_manifest.clone() else {
            bail!(
                "target {id} has not been filled (it is {:?}); only a filled target has data",
                target.status
            );
        };
        let limit = chain.epoch_view().await?.params.max_submission_data_size;
        if manifest.size > limit {
            bail!(
                "target {id}'s manifest declares {} bytes, over the chain's {limit}-byte \
                 submission limit; not downloaded",
                manifest.size
            );
        }
        let http = somatrain_client::http_client();
        somatrain_storage::download_verified(&http, &manifest, &out).await?;
        let scalar = |t: &Option<somatrain_protocol::SomaTensor>| {
            t.as_ref().and_then(|t| t.scalar_value().ok())
        };
        let loss = target
            .winning_loss_score
            .as_ref()
            .and_then(|t| t.vector_values().ok())
            .and_then(|v| v.first().copied());
        let distance = scalar(&target.winning_distance_score);
        let model = target.winning_model_id.map(|m| m.to_string());
        if json {
            println!(
                "{}",
                serde_json::json!({
                    "target": id.to_string(),
                    "out": out.display().to_string(),
                    "bytes": manifest.size,
                    "checksum": manifest.checksum.to_base58(),
                    "url": manifest.url,
                    "model": model,
                    "loss": loss,
                    "distance": distance,
                    "threshold": target.distance_threshold.scalar_value().ok(),
                })
            );
        } else {
            println!(
                "target {id}: {} bytes (checksum verified) into {}; won by model {} with loss {} \
                 at distance {} (threshold {})",
                manifest.size,
                out.display(),
                model.as_deref().unwrap_or("?"),
                loss.map(|l| l.to_string()).unwrap_or_else(|| "?".into()),
                distance
                    .map(|d| d.to_string())
                    .unwrap_or_else(|| "?".into()),
                target
                    .distance_threshold
                    .scalar_value()
                    .map(|t| t.to_string())
                    .unwrap_or_else(|_| "?".into()),
            );
        }
        Ok(())
    })
}
