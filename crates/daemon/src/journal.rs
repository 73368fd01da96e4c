//! The loop's memory: what it has created, committed and must still reveal. It is written
//! atomically (temporary file, fsync, rename, fsync of the directory) with mode 0600 *before*
//! every network action, so a process killed at any instant restarts knowing exactly which
//! transaction may have gone out.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use somatrain_client::view::Commitments;
use somatrain_protocol::{Manifest, ObjectId, SignedTransaction, TxDigest};
use somatrain_train::trainer::HeldoutScore;

use crate::DaemonError;

/// 2: signed BCS transactions with the chain id, and the reveal window journaled at commit.
const VERSION: u32 = 2;

/// What the loop is doing now (shown by `somatrain status` and on `/metrics`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    #[default]
    Starting,
    CreatingModel,
    Training,
    Uploading,
    Committing,
    AwaitingReveal,
    Revealing,
    Stopped,
}

impl Phase {
    pub const ALL: [Phase; 8] = [
        Phase::Starting,
        Phase::CreatingModel,
        Phase::Training,
        Phase::Uploading,
        Phase::Committing,
        Phase::AwaitingReveal,
        Phase::Revealing,
        Phase::Stopped,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::CreatingModel => "creating_model",
            Phase::Training => "training",
            Phase::Uploading => "uploading",
            Phase::Committing => "committing",
            Phase::AwaitingReveal => "awaiting_reveal",
            Phase::Revealing => "revealing",
            Phase::Stopped => "stopped",
        }
    }
}

/// Why a transaction was sent; decides what its outcome changes in the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Purpose {
    CreateModel,
    Commit,
    Reveal,
}

/// A signed transaction that may or may not have reached the network. It is kept byte for
/// byte (the BCS of the signed envelope) so a retry sends the very same transaction (the node
/// answers a repeat with the first outcome) instead of a second one, and only to the chain it
/// was signed for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Inflight {
    pub purpose: Purpose,
    pub digest: TxDigest,
    /// The chain id (`GetServiceInfo`) of the network it was signed for.
    pub chain_id: String,
    /// Hex of the signed envelope's BCS.
    pub signed_bcs: String,
}

impl Inflight {
    pub fn new(purpose: Purpose, chain_id: &str, tx: &SignedTransaction) -> Self {
        Inflight {
            purpose,
            digest: tx.digest(),
            chain_id: chain_id.to_string(),
            signed_bcs: hex::encode(tx.to_bcs()),
        }
    }

    /// The journaled transaction, checked to be what its digest says.
    pub fn transaction(&self) -> Result<SignedTransaction, DaemonError> {
        let bytes = hex::decode(&self.signed_bcs).map_err(|e| {
            DaemonError::Journal(format!("the in-flight transaction is not hex: {e}"))
        })?;
        let tx = SignedTransaction::from_bcs(&bytes).map_err(|e| {
            DaemonError::Journal(format!("the in-flight transaction does not decode: {e}"))
        })?;
        if tx.digest() != self.digest {
            return Err(DaemonError::Journal(format!(
                "the in-flight transaction has digest {}, the journal says {}",
                tx.digest(),
                self.digest
            )));
        }
        Ok(tx)
    }
}

/// A round's weights, encrypted and uploaded, from before its commit until its reveal.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct PendingRound {
    pub round: u64,
    pub step: u64,
    /// The encrypted file, kept to re-upload if the bucket stops serving it.
    pub encrypted: PathBuf,
    pub object_name: String,
    pub manifest: Manifest,
    pub commitments: Commitments,
    /// The AES key (Base58): secret until the reveal.
    pub decryption_key: String,
    pub embedding: Vec<f32>,
    pub heldout: Option<HeldoutScore>,
    /// The epoch the commit landed in; None until it has.
    pub commit_epoch: Option<u64>,
    /// When the reveal window opens and closes (ms since the Unix epoch), from the epoch start
    /// and duration read with the commit. A localnet advanced by its admin opens it sooner.
    pub reveal_opens_ms: Option<u64>,
    pub reveal_closes_ms: Option<u64>,
    /// The chain (`GetServiceInfo` chain id) the round was committed on; absent in journals
    /// written before it was recorded.
    #[serde(default)]
    pub chain_id: Option<String>,
    /// The commit transaction, once it executed.
    #[serde(default)]
    pub commit_digest: Option<TxDigest>,
}

impl PendingRound {
    /// The upload behind this round's commit.
    pub fn upload(&self) -> Upload {
        Upload {
            round: self.round,
            encrypted: self.encrypted.clone(),
            object_name: self.object_name.clone(),
            manifest: self.manifest.clone(),
            since_ms: None,
        }
    }
}

/// Committed weights as they must be served: the bytes in `encrypted`, at `manifest.url`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Upload {
    pub round: u64,
    /// The encrypted file, kept until the URL is confirmed to serve it.
    pub encrypted: PathBuf,
    pub object_name: String,
    pub manifest: Manifest,
    /// Since when the URL has been seen not to serve them (ms since the Unix epoch).
    #[serde(default)]
    pub since_ms: Option<u64>,
}

impl std::fmt::Debug for PendingRound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingRound")
            .field("round", &self.round)
            .field("step", &self.step)
            .field("manifest", &self.manifest)
            .field("commit_epoch", &self.commit_epoch)
            .field("reveal_closes_ms", &self.reveal_closes_ms)
            .finish_non_exhaustive()
    }
}

/// Name of the rounds' history inside the run directory.
pub const ROUNDS_FILE: &str = "rounds.jsonl";

/// One revealed round, as `rounds.jsonl` keeps it (one JSON line each).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundRecord {
    pub round: u64,
    /// The optimizer step the round's weights were trained to.
    pub step: u64,
    pub heldout_loss: Option<f32>,
    pub heldout_bits_per_byte: Option<f32>,
    pub commit_epoch: u64,
    pub reveal_epoch: u64,
    pub commit_digest: Option<TxDigest>,
    pub reveal_digest: TxDigest,
    pub url: String,
    /// The model's stake and the wallet's balance right after the reveal (shannons), where the
    /// node could tell.
    pub stake: Option<u64>,
    pub balance: Option<u64>,
    /// The owner's share of the targets the model won, claimed by the time of the reveal
    /// (shannons, from `earnings.json`). The model's commission pays nothing on this network
    /// (`protocol-targets.md` §4.1), so there is no commission to record.
    #[serde(default)]
    pub earned_shannons: Option<u64>,
    /// When the reveal was settled, ms since the Unix epoch.
    pub time_ms: u64,
}

/// A round whose reveal landed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RevealedRound {
    pub round: u64,
    pub step: u64,
    pub commit_epoch: u64,
    pub reveal_epoch: u64,
    pub url: String,
    pub heldout: Option<HeldoutScore>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Journal {
    pub version: u32,
    pub model_id: Option<ObjectId>,
    pub phase: Phase,
    /// Rounds revealed so far.
    pub rounds_revealed: u64,
    pub inflight: Option<Inflight>,
    pub pending: Option<PendingRound>,
    pub last_revealed: Option<RevealedRound>,
    /// When the pending reveal must have landed (end of the commit epoch + 1), ms since epoch.
    pub reveal_deadline_ms: Option<u64>,
    /// Commits whose reveal window closed before the reveal landed (slashed or dropped).
    pub missed_reveals: u64,
    /// Weights whose reveal window has opened and which are not yet confirmed to read back
    /// whole at their committed URL: re-uploaded until they do (validators fetch them, and
    /// weights they cannot fetch are slashed).
    #[serde(default)]
    pub reupload: Option<Upload>,
}

impl Journal {
    pub fn path_in(run_dir: &Path) -> PathBuf {
        run_dir.join("journal.json")
    }

    /// The journal of a run directory; a fresh one if none was written yet.
    pub fn load(path: &Path) -> Result<Self, DaemonError> {
        match std::fs::read(path) {
            Ok(bytes) => {
                let journal: Journal = serde_json::from_slice(&bytes).map_err(|e| {
                    DaemonError::Journal(format!("{} is not a valid journal: {e}", path.display()))
                })?;
                if journal.version != VERSION {
                    return Err(DaemonError::Journal(format!(
                        "{} has version {}, this somatrain reads version {VERSION}",
                        path.display(),
                        journal.version
                    )));
                }
                Ok(journal)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Journal {
                version: VERSION,
                ..Journal::default()
            }),
            Err(e) => Err(DaemonError::Journal(format!(
                "reading {}: {e}",
                path.display()
            ))),
        }
    }

    pub fn save(&self, path: &Path) -> Result<(), DaemonError> {
        let bytes = serde_json::to_vec_pretty(self).expect("the journal serialises");
        write_private_file(path, &bytes)
            .map_err(|e| DaemonError::Journal(format!("writing {}: {e}", path.display())))
    }
}

/// Writes a file only its owner can read, atomically: created with mode 0600 under a temporary
/// name, synced, renamed over `path`, and the directory synced.
pub fn write_private_file(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let (tmp, mut file) = somatrain_model::io::create_private_temp(path)?;
    file.write_all(contents)?;
    drop(file);
    somatrain_model::io::finish_atomic(&tmp, path)
}

pub use somatrain_model::io::create_private_dir;
