//! The quickstart's whole localnet flow once a localnet is up: fund a wallet, run the rounds
//! ([`crate::rounds`]), check the model is active, then play the data submitter (a hit on one
//! of the model's targets, the audit window, the claim) and compare the balances.
//!
//! `somatrain localnet-cycle` starts the embedded localnet and calls [`run`]; every line the
//! flow reports goes through its `report` callback, so this module prints nothing itself.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use somatrain_client::chain::ChainClient;
use somatrain_client::view::ModelState;
use somatrain_protocol::effects::ExecutionStatus;
use somatrain_protocol::{Keypair, ObjectId, SHANNONS_PER_SOMA, format_soma};
use somatrain_storage::{Backend, Storage};
use somatrain_train::TrainSettings;

use crate::DaemonError;
use crate::journal::{Journal, Phase};
use crate::metrics::Metrics;
use crate::publisher::{Adopt, NewModel, Publisher};
use crate::rounds::{EngineFactory, EpochAdvance, LoopConfig};

/// Tops the wallet up from the faucet until it covers `stake` plus fees.
pub async fn fund(chain: &ChainClient, keypair: &Keypair, stake: u64) -> Result<(), DaemonError> {
    let address = keypair.address();
    for _ in 0..100 {
        if chain.balance(&address).await? >= stake + SHANNONS_PER_SOMA / 10 {
            return Ok(());
        }
        chain.faucet(&address).await?;
    }
    Err(DaemonError::Usage(format!(
        "the faucet did not cover a stake of {stake} shannons"
    )))
}

/// What a loop has done, as lines: the model's state and stake, the rounds, the last round.
pub async fn loop_summary(
    chain: &ChainClient,
    journal: &Journal,
) -> Result<Vec<String>, DaemonError> {
    let Some(model_id) = journal.model_id else {
        return Ok(Vec::new());
    };
    let mut lines = vec![match chain.model(&model_id).await? {
        Some(model) => format!(
            "model {model_id}: {}, stake {} SOMA",
            model.state.name(),
            format_soma(model.stake)
        ),
        None => format!("model {model_id}: not on chain"),
    }];
    lines.push(format!(
        "rounds revealed: {} (missed reveals: {})",
        journal.rounds_revealed, journal.missed_reveals
    ));
    if let Some(r) = &journal.last_revealed {
        let mut line = format!(
            "last round {}: step {}, committed in epoch {}, revealed in epoch {}",
            r.round, r.step, r.commit_epoch, r.reveal_epoch
        );
        if let Some(h) = &r.heldout {
            line.push_str(&format!(
                ", held-out loss {:.4} ({:.3} bits/byte)",
                h.loss, h.bits_per_byte
            ));
        }
        lines.push(line);
        lines.push(format!("weights: {}", r.url));
    }
    Ok(lines)
}

/// One invocation of the cycle against a running localnet.
pub struct Cycle {
    pub chain: ChainClient,
    pub keypair: Keypair,
    /// The localnet's blob host (`http://ADDR/v1/blobs`).
    pub blobs: String,
    pub run_dir: PathBuf,
    /// Where the submitter keeps the weights it downloads.
    pub cache_dir: PathBuf,
    /// Where the submitter's chunks come from.
    pub corpus: Vec<PathBuf>,
    pub train: TrainSettings,
    pub steps_per_round: u64,
    /// Rounds to train, commit and reveal in this invocation.
    pub rounds: u64,
    /// Where the rounds train.
    pub engine: EngineFactory,
    /// What the submitter scores with.
    pub scorers: somatrain_submit::ScorerFactory,
}

/// Runs the cycle: fund, the rounds, the model checked active, the submitter's side, the
/// balances. A model that does not end active is an error. A stop asked for through the train
/// settings ends the rounds as `run` ends them (a committed round revealed first), and the
/// cycle there, or between the submitter's chunks before anything is submitted.
pub async fn run(cycle: Cycle, report: &mut dyn FnMut(String)) -> Result<(), DaemonError> {
    let Cycle { chain, keypair, .. } = &cycle;
    let stake = SHANNONS_PER_SOMA;
    let started_with = chain.balance(&keypair.address()).await?;
    fund(chain, keypair, stake).await?;
    let funded = chain.balance(&keypair.address()).await?;
    report(format!(
        "wallet {} funded: {} SOMA",
        keypair.address(),
        format_soma(funded)
    ));
    let storage = Storage::open(&Backend::BlobHost {
        base: cycle.blobs.clone(),
    })?;
    let mut publisher = Publisher::open(chain.clone(), keypair.clone(), storage, &cycle.run_dir)?;
    let config = LoopConfig {
        run_dir: cycle.run_dir.clone(),
        train: cycle.train.clone(),
        engine: cycle.engine.clone(),
        steps_per_round: cycle.steps_per_round,
        rounds: Some(publisher.journal().rounds_revealed + cycle.rounds),
        new_model: NewModel {
            stake,
            commission_bps: 0,
            architecture_version: 1,
        },
        adopt: Adopt::Refuse,
        advance: EpochAdvance::Admin,
        poll: Duration::from_millis(200),
        warn_before: Duration::from_secs(60),
        min_improvement: None,
    };
    crate::rounds::run(&mut publisher, &config, Arc::new(Metrics::default())).await?;
    for line in loop_summary(chain, publisher.journal()).await? {
        report(line);
    }
    if cycle.train.stop.requested() {
        report("stopped as asked, with no reveal due; the same command goes on from here".into());
        return Ok(());
    }
    let model_id = publisher
        .journal()
        .model_id
        .ok_or_else(|| DaemonError::Chain("the loop ended without a model".into()))?;
    let model = chain
        .model(&model_id)
        .await?
        .ok_or_else(|| DaemonError::Chain(format!("model {model_id} is not on chain")))?;
    if model.state != ModelState::Active {
        return Err(DaemonError::Chain(format!(
            "model {model_id} ended {}, not active",
            model.state.name()
        )));
    }
    report(format!(
        "epoch {}: model active. Run again to train further.",
        chain.epoch_clock().await?.epoch
    ));
    let storage = Storage::open(&Backend::BlobHost {
        base: cycle.blobs.clone(),
    })?;
    economy(&cycle, &storage, model_id, report).await?;
    let ended_with = chain.balance(&keypair.address()).await?;
    let staked = chain.model(&model_id).await?.map_or(0, |m| m.stake);
    report(format!(
        "balance: started {} SOMA ({} after the faucet), ended {} SOMA, with {} SOMA staked in model {model_id}",
        format_soma(started_with),
        format_soma(funded),
        format_soma(ended_with),
        format_soma(staked)
    ));
    debug_assert_eq!(publisher.journal().phase, Phase::Stopped);
    Ok(())
}

/// Source files under `dirs` (the cycle's default corpus kinds; build and VCS folders skipped),
/// cut into chunks of `chunk_bytes`, at most `max_chunks`, in a stable order.
fn corpus_chunks(dirs: &[PathBuf], chunk_bytes: usize, max_chunks: usize) -> Vec<Vec<u8>> {
    let skip = ["target", ".git", ".somatrain", "node_modules", ".venv-sdk"];
    let mut files = Vec::new();
    let mut stack: Vec<PathBuf> = dirs.to_vec();
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().to_string();
            match entry.file_type() {
                Ok(t) if t.is_dir() && !skip.contains(&name.as_str()) => stack.push(path),
                Ok(t)
                    if t.is_file()
                        && ["rs", "md", "py", "txt"]
                            .iter()
                            .any(|ext| path.extension().is_some_and(|e| e == *ext)) =>
                {
                    files.push(path)
                }
                _ => {}
            }
        }
    }
    files.sort();
    let mut chunks = Vec::new();
    for path in files {
        let Ok(bytes) = std::fs::read(&path) else {
            continue;
        };
        for piece in bytes.chunks(chunk_bytes) {
            if chunks.len() == max_chunks {
                return chunks;
            }
            if piece.len() >= 256 {
                chunks.push(piece.to_vec());
            }
        }
    }
    chunks
}

/// The data submitter's side of the quickstart: the next epoch's targets, the closest hit among
/// a few chunks of the corpus (scored with the model's revealed weights, downloaded and checked
/// like any submitter's), its submission with the bond, the epochs to the claim window, and the
/// claim.
async fn economy(
    cycle: &Cycle,
    storage: &Storage,
    model_id: ObjectId,
    report: &mut dyn FnMut(String),
) -> Result<(), DaemonError> {
    let (chain, keypair) = (&cycle.chain, &cycle.keypair);
    let epoch = chain.advance_epoch().await?;
    let targets: Vec<_> = chain
        .target_views("open")
        .await?
        .into_iter()
        .filter(|t| t.model_ids.contains(&model_id))
        .collect();
    report(format!(
        "epoch {epoch}: {} open targets name model {model_id}",
        targets.len()
    ));
    let chunks = corpus_chunks(&cycle.corpus, 4096, 24);
    let mut cache =
        somatrain_submit::ModelCache::with_scorers(&cycle.cache_dir, cycle.scorers.clone());
    let mut candidates = Vec::new();
    for (i, chunk) in chunks.iter().enumerate() {
        if cycle.train.stop.requested() {
            report(format!(
                "stopped as asked after scoring {i} of {} chunks; nothing submitted",
                chunks.len()
            ));
            return Ok(());
        }
        let scores =
            somatrain_submit::score_with_models(chain, &mut cache, &[model_id], chunk).await?;
        for target in &targets {
            if let Some(evaluation) = somatrain_submit::evaluate(target, &scores)
                && evaluation.hit
            {
                candidates.push(somatrain_submit::Hit {
                    chunk: i,
                    evaluation,
                });
            }
        }
    }
    let sizes: Vec<u64> = chunks.iter().map(|c| c.len() as u64).collect();
    let bond_per_byte = chain.epoch_view().await?.params.submission_bond_per_byte;
    let chosen =
        somatrain_submit::choose_hits(candidates, &sizes, bond_per_byte, 1, SHANNONS_PER_SOMA);
    let Some(hit) = chosen.first() else {
        report(format!(
            "none of {} corpus chunks landed within a target's threshold; nothing submitted",
            chunks.len()
        ));
        return Ok(());
    };
    let executed =
        somatrain_submit::submit_hit(chain, keypair, storage, &hit.evaluation, &chunks[hit.chunk])
            .await?;
    if let ExecutionStatus::Failure(f) = executed.status() {
        return Err(DaemonError::Failed {
            what: "submission",
            digest: executed.digest.to_string(),
            kind: f.kind.name().to_string(),
            description: f.description.clone(),
        });
    }
    report(format!(
        "submitted a hit to target {} (distance {:.4} within {:.4}, bond {} SOMA)",
        hit.evaluation.target_id,
        hit.evaluation.distance,
        hit.evaluation.threshold,
        format_soma(sizes[hit.chunk] * bond_per_byte)
    ));
    // Claims open two epochs after the fill (the audit window).
    chain.advance_epoch().await?;
    let epoch = chain.advance_epoch().await?;
    let before = chain.balance(&keypair.address()).await?;
    let outcomes = somatrain_submit::claim_all(chain, keypair, false).await?;
    for o in &outcomes {
        report(match &o.result {
            Ok(executed) if executed.status().is_success() => format!(
                "epoch {epoch}: claimed target {} (reward pool {} SOMA)",
                o.target_id,
                format_soma(o.reward_pool)
            ),
            Ok(executed) => format!("target {}: {:?}", o.target_id, executed.status()),
            Err(e) => format!("target {}: {e}", o.target_id),
        });
    }
    let after = chain.balance(&keypair.address()).await?;
    report(format!(
        "claims paid {} SOMA (after their fees)",
        format_soma(after.saturating_sub(before))
    ));
    Ok(())
}
