//! `somatrain targets`, `submit` (one file, or `--auto` over a corpus) and `claim`.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use somatrain_client::Client;
use somatrain_protocol::ObjectId;
use somatrain_protocol::chain::Target;
use somatrain_storage::Storage;
use somatrain_submit::{
    Hit, ModelCache, SubmitError, choose_hits, claim_all, corpus_chunks, evaluate, pending_claims,
    precheck, score_with_models, submit_hit,
};

use super::net::soma;
use super::publish::NetworkOptions;

#[derive(Args)]
pub struct TargetsArgs {
    #[arg(long, env = "SOMATRAIN_NODE", default_value = "http://127.0.0.1:9000")]
    node: String,
    /// open, filled, expired, claimable or all.
    #[arg(long, default_value = "open")]
    status: String,
    #[arg(long)]
    json: bool,
}

pub fn run_targets(args: TargetsArgs) -> Result<()> {
    super::publish::runtime()?.block_on(async {
        let client = Client::new(&args.node);
        let targets = client.targets(&args.status).await?;
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
    /// Scan a corpus for hits against every open target.
    #[arg(long, requires = "corpus")]
    auto: bool,
    #[arg(long)]
    corpus: Option<PathBuf>,
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
    /// Where downloaded weights are kept, by checksum (default $HOME/.somatrain/cache/weights).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    #[command(flatten)]
    network: NetworkOptions,
    #[arg(long)]
    json: bool,
}

fn cache_dir(args: &SubmitArgs) -> PathBuf {
    args.cache_dir.clone().unwrap_or_else(|| {
        let home = std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("."));
        home.join(".somatrain/cache/weights")
    })
}

pub fn run_submit(args: SubmitArgs) -> Result<()> {
    super::publish::runtime()?.block_on(async {
        let client = Client::new(&args.network.node);
        let mut cache = ModelCache::new(&cache_dir(&args));
        if args.auto {
            return submit_auto(&args, &client, &mut cache).await;
        }
        let target_id = args.target.expect("clap requires --target");
        let path = args.data.clone().expect("clap requires --data");
        let data = super::read_input(&path)?;
        let status = client.status().await?;
        let target = client.target(&target_id).await?;
        precheck(&target, status.epoch, data.len() as u64, status.params.max_submission_bytes)?;
        let scores = score_with_models(&client, &mut cache, &target.model_ids, &data).await?;
        let mut evaluation = evaluate(&target, &scores).context("none of the target's models is active")?;
        if let Some(model) = args.model {
            if !target.model_ids.contains(&model) {
                bail!("model {model} is not assigned to target {target_id}; the chain would refuse it (model_not_in_target)");
            }
            // Forced model: its own score, as the chain will see it.
            let forced = score_with_models(&client, &mut cache, &[model], &data).await?;
            let forced_target = Target {
                model_ids: vec![model],
                ..target.clone()
            };
            evaluation = evaluate(&forced_target, &forced).context("the chosen model is not active")?;
        }
        let report = serde_json::json!({
            "target_id": evaluation.target_id,
            "model_id": evaluation.model_id,
            "loss": evaluation.loss,
            "distance": evaluation.distance,
            "threshold": evaluation.threshold,
            "hit": evaluation.hit,
            "losses": evaluation.losses.iter().map(|(m, l)| serde_json::json!({"model_id": m, "loss": l})).collect::<Vec<_>>(),
        });
        let mut submitted = None;
        if evaluation.hit && !args.dry_run {
            let keypair = super::wallet::load_keypair(args.network.keystore.as_deref())?;
            let storage = Storage::open(&args.network.backend()?)?;
            let record = submit_hit(&client, &keypair, &storage, &evaluation, &data).await?;
            submitted = Some(record.digest.to_string());
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

async fn submit_auto(args: &SubmitArgs, client: &Client, cache: &mut ModelCache) -> Result<()> {
    let corpus = args.corpus.as_ref().expect("clap requires --corpus");
    let status = client.status().await?;
    let max = status.params.max_submission_bytes as usize;
    if args.chunk_bytes == 0 || args.chunk_bytes > max {
        bail!("--chunk-bytes must be between 1 and {max}");
    }
    let targets = client.targets("open").await?;
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
    let chunks = corpus_chunks(corpus, args.chunk_bytes, args.max_chunks)?;
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
    let budget = (args.max_bond * somatrain_protocol::tx::SHANNONS_PER_SOMA as f64) as u64;
    let chosen = choose_hits(
        candidates,
        &sizes,
        status.params.submission_bond_per_byte,
        args.max_submissions,
        budget,
    );
    let mut submitted = Vec::new();
    if !args.dry_run && !chosen.is_empty() {
        let keypair = super::wallet::load_keypair(args.network.keystore.as_deref())?;
        let storage = Storage::open(&args.network.backend()?)?;
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
                Ok(record) => submitted.push((hit, record.digest.to_string())),
                Err(SubmitError::Client(e)) => {
                    tracing::warn!("target {}: refused: {e}", hit.evaluation.target_id)
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    if args.json {
        let list: Vec<_> = submitted
            .iter()
            .map(|(h, d)| serde_json::json!({"target_id": h.evaluation.target_id, "distance": h.evaluation.distance, "chunk": chunks[h.chunk].source, "offset": chunks[h.chunk].offset, "digest": d}))
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
    #[arg(long, env = "SOMATRAIN_NODE", default_value = "http://127.0.0.1:9000")]
    node: String,
    #[arg(long, env = "SOMATRAIN_KEYSTORE")]
    keystore: Option<PathBuf>,
    /// Also settle expired open targets (anyone may; the claimer earns 0.5%).
    #[arg(long)]
    expired: bool,
}

pub fn run_claim(args: ClaimArgs) -> Result<()> {
    super::publish::runtime()?.block_on(async {
        let client = Client::new(&args.node);
        let keypair = super::wallet::load_keypair(args.keystore.as_deref())?;
        let before = client.account(&keypair.address()).await?;
        let outcomes = claim_all(&client, &keypair, args.expired).await?;
        let mut claimed = 0;
        for o in &outcomes {
            match &o.result {
                Ok(_) => {
                    claimed += 1;
                    println!(
                        "claimed target {} (pool {} SOMA{})",
                        o.target_id,
                        soma(o.reward_pool),
                        if o.expired { ", expired" } else { "" }
                    );
                }
                Err(e) => println!("target {}: {e}", o.target_id),
            }
        }
        for (id, epoch) in pending_claims(&client, &keypair).await? {
            println!("target {id}: claimable from epoch {epoch}");
        }
        let after = client.account(&keypair.address()).await?;
        println!(
            "{claimed} claimed; rewards {} SOMA this time, {} SOMA in all; balance {} SOMA",
            soma(after.rewards - before.rewards),
            soma(after.rewards),
            soma(after.balance)
        );
        Ok(())
    })
}
