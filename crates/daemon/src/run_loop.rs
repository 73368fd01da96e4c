//! `somatrain run`: train a round, commit it, wait for the epoch change, reveal at once, repeat.
//!
//! The next round trains in a background thread while the loop waits for the reveal window, but
//! a new commit is only prepared once the pending reveal has landed. The window is watched
//! against the chain's epoch start and duration, with short polls around the boundary, so the
//! reveal goes out as soon as the epoch changes. The model is created only once the first round
//! has trained and passed every check, so a run that diverges never stakes anything.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use somatrain_train::trainer::RunSummary;
use somatrain_train::{GradientEngine, TrainError, TrainSettings, Until};
use tokio::task::JoinHandle;

use somatrain_protocol::effects::ExecutionErrorKind;

use crate::journal::Phase;
use crate::metrics::Metrics;
use crate::publisher::{Adopt, NewModel, Publisher, RevealWindow, pause_point};
use crate::{DaemonError, now_ms};

/// How the epoch moves on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EpochAdvance {
    /// Wait for the network's clock.
    Wait,
    /// Ask the localnet's admin service, as soon as a commit is in.
    Admin,
}

/// Makes the gradient engine a round trains with (the CPU's, or a GPU's); called on the
/// training thread, so the engine itself need not cross threads.
#[derive(Clone)]
pub struct EngineFactory(
    pub Arc<dyn Fn() -> Result<Box<dyn GradientEngine>, String> + Send + Sync>,
);

impl EngineFactory {
    /// The hand-written CPU backward.
    pub fn cpu() -> Self {
        EngineFactory(Arc::new(|| {
            Ok(Box::new(somatrain_model::cpu::train::TrainPass::new()) as Box<dyn GradientEngine>)
        }))
    }
}

impl std::fmt::Debug for EngineFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EngineFactory")
    }
}

#[derive(Debug, Clone)]
pub struct LoopConfig {
    pub run_dir: PathBuf,
    pub train: TrainSettings,
    pub engine: EngineFactory,
    pub steps_per_round: u64,
    /// Stop after this many rounds are revealed (None: run until stopped).
    pub rounds: Option<u64>,
    /// The model created when the journal names none.
    pub new_model: NewModel,
    pub adopt: Adopt,
    pub advance: EpochAdvance,
    /// Longest sleep between looks at the node.
    pub poll: Duration,
    /// Warn when the reveal has not landed this long before its deadline.
    pub warn_before: Duration,
    /// Commit a round only if its held-out loss is at least this much below the last revealed
    /// round's; otherwise train another `steps_per_round` steps and look again.
    pub min_improvement: Option<f32>,
}

type Training = JoinHandle<Result<RunSummary, TrainError>>;

fn start_training(
    config: &LoopConfig,
    round: u64,
    extra_steps: u64,
    metrics: Arc<Metrics>,
) -> Training {
    let (run_dir, settings, engine) = (
        config.run_dir.clone(),
        config.train.clone(),
        config.engine.clone(),
    );
    let until_step = round * config.steps_per_round + extra_steps;
    let until = Until::Step(until_step);
    tracing::info!("training round {round} (until step {until_step})");
    tokio::task::spawn_blocking(move || {
        let mut engine = (engine.0)().map_err(TrainError::Settings)?;
        somatrain_train::run_with(&run_dir, &settings, until, engine.as_mut(), &mut |log| {
            metrics.observe_step(log.step, log.loss, log.tokens_per_s);
        })
    })
}

async fn finish_training(handle: Training) -> Result<RunSummary, DaemonError> {
    handle
        .await
        .map_err(|e| DaemonError::Io(format!("the training thread failed: {e}")))?
        .map_err(DaemonError::Train)
}

/// Runs the loop until `config.rounds` rounds are revealed (or forever).
pub async fn run(
    publisher: &mut Publisher,
    config: &LoopConfig,
    metrics: Arc<Metrics>,
) -> Result<(), DaemonError> {
    publisher.resolve_inflight().await?;
    if publisher.journal.model_id.is_none() && config.adopt == Adopt::Refuse {
        // Stop before training when a lost journal would otherwise create a second model.
        let unfinished = publisher.unfinished_models().await?;
        if !unfinished.is_empty() {
            return publisher
                .ensure_model(config.new_model, Adopt::Refuse)
                .await
                .map(|_| ());
        }
    }
    metrics.observe_journal(&publisher.journal);
    let mut training: Option<Training> = None;
    let mut extra_steps = 0;
    let result = drive(publisher, config, &metrics, &mut training, &mut extra_steps).await;
    if let Some(handle) = training {
        // Let a round in progress reach its checkpoint rather than tearing it mid-write.
        let _ = handle.await;
    }
    metrics.observe_journal(&publisher.journal);
    result
}

async fn drive(
    publisher: &mut Publisher,
    config: &LoopConfig,
    metrics: &Arc<Metrics>,
    training: &mut Option<Training>,
    extra_steps: &mut u64,
) -> Result<(), DaemonError> {
    let wanted = |round: u64| config.rounds.is_none_or(|n| round <= n);
    loop {
        metrics.observe_journal(&publisher.journal);
        if let Ok(balance) = publisher
            .chain
            .balance(&publisher.keypair().address())
            .await
        {
            metrics.observe_balance(balance);
        }
        if let Some(pending) = publisher.journal.pending.clone() {
            if pending.commit_epoch.is_none() {
                publisher.commit_pending().await?;
                metrics.count_commit();
                continue;
            }
            let next = pending.round + 1;
            if training.is_none() && wanted(next) {
                *training = Some(start_training(config, next, *extra_steps, metrics.clone()));
            }
            match wait_for_window(publisher, config).await? {
                RevealWindow::Open { .. } => {
                    reveal_before_deadline(publisher, config).await?;
                    metrics.count_reveal();
                }
                RevealWindow::Missed => publisher.abandon_pending()?,
                RevealWindow::NotYet { .. } => {
                    unreachable!("wait_for_window returns once the window is open or gone")
                }
            }
            continue;
        }
        let round = publisher.journal.rounds_revealed + 1;
        if !wanted(round) {
            publisher.set_phase(Phase::Stopped)?;
            tracing::info!(
                "{} rounds revealed; stopping",
                publisher.journal.rounds_revealed
            );
            return Ok(());
        }
        publisher.set_phase(Phase::Training)?;
        let handle = match training.take() {
            Some(handle) => handle,
            None => start_training(config, round, *extra_steps, metrics.clone()),
        };
        let summary = finish_training(handle).await?;
        pause_point("trained");
        if let Some(h) = &summary.round.heldout {
            tracing::info!(
                "round {round}: step {}, held-out loss {:.4} ({:.3} bits/byte)",
                summary.end_step,
                h.loss,
                h.bits_per_byte
            );
        }
        if config.min_improvement.is_some() && summary.round.heldout.is_none() {
            return Err(DaemonError::Usage(
                "--min-improvement compares held-out losses, but this round has no held-out \
                 score (the corpus has no held-out documents: raise --heldout-per-mille or give \
                 more documents)"
                    .into(),
            ));
        }
        if let (Some(min), Some(last), Some(new)) = (
            config.min_improvement,
            publisher
                .journal
                .last_revealed
                .as_ref()
                .and_then(|r| r.heldout.as_ref()),
            summary.round.heldout.as_ref(),
        ) && new.loss > last.loss - min
        {
            tracing::info!(
                "round {round}: held-out loss {:.4} is not {min} below the last revealed round's \
                 {:.4}; training {} more steps instead of committing",
                new.loss,
                last.loss,
                config.steps_per_round
            );
            *extra_steps += config.steps_per_round;
            continue;
        }
        publisher
            .check_round(
                &summary.round.weights,
                &summary.round.embedding,
                summary.round.heldout.as_ref(),
            )
            .await?;
        publisher
            .ensure_model(config.new_model, config.adopt)
            .await?;
        metrics.observe_journal(&publisher.journal);
        publisher
            .prepare(
                round,
                summary.end_step,
                &summary.round.weights,
                summary.round.embedding.clone(),
                summary.round.heldout.clone(),
            )
            .await?;
    }
}

/// Waits until the pending round's reveal window opens (or is found closed).
async fn wait_for_window(
    publisher: &mut Publisher,
    config: &LoopConfig,
) -> Result<RevealWindow, DaemonError> {
    publisher.set_phase(Phase::AwaitingReveal)?;
    let mut advanced = false;
    loop {
        let window = match publisher.reveal_window().await {
            Ok(w) => w,
            Err(DaemonError::Network(e)) if e.is_transient() => {
                tracing::warn!("cannot read the epoch from the node: {e}");
                warn_if_late(publisher, config);
                tokio::time::sleep(config.poll).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        match window {
            RevealWindow::NotYet { opens_ms } => match config.advance {
                EpochAdvance::Admin if !advanced => {
                    let epoch = publisher.chain.advance_epoch().await?;
                    tracing::info!("advanced the localnet to epoch {epoch}");
                    advanced = true;
                }
                _ => {
                    // Sleep to just past the boundary, but never longer than one poll.
                    let until_open = Duration::from_millis(opens_ms.saturating_sub(now_ms()) + 25);
                    tokio::time::sleep(until_open.min(config.poll)).await;
                }
            },
            other => return Ok(other),
        }
    }
}

fn warn_if_late(publisher: &Publisher, config: &LoopConfig) {
    if let Some(deadline) = publisher.journal.reveal_deadline_ms {
        let left = deadline.saturating_sub(now_ms());
        if left <= config.warn_before.as_millis() as u64 {
            tracing::warn!(
                "the reveal of round {} has not landed and its window closes in {:.1} s",
                publisher.journal.pending.as_ref().map_or(0, |p| p.round),
                left as f64 / 1000.0
            );
        }
    }
}

/// Failures of an executed reveal that no retry can turn around: what was committed and what
/// is revealed disagree, or the model is not ours to reveal.
const FINAL_REVEAL_FAILURES: &[ExecutionErrorKind] = &[
    ExecutionErrorKind::ModelDecryptionKeyCommitmentMismatch,
    ExecutionErrorKind::ModelEmbeddingCommitmentMismatch,
    ExecutionErrorKind::EmbeddingDimensionMismatch,
    ExecutionErrorKind::NotModelOwner,
    ExecutionErrorKind::ModelNotFound,
    ExecutionErrorKind::ModelNoPendingUpdate,
    ExecutionErrorKind::ModelNotPending,
];

fn is_final(e: &DaemonError) -> bool {
    match e {
        DaemonError::Failed { kind, .. } => FINAL_REVEAL_FAILURES.iter().any(|k| k.name() == kind),
        // Refused as malformed (the node checks the transaction before executing it).
        DaemonError::Network(e) => e.is_malformed(),
        _ => false,
    }
}

/// Reveals, retrying failures (the node unreachable, the bucket not serving, a failure that may
/// pass later, such as a balance too low for the fee) until the deadline. A failure that no
/// retry can help stops at once, keeping the pending round in the journal.
async fn reveal_before_deadline(
    publisher: &mut Publisher,
    config: &LoopConfig,
) -> Result<(), DaemonError> {
    let mut backoff = Duration::from_millis(250);
    loop {
        match publisher.reveal_pending().await {
            Ok(_) => return Ok(()),
            Err(e) if is_final(&e) => {
                return Err(DaemonError::Usage(format!(
                    "the reveal of round {} cannot succeed ({e}); no retry can help. The round \
                     stays pending in the journal",
                    publisher.journal.pending.as_ref().map_or(0, |p| p.round)
                )));
            }
            Err(DaemonError::Failed {
                kind, description, ..
            }) if kind == ExecutionErrorKind::ModelRevealEpochMismatch.name() => {
                publisher.abandon_pending()?;
                return Err(DaemonError::Usage(format!(
                    "the reveal landed outside its window: {description}"
                )));
            }
            Err(
                e
                @ (DaemonError::Network(_) | DaemonError::Storage(_) | DaemonError::Failed { .. }),
            ) => {
                let deadline = publisher.journal.reveal_deadline_ms.unwrap_or(0);
                if now_ms() >= deadline {
                    publisher.abandon_pending()?;
                    return Err(e);
                }
                tracing::warn!("reveal failed, retrying: {e}");
                warn_if_late(publisher, config);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(config.poll.max(Duration::from_secs(1)));
                if let Err(e) = publisher.resolve_inflight().await {
                    tracing::warn!("{e}");
                }
            }
            Err(e) => return Err(e),
        }
    }
}
