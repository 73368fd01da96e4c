//! `somatrain run`: the rounds of a model as one state machine, read top to bottom.
//!
//! A round goes through these states, each derived from the journal (and, for the window, the
//! chain's clock), so a restarted process picks up exactly where the last one stopped:
//!
//! ```text
//!   Idle ──train──> Trained ──encrypt, upload──> Uploaded ──commit──> Committed
//!     ^                                                                   │ the epoch changes
//!     └──────────── Revealed <──reveal── RevealWindowOpen <───────────────┘
//! ```
//!
//! Beside them runs one more: **re-upload pending**. From the moment a round's reveal window
//! opens until its weights read back whole at their committed URL, a task looks at the URL and
//! uploads the encrypted file again while it does not serve it, whatever state the round is in.
//!
//! The reveal comes first. [`RoundState::RevealWindowOpen`] is matched before anything else,
//! and its only inputs are the journal, a gas coin and the epoch's clock (a small reply that no
//! other user can inflate): the bucket is never waited on before a reveal, because the chain
//! does not read the URL at the reveal and a missed first reveal costs half the stake. The next
//! round trains on a background thread while a commit waits for its window, so no training
//! step ever delays a reveal either. The model is created only once the first round has
//! trained and passed every check, so a run that diverges never stakes anything.
//!
//! A stop asked for while the loop runs (the train settings' [`somatrain_train::StopRequest`],
//! set by the signal handler of `run` and `localnet-cycle`) ends it without costing the stake:
//! the round in training stops after its step in progress with its checkpoint saved, nothing
//! new is committed, and a round already committed is still revealed in its window before the
//! loop ends.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use somatrain_protocol::effects::ExecutionErrorKind;
use somatrain_storage::Storage;
use somatrain_train::trainer::RunSummary;
use somatrain_train::{GradientEngine, TrainError, TrainSettings, Until};
use tokio::task::JoinHandle;

use crate::journal::{Phase, Upload};
use crate::metrics::Metrics;
use crate::publisher::{Adopt, NewModel, Publisher, RevealWindow, Served, pause_point, serve_once};
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

/// Where the round in flight stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoundState {
    /// The reveal epoch of a committed round: reveal now, before `deadline_ms`.
    RevealWindowOpen { deadline_ms: u64 },
    /// Committed; the window opens with the next epoch, due at `opens_ms`.
    Committed { opens_ms: u64 },
    /// Committed, and the node cannot tell the epoch right now: look again soon.
    CommittedClockUnknown,
    /// The window closed before the reveal landed.
    Missed,
    /// Encrypted, uploaded and journaled with its commitments; not yet committed.
    Uploaded,
    /// Nothing in flight: train the next round, or stop when enough are revealed.
    Idle,
}

impl RoundState {
    /// The state the journal (and, for a committed round, the chain's clock) says the round is in.
    async fn of(publisher: &mut Publisher) -> Result<Self, DaemonError> {
        let Some(pending) = &publisher.journal().pending else {
            return Ok(RoundState::Idle);
        };
        if pending.commit_epoch.is_none() {
            return Ok(RoundState::Uploaded);
        }
        match publisher.reveal_window().await {
            Ok(RevealWindow::Open { deadline_ms }) => {
                Ok(RoundState::RevealWindowOpen { deadline_ms })
            }
            Ok(RevealWindow::NotYet { opens_ms }) => Ok(RoundState::Committed { opens_ms }),
            Ok(RevealWindow::Missed) => Ok(RoundState::Missed),
            Err(DaemonError::Network(e)) if e.is_transient() => {
                tracing::warn!("cannot read the epoch from the node: {e}");
                Ok(RoundState::CommittedClockUnknown)
            }
            Err(e) => Err(e),
        }
    }
}

type Training = JoinHandle<Result<RunSummary, TrainError>>;

/// The re-upload pending state: a task that keeps one round's weights served.
struct Reupload {
    upload: Upload,
    task: JoinHandle<Served>,
}

/// Runs the loop until `config.rounds` rounds are revealed (or forever).
pub async fn run(
    publisher: &mut Publisher,
    config: &LoopConfig,
    metrics: Arc<Metrics>,
) -> Result<(), DaemonError> {
    let mut rounds = Rounds {
        publisher,
        config,
        metrics,
        training: None,
        extra_steps: 0,
        reupload: None,
        gave_up: None,
        advanced_for: None,
        earnings_seen: None,
        said_stop_waits: false,
    };
    rounds.start().await?;
    let result = rounds.drive().await;
    if let Some(handle) = rounds.training.take() {
        // Let a round in progress reach its checkpoint rather than tearing it mid-write.
        let _ = handle.await;
    }
    if let Some(reupload) = rounds.reupload.take() {
        reupload.task.abort();
    }
    rounds.metrics.observe_journal(rounds.publisher.journal());
    result
}

struct Rounds<'a> {
    publisher: &'a mut Publisher,
    config: &'a LoopConfig,
    metrics: Arc<Metrics>,
    /// The next round, training on a background thread.
    training: Option<Training>,
    /// Steps added because a round did not improve enough to be committed.
    extra_steps: u64,
    reupload: Option<Reupload>,
    /// Weights found impossible to serve again; not retried by this process.
    gave_up: Option<Upload>,
    /// The commit epoch the localnet's epoch was last advanced for (once per commit, so a
    /// slow look at the clock never skips a window).
    advanced_for: Option<u64>,
    /// When the filled targets were last listed for `earnings.json`.
    earnings_seen: Option<std::time::Instant>,
    /// Whether the stop's wait for a reveal was announced.
    said_stop_waits: bool,
}

impl Rounds<'_> {
    /// Settles what a killed process left in flight and refuses, before any training, what
    /// would end in a refused (and paid for) transaction.
    async fn start(&mut self) -> Result<(), DaemonError> {
        self.publisher.resolve_inflight().await?;
        let journal = self.publisher.journal();
        if journal.model_id.is_none() && self.config.adopt == Adopt::Refuse {
            // Stop before training when a lost journal would otherwise create a second model.
            if !self.publisher.unfinished_models().await?.is_empty() {
                return self
                    .publisher
                    .ensure_model(self.config.new_model, Adopt::Refuse)
                    .await
                    .map(|_| ());
            }
        }
        if journal.model_id.is_some()
            && journal.pending.is_none()
            && self.config.adopt != Adopt::CreateNew
        {
            self.publisher.check_model_committable().await?;
        }
        self.metrics.observe_journal(self.publisher.journal());
        Ok(())
    }

    async fn drive(&mut self) -> Result<(), DaemonError> {
        loop {
            self.settle_reupload().await?;
            self.metrics.observe_journal(self.publisher.journal());
            match RoundState::of(self.publisher).await? {
                // First, whatever else is going on.
                RoundState::RevealWindowOpen { deadline_ms } => self.reveal(deadline_ms).await?,
                RoundState::Committed { opens_ms } => {
                    if self.stop_asked() {
                        self.say_stop_waits_for_reveal(opens_ms);
                    } else {
                        self.train_next_in_background();
                    }
                    self.observe_balance().await;
                    self.wait_for_window(opens_ms).await?;
                }
                RoundState::CommittedClockUnknown => {
                    self.warn_if_late();
                    tokio::time::sleep(self.config.poll).await;
                }
                RoundState::Missed => {
                    self.publisher.abandon_pending()?;
                    // A missed first reveal leaves the model inactive: say so before training a
                    // round that could never be committed to it.
                    if self.config.adopt != Adopt::CreateNew {
                        self.publisher.check_model_committable().await?;
                    }
                }
                RoundState::Uploaded if self.stop_asked() => {
                    tracing::info!(
                        "round {} is uploaded but not committed; it is left for the same command \
                         to commit, since a commit now would oblige a reveal next epoch",
                        self.round()
                    );
                    return self.stop().await;
                }
                RoundState::Uploaded => {
                    self.publisher.commit_pending().await?;
                    self.metrics.count_commit();
                }
                RoundState::Idle => {
                    self.observe_balance().await;
                    if self.stop_asked() || !self.wanted(self.round()) {
                        return self.stop().await;
                    }
                    let Some(trained) = self.train().await? else {
                        continue;
                    };
                    self.upload(trained).await?;
                }
            }
        }
    }

    /// The wallet's balance for `/metrics`, and the model's earnings; never looked at while a
    /// reveal window is open.
    async fn observe_balance(&mut self) {
        let address = self.publisher.keypair().address();
        if let Ok(balance) = self.publisher.chain().balance(&address).await {
            self.metrics.observe_balance(balance);
        }
        self.observe_earnings().await;
    }

    /// Writes down the targets the model won (at most every [`crate::earnings::OBSERVE_EVERY`]):
    /// the chain forgets them once claimed. A failure is logged and tried again next time.
    async fn observe_earnings(&mut self) {
        let Some(model_id) = self.publisher.journal().model_id else {
            return;
        };
        if self
            .earnings_seen
            .is_some_and(|t| t.elapsed() < crate::earnings::OBSERVE_EVERY)
        {
            return;
        }
        self.earnings_seen = Some(std::time::Instant::now());
        match crate::earnings::observe(self.publisher.chain(), &self.config.run_dir, model_id).await
        {
            Ok(summary) => self.metrics.observe_earnings(summary),
            Err(e) => tracing::warn!("recording the model's earnings: {e}"),
        }
    }

    fn stop_asked(&self) -> bool {
        self.config.train.stop.requested()
    }

    /// Says once, when a stop is asked for with a round committed, that the loop stays up for
    /// its reveal, and what a second signal would cost.
    fn say_stop_waits_for_reveal(&mut self, opens_ms: u64) {
        if self.said_stop_waits {
            return;
        }
        self.said_stop_waits = true;
        tracing::warn!(
            "asked to stop: round {} is committed, and its reveal window opens in {:.0} s; \
             staying up to reveal it, then stopping. Stopping now instead (a second signal) \
             leaves the reveal to the next `somatrain run` or `somatrain reveal`, which must \
             run before that window closes: a missed first reveal costs half the stake",
            self.round(),
            opens_ms.saturating_sub(now_ms()) as f64 / 1000.0
        );
    }

    /// The round trained next: one past the last revealed.
    fn round(&self) -> u64 {
        self.publisher.journal().rounds_revealed + 1
    }

    fn wanted(&self, round: u64) -> bool {
        self.config.rounds.is_none_or(|n| round <= n)
    }

    // --- Idle -> Trained ------------------------------------------------------------------

    fn start_training(&self, round: u64) -> Training {
        let (run_dir, settings, engine, metrics) = (
            self.config.run_dir.clone(),
            self.config.train.clone(),
            self.config.engine.clone(),
            self.metrics.clone(),
        );
        let until_step = round * self.config.steps_per_round + self.extra_steps;
        tracing::info!("training round {round} (until step {until_step})");
        tokio::task::spawn_blocking(move || {
            let mut engine = (engine.0)().map_err(TrainError::Settings)?;
            somatrain_train::run_with(
                &run_dir,
                &settings,
                Until::Step(until_step),
                engine.as_mut(),
                &mut |log| metrics.observe_step(log.step, log.loss, log.tokens_per_s),
            )
        })
    }

    /// While a commit waits for its window, the next round trains.
    fn train_next_in_background(&mut self) {
        let next = self.round() + 1;
        if self.training.is_none() && self.wanted(next) {
            self.training = Some(self.start_training(next));
        }
    }

    /// Trains the round (or takes the one training already) and checks it is worth committing;
    /// None when it is not, and more steps were asked for, or when a stop was asked for.
    async fn train(&mut self) -> Result<Option<RunSummary>, DaemonError> {
        let round = self.round();
        self.publisher.set_phase(Phase::Training)?;
        let mut handle = match self.training.take() {
            Some(handle) => handle,
            None => self.start_training(round),
        };
        // A re-upload may finish while the round trains: its outcome is settled as it comes.
        let summary = loop {
            tokio::select! {
                joined = &mut handle => break joined,
                _ = tokio::time::sleep(self.config.poll) => {
                    self.settle_reupload().await?;
                    self.observe_earnings().await;
                }
            }
        };
        let summary = match summary
            .map_err(|e| DaemonError::Io(format!("the training thread failed: {e}")))?
        {
            Err(TrainError::Stopped { step }) => {
                tracing::info!(
                    "round {round}: training stopped after step {step} as asked, its checkpoint \
                     saved; the same command trains on from there"
                );
                return Ok(None);
            }
            other => other.map_err(DaemonError::Train)?,
        };
        pause_point("trained");
        if let Some(h) = &summary.round.heldout {
            tracing::info!(
                "round {round}: step {}, held-out loss {:.4} ({:.3} bits/byte)",
                summary.end_step,
                h.loss,
                h.bits_per_byte
            );
        }
        let Some(min) = self.config.min_improvement else {
            return Ok(Some(summary));
        };
        let Some(new) = summary.round.heldout.as_ref() else {
            return Err(DaemonError::Usage(
                "--min-improvement compares held-out losses, but this round has no held-out \
                 score (the corpus has no held-out documents: raise --heldout-per-mille or give \
                 more documents)"
                    .into(),
            ));
        };
        let last = self
            .publisher
            .journal()
            .last_revealed
            .as_ref()
            .and_then(|r| r.heldout.as_ref());
        if let Some(last) = last
            && new.loss > last.loss - min
        {
            tracing::info!(
                "round {round}: held-out loss {:.4} is not {min} below the last revealed round's \
                 {:.4}; training {} more steps instead of committing",
                new.loss,
                last.loss,
                self.config.steps_per_round
            );
            self.extra_steps += self.config.steps_per_round;
            return Ok(None);
        }
        Ok(Some(summary))
    }

    // --- Trained -> Uploaded --------------------------------------------------------------

    /// Checks the round, creates the model if there is none yet, encrypts and uploads.
    async fn upload(&mut self, trained: RunSummary) -> Result<(), DaemonError> {
        let round = &trained.round;
        let weights = round
            .verified_weights(&self.config.run_dir)
            .map_err(DaemonError::Train)?;
        self.publisher
            .check_round(&weights, &round.embedding, round.heldout.as_ref())
            .await?;
        self.publisher
            .ensure_model(self.config.new_model, self.config.adopt)
            .await?;
        self.metrics.observe_journal(self.publisher.journal());
        self.publisher
            .prepare(
                self.round(),
                trained.end_step,
                &weights,
                round.embedding.clone(),
                round.heldout.clone(),
            )
            .await
    }

    // --- Committed -> RevealWindowOpen ----------------------------------------------------

    /// Sleeps towards the window (or, on a localnet, advances the epoch) and returns to look.
    async fn wait_for_window(&mut self, opens_ms: u64) -> Result<(), DaemonError> {
        self.publisher.set_phase(Phase::AwaitingReveal)?;
        let commit_epoch = self
            .publisher
            .journal()
            .pending
            .as_ref()
            .and_then(|p| p.commit_epoch);
        if self.config.advance == EpochAdvance::Admin && self.advanced_for != commit_epoch {
            let epoch = self.publisher.chain().advance_epoch().await?;
            self.advanced_for = commit_epoch;
            tracing::info!("advanced the localnet to epoch {epoch}");
            return Ok(());
        }
        // To just past the boundary, but never longer than one poll.
        let until_open = Duration::from_millis(opens_ms.saturating_sub(now_ms()) + 25);
        tokio::time::sleep(until_open.min(self.config.poll)).await;
        Ok(())
    }

    // --- RevealWindowOpen -> Revealed -----------------------------------------------------

    /// Sends the reveal, retrying what may pass (the node unreachable, a fee the wallet cannot
    /// pay yet) until the deadline; the re-upload of the weights starts beside it, never in
    /// front of it. A failure that no retry can help stops at once, the round kept pending.
    async fn reveal(&mut self, deadline_ms: u64) -> Result<(), DaemonError> {
        if let Some(upload) = self.publisher.watch_pending_upload()? {
            self.keep_served(upload);
        }
        let round = self
            .publisher
            .journal()
            .pending
            .as_ref()
            .map_or(0, |p| p.round);
        let mut backoff = Duration::from_millis(250);
        loop {
            let error = match self.publisher.reveal_pending().await {
                Ok(_) => {
                    self.metrics.count_reveal();
                    return Ok(());
                }
                Err(e) => e,
            };
            if let DaemonError::Failed {
                kind, description, ..
            } = &error
                && kind == ExecutionErrorKind::ModelRevealEpochMismatch.name()
            {
                self.publisher.abandon_pending()?;
                return Err(DaemonError::Usage(format!(
                    "the reveal landed outside its window: {description}"
                )));
            }
            if is_final(&error) {
                return Err(DaemonError::Usage(format!(
                    "the reveal of round {round} cannot succeed ({error}); no retry can help. \
                     The round stays pending in the journal"
                )));
            }
            if !matches!(error, DaemonError::Network(_) | DaemonError::Failed { .. }) {
                return Err(error);
            }
            if now_ms() >= deadline_ms.max(self.publisher.journal().reveal_deadline_ms.unwrap_or(0))
            {
                self.publisher.abandon_pending()?;
                return Err(error);
            }
            tracing::warn!("the reveal of round {round} failed, retrying: {error}");
            self.warn_if_late();
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(self.config.poll.max(Duration::from_secs(1)));
            if let Err(e) = self.publisher.resolve_inflight().await {
                tracing::warn!("{e}");
            }
        }
    }

    fn warn_if_late(&self) {
        let journal = self.publisher.journal();
        let (Some(deadline), Some(pending)) = (journal.reveal_deadline_ms, &journal.pending) else {
            return;
        };
        let now = now_ms();
        if now >= deadline {
            tracing::error!(
                "the reveal window of round {} has closed and its reveal has not landed",
                pending.round
            );
        } else if deadline - now <= self.config.warn_before.as_millis() as u64 {
            tracing::warn!(
                "the reveal of round {} has not landed and its window closes in {:.1} s",
                pending.round,
                (deadline - now) as f64 / 1000.0
            );
        }
    }

    // --- Re-upload pending ----------------------------------------------------------------

    /// Starts the task that keeps `upload` served, unless it runs already.
    fn keep_served(&mut self, upload: Upload) {
        if self
            .reupload
            .as_ref()
            .is_some_and(|r| r.upload.manifest == upload.manifest)
        {
            return;
        }
        if let Some(old) = self.reupload.take() {
            old.task.abort();
        }
        let task = tokio::spawn(keep_served(
            self.publisher.storage(),
            upload.clone(),
            self.metrics.clone(),
            self.config.poll,
        ));
        self.reupload = Some(Reupload { upload, task });
    }

    /// Applies the re-upload task's outcome to the journal once it has one, and starts the task
    /// for a record that has none (left by a previous process, say).
    async fn settle_reupload(&mut self) -> Result<(), DaemonError> {
        if let Some(reupload) = &self.reupload
            && reupload.task.is_finished()
        {
            let Reupload { upload, task } = self.reupload.take().expect("checked above");
            match task.await {
                Ok(Served::Whole) => {
                    tracing::info!(
                        "the weights of round {} read back whole at {}",
                        upload.round,
                        upload.manifest.url
                    );
                    self.metrics.observe_unserved(None);
                    self.publisher.upload_confirmed(&upload)?;
                }
                Ok(Served::Impossible(e)) => {
                    tracing::error!(
                        "the weights of round {} cannot be served again at {} ({e}); \
                         validators cannot fetch them",
                        upload.round,
                        upload.manifest.url
                    );
                    self.publisher.upload_missing(&upload)?;
                    self.gave_up = Some(upload);
                }
                Ok(Served::Missing(_)) | Err(_) => {}
            }
        }
        let Some(upload) = self.publisher.journal().reupload.clone() else {
            return Ok(());
        };
        if self.metrics.unserved_round() == Some(upload.round) {
            self.publisher.upload_missing(&upload)?;
        }
        let gave_up = self
            .gave_up
            .as_ref()
            .is_some_and(|g| g.manifest == upload.manifest);
        if self.reupload.is_none() && !gave_up {
            self.keep_served(upload);
        }
        Ok(())
    }

    /// The rounds asked for are revealed, or a stop was asked for with no reveal due: stop once
    /// the revealed weights are served.
    async fn stop(&mut self) -> Result<(), DaemonError> {
        if let Some(reupload) = &self.reupload {
            tracing::info!(
                "waiting for the weights of round {} to be served before stopping",
                reupload.upload.round
            );
        }
        while self.reupload.is_some() {
            tokio::time::sleep(self.config.poll.min(Duration::from_millis(250))).await;
            self.settle_reupload().await?;
        }
        self.publisher.set_phase(Phase::Stopped)?;
        let revealed = self.publisher.journal().rounds_revealed;
        if self.stop_asked() {
            tracing::info!(
                "stopped as asked, with {revealed} rounds revealed and no reveal due; the same \
                 command goes on from here"
            );
        } else {
            tracing::info!("{revealed} rounds revealed; stopping");
        }
        Ok(())
    }
}

/// Looks at the URL until it serves the committed bytes, uploading them again each time it does
/// not, with a loud warning (log and `/metrics`) while they are missing.
async fn keep_served(
    storage: Arc<Storage>,
    upload: Upload,
    metrics: Arc<Metrics>,
    poll: Duration,
) -> Served {
    let mut backoff = Duration::from_millis(500);
    loop {
        match serve_once(&storage, &upload).await {
            Served::Missing(e) => {
                metrics.observe_unserved(Some(upload.round));
                tracing::error!(
                    "the weights of round {} are missing at {} and could not be uploaded again \
                     ({e}); validators that fetch them now will report the model. Retrying in \
                     {:.1} s",
                    upload.round,
                    upload.manifest.url,
                    backoff.as_secs_f64()
                );
            }
            done => return done,
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(poll.max(Duration::from_secs(30)));
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
