//! Create, commit and reveal, one journaled step at a time. `somatrain commit` and
//! `somatrain reveal` call these directly; the loop in [`crate::run_loop`] strings them together.
//!
//! Every transaction is signed, written into the journal, and only then sent. After a crash the
//! journal's transaction is looked up on the network by digest: if it executed, its outcome is
//! applied; if not, the very same signed bytes are sent again. Nothing is ever signed twice for
//! one step, so nothing is ever committed twice.

use std::path::{Path, PathBuf};
use std::time::Duration;

use somatrain_client::{Client, ClientError};
use somatrain_protocol::chain::{Commitments, ModelStatus, TxRecord};
use somatrain_protocol::crypto::{EncryptionKey, embedding_commitment, encrypt_stream};
use somatrain_protocol::tx::{SignedTx, TxBody, TxKind};
use somatrain_protocol::{Keypair, ObjectId};
use somatrain_storage::{Storage, StorageError, verify_url};
use somatrain_train::trainer::HeldoutScore;

use crate::DaemonError;
use crate::journal::{Inflight, Journal, PendingRound, Phase, Purpose, RevealedRound};

/// Where the reveal of a committed round stands against the chain's epochs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevealWindow {
    /// Still the commit epoch; the window opens at `opens_ms`.
    NotYet { opens_ms: u64 },
    /// The reveal epoch: reveal now, before `deadline_ms`.
    Open { deadline_ms: u64 },
    /// The window has closed.
    Missed,
}

/// Test hook: `SOMATRAIN_PAUSE_AT=NAME` stops the process at the named point (announced on
/// stderr) so a test can `kill -9` it exactly there.
pub fn pause_point(name: &str) {
    if std::env::var("SOMATRAIN_PAUSE_AT").is_ok_and(|v| v == name) {
        eprintln!("PAUSED AT {name}");
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
}

pub struct Publisher {
    pub client: Client,
    keypair: Keypair,
    pub storage: Storage,
    pub journal: Journal,
    journal_path: PathBuf,
    publish_dir: PathBuf,
}

impl Publisher {
    /// A publisher whose journal and encrypted files live in `run_dir`.
    pub fn open(
        client: Client,
        keypair: Keypair,
        storage: Storage,
        run_dir: &Path,
    ) -> Result<Self, DaemonError> {
        let journal_path = Journal::path_in(run_dir);
        let journal = Journal::load(&journal_path)?;
        Ok(Publisher {
            client,
            keypair,
            storage,
            journal,
            journal_path,
            publish_dir: run_dir.join("publish"),
        })
    }

    pub fn keypair(&self) -> &Keypair {
        &self.keypair
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

    /// Settles a transaction left in flight by a previous process.
    pub async fn resolve_inflight(&mut self) -> Result<(), DaemonError> {
        let Some(inflight) = self.journal.inflight.clone() else {
            return Ok(());
        };
        let digest = inflight.tx.digest();
        if let Some(record) = self.client.transaction(&digest).await? {
            tracing::info!(
                "transaction {digest} ({:?}) had executed before the restart",
                inflight.purpose
            );
            return self.settle(inflight.purpose, &record);
        }
        let account = self.client.account(&self.keypair.address()).await?;
        let body = inflight.tx.verify().map_err(|e| {
            DaemonError::Journal(format!("the journal's transaction is invalid: {e}"))
        })?;
        if account.sequence == body.sequence {
            tracing::info!(
                "resending transaction {digest} ({:?}) after the restart",
                inflight.purpose
            );
            let record = self.submit_or_find(&inflight.tx).await?;
            return self.settle(inflight.purpose, &record);
        }
        // Its sequence number was used by another transaction: it can never execute.
        tracing::warn!(
            "transaction {digest} ({:?}) can no longer execute; the step will be redone",
            inflight.purpose
        );
        self.journal.inflight = None;
        self.save()
    }

    /// Sends `tx`, retrying through network failures; before each retry the digest is looked up,
    /// since a send whose answer was lost may have executed.
    async fn submit_or_find(&self, tx: &SignedTx) -> Result<TxRecord, DaemonError> {
        let mut backoff = Duration::from_millis(200);
        let mut attempts = 0;
        loop {
            match self.client.submit(tx).await {
                Ok(record) => return Ok(record),
                Err(ClientError::Network { .. } | ClientError::Protocol { .. }) if attempts < 8 => {
                    attempts += 1;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    if let Ok(Some(record)) = self.client.transaction(&tx.digest()).await {
                        return Ok(record);
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Signs `kind`, journals it, sends it and applies its outcome.
    async fn send(&mut self, purpose: Purpose, kind: TxKind) -> Result<TxRecord, DaemonError> {
        let account = self.client.account(&self.keypair.address()).await?;
        let body = TxBody {
            sender: self.keypair.address(),
            sequence: account.sequence,
            kind,
        };
        let tx = SignedTx::sign(&self.keypair, &body);
        self.journal.inflight = Some(Inflight {
            purpose,
            tx: tx.clone(),
        });
        self.save()?;
        pause_point(&format!("{}-journaled", purpose_name(purpose)));
        let record = match self.submit_or_find(&tx).await {
            Ok(record) => record,
            Err(e) => {
                if matches!(e, DaemonError::Client(ClientError::Rejected { .. })) {
                    // Refused for good: this signed transaction will never execute.
                    self.journal.inflight = None;
                    self.save()?;
                }
                return Err(e);
            }
        };
        pause_point(&format!("{}-sent", purpose_name(purpose)));
        self.settle(purpose, &record)?;
        Ok(record)
    }

    fn settle(&mut self, purpose: Purpose, record: &TxRecord) -> Result<(), DaemonError> {
        match purpose {
            Purpose::CreateModel => {
                let id = *record.created.first().ok_or_else(|| {
                    DaemonError::Chain("the create transaction created no model".into())
                })?;
                tracing::info!("model {id} created in epoch {}", record.epoch);
                self.journal.model_id = Some(id);
            }
            Purpose::Commit => {
                if let Some(pending) = &mut self.journal.pending {
                    pending.commit_epoch = Some(record.epoch);
                    tracing::info!(
                        "round {} committed in epoch {}",
                        pending.round,
                        record.epoch
                    );
                }
            }
            Purpose::Reveal => {
                if let Some(pending) = self.journal.pending.take() {
                    tracing::info!("round {} revealed in epoch {}", pending.round, record.epoch);
                    self.journal.last_revealed = Some(RevealedRound {
                        round: pending.round,
                        step: pending.step,
                        commit_epoch: pending
                            .commit_epoch
                            .unwrap_or(record.epoch.saturating_sub(1)),
                        reveal_epoch: record.epoch,
                        url: pending.manifest.url.clone(),
                        heldout: pending.heldout.clone(),
                    });
                    self.journal.rounds_revealed = self.journal.rounds_revealed.max(pending.round);
                    self.journal.reveal_deadline_ms = None;
                    let _ = std::fs::remove_file(&pending.encrypted);
                }
            }
        }
        self.journal.inflight = None;
        self.save()
    }

    /// The model this publisher commits to, created (with `stake` shannons) if it has none.
    pub async fn ensure_model(
        &mut self,
        stake: u64,
        commission_bps: u64,
        architecture_version: u64,
    ) -> Result<ObjectId, DaemonError> {
        if let Some(id) = self.journal.model_id {
            return Ok(id);
        }
        self.set_phase(Phase::CreatingModel)?;
        self.send(
            Purpose::CreateModel,
            TxKind::CreateModel {
                stake,
                commission_bps,
                architecture_version,
            },
        )
        .await?;
        self.journal
            .model_id
            .ok_or_else(|| DaemonError::Chain("no model id after create".into()))
    }

    fn model_id(&self) -> Result<ObjectId, DaemonError> {
        self.journal
            .model_id
            .ok_or_else(|| DaemonError::Usage("no model yet: commit creates one".into()))
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
        std::fs::create_dir_all(&self.publish_dir)
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
        let id_hex = model_id.to_string();
        let object_name = format!(
            "somatrain-{}-round{round}-{}.safetensors.enc",
            &id_hex[2..18],
            &summary.output_commitment.to_base58()[..10]
        );
        let manifest = self.storage.upload_file(&object_name, &encrypted).await?;
        if manifest.checksum != summary.output_commitment || manifest.size != summary.bytes {
            let expected = somatrain_protocol::tx::Manifest {
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
        let model = self.client.model(&model_id).await?;
        if let Some(on_chain) = &model.pending
            && on_chain.commitments == pending.commitments
        {
            if let Some(p) = &mut self.journal.pending {
                p.commit_epoch = Some(on_chain.commit_epoch);
            }
            self.save()?;
            return Ok(on_chain.commit_epoch);
        }
        self.set_phase(Phase::Committing)?;
        let record = self
            .send(
                Purpose::Commit,
                TxKind::CommitModel {
                    model_id,
                    manifest: pending.manifest.clone(),
                    weights_commitment: pending.commitments.weights,
                    embedding_commitment: pending.commitments.embedding,
                    decryption_key_commitment: pending.commitments.decryption_key,
                },
            )
            .await?;
        self.set_phase(Phase::AwaitingReveal)?;
        Ok(record.epoch)
    }

    /// Where the pending round's reveal stands, from the node's clock and epoch.
    pub async fn reveal_window(&mut self) -> Result<RevealWindow, DaemonError> {
        let status = self.client.status().await?;
        let commit_epoch = self
            .journal
            .pending
            .as_ref()
            .and_then(|p| p.commit_epoch)
            .ok_or_else(|| DaemonError::Usage("no committed round awaits a reveal".into()))?;
        let window = if status.epoch == commit_epoch {
            RevealWindow::NotYet {
                opens_ms: status.next_epoch_ms,
            }
        } else if status.epoch == commit_epoch + 1 {
            RevealWindow::Open {
                deadline_ms: status.next_epoch_ms,
            }
        } else {
            RevealWindow::Missed
        };
        let deadline = match window {
            RevealWindow::NotYet { opens_ms } => Some(opens_ms + status.params.epoch_duration_ms),
            RevealWindow::Open { deadline_ms } => Some(deadline_ms),
            RevealWindow::Missed => None,
        };
        if self.journal.reveal_deadline_ms != deadline {
            self.journal.reveal_deadline_ms = deadline;
            self.save()?;
        }
        Ok(window)
    }

    /// Gives up on a round whose window closed: the chain slashes (first reveal) or drops it.
    pub fn abandon_pending(&mut self) -> Result<(), DaemonError> {
        if let Some(p) = self.journal.pending.take() {
            tracing::error!(
                "the reveal window of round {} (committed in epoch {:?}) closed before the reveal landed",
                p.round,
                p.commit_epoch
            );
            self.journal.missed_reveals += 1;
            self.journal.reveal_deadline_ms = None;
        }
        self.save()
    }

    /// Checks the committed URL still serves the committed bytes, uploading them again from the
    /// local encrypted file if it does not.
    pub async fn ensure_served(&mut self) -> Result<(), DaemonError> {
        let pending = self
            .journal
            .pending
            .clone()
            .ok_or_else(|| DaemonError::Usage("nothing pending".into()))?;
        match verify_url(self.storage.http(), &pending.manifest).await {
            Ok(()) => Ok(()),
            Err(e) => {
                tracing::warn!("{e}; uploading the committed file again");
                let manifest = self
                    .storage
                    .upload_file(&pending.object_name, &pending.encrypted)
                    .await?;
                if manifest != pending.manifest {
                    return Err(StorageError::mismatch(
                        &pending.manifest,
                        manifest.checksum,
                        manifest.size,
                    )
                    .into());
                }
                Ok(())
            }
        }
    }

    /// Reveals the pending round: key and embedding, after checking the weights are served.
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
        self.set_phase(Phase::Revealing)?;
        self.ensure_served().await?;
        let record = self
            .send(
                Purpose::Reveal,
                TxKind::RevealModel {
                    model_id,
                    decryption_key: pending.decryption_key.clone(),
                    embedding: pending.embedding.clone(),
                },
            )
            .await?;
        Ok(record.epoch)
    }

    /// The model's status on chain (None before it is created).
    pub async fn model_status(&self) -> Result<Option<ModelStatus>, DaemonError> {
        match self.journal.model_id {
            Some(id) => Ok(Some(self.client.model(&id).await?.status)),
            None => Ok(None),
        }
    }
}

fn purpose_name(purpose: Purpose) -> &'static str {
    match purpose {
        Purpose::CreateModel => "create",
        Purpose::Commit => "commit",
        Purpose::Reveal => "reveal",
    }
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
    let tmp = somatrain_model::io::temp_path_for(encrypted);
    let output = std::fs::File::create(&tmp).map_err(|e| io(&tmp, &e))?;
    let summary = encrypt_stream(
        key,
        std::io::BufReader::new(input),
        std::io::BufWriter::new(output),
    )
    .map_err(|e| io(weights, &e))?;
    somatrain_model::io::finish_atomic(&tmp, encrypted).map_err(|e| io(encrypted, &e))?;
    Ok(summary)
}
