//! Create, commit and reveal, one journaled step at a time. `somatrain commit` and
//! `somatrain reveal` call these directly; the state machine in [`crate::rounds`] strings them together.
//!
//! Every transaction is signed, written into the journal (its BCS bytes and the chain id), and
//! only then sent. After a crash the journal's transaction is looked up on the network by
//! digest: if it executed, its outcome is applied; if its gas coin is still at the version it
//! names, the very same signed bytes are sent again; otherwise it can never execute and the
//! step is redone. Nothing is ever signed twice while the first may still execute, so nothing
//! is ever committed twice.
//!
//! Three outcomes stay apart: the node refused (nothing happened), the node was unreachable
//! (look the digest up later), and the transaction executed but failed (its fee was paid).

use somatrain_protocol::transaction::{CommitModel, CreateModel, RevealModel};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use somatrain_client::chain::{ChainClient, ChainError, EpochClock, Executed};
use somatrain_client::view::{Commitments, EpochView, ModelState, ModelView};
use somatrain_protocol::crypto::{EncryptionKey, embedding_commitment, encrypt_stream};
use somatrain_protocol::effects::ExecutionStatus;
use somatrain_protocol::{
    Digest, Keypair, Manifest, ObjectId, SignedTransaction, SomaTensor, TransactionData,
    TransactionKind,
};
use somatrain_storage::{Storage, StorageError, verify_url};
use somatrain_train::trainer::HeldoutScore;

use crate::journal::{
    Inflight, Journal, PendingRound, Phase, Purpose, ROUNDS_FILE, RevealedRound, RoundRecord,
    Upload,
};
use crate::{DaemonError, now_ms};
use somatrain_train::history::JsonLines;

/// Where the reveal of a committed round stands against the chain's epochs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevealWindow {
    /// Still the commit epoch; the window opens at `opens_ms` (or sooner on a localnet).
    NotYet { opens_ms: u64 },
    /// The reveal epoch: reveal now, before `deadline_ms`.
    Open { deadline_ms: u64 },
    /// The window has closed.
    Missed,
}

/// Test hook: `SOMATRAIN_PAUSE_AT=NAME` stops the process at the named point (announced in
/// the log) so a test can `kill -9` it exactly there.
pub fn pause_point(name: &str) {
    if std::env::var("SOMATRAIN_PAUSE_AT").is_ok_and(|v| v == name) {
        // Through the log, like everything a library says: the binary decides where it goes.
        tracing::info!("PAUSED AT {name}");
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
}

/// What a model of this wallet needs before it can be created.
#[derive(Debug, Clone, Copy)]
pub struct NewModel {
    pub stake: u64,
    pub commission_bps: u64,
    pub architecture_version: u64,
}

/// How to treat models this wallet already has on chain when the journal names none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Adopt {
    /// Stop and name them (the default: a lost journal must not create a second model).
    #[default]
    Refuse,
    /// Use this model (it must be ours, and created or active).
    Model(ObjectId),
    /// Create another model anyway.
    CreateNew,
}

pub struct Publisher {
    chain: ChainClient,
    keypair: Keypair,
    storage: Arc<Storage>,
    journal: Journal,
    journal_path: PathBuf,
    publish_dir: PathBuf,
    chain_id: Option<String>,
    /// The epoch's clock as read just before the last commit.
    last_clock: Option<EpochClock>,
    /// `rounds.jsonl`: one line per revealed round.
    rounds_path: PathBuf,
}

/// The estimated fee of a transaction writing `writes` objects and moving `value` shannons.
fn fee_estimate(epoch: &EpochView, writes: u64, value: u64) -> u64 {
    let p = &epoch.params;
    let value_fee = (value as u128 * p.value_fee_bps as u128 / 10_000) as u64;
    p.base_fee + p.write_object_fee * writes + value_fee
}

impl Publisher {
    /// A publisher whose journal and encrypted files live in `run_dir`.
    pub fn open(
        chain: ChainClient,
        keypair: Keypair,
        storage: Storage,
        run_dir: &Path,
    ) -> Result<Self, DaemonError> {
        // The journal names the encrypted files by absolute paths, so that a later command run
        // from another working directory finds them.
        let run_dir = std::path::absolute(run_dir)
            .map_err(|e| DaemonError::Io(format!("{}: {e}", run_dir.display())))?;
        let run_dir = run_dir.as_path();
        let journal_path = Journal::path_in(run_dir);
        let journal = Journal::load(&journal_path)?;
        let rounds_path = run_dir.join(ROUNDS_FILE);
        Ok(Publisher {
            chain,
            keypair,
            storage: Arc::new(storage),
            journal,
            journal_path,
            publish_dir: run_dir.join("publish"),
            chain_id: None,
            last_clock: None,
            rounds_path,
        })
    }

    pub fn keypair(&self) -> &Keypair {
        &self.keypair
    }

    pub fn chain(&self) -> &ChainClient {
        &self.chain
    }

    /// Where the weights go; shared with the task that keeps them served.
    pub fn storage(&self) -> Arc<Storage> {
        self.storage.clone()
    }

    /// What the run has done so far; changed only through the publisher's steps.
    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    pub fn save(&self) -> Result<(), DaemonError> {
        self.journal.save(&self.journal_path)
    }

    pub fn set_phase(&mut self, phase: Phase) -> Result<(), DaemonError> {
        if self.journal.phase != phase {
            self.journal.phase = phase;
            self.save()?;
        }
        Ok(())
    }

    pub async fn chain_id(&mut self) -> Result<String, DaemonError> {
        if let Some(id) = &self.chain_id {
            return Ok(id.clone());
        }
        let info = self.chain.service_info().await?;
        let id = info
            .chain_id
            .ok_or_else(|| DaemonError::Chain("GetServiceInfo named no chain id".into()))?;
        self.chain_id = Some(id.clone());
        Ok(id)
    }

    /// Settles a transaction left in flight by a previous process.
    pub async fn resolve_inflight(&mut self) -> Result<(), DaemonError> {
        let Some(inflight) = self.journal.inflight.clone() else {
            return Ok(());
        };
        let chain_id = self.chain_id().await?;
        if inflight.chain_id != chain_id {
            return Err(DaemonError::Journal(format!(
                "the journal's {:?} transaction {} was signed for chain {}, but this network is \
                 chain {chain_id}; use the run directory with the network it belongs to",
                inflight.purpose, inflight.digest, inflight.chain_id
            )));
        }
        let tx = inflight.transaction()?;
        if let Some(executed) = self.chain.transaction(&inflight.digest).await? {
            tracing::info!(
                "transaction {} ({:?}) had executed before the restart",
                inflight.digest,
                inflight.purpose
            );
            return self.settle(inflight.purpose, &executed).await;
        }
        let mut executable = true;
        for coin in &tx.data.gas_payment {
            executable &= self.chain.is_current(coin).await?;
        }
        if executable {
            tracing::info!(
                "resending transaction {} ({:?}) after the restart",
                inflight.digest,
                inflight.purpose
            );
            return match self.submit_or_find(&tx).await {
                Ok(executed) => self.settle(inflight.purpose, &executed).await,
                Err(e @ DaemonError::Chain(_)) => Err(e),
                Err(e) => {
                    self.forget_inflight_if_refused(&e)?;
                    Err(e)
                }
            };
        }
        // Its gas coin moved on without it: it can never execute.
        tracing::warn!(
            "transaction {} ({:?}) can no longer execute; the step will be redone",
            inflight.digest,
            inflight.purpose
        );
        self.journal.inflight = None;
        self.save()
    }

    fn forget_inflight_if_refused(&mut self, e: &DaemonError) -> Result<(), DaemonError> {
        if matches!(e, DaemonError::Network(ChainError::Refused { .. })) {
            // Refused for good: this signed transaction will never execute.
            self.journal.inflight = None;
            self.save()?;
        }
        Ok(())
    }

    /// Sends `tx`, retrying through network failures; before each retry the digest is looked up,
    /// since a send whose answer was lost may have executed.
    async fn submit_or_find(&self, tx: &SignedTransaction) -> Result<Executed, DaemonError> {
        let mut backoff = Duration::from_millis(200);
        let mut attempts = 0;
        loop {
            match self.chain.execute(tx).await {
                Ok(executed) => return Ok(executed),
                Err(e) if e.is_transient() && attempts < 8 => {
                    tracing::warn!("sending {}: {e}; retrying", tx.digest());
                    attempts += 1;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    if let Ok(Some(executed)) = self.chain.transaction(&tx.digest()).await {
                        return Ok(executed);
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Signs `kind` with the wallet's richest coin as gas, journals it, sends it and applies
    /// its outcome. A coin that turned stale between reading and sending is read again.
    async fn send(
        &mut self,
        purpose: Purpose,
        kind: TransactionKind,
    ) -> Result<Executed, DaemonError> {
        let chain_id = self.chain_id().await?;
        let mut attempt = 0;
        loop {
            let gas = self.chain.richest_coin(&self.keypair.address()).await?;
            let data = TransactionData::new(kind.clone(), self.keypair.address(), vec![gas]);
            let tx = SignedTransaction::sign(&self.keypair, data);
            self.journal.inflight = Some(Inflight::new(purpose, &chain_id, &tx));
            self.save()?;
            pause_point(&format!("{}-journaled", purpose_name(purpose)));
            let executed = match self.submit_or_find(&tx).await {
                Ok(executed) => executed,
                Err(DaemonError::Network(e)) if e.is_coin_conflict() && attempt < 3 => {
                    self.journal.inflight = None;
                    self.save()?;
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                    continue;
                }
                Err(e) => {
                    self.forget_inflight_if_refused(&e)?;
                    return Err(e);
                }
            };
            pause_point(&format!("{}-sent", purpose_name(purpose)));
            self.settle(purpose, &executed).await?;
            return Ok(executed);
        }
    }

    /// Applies an executed transaction to the journal. A failed one paid its fee and changed
    /// nothing else: the step is not done, and the failure is returned.
    async fn settle(&mut self, purpose: Purpose, executed: &Executed) -> Result<(), DaemonError> {
        let epoch = executed.effects.executed_epoch;
        if let ExecutionStatus::Failure(failure) = executed.status() {
            self.journal.inflight = None;
            self.save()?;
            return Err(DaemonError::Failed {
                what: purpose_name(purpose),
                digest: executed.digest.to_string(),
                kind: failure.kind.name().to_string(),
                description: failure.description.clone(),
            });
        }
        match purpose {
            Purpose::CreateModel => {
                let id = ObjectId::derive(&executed.digest, 0);
                tracing::info!("model {id} created in epoch {epoch}");
                self.journal.model_id = Some(id);
            }
            Purpose::Commit => {
                // The window is known from now on, even if the node becomes unreachable: from
                // a fresh read of the epoch's clock, or else the one read just before the commit.
                let clock = match self.chain.epoch_clock().await {
                    Ok(clock) => Some(clock),
                    Err(e) => {
                        tracing::warn!("reading the epoch after the commit: {e}");
                        self.last_clock
                    }
                };
                let chain_id = self.chain_id.clone();
                if let Some(pending) = &mut self.journal.pending {
                    pending.commit_epoch = Some(epoch);
                    pending.chain_id = chain_id;
                    pending.commit_digest = Some(executed.digest);
                    if let Some(clock) = clock.filter(|c| c.epoch >= epoch) {
                        let opens = window_opens(&clock, epoch);
                        pending.reveal_opens_ms = Some(opens);
                        pending.reveal_closes_ms = Some(opens + clock.epoch_duration_ms);
                    }
                    self.journal.reveal_deadline_ms = pending.reveal_closes_ms;
                    tracing::info!("round {} committed in epoch {epoch}", pending.round);
                }
            }
            Purpose::Reveal => {
                if let Some(pending) = &self.journal.pending {
                    let record = self.round_record(pending, epoch, executed).await;
                    // The line goes before the journal counts the round: a line past the
                    // journal's count is from a settle that was cut short, done again now.
                    let revealed = self.journal.rounds_revealed;
                    let written = JsonLines::open_keeping(&self.rounds_path, |r: &RoundRecord| {
                        r.round <= revealed
                    })
                    .and_then(|mut rounds| rounds.append(&record));
                    if let Err(e) = written {
                        tracing::warn!("{}: {e}", self.rounds_path.display());
                    }
                }
                if let Some(pending) = self.journal.pending.take() {
                    tracing::info!("round {} revealed in epoch {epoch}", pending.round);
                    self.journal.last_revealed = Some(RevealedRound {
                        round: pending.round,
                        step: pending.step,
                        commit_epoch: pending.commit_epoch.unwrap_or(epoch.saturating_sub(1)),
                        reveal_epoch: epoch,
                        url: pending.manifest.url.clone(),
                        heldout: pending.heldout.clone(),
                    });
                    self.journal.rounds_revealed = self.journal.rounds_revealed.max(pending.round);
                    self.journal.reveal_deadline_ms = None;
                    // Kept while the weights still have to be confirmed served.
                    let still_needed = self
                        .journal
                        .reupload
                        .as_ref()
                        .is_some_and(|u| u.encrypted == pending.encrypted);
                    if !still_needed {
                        let _ = std::fs::remove_file(&pending.encrypted);
                    }
                }
            }
        }
        self.journal.inflight = None;
        self.save()
    }

    /// The line `rounds.jsonl` keeps for a round revealed in `reveal_epoch` by `executed`; the
    /// stake and balance are read from the node where it answers.
    async fn round_record(
        &self,
        pending: &PendingRound,
        reveal_epoch: u64,
        executed: &Executed,
    ) -> RoundRecord {
        let stake = match self.journal.model_id {
            Some(id) => self.chain.model(&id).await.ok().flatten().map(|m| m.stake),
            None => None,
        };
        RoundRecord {
            round: pending.round,
            step: pending.step,
            heldout_loss: pending.heldout.as_ref().map(|h| h.loss),
            heldout_bits_per_byte: pending.heldout.as_ref().map(|h| h.bits_per_byte),
            commit_epoch: pending
                .commit_epoch
                .unwrap_or(reveal_epoch.saturating_sub(1)),
            reveal_epoch,
            commit_digest: pending.commit_digest,
            reveal_digest: executed.digest,
            url: pending.manifest.url.clone(),
            stake,
            balance: self.chain.balance(&self.keypair.address()).await.ok(),
            earned_shannons: self.rounds_path.parent().and_then(|run_dir| {
                crate::earnings::Earnings::load(run_dir)
                    .ok()
                    .map(|e| e.summary().claimed_shannons)
            }),
            time_ms: now_ms(),
        }
    }

    /// Models of this wallet that are still created or pending on chain.
    pub async fn unfinished_models(&self) -> Result<Vec<ModelView>, DaemonError> {
        let view = self.chain.epoch_view().await?;
        Ok(unfinished(&view, &self.keypair.address())
            .into_iter()
            .cloned()
            .collect())
    }

    /// The model this publisher commits to: the journal's, an adopted one, or a new one staked
    /// from the wallet. Before creating, it looks for models this wallet left unfinished, so a
    /// lost journal never creates a second model by surprise.
    pub async fn ensure_model(
        &mut self,
        new: NewModel,
        adopt: Adopt,
    ) -> Result<ObjectId, DaemonError> {
        let me = self.keypair.address();
        if let Some(id) = self.journal.model_id {
            let view = self.chain.epoch_view().await?;
            let model = view.model(&id);
            match committable(model, &id, &me) {
                Ok(()) => return Ok(id),
                Err(e)
                    if adopt == Adopt::CreateNew
                        && model.is_some_and(|m| m.state == ModelState::Inactive) =>
                {
                    tracing::warn!("{e}; creating a new model, as --new-model asks");
                    self.journal.model_id = None;
                    self.save()?;
                }
                Err(e) => return Err(e),
            }
        }
        let view = self.chain.epoch_view().await?;
        match adopt {
            Adopt::Model(id) => {
                let model = view
                    .model(&id)
                    .ok_or_else(|| DaemonError::Usage(format!("model {id} is not on chain")))?;
                if model.owner != me {
                    return Err(DaemonError::Usage(format!(
                        "model {id} belongs to {}, not to this wallet ({me})",
                        model.owner
                    )));
                }
                if !matches!(model.state, ModelState::Created | ModelState::Active) {
                    return Err(DaemonError::Usage(format!(
                        "model {id} is {}: only a created or active model can take a new commit",
                        model.state.name()
                    )));
                }
                self.journal.model_id = Some(id);
                self.save()?;
                return Ok(id);
            }
            Adopt::Refuse => {
                let found = unfinished(&view, &me);
                if !found.is_empty() {
                    let list: Vec<String> = found
                        .iter()
                        .map(|m| match &m.pending {
                            Some(p) => format!(
                                "{} ({}, committed in epoch {})",
                                m.id,
                                m.state.name(),
                                p.commit_epoch
                            ),
                            None => format!("{} ({})", m.id, m.state.name()),
                        })
                        .collect();
                    return Err(DaemonError::Usage(format!(
                        "this run directory's journal names no model, but this wallet already has \
                         unfinished models on chain: {}. Resume a created one with \
                         `--model-id ID`; a pending one can only be revealed with the journal \
                         that committed it (its key is not on chain). Pass `--new-model` to \
                         create another model anyway",
                        list.join(", ")
                    )));
                }
            }
            Adopt::CreateNew => {}
        }
        let needed = new.stake + fee_estimate(&view, 5, new.stake);
        let balance = self.chain.balance(&me).await?;
        if balance < needed {
            return Err(DaemonError::Usage(format!(
                "creating a model needs about {needed} shannons (stake {} and fees); the wallet \
                 {me} holds {balance}",
                new.stake
            )));
        }
        self.set_phase(Phase::CreatingModel)?;
        self.send(
            Purpose::CreateModel,
            TransactionKind::CreateModel(CreateModel {
                stake_amount: new.stake,
                commission_rate: new.commission_bps,
                architecture_version: new.architecture_version,
            }),
        )
        .await?;
        self.journal
            .model_id
            .ok_or_else(|| DaemonError::Chain("no model id after create".into()))
    }

    /// Checks, before anything is signed, that the journal's model can take a commit from this
    /// wallet (a restart after a missed reveal must not pay a fee for a refused commit).
    pub async fn check_model_committable(&self) -> Result<(), DaemonError> {
        let Some(id) = self.journal.model_id else {
            return Ok(());
        };
        let model = self.chain.model(&id).await?;
        committable(model.as_ref(), &id, &self.keypair.address())
    }

    fn model_id(&self) -> Result<ObjectId, DaemonError> {
        self.journal
            .model_id
            .ok_or_else(|| DaemonError::Usage("no model yet: commit creates one".into()))
    }

    /// Everything a round must pass before anything about it goes on chain: the weights load
    /// as V1 weights of the chain's width with every value finite, the embedding has the
    /// chain's length and is finite, the held-out score is finite, and the wallet can pay.
    pub async fn check_round(
        &self,
        weights: &Path,
        embedding: &[f32],
        heldout: Option<&HeldoutScore>,
    ) -> Result<(), DaemonError> {
        let view = self.chain.epoch_view().await?;
        let width = view.params.embedding_dim as usize;
        let path = weights.to_path_buf();
        tokio::task::spawn_blocking(move || check_weights(&path, width))
            .await
            .map_err(|e| DaemonError::Io(e.to_string()))??;
        if embedding.len() != width {
            return Err(DaemonError::Usage(format!(
                "the embedding has {} values; this chain takes {width}",
                embedding.len()
            )));
        }
        if let Some(i) = embedding.iter().position(|v| !v.is_finite()) {
            return Err(DaemonError::Usage(format!(
                "the embedding's value {i} is {}; nothing non-finite is published",
                embedding[i]
            )));
        }
        if let Some(h) = heldout
            && !(h.loss.is_finite() && h.bits_per_byte.is_finite())
        {
            return Err(DaemonError::Usage(format!(
                "the round's held-out loss is {}; nothing non-finite is published",
                h.loss
            )));
        }
        let me = self.keypair.address();
        let needed = fee_estimate(&view, 5, 0) * 2;
        let balance = self.chain.balance(&me).await?;
        if balance < needed {
            return Err(DaemonError::Usage(format!(
                "a commit and its reveal need about {needed} shannons in fees; the wallet {me} \
                 holds {balance}"
            )));
        }
        Ok(())
    }

    /// Encrypts `weights` with a fresh key, uploads the ciphertext, checks the upload and
    /// journals the round with its commitments. Nothing is sent to the chain.
    pub async fn prepare(
        &mut self,
        round: u64,
        step: u64,
        weights: &Path,
        embedding: Vec<f32>,
        heldout: Option<HeldoutScore>,
    ) -> Result<(), DaemonError> {
        if let Some(p) = &self.journal.pending {
            return Err(DaemonError::Usage(format!(
                "round {} is committed or prepared and not yet revealed; reveal it first",
                p.round
            )));
        }
        let model_id = self.model_id()?;
        self.set_phase(Phase::Uploading)?;
        crate::journal::create_private_dir(&self.publish_dir)
            .map_err(|e| DaemonError::Io(format!("{}: {e}", self.publish_dir.display())))?;
        let key = EncryptionKey::generate();
        let encrypted = self
            .publish_dir
            .join(format!("round-{round}.safetensors.enc"));
        let summary = {
            let (key, weights, encrypted) = (key.clone(), weights.to_path_buf(), encrypted.clone());
            tokio::task::spawn_blocking(move || encrypt_file(&key, &weights, &encrypted))
                .await
                .map_err(|e| DaemonError::Io(e.to_string()))??
        };
        let id_hex = model_id.hex();
        let object_name = format!(
            "somatrain-{}-round{round}-{}.safetensors.enc",
            &id_hex[..16],
            &summary.output_commitment.to_base58()[..10]
        );
        let manifest = self.storage.upload_file(&object_name, &encrypted).await?;
        if manifest.checksum != summary.output_commitment || manifest.size != summary.bytes {
            let expected = Manifest {
                url: manifest.url.clone(),
                checksum: summary.output_commitment,
                size: summary.bytes,
            };
            return Err(StorageError::mismatch(&expected, manifest.checksum, manifest.size).into());
        }
        pause_point("uploaded");
        self.journal.pending = Some(PendingRound {
            round,
            step,
            encrypted,
            object_name,
            commitments: Commitments {
                weights: manifest.checksum,
                embedding: embedding_commitment(&embedding),
                decryption_key: key.commitment(),
            },
            manifest,
            decryption_key: key.to_base58(),
            embedding,
            heldout,
            commit_epoch: None,
            reveal_opens_ms: None,
            reveal_closes_ms: None,
            chain_id: None,
            commit_digest: None,
        });
        self.save()
    }

    /// Commits the prepared round (once: a commit that already landed is recognised).
    pub async fn commit_pending(&mut self) -> Result<u64, DaemonError> {
        let model_id = self.model_id()?;
        let pending = self
            .journal
            .pending
            .clone()
            .ok_or_else(|| DaemonError::Usage("nothing prepared to commit".into()))?;
        if let Some(epoch) = pending.commit_epoch {
            return Ok(epoch);
        }
        // A commit of these very commitments already on chain (from a lost answer) counts.
        let model = self.chain.model(&model_id).await?;
        if let Some(on_chain) = model.as_ref().and_then(|m| m.pending.as_ref())
            && on_chain.commitments == pending.commitments
        {
            let epoch = on_chain.commit_epoch;
            let clock = self.chain.epoch_clock().await?;
            let opens = window_opens(&clock, epoch);
            let chain_id = self.chain_id().await?;
            if let Some(p) = &mut self.journal.pending {
                p.commit_epoch = Some(epoch);
                p.chain_id = Some(chain_id);
                p.reveal_opens_ms = Some(opens);
                p.reveal_closes_ms = Some(opens + clock.epoch_duration_ms);
                self.journal.reveal_deadline_ms = p.reveal_closes_ms;
            }
            self.save()?;
            return Ok(epoch);
        }
        committable(model.as_ref(), &model_id, &self.keypair.address())?;
        self.set_phase(Phase::Committing)?;
        self.last_clock = Some(self.chain.epoch_clock().await?);
        let executed = self
            .send(
                Purpose::Commit,
                TransactionKind::CommitModel(CommitModel {
                    model_id,
                    manifest: pending.manifest.clone(),
                    weights_commitment: pending.commitments.weights,
                    embedding_commitment: pending.commitments.embedding,
                    decryption_key_commitment: pending.commitments.decryption_key,
                }),
            )
            .await?;
        self.set_phase(Phase::AwaitingReveal)?;
        Ok(executed.effects.executed_epoch)
    }

    /// Where the pending round's reveal stands, from the chain's epoch.
    pub async fn reveal_window(&mut self) -> Result<RevealWindow, DaemonError> {
        let commit_epoch = self
            .journal
            .pending
            .as_ref()
            .and_then(|p| p.commit_epoch)
            .ok_or_else(|| DaemonError::Usage("no committed round awaits a reveal".into()))?;
        self.check_same_chain().await?;
        // The clock alone: a reply no other user can inflate.
        let clock = self.chain.epoch_clock().await?;
        let window = if clock.epoch == commit_epoch {
            RevealWindow::NotYet {
                opens_ms: clock.next_epoch_ms(),
            }
        } else if clock.epoch == commit_epoch + 1 {
            RevealWindow::Open {
                deadline_ms: clock.next_epoch_ms(),
            }
        } else if clock.epoch < commit_epoch {
            return Err(DaemonError::Journal(format!(
                "the journal's round was committed in epoch {commit_epoch}, but this network is \
                 at epoch {}: the run directory belongs to another network",
                clock.epoch
            )));
        } else {
            RevealWindow::Missed
        };
        let deadline = match window {
            RevealWindow::NotYet { opens_ms } => Some(opens_ms + clock.epoch_duration_ms),
            RevealWindow::Open { deadline_ms } => Some(deadline_ms),
            RevealWindow::Missed => None,
        };
        if self.journal.reveal_deadline_ms != deadline {
            self.journal.reveal_deadline_ms = deadline;
            self.save()?;
        }
        Ok(window)
    }

    /// Refuses a pending round committed on another chain than the one this client talks to
    /// (its epochs say nothing about that round's window).
    async fn check_same_chain(&mut self) -> Result<(), DaemonError> {
        let Some(committed_on) = self
            .journal
            .pending
            .as_ref()
            .and_then(|p| p.chain_id.clone())
        else {
            return Ok(());
        };
        let here = self.chain_id().await?;
        if committed_on != here {
            return Err(DaemonError::Journal(format!(
                "the journal's round was committed on chain {committed_on}, but this network is \
                 chain {here}: use the run directory with the network it belongs to"
            )));
        }
        Ok(())
    }

    /// Gives up on a round whose window closed: the chain slashes (first reveal) or drops it.
    pub fn abandon_pending(&mut self) -> Result<(), DaemonError> {
        if let Some(p) = self.journal.pending.take() {
            let committed = p
                .commit_epoch
                .map_or("was never committed".to_string(), |e| {
                    format!("committed in epoch {e}")
                });
            tracing::error!(
                "the reveal window of round {} ({committed}) closed before the reveal landed",
                p.round,
            );
            self.journal.missed_reveals += 1;
            self.journal.reveal_deadline_ms = None;
        }
        self.save()
    }

    /// Records that the pending round's weights must be confirmed served from now on (its reveal
    /// window is open), and returns what must be served: the record stays in the journal, with
    /// the encrypted file, until [`Publisher::upload_confirmed`].
    pub fn watch_pending_upload(&mut self) -> Result<Option<Upload>, DaemonError> {
        if self.journal.reupload.is_none()
            && let Some(pending) = &self.journal.pending
        {
            self.journal.reupload = Some(pending.upload());
            self.save()?;
        }
        Ok(self.journal.reupload.clone())
    }

    /// Notes, once, since when the weights have been seen missing (for `status`).
    pub fn upload_missing(&mut self, upload: &Upload) -> Result<(), DaemonError> {
        if let Some(u) = &mut self.journal.reupload
            && u.manifest == upload.manifest
            && u.since_ms.is_none()
        {
            u.since_ms = Some(now_ms());
            self.save()?;
        }
        Ok(())
    }

    /// The weights read back whole at their URL: the record goes, and the encrypted file too
    /// once the round is revealed.
    pub fn upload_confirmed(&mut self, upload: &Upload) -> Result<(), DaemonError> {
        if self
            .journal
            .reupload
            .as_ref()
            .is_some_and(|u| u.manifest == upload.manifest)
        {
            self.journal.reupload = None;
            self.save()?;
        }
        let pending_needs_it = self
            .journal
            .pending
            .as_ref()
            .is_some_and(|p| p.encrypted == upload.encrypted);
        if !pending_needs_it {
            let _ = std::fs::remove_file(&upload.encrypted);
        }
        Ok(())
    }

    /// Reveals the pending round: key and embedding. The bucket is not looked at first: the
    /// chain does not read the URL at the reveal, a missed first reveal costs half the stake,
    /// and weights that come back before the validators look cost nothing. The weights are
    /// recorded as to be confirmed served ([`Publisher::watch_pending_upload`]) before it goes.
    pub async fn reveal_pending(&mut self) -> Result<u64, DaemonError> {
        let model_id = self.model_id()?;
        let pending = self
            .journal
            .pending
            .clone()
            .ok_or_else(|| DaemonError::Usage("no committed round awaits a reveal".into()))?;
        if pending.commit_epoch.is_none() {
            return Err(DaemonError::Usage(
                "the pending round is not committed yet".into(),
            ));
        }
        let key = EncryptionKey::from_base58(&pending.decryption_key)
            .map_err(|_| DaemonError::Journal("the journal's decryption key is damaged".into()))?;
        self.set_phase(Phase::Revealing)?;
        self.watch_pending_upload()?;
        let executed = self
            .send(
                Purpose::Reveal,
                TransactionKind::RevealModel(RevealModel {
                    model_id,
                    decryption_key: Digest(*key.as_bytes()),
                    embedding: SomaTensor::vector(&pending.embedding),
                }),
            )
            .await?;
        Ok(executed.effects.executed_epoch)
    }

    /// This wallet's models with a commit awaiting its reveal on chain (a pending model, or an
    /// active one with an update), whatever the journal says.
    pub async fn commits_on_chain(&self) -> Result<Vec<ModelView>, DaemonError> {
        let me = self.keypair.address();
        let view = self.chain.epoch_view().await?;
        Ok(view
            .models
            .into_iter()
            .filter(|m| m.owner == me && m.pending.is_some())
            .collect())
    }

    /// Reveals a commit the journal does not hold (the journal was lost), from a key and an
    /// embedding the user gives. Both are checked against the commitments on chain and the
    /// window against the epoch before anything is signed; the model becomes the journal's.
    pub async fn reveal_unjournaled(
        &mut self,
        model: &ModelView,
        key: &EncryptionKey,
        embedding: &[f32],
    ) -> Result<u64, DaemonError> {
        let id = model.id;
        let commit = model
            .pending
            .as_ref()
            .ok_or_else(|| DaemonError::Usage(format!("model {id} has no commit to reveal")))?;
        if key.commitment() != commit.commitments.decryption_key {
            return Err(DaemonError::Usage(format!(
                "that decryption key is not the one model {id} committed to in epoch {} (its \
                 commitment differs): nothing was signed",
                commit.commit_epoch
            )));
        }
        if embedding_commitment(embedding) != commit.commitments.embedding {
            return Err(DaemonError::Usage(format!(
                "that embedding is not the one model {id} committed to in epoch {} (its \
                 commitment differs): nothing was signed. Give the committed one with --embedding",
                commit.commit_epoch
            )));
        }
        let clock = self.chain.epoch_clock().await?;
        if clock.epoch == commit.commit_epoch {
            return Err(DaemonError::Usage(format!(
                "model {id} was committed in epoch {}, which is still the current epoch: its \
                 reveal window opens with epoch {}",
                commit.commit_epoch,
                commit.commit_epoch + 1
            )));
        }
        if clock.epoch > commit.commit_epoch + 1 {
            return Err(DaemonError::Usage(format!(
                "the reveal window of model {id}'s commit (epoch {}) closed with epoch {}; the \
                 network is at epoch {}",
                commit.commit_epoch,
                commit.commit_epoch + 1,
                clock.epoch
            )));
        }
        if self.journal.model_id.is_none() {
            self.journal.model_id = Some(id);
            self.save()?;
        }
        self.set_phase(Phase::Revealing)?;
        let executed = self
            .send(
                Purpose::Reveal,
                TransactionKind::RevealModel(RevealModel {
                    model_id: id,
                    decryption_key: Digest(*key.as_bytes()),
                    embedding: SomaTensor::vector(embedding),
                }),
            )
            .await?;
        Ok(executed.effects.executed_epoch)
    }

    /// The model's state on chain (None before it is created).
    pub async fn model_state(&self) -> Result<Option<ModelState>, DaemonError> {
        match self.journal.model_id {
            Some(id) => Ok(self.chain.model(&id).await?.map(|m| m.state)),
            None => Ok(None),
        }
    }

    /// Milliseconds left before the pending reveal's window closes, from the journal alone
    /// (so it is known while the node is unreachable).
    pub fn reveal_time_left_ms(&self) -> Option<u64> {
        self.journal
            .reveal_deadline_ms
            .map(|d| d.saturating_sub(now_ms()))
    }
}

/// The models `owner` has on chain that are still created or pending.
fn unfinished<'a>(view: &'a EpochView, owner: &somatrain_protocol::Address) -> Vec<&'a ModelView> {
    view.models
        .iter()
        .filter(|m| {
            m.owner == *owner && matches!(m.state, ModelState::Created | ModelState::Pending)
        })
        .collect()
}

/// When the reveal window of a commit in `commit_epoch` opens: the end of that epoch, as far as
/// `clock` (of that epoch or a later one) tells.
fn window_opens(clock: &EpochClock, commit_epoch: u64) -> u64 {
    let duration = clock.epoch_duration_ms;
    match clock.epoch.checked_sub(commit_epoch) {
        Some(0) | None => clock.next_epoch_ms(),
        Some(later) => clock.start_ms.saturating_sub((later - 1) * duration),
    }
}

/// Refuses a model that cannot take a commit from `me`: missing, another wallet's, inactive
/// (a missed reveal, a deactivation or a slash), or pending with a commit this journal does not
/// hold. The error names the model and its state; nothing has been signed when it is returned.
fn committable(
    model: Option<&ModelView>,
    id: &ObjectId,
    me: &somatrain_protocol::Address,
) -> Result<(), DaemonError> {
    let Some(model) = model else {
        return Err(DaemonError::Usage(format!(
            "model {id} is not on chain: nothing was signed. Pass `--new-model` to create a \
             new model"
        )));
    };
    if model.owner != *me {
        return Err(DaemonError::Usage(format!(
            "model {id} belongs to {}, not to this wallet ({me}): nothing was signed",
            model.owner
        )));
    }
    match model.state {
        ModelState::Created | ModelState::Active => Ok(()),
        ModelState::Inactive => Err(DaemonError::Usage(format!(
            "model {id} is inactive on chain (a reveal window closed without its reveal, or it \
             was deactivated or slashed; {} shannons of stake are left in it): it can take no \
             commit, and nothing was signed. Pass `--new-model` to create a new model",
            model.stake
        ))),
        ModelState::Pending => Err(DaemonError::Usage(format!(
            "model {id} is pending on chain with a commit from epoch {} that this journal did \
             not make; it can take no other commit until that one is revealed (its key is only \
             in the journal that committed it), and nothing was signed. Pass `--new-model` to \
             create a new model",
            model.pending.as_ref().map_or(0, |p| p.commit_epoch)
        ))),
    }
}

fn purpose_name(purpose: Purpose) -> &'static str {
    match purpose {
        Purpose::CreateModel => "create",
        Purpose::Commit => "commit",
        Purpose::Reveal => "reveal",
    }
}

/// The weights file loads as V1 weights of `width` and every value is finite.
fn check_weights(path: &Path, width: usize) -> Result<(), DaemonError> {
    let weights = somatrain_model::io::load_file_any_width(path).map_err(|e| {
        DaemonError::Usage(format!(
            "{} is not publishable weights: {e}",
            path.display()
        ))
    })?;
    if weights.config.embedding_dim != width {
        return Err(DaemonError::Usage(format!(
            "{} has width {}; this chain's models have width {width}",
            path.display(),
            weights.config.embedding_dim
        )));
    }
    for (name, values) in weights.tensors() {
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(DaemonError::Usage(format!(
                "{}: tensor {name} holds {} at index {i}; nothing non-finite is published",
                path.display(),
                values[i]
            )));
        }
    }
    Ok(())
}

fn encrypt_file(
    key: &EncryptionKey,
    weights: &Path,
    encrypted: &Path,
) -> Result<somatrain_protocol::crypto::StreamSummary, DaemonError> {
    let io = |path: &Path, e: &dyn std::fmt::Display| {
        DaemonError::Io(format!("{}: {e}", path.display()))
    };
    let input = std::fs::File::open(weights).map_err(|e| io(weights, &e))?;
    let (tmp, output) =
        somatrain_model::io::create_private_temp(encrypted).map_err(|e| io(encrypted, &e))?;
    let summary = encrypt_stream(
        key,
        std::io::BufReader::new(input),
        std::io::BufWriter::new(output),
    )
    .map_err(|e| io(weights, &e))?;
    somatrain_model::io::finish_atomic(&tmp, encrypted).map_err(|e| io(encrypted, &e))?;
    Ok(summary)
}

/// What one look at committed weights found.
#[derive(Debug)]
pub enum Served {
    /// The URL serves the committed bytes.
    Whole,
    /// Not served, and the upload failed this time (the host down, say): try again later.
    Missing(StorageError),
    /// Not served, and no retry can change that (the name holds other bytes the store will not
    /// overwrite, or the local encrypted file is gone).
    Impossible(StorageError),
}

/// Looks at the committed URL; when it does not serve the committed bytes, uploads the local
/// encrypted file once (with the storage's own retries) and so confirms them.
pub async fn serve_once(storage: &Storage, upload: &Upload) -> Served {
    let missing = match verify_url(storage.http(), &upload.manifest).await {
        Ok(()) => return Served::Whole,
        Err(e) => e,
    };
    tracing::warn!(
        "the weights of round {} are not served whole at {} ({missing}); uploading them again",
        upload.round,
        upload.manifest.url
    );
    match storage
        .upload_file(&upload.object_name, &upload.encrypted)
        .await
    {
        Ok(manifest) if manifest == upload.manifest => Served::Whole,
        Ok(manifest) => Served::Missing(StorageError::mismatch(
            &upload.manifest,
            manifest.checksum,
            manifest.size,
        )),
        Err(
            e @ (StorageError::Taken { .. }
            | StorageError::Local { .. }
            | StorageError::BadName(_)
            | StorageError::Config(_)),
        ) => Served::Impossible(e),
        Err(e) => Served::Missing(e),
    }
}
