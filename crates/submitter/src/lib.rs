//! The data submitter as a service: what the trainer's daemon is for trainers, for submitters.
//!
//! It reads corpus pieces (the trainer's corpus sources, cut into pieces of at most the network's
//! submission size, seeded and resumable by the same cursor), scores each once per distinct
//! model of the open targets (weights from `somatrain-submit`'s cache, on the chosen device),
//! and queues every open target the piece hits. A transaction task beside the scoring submits
//! the queue (upload, read back, sign, journal, send), claims what has settled as soon as the
//! chain allows, and merges coins. Everything it does is journaled ([`journal`]) before it is
//! sent, so after a kill -9 nothing is submitted twice, no bond is lost track of, and every
//! claim still happens.
//!
//! Owns: the loop, the journal, the limits, `/metrics`. It uses `submit` for scoring, the weights
//! cache and hit evaluation, `train`'s corpus stream for pieces, `storage` for uploads and the
//! client for the chain; it never reimplements a chain rule (the chain checks them).

#![forbid(unsafe_code)]

pub mod journal;
pub mod metrics;

use somatrain_protocol::transaction::{ClaimRewards, SubmitData};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use somatrain_client::chain::{ChainClient, ChainError, Executed};
use somatrain_client::view::{EpochView, ModelState, TargetView};
use somatrain_model::score::Score;
use somatrain_protocol::crypto::Commitment;
use somatrain_protocol::effects::ExecutionStatus;
use somatrain_protocol::object::TargetStatus;
use somatrain_protocol::{
    Keypair, ObjectId, SignedTransaction, SomaTensor, TransactionData, TransactionKind,
};
use somatrain_storage::Storage;
use somatrain_submit::ModelCache;
use somatrain_train::corpus::{CorpusConfig, Position, TrainStream};

use journal::{Hit, Inflight, Journal, State};
use metrics::{Gauges, Metrics};

#[derive(Debug, thiserror::Error)]
pub enum SubmitterError {
    #[error(transparent)]
    Chain(#[from] ChainError),
    #[error(transparent)]
    Submit(#[from] somatrain_submit::SubmitError),
    #[error(transparent)]
    Corpus(#[from] somatrain_train::corpus::CorpusError),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("journal: {0}")]
    Journal(String),
    #[error("{0}")]
    Settings(String),
}

impl SubmitterError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        SubmitterError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Per-epoch ceilings on what the submitter spends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Shannons of bond sent in one epoch.
    pub bond_per_epoch: u64,
    /// Shannons of fees paid in one epoch.
    pub fees_per_epoch: u64,
    pub submissions_per_epoch: u64,
}

#[derive(Debug, Clone)]
pub struct Settings {
    /// Journal, cursor and queued pieces.
    pub state_dir: PathBuf,
    /// The corpus; its `max_seq_len` is the piece size in bytes.
    pub corpus: CorpusConfig,
    pub limits: Limits,
    /// Refresh the targets after this many pieces even without a hit or a new epoch.
    pub refresh_every: u64,
    /// Merge coins when the wallet holds more than this many.
    pub merge_coins_above: usize,
    pub dry_run: bool,
    /// Stop scoring after this many pieces (in this process), then wait until every
    /// submission is settled (claimed, or refused) and exit.
    pub max_pieces: Option<u64>,
    /// Once scoring is over, submit what is queued and exit without waiting for claims (they
    /// stay journaled for the next start). `bench submitter` uses it.
    pub exit_when_scored: bool,
    pub progress_every: Duration,
    /// How often the transaction task and an idle loop look at the chain.
    pub poll: Duration,
}

/// Counters are saved at least this often while nothing else changes.
const JOURNAL_SAVE_EVERY: Duration = Duration::from_secs(5);

/// A piece's hits are written under `pieces/` by checksum until they are submitted.
fn piece_path(state_dir: &Path, checksum: &str) -> PathBuf {
    state_dir.join("pieces").join(format!("{checksum}.bin"))
}

/// What the scoring loop and the transaction task share.
struct Shared {
    chain: ChainClient,
    keypair: Keypair,
    storage: Option<Storage>,
    settings: Settings,
    journal: Mutex<Journal>,
    metrics: Arc<Metrics>,
    /// The epoch the loop saw last (the journal prunes by it).
    epoch: std::sync::atomic::AtomicU64,
    /// Set by the transaction task after a fill or a refusal: the targets changed.
    refresh: AtomicBool,
    /// Set when scoring is over: the task exits once nothing is left to settle.
    scoring_done: AtomicBool,
    stop: Arc<AtomicBool>,
    wake: tokio::sync::Notify,
}

impl Shared {
    /// Applies `change` to the journal and saves it; metrics follow.
    fn update<T>(&self, change: impl FnOnce(&mut Journal) -> T) -> Result<T, SubmitterError> {
        self.change(true, change)
    }

    /// As [`Shared::update`], saving only when `save` (counters may wait for the next save;
    /// anything that must survive a crash may not).
    fn change<T>(
        &self,
        save: bool,
        change: impl FnOnce(&mut Journal) -> T,
    ) -> Result<T, SubmitterError> {
        let mut journal = self.journal.lock().expect("journal lock");
        let out = change(&mut journal);
        if save {
            journal.save(&self.settings.state_dir, self.epoch.load(Ordering::Relaxed))?;
        }
        self.metrics.observe_journal(&journal);
        Ok(out)
    }

    /// Moves a hit to `state` and saves the journal.
    fn set_state(&self, target: ObjectId, state: State) -> Result<(), SubmitterError> {
        self.update(|j| j.set_state(&target, state))
    }

    fn read<T>(&self, f: impl FnOnce(&Journal) -> T) -> T {
        f(&self.journal.lock().expect("journal lock"))
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

/// The service: open it, then [`Submitter::run`].
pub struct Submitter {
    shared: Arc<Shared>,
    cache: ModelCache,
}

/// What a run did, for the caller to print.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    pub pieces_scored: u64,
    pub hits: u64,
    pub submissions: u64,
    pub refused: u64,
    pub dropped: u64,
    pub upload_failures: u64,
    pub claims: u64,
    pub claimed_shannons: i64,
    pub bond_outstanding: u64,
    pub weights_downloads: u64,
    /// This process's scoring loop: pieces, tokens, its wall time and the part spent scoring.
    pub run: RunTiming,
}

#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct RunTiming {
    pub pieces: u64,
    pub tokens: u64,
    pub loop_seconds: f64,
    pub scoring_seconds: f64,
    /// The same until the first piece was done: it includes loading each model (from the
    /// disk cache, or downloading it), once per process.
    pub first_piece_loop_seconds: f64,
    pub first_piece_scoring_seconds: f64,
}

impl Submitter {
    /// Opens (or creates) the state directory's journal for this chain and wallet.
    pub async fn open(
        chain: ChainClient,
        keypair: Keypair,
        storage: Option<Storage>,
        cache: ModelCache,
        settings: Settings,
        metrics: Arc<Metrics>,
        stop: Arc<AtomicBool>,
    ) -> Result<Self, SubmitterError> {
        if storage.is_none() && !settings.dry_run {
            return Err(SubmitterError::Settings(
                "submitting needs a bucket for the data (or --dry-run)".into(),
            ));
        }
        let dir = &settings.state_dir;
        somatrain_model::io::create_private_dir(&dir.join("pieces"))
            .map_err(|e| SubmitterError::io(dir, e))?;
        let chain_id =
            chain.service_info().await?.chain_id.ok_or_else(|| {
                SubmitterError::Journal("GetServiceInfo named no chain id".into())
            })?;
        let wallet = keypair.address().to_string();
        let journal = match Journal::load(dir)? {
            Some(j) if j.chain_id != chain_id => {
                return Err(SubmitterError::Journal(format!(
                    "{} belongs to chain {}, not this network's {chain_id}; use another \
                     --state-dir",
                    dir.display(),
                    j.chain_id
                )));
            }
            Some(j) if j.wallet != wallet => {
                return Err(SubmitterError::Journal(format!(
                    "{} belongs to wallet {}, not {wallet}: its bonds and claims are that \
                     wallet's; use another --state-dir",
                    dir.display(),
                    j.wallet
                )));
            }
            Some(j) => j,
            None => Journal::new(&chain_id, &wallet),
        };
        let epoch = chain.epoch_clock().await?.epoch;
        metrics.observe_journal(&journal);
        Ok(Submitter {
            shared: Arc::new(Shared {
                chain,
                keypair,
                storage,
                settings,
                journal: Mutex::new(journal),
                metrics,
                epoch: epoch.into(),
                refresh: AtomicBool::new(true),
                scoring_done: AtomicBool::new(false),
                stop,
                wake: tokio::sync::Notify::new(),
            }),
            cache,
        })
    }

    /// Scores until stopped (or `max_pieces`), with the transaction task beside it; then waits
    /// for the task to settle what it can.
    pub async fn run(mut self) -> Result<Summary, SubmitterError> {
        let shared = self.shared.clone();
        resolve_inflight(&shared).await?;
        let task = tokio::spawn(transactions(shared.clone()));
        let mut timing = RunTiming::default();
        let scored = self.score_loop(&mut timing).await;
        shared.scoring_done.store(true, Ordering::Relaxed);
        shared.wake.notify_one();
        let settled = task
            .await
            .map_err(|e| SubmitterError::Journal(format!("the transaction task failed: {e}")))?;
        scored?;
        settled?;
        let downloads = self.cache.downloads();
        Ok(shared.read(|j| Summary {
            pieces_scored: j.totals.pieces_scored,
            hits: j.totals.hits,
            submissions: j.totals.submissions,
            refused: j.totals.refused,
            dropped: j.totals.dropped,
            upload_failures: j.totals.upload_failures,
            claims: j.totals.claims,
            claimed_shannons: j.totals.claimed_shannons,
            bond_outstanding: j.bond_outstanding(),
            weights_downloads: downloads,
            run: timing,
        }))
    }

    async fn score_loop(&mut self, timing: &mut RunTiming) -> Result<(), SubmitterError> {
        let shared = self.shared.clone();
        let settings = &shared.settings;
        let cursor_path = settings.state_dir.join("cursor.bin");
        let position = load_cursor(&cursor_path)?;
        let mut stream =
            tokio::task::block_in_place(|| TrainStream::open(settings.corpus.clone(), position))?;
        let mut view: Option<EpochView> = None;
        let mut targets: Vec<TargetView> = Vec::new();
        let mut models: Vec<ObjectId> = Vec::new();
        let mut since_refresh = 0u64;
        let mut pieces = 0u64;
        let started = Instant::now();
        let mut scoring_time = Duration::ZERO;
        let mut interval = (Instant::now(), 0u64, Duration::ZERO, 0u64);
        // Models whose weights failed to load: skipped until the next refresh.
        let mut broken: HashSet<ObjectId> = HashSet::new();
        let mut last_save = Instant::now();
        loop {
            timing.pieces = pieces;
            timing.loop_seconds = started.elapsed().as_secs_f64();
            timing.scoring_seconds = scoring_time.as_secs_f64();
            if shared.stopping() || settings.max_pieces.is_some_and(|max| pieces >= max) {
                // The counters that waited for a save.
                shared.update(|_| ())?;
                return Ok(());
            }
            let epoch = match shared.chain.epoch_clock().await {
                Ok(clock) => clock.epoch,
                Err(e) if e.is_transient() => {
                    tracing::warn!("reading the epoch: {e}; retrying");
                    tokio::time::sleep(settings.poll).await;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let new_epoch = view.as_ref().is_none_or(|v| v.epoch != epoch);
            if new_epoch
                || shared.refresh.swap(false, Ordering::Relaxed)
                || since_refresh >= settings.refresh_every
            {
                match refresh(&shared.chain).await {
                    Ok((v, t)) => {
                        shared.epoch.store(v.epoch, Ordering::Relaxed);
                        models = distinct_models(&v, &t);
                        self.cache.retain(&models.iter().copied().collect());
                        tracing::info!(
                            "epoch {}: {} open targets over {} models",
                            v.epoch,
                            t.len(),
                            models.len()
                        );
                        broken.clear();
                        view = Some(v);
                        targets = t;
                        since_refresh = 0;
                        shared.wake.notify_one();
                    }
                    Err(e) if e.is_transient() => {
                        tracing::warn!("refreshing the targets: {e}; retrying");
                        tokio::time::sleep(settings.poll).await;
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            let v = view.as_ref().expect("refreshed above");
            let already: HashSet<ObjectId> = shared.read(|j| j.hits.keys().copied().collect());
            let open: Vec<&TargetView> = targets
                .iter()
                .filter(|t| !already.contains(&t.id))
                .collect();
            if open.is_empty() {
                if last_save.elapsed() >= JOURNAL_SAVE_EVERY {
                    shared.update(|_| ())?;
                    last_save = Instant::now();
                }
                // Nothing to score for: wait for a new epoch or a refresh.
                tokio::time::sleep(settings.poll).await;
                since_refresh = settings.refresh_every;
                continue;
            }
            let piece = tokio::task::block_in_place(|| stream.next_piece())?;
            let mut scores: HashMap<ObjectId, Score> = HashMap::new();
            let mut tokens = 0u64;
            for id in &models {
                if broken.contains(id) {
                    continue;
                }
                let Some(model) = v.model(id).filter(|m| m.state == ModelState::Active) else {
                    continue;
                };
                let scorer = match self.cache.model(model).await {
                    Ok(scorer) => scorer,
                    Err(e) => {
                        tracing::warn!("model {id}: {e}; skipped until the next refresh");
                        broken.insert(*id);
                        continue;
                    }
                };
                let began = Instant::now();
                let scored =
                    tokio::task::block_in_place(|| somatrain_submit::score(scorer, &piece));
                scoring_time += began.elapsed();
                interval.2 += began.elapsed();
                match scored {
                    Ok(score) => {
                        tokens += score.tokens as u64;
                        scores.insert(*id, score);
                    }
                    Err(e) => tracing::warn!("model {id} could not score a piece: {e}"),
                }
            }
            let checksum = Commitment::of_bytes(&piece).to_base58();
            let mut found: Vec<Hit> = open
                .iter()
                .filter_map(|t| somatrain_submit::evaluate(t, &scores).map(|e| (t, e)))
                .filter(|(_, e)| e.hit)
                .map(|(t, e)| Hit {
                    target_id: t.id,
                    generation_epoch: t.generation_epoch,
                    model_id: e.model_id,
                    piece: checksum.clone(),
                    size: piece.len() as u64,
                    loss: e.loss,
                    distance: e.distance,
                    threshold: e.threshold,
                    reward_pool: t.reward_pool,
                    state: if settings.dry_run {
                        State::Dropped {
                            reason: "dry run".into(),
                        }
                    } else {
                        State::Queued
                    },
                })
                .collect();
            found.sort_by(|a, b| a.distance.total_cmp(&b.distance));
            if !found.is_empty() && !settings.dry_run {
                journal::write_atomic(&piece_path(&settings.state_dir, &checksum), &piece)?;
            }
            let hits = found.len() as u64;
            for hit in &found {
                tracing::info!(
                    "hit: target {} with model {} at distance {:.5} (threshold {:.5}){}",
                    hit.target_id,
                    hit.model_id,
                    hit.distance,
                    hit.threshold,
                    if settings.dry_run { " (dry run)" } else { "" }
                );
            }
            // Hits are saved before the cursor moves past their piece; counters alone wait
            // (at most a few seconds) for the next save.
            let save = hits > 0 || last_save.elapsed() >= JOURNAL_SAVE_EVERY;
            shared.change(save, |j| {
                j.totals.pieces_scored += 1;
                j.totals.tokens_scored += tokens;
                j.totals.hits += hits;
                if settings.dry_run {
                    j.totals.dropped += hits;
                }
                for hit in found {
                    if !settings.dry_run {
                        j.embeddings
                            .insert(hit.embedding_key(), scores[&hit.model_id].embedding.clone());
                    }
                    j.hits.insert(hit.target_id, hit);
                }
            })?;
            if save {
                last_save = Instant::now();
            }
            journal::write_atomic(&cursor_path, &stream.position().to_bytes())?;
            if hits > 0 {
                shared.wake.notify_one();
            }
            pieces += 1;
            timing.tokens += tokens;
            if pieces == 1 {
                timing.first_piece_loop_seconds = started.elapsed().as_secs_f64();
                timing.first_piece_scoring_seconds = scoring_time.as_secs_f64();
            }
            since_refresh += 1;
            interval.1 += 1;
            interval.3 += tokens;
            let elapsed = interval.0.elapsed();
            if elapsed >= settings.progress_every {
                let other = 1.0 - (interval.2.as_secs_f64() / elapsed.as_secs_f64()).min(1.0);
                let gauges = Gauges {
                    epoch: v.epoch,
                    open_targets: targets.len() as u64,
                    scoring_tokens_per_second: interval.3 as f64
                        / interval.2.as_secs_f64().max(1e-9),
                    weights_downloads: self.cache.downloads(),
                    other_time_fraction: other,
                };
                shared.metrics.observe(gauges);
                shared.read(|j| {
                    tracing::info!(
                        "progress: {} pieces in {:.0} s ({:.2}/s), {:.0} tokens/s scoring, {:.1}% \
                         of the time not scoring; hits {}, submitted {}, refused {}, claimed {}, \
                         bond out {} shannons",
                        interval.1,
                        elapsed.as_secs_f64(),
                        interval.1 as f64 / elapsed.as_secs_f64(),
                        gauges.scoring_tokens_per_second,
                        other * 100.0,
                        j.totals.hits,
                        j.totals.submissions,
                        j.totals.refused,
                        j.totals.claims,
                        j.bond_outstanding()
                    )
                });
                interval = (Instant::now(), 0, Duration::ZERO, 0);
            }
            // Whole-run timing, for `bench submitter`.
            let total = started.elapsed().as_secs_f64().max(1e-9);
            shared.metrics.observe(Gauges {
                epoch: v.epoch,
                open_targets: targets.len() as u64,
                scoring_tokens_per_second: shared.read(|j| j.totals.tokens_scored) as f64
                    / scoring_time.as_secs_f64().max(1e-9),
                weights_downloads: self.cache.downloads(),
                other_time_fraction: 1.0 - (scoring_time.as_secs_f64() / total).min(1.0),
            });
        }
    }
}

fn load_cursor(path: &Path) -> Result<Position, SubmitterError> {
    const MAX_CURSOR_BYTES: u64 = 2 << 30;
    match std::fs::metadata(path) {
        Ok(m) if m.len() > MAX_CURSOR_BYTES => Err(SubmitterError::Journal(format!(
            "{} is {} bytes, over the {MAX_CURSOR_BYTES} a cursor may hold",
            path.display(),
            m.len()
        ))),
        Ok(_) => {
            let bytes = std::fs::read(path).map_err(|e| SubmitterError::io(path, e))?;
            Position::from_bytes(&bytes)
                .map_err(|e| SubmitterError::Journal(format!("{}: {e}", path.display())))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Position::default()),
        Err(e) => Err(SubmitterError::io(path, e)),
    }
}

async fn refresh(chain: &ChainClient) -> Result<(EpochView, Vec<TargetView>), ChainError> {
    let view = chain.epoch_view().await?;
    let targets = chain
        .target_views("open")
        .await?
        .into_iter()
        .filter(|t| t.generation_epoch == view.epoch)
        .collect();
    Ok((view, targets))
}

/// Every active model assigned to an open target, once.
fn distinct_models(view: &EpochView, targets: &[TargetView]) -> Vec<ObjectId> {
    let mut ids: Vec<ObjectId> = targets
        .iter()
        .flat_map(|t| t.model_ids.iter().copied())
        .filter(|id| {
            view.model(id)
                .is_some_and(|m| m.state == ModelState::Active)
        })
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

/// The transaction task: submissions, claims and coin merges, one transaction at a time (they
/// share the wallet's coins), until scoring is over and nothing is left to settle.
async fn transactions(shared: Arc<Shared>) -> Result<(), SubmitterError> {
    let mut merged_at = None;
    let mut uploads = Uploads::default();
    loop {
        let epoch = match shared.chain.epoch_clock().await {
            Ok(clock) => Some(clock.epoch),
            Err(e) if e.is_transient() => {
                tracing::warn!("reading the epoch: {e}; retrying");
                None
            }
            Err(e) => return Err(e.into()),
        };
        if let Some(epoch) = epoch {
            shared.epoch.fetch_max(epoch, Ordering::Relaxed);
            let step = async {
                resolve_inflight(&shared).await?;
                if merged_at != Some(epoch) {
                    merge_coins(&shared).await?;
                    merged_at = Some(epoch);
                }
                submit_queued(&shared, epoch, &mut uploads).await?;
                claim_due(&shared, epoch).await
            };
            match step.await {
                Ok(()) => {}
                Err(SubmitterError::Chain(e)) if e.is_transient() => {
                    tracing::warn!("{e}; retrying")
                }
                Err(e) => return Err(e),
            }
        }
        let (unsettled, unsent) = shared.read(|j| {
            let open = |h: &&Hit| {
                !(h.state.is_settled() || (shared.stopping() && h.state == State::Queued))
            };
            let unsent = |h: &&Hit| matches!(h.state, State::Queued | State::Submitting { .. });
            (
                j.hits.values().filter(open).count(),
                j.hits.values().filter(unsent).count(),
            )
        });
        let done = shared.scoring_done.load(Ordering::Relaxed)
            && (unsettled == 0 || (shared.settings.exit_when_scored && unsent == 0));
        if shared.stopping() || done {
            if unsettled > 0 {
                tracing::info!(
                    "stopping with {unsettled} submissions to settle: they are journaled and the \
                     next start settles them"
                );
            }
            return Ok(());
        }
        tokio::select! {
            _ = shared.wake.notified() => {}
            _ = tokio::time::sleep(shared.settings.poll) => {}
        }
    }
}

/// Sends `tx` until it executes or is refused; before each retry the digest is looked up,
/// since a send whose answer was lost may have executed.
async fn send(chain: &ChainClient, tx: &SignedTransaction) -> Result<Executed, ChainError> {
    let mut backoff = Duration::from_millis(200);
    let mut attempts = 0;
    loop {
        match chain.execute(tx).await {
            Ok(executed) => return Ok(executed),
            Err(e) if e.is_transient() && attempts < 6 => {
                tracing::warn!("sending {}: {e}; retrying", tx.digest());
                attempts += 1;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
                if let Ok(Some(executed)) = chain.transaction(&tx.digest()).await {
                    return Ok(executed);
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// A transaction the journal says may have executed: executed (settled from its effects),
/// still executable (sent again), or never executable (its gas coin moved on without it).
enum Outcome {
    Executed(Box<Executed>),
    Never,
}

async fn find_or_resend(
    chain: &ChainClient,
    inflight: &Inflight,
) -> Result<Outcome, SubmitterError> {
    if let Some(executed) = chain.transaction(&inflight.digest).await? {
        return Ok(Outcome::Executed(Box::new(executed)));
    }
    let tx = inflight.transaction()?;
    for coin in &tx.data.gas_payment {
        if !chain.is_current(coin).await? {
            return Ok(Outcome::Never);
        }
    }
    match send(chain, &tx).await {
        Ok(executed) => Ok(Outcome::Executed(Box::new(executed))),
        Err(ChainError::Refused { .. }) => Ok(Outcome::Never),
        Err(e) => Err(e.into()),
    }
}

/// Settles what a previous process (or a failed send) left in flight.
async fn resolve_inflight(shared: &Shared) -> Result<(), SubmitterError> {
    let inflight: Vec<(ObjectId, State)> = shared.read(|j| {
        j.hits
            .iter()
            .filter(|(_, h)| matches!(h.state, State::Submitting { .. } | State::Claiming { .. }))
            .map(|(id, h)| (*id, h.state.clone()))
            .collect()
    });
    for (target, state) in inflight {
        match state {
            State::Submitting { inflight, bond } => {
                match find_or_resend(&shared.chain, &inflight).await? {
                    Outcome::Executed(executed) => {
                        tracing::info!("submission {} had been sent before", inflight.digest);
                        settle_submission(shared, target, bond, &executed)?;
                    }
                    Outcome::Never => {
                        tracing::info!(
                            "submission {} never executed; target {target} is queued again",
                            inflight.digest
                        );
                        shared.set_state(target, State::Queued)?;
                    }
                }
            }
            State::Claiming {
                inflight,
                fill_epoch,
                bond,
            } => match find_or_resend(&shared.chain, &inflight).await? {
                Outcome::Executed(executed) => {
                    settle_claim(shared, target, fill_epoch, bond, &executed).await?
                }
                Outcome::Never => shared.set_state(
                    target,
                    State::Submitted {
                        digest: inflight.digest,
                        fill_epoch,
                        bond,
                    },
                )?,
            },
            _ => {}
        }
    }
    Ok(())
}

fn drop_hit(
    shared: &Shared,
    target: ObjectId,
    refused: bool,
    reason: String,
) -> Result<(), SubmitterError> {
    tracing::warn!("target {target}: {reason}");
    shared.update(|j| {
        let state = if refused {
            j.totals.refused += 1;
            State::Refused { reason }
        } else {
            j.totals.dropped += 1;
            State::Dropped { reason }
        };
        j.set_state(&target, state);
    })?;
    remove_unused_pieces(shared);
    Ok(())
}

/// Piece files no queued or in-flight hit needs any more.
fn remove_unused_pieces(shared: &Shared) {
    let needed: HashSet<String> = shared.read(|j| {
        j.hits
            .values()
            .filter(|h| matches!(h.state, State::Queued | State::Submitting { .. }))
            .map(|h| h.piece.clone())
            .collect()
    });
    let dir = shared.settings.state_dir.join("pieces");
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            if let Some(checksum) = name.strip_suffix(".bin")
                && !needed.contains(checksum)
            {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

/// Uploads already made (a piece that hits several targets is uploaded once) and the pause
/// after a failed one.
#[derive(Default)]
struct Uploads {
    manifests: HashMap<String, somatrain_protocol::Manifest>,
    retry_at: Option<Instant>,
    backoff: Duration,
}

impl Uploads {
    const FIRST_BACKOFF: Duration = Duration::from_secs(5);
    const MAX_BACKOFF: Duration = Duration::from_secs(300);

    fn failed(&mut self) -> Duration {
        self.backoff = (self.backoff * 2).clamp(Self::FIRST_BACKOFF, Self::MAX_BACKOFF);
        self.retry_at = Some(Instant::now() + self.backoff);
        self.backoff
    }

    fn succeeded(&mut self) {
        self.retry_at = None;
        self.backoff = Duration::ZERO;
    }

    fn paused(&self) -> bool {
        self.retry_at.is_some_and(|at| Instant::now() < at)
    }
}

async fn submit_queued(
    shared: &Shared,
    epoch: u64,
    uploads: &mut Uploads,
) -> Result<(), SubmitterError> {
    // Hits of a past epoch can no longer be submitted, bucket or not.
    let expired: Vec<(ObjectId, u64)> = shared.read(|j| {
        j.hits
            .values()
            .filter(|h| h.state == State::Queued && h.generation_epoch != epoch)
            .map(|h| (h.target_id, h.generation_epoch))
            .collect()
    });
    for (target, generation) in expired {
        drop_hit(
            shared,
            target,
            true,
            format!("expired with epoch {generation}"),
        )?;
    }
    loop {
        if shared.stopping() || uploads.paused() {
            return Ok(());
        }
        let next = shared.read(|j| {
            j.hits
                .values()
                .filter(|h| h.state == State::Queued)
                .min_by(|a, b| a.distance.total_cmp(&b.distance))
                .cloned()
        });
        let Some(hit) = next else {
            return Ok(());
        };
        submit_one(shared, epoch, hit, uploads).await?;
    }
}

async fn submit_one(
    shared: &Shared,
    epoch: u64,
    hit: Hit,
    uploads: &mut Uploads,
) -> Result<(), SubmitterError> {
    pause_point("submitter-before-submit").await;
    let target = hit.target_id;
    if hit.generation_epoch != epoch {
        return drop_hit(
            shared,
            target,
            true,
            format!("expired with epoch {}", hit.generation_epoch),
        );
    }
    let params = shared.chain.epoch_view().await?.params;
    let bond = hit.size.saturating_mul(params.submission_bond_per_byte);
    let limits = shared.settings.limits;
    let spent = shared.read(|j| j.spend.get(&epoch).cloned().unwrap_or_default());
    let over = if spent.submissions >= limits.submissions_per_epoch {
        Some(format!(
            "the limit of {} submissions this epoch is reached",
            limits.submissions_per_epoch
        ))
    } else if spent.bond.saturating_add(bond) > limits.bond_per_epoch {
        Some(format!(
            "its bond of {bond} shannons would pass this epoch's bond limit ({} of {} spent)",
            spent.bond, limits.bond_per_epoch
        ))
    } else if spent.fees >= limits.fees_per_epoch {
        Some(format!(
            "this epoch's fee limit ({} shannons) is spent",
            limits.fees_per_epoch
        ))
    } else {
        None
    };
    if let Some(reason) = over {
        return drop_hit(shared, target, false, reason);
    }
    // Filled by someone else since it was scored: refused without paying a fee.
    match shared.chain.object(&target).await? {
        Some(object) => match object.target() {
            Ok(t) if t.status == TargetStatus::Open => {}
            Ok(t) => {
                return drop_hit(
                    shared,
                    target,
                    true,
                    format!(
                        "no longer open ({:?}): someone else filled it first",
                        t.status
                    ),
                );
            }
            Err(e) => return drop_hit(shared, target, true, format!("not a target: {e}")),
        },
        None => return drop_hit(shared, target, true, "no longer on chain".into()),
    }
    let path = piece_path(&shared.settings.state_dir, &hit.piece);
    let data = match std::fs::read(&path) {
        Ok(data) if Commitment::of_bytes(&data).to_base58() == hit.piece => data,
        Ok(_) => {
            return drop_hit(
                shared,
                target,
                false,
                format!("{} is corrupted", path.display()),
            );
        }
        Err(e) => return drop_hit(shared, target, false, format!("{}: {e}", path.display())),
    };
    let Some(embedding) = shared.read(|j| j.embeddings.get(&hit.embedding_key()).cloned()) else {
        return drop_hit(
            shared,
            target,
            false,
            "its embedding is not in the journal".into(),
        );
    };
    let storage = shared
        .storage
        .as_ref()
        .expect("checked at open: not a dry run");
    let name = format!("data-{}.bin", &hit.piece[..hit.piece.len().min(16)]);
    let manifest = match uploads.manifests.get(&hit.piece) {
        Some(manifest) => manifest.clone(),
        None => match storage.upload_bytes(&name, &data).await {
            Ok(manifest) => {
                uploads.succeeded();
                uploads
                    .manifests
                    .insert(hit.piece.clone(), manifest.clone());
                manifest
            }
            Err(e) => {
                // The bucket's trouble, not the hit's: it stays queued (until its epoch ends).
                let wait = uploads.failed();
                let queued = shared.update(|j| {
                    j.totals.upload_failures += 1;
                    j.hits.values().filter(|h| h.state == State::Queued).count()
                })?;
                tracing::warn!(
                    "the upload failed: nothing submitted, no bond taken; {queued} hits stay \
                     queued and uploads are tried again in {} s: {e}",
                    wait.as_secs()
                );
                return Ok(());
            }
        },
    };
    let mut attempt = 0;
    loop {
        let gas = shared.chain.richest_coin(&shared.keypair.address()).await?;
        let kind = TransactionKind::SubmitData(SubmitData {
            target_id: target,
            data_manifest: manifest.clone(),
            model_id: hit.model_id,
            embedding: SomaTensor::vector(&embedding),
            distance_score: SomaTensor::scalar(hit.distance),
            loss_score: SomaTensor::vector(&[hit.loss]),
            bond_coin: gas,
        });
        let data = TransactionData::new(kind, shared.keypair.address(), vec![gas]);
        let tx = SignedTransaction::sign(&shared.keypair, data);
        let inflight = Inflight::new(&tx);
        shared.set_state(
            target,
            State::Submitting {
                inflight: inflight.clone(),
                bond,
            },
        )?;
        pause_point("submitter-journaled").await;
        match send(&shared.chain, &tx).await {
            Ok(executed) => {
                settle_submission(shared, target, bond, &executed)?;
                pause_point("submitter-submitted").await;
                return Ok(());
            }
            Err(e) if e.is_coin_conflict() && attempt < 3 => {
                attempt += 1;
                shared.set_state(target, State::Queued)?;
                tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
            }
            Err(ChainError::Refused { message, .. }) => {
                return drop_hit(
                    shared,
                    target,
                    true,
                    format!("the node refused it: {message}"),
                );
            }
            // Left in flight: resolved on the next pass, or by the next start.
            Err(e) => return Err(e.into()),
        }
    }
}

fn settle_submission(
    shared: &Shared,
    target: ObjectId,
    bond: u64,
    executed: &Executed,
) -> Result<(), SubmitterError> {
    let fee = executed.effects.fee.total_fee;
    let epoch = executed.effects.executed_epoch;
    match executed.status() {
        ExecutionStatus::Success => {
            tracing::info!(
                "submitted to target {target} in {} (bond {bond} shannons)",
                executed.digest
            );
            shared.update(|j| {
                j.totals.submissions += 1;
                j.totals.fees += fee;
                let spend = j.spend_in(epoch);
                spend.bond += bond;
                spend.fees += fee;
                spend.submissions += 1;
                j.set_state(
                    &target,
                    State::Submitted {
                        digest: executed.digest,
                        fill_epoch: epoch,
                        bond,
                    },
                );
            })?;
            remove_unused_pieces(shared);
        }
        ExecutionStatus::Failure(f) => {
            shared.update(|j| {
                j.totals.fees += fee;
                j.spend_in(epoch).fees += fee;
            })?;
            drop_hit(
                shared,
                target,
                true,
                format!(
                    "the submission {} executed and failed ({}): {}",
                    executed.digest,
                    f.kind.name(),
                    f.description
                ),
            )?;
        }
    }
    shared.refresh.store(true, Ordering::Relaxed);
    Ok(())
}

/// Claims every submission whose audit window has closed (from epoch fill + 2).
async fn claim_due(shared: &Shared, epoch: u64) -> Result<(), SubmitterError> {
    let due: Vec<(ObjectId, u64, u64)> = shared.read(|j| {
        j.hits
            .iter()
            .filter_map(|(id, h)| match h.state {
                State::Submitted {
                    fill_epoch, bond, ..
                } if epoch >= fill_epoch + 2 => Some((*id, fill_epoch, bond)),
                _ => None,
            })
            .collect()
    });
    for (target, fill_epoch, bond) in due {
        if shared.stopping() {
            return Ok(());
        }
        if shared.chain.object(&target).await?.is_none() {
            tracing::info!("target {target} was claimed by someone else; the chain paid us");
            shared.set_state(target, State::ClaimedByOther { bond })?;
            continue;
        }
        let gas = shared.chain.richest_coin(&shared.keypair.address()).await?;
        let data = TransactionData::new(
            TransactionKind::ClaimRewards(ClaimRewards { target_id: target }),
            shared.keypair.address(),
            vec![gas],
        );
        let tx = SignedTransaction::sign(&shared.keypair, data);
        let inflight = Inflight::new(&tx);
        shared.set_state(
            target,
            State::Claiming {
                inflight: inflight.clone(),
                fill_epoch,
                bond,
            },
        )?;
        match send(&shared.chain, &tx).await {
            Ok(executed) => settle_claim(shared, target, fill_epoch, bond, &executed).await?,
            Err(e) if !e.is_transient() => {
                tracing::warn!("claiming target {target}: {e}; tried again later");
                shared.set_state(
                    target,
                    State::Submitted {
                        digest: inflight.digest,
                        fill_epoch,
                        bond,
                    },
                )?;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

async fn settle_claim(
    shared: &Shared,
    target: ObjectId,
    fill_epoch: u64,
    bond: u64,
    executed: &Executed,
) -> Result<(), SubmitterError> {
    let fee = executed.effects.fee.total_fee;
    let epoch = executed.effects.executed_epoch;
    let me = shared.keypair.address();
    let received: i128 = executed
        .balance_changes
        .iter()
        .filter(|c| c.address == me)
        .map(|c| c.amount)
        .sum();
    // Within the total supply (10^16 shannons), far inside i64.
    let received = i64::try_from(received).map_err(|_| {
        SubmitterError::Journal(format!("a claim moved {received} shannons: out of range"))
    })?;
    match executed.status() {
        ExecutionStatus::Success => {
            tracing::info!(
                "claimed target {target} in {}: {received} shannons into the wallet (bond \
                 {bond} back, fee {fee} paid)",
                executed.digest
            );
            shared.update(|j| {
                j.totals.claims += 1;
                j.totals.claimed_shannons += received;
                j.totals.fees += fee;
                j.spend_in(epoch).fees += fee;
                j.set_state(
                    &target,
                    State::Claimed {
                        digest: executed.digest,
                        epoch,
                        bond,
                        received,
                    },
                );
            })
        }
        ExecutionStatus::Failure(f) => {
            let gone = shared.chain.object(&target).await?.is_none();
            tracing::warn!(
                "claim {} of target {target} failed ({}): {}",
                executed.digest,
                f.kind.name(),
                f.description
            );
            shared.update(|j| {
                j.totals.fees += fee;
                j.spend_in(epoch).fees += fee;
                j.set_state(
                    &target,
                    if gone {
                        State::ClaimedByOther { bond }
                    } else {
                        State::Submitted {
                            digest: executed.digest,
                            fill_epoch,
                            bond,
                        }
                    },
                );
            })
        }
    }
}

/// Merges the wallet's coins the SDK's way (see [`ChainClient::merge_coins`]) when it holds
/// more than `merge_coins_above`. Done once per epoch.
async fn merge_coins(shared: &Shared) -> Result<(), SubmitterError> {
    let Some(executed) = shared
        .chain
        .merge_coins(&shared.keypair, shared.settings.merge_coins_above)
        .await?
    else {
        return Ok(());
    };
    let fee = executed.effects.fee.total_fee;
    let epoch = executed.effects.executed_epoch;
    shared.update(|j| {
        j.totals.fees += fee;
        j.spend_in(epoch).fees += fee;
    })?;
    match executed.status() {
        ExecutionStatus::Success => {
            tracing::info!("merged the wallet's coins ({})", executed.digest)
        }
        ExecutionStatus::Failure(f) => {
            tracing::warn!(
                "merging coins failed ({}): {}",
                f.kind.name(),
                f.description
            )
        }
    }
    Ok(())
}

/// Stops the transaction task here for ever when `SOMATRAIN_PAUSE_AT` names this point (tests
/// kill the process there); scoring and `/metrics` go on.
async fn pause_point(name: &str) {
    if std::env::var("SOMATRAIN_PAUSE_AT").is_ok_and(|v| v == name) {
        // Through the log, like everything a library says: the binary decides where it goes.
        tracing::info!("PAUSED AT {name}");
        std::future::pending::<()>().await;
    }
}
