//! What the submitter has done, durably: every hit from the moment it is queued until its claim,
//! the transactions in flight (signed and journaled before they are sent), the spend per epoch,
//! and the counters. Written atomically (temporary file, fsync, rename) after every change, so a
//! process killed at any point restarts knowing which targets it submitted to, which bonds are
//! out and which claims are due.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use somatrain_protocol::{ObjectId, SignedTransaction, TxDigest};

use crate::SubmitterError;

const FORMAT: &str = "somatrain-submitter";
const VERSION: u32 = 1;
/// A journal is refused above this size before it is parsed.
const MAX_JOURNAL_BYTES: u64 = 256 << 20;
/// Settled records stay this many epochs after their target's epoch, then move to the history.
const KEEP_SETTLED_EPOCHS: u64 = 3;

/// A signed transaction that may have executed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Inflight {
    pub digest: TxDigest,
    /// Hex of the signed envelope's BCS.
    pub signed_bcs: String,
}

impl Inflight {
    pub fn new(tx: &SignedTransaction) -> Self {
        Inflight {
            digest: tx.digest(),
            signed_bcs: hex::encode(tx.to_bcs()),
        }
    }

    /// The journaled transaction, checked to be what its digest says.
    pub fn transaction(&self) -> Result<SignedTransaction, SubmitterError> {
        let bytes = hex::decode(&self.signed_bcs)
            .map_err(|e| SubmitterError::Journal(format!("an in-flight transaction: {e}")))?;
        let tx = SignedTransaction::from_bcs(&bytes)
            .map_err(|e| SubmitterError::Journal(format!("an in-flight transaction: {e}")))?;
        if tx.digest() != self.digest {
            return Err(SubmitterError::Journal(format!(
                "the in-flight transaction has digest {}, the journal says {}",
                tx.digest(),
                self.digest
            )));
        }
        Ok(tx)
    }
}

/// Where one hit stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum State {
    /// Scored as a hit; the piece waits under `pieces/` for the submission queue.
    Queued,
    /// `SubmitData` signed and journaled; it may have executed.
    Submitting { inflight: Inflight, bond: u64 },
    /// The target is ours since `fill_epoch`; the bond is out until the claim.
    Submitted {
        digest: TxDigest,
        fill_epoch: u64,
        bond: u64,
    },
    /// `ClaimRewards` signed and journaled; it may have executed.
    Claiming {
        inflight: Inflight,
        fill_epoch: u64,
        bond: u64,
    },
    /// Claimed by us: `received` is what the claim moved into the wallet (bond, share and the
    /// claimer's incentive, less its fee).
    Claimed {
        digest: TxDigest,
        epoch: u64,
        bond: u64,
        /// Shannons (i64: the whole supply fits, and JSON in a tagged enum takes no i128).
        received: i64,
    },
    /// Someone else claimed it first: the chain paid our share and bond all the same.
    ClaimedByOther { bond: u64 },
    /// Not ours: someone filled the target first, it expired, or the chain refused the
    /// submission. No bond was taken (an executed failure still paid its fee).
    Refused { reason: String },
    /// Never sent: a limit was reached, or its piece was lost. Nothing was spent.
    Dropped { reason: String },
}

impl State {
    pub fn name(&self) -> &'static str {
        match self {
            State::Queued => "queued",
            State::Submitting { .. } => "submitting",
            State::Submitted { .. } => "submitted",
            State::Claiming { .. } => "claiming",
            State::Claimed { .. } => "claimed",
            State::ClaimedByOther { .. } => "claimed_by_other",
            State::Refused { .. } => "refused",
            State::Dropped { .. } => "dropped",
        }
    }

    /// The bond this hit holds on chain now.
    pub fn bond_outstanding(&self) -> u64 {
        match self {
            State::Submitted { bond, .. } | State::Claiming { bond, .. } => *bond,
            _ => 0,
        }
    }

    pub fn is_settled(&self) -> bool {
        matches!(
            self,
            State::Claimed { .. }
                | State::ClaimedByOther { .. }
                | State::Refused { .. }
                | State::Dropped { .. }
        )
    }
}

/// One hit: a piece of data within a target's threshold under one of its models.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hit {
    pub target_id: ObjectId,
    pub generation_epoch: u64,
    pub model_id: ObjectId,
    /// Blake2b-256 (Base58) of the piece, its file name under `pieces/`.
    pub piece: String,
    pub size: u64,
    pub loss: f32,
    pub distance: f32,
    pub threshold: f32,
    pub reward_pool: u64,
    pub state: State,
}

impl Hit {
    /// The key of its embedding in [`Journal::embeddings`]: every target a piece hits with the
    /// same model shares one.
    pub fn embedding_key(&self) -> String {
        format!("{}/{}", self.piece, self.model_id)
    }
}

/// Spend in one epoch, held against the limits.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EpochSpend {
    pub bond: u64,
    pub fees: u64,
    pub submissions: u64,
}

/// Counters since the state directory was created.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Totals {
    pub pieces_scored: u64,
    pub tokens_scored: u64,
    pub hits: u64,
    pub submissions: u64,
    pub refused: u64,
    pub dropped: u64,
    /// Uploads that failed (their hits stayed queued).
    #[serde(default)]
    pub upload_failures: u64,
    pub claims: u64,
    /// What claims moved into the wallet, bonds included, fees excluded.
    pub claimed_shannons: i64,
    pub fees: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Journal {
    format: String,
    version: u32,
    /// The chain (`GetServiceInfo`) the journal's transactions were signed for.
    pub chain_id: String,
    pub wallet: String,
    /// Keyed by target id.
    pub hits: BTreeMap<ObjectId, Hit>,
    /// The embeddings queued hits will be submitted with, by [`Hit::embedding_key`].
    pub embeddings: BTreeMap<String, Vec<f32>>,
    pub spend: BTreeMap<u64, EpochSpend>,
    pub totals: Totals,
}

impl Journal {
    pub fn new(chain_id: &str, wallet: &str) -> Self {
        Journal {
            format: FORMAT.into(),
            version: VERSION,
            chain_id: chain_id.into(),
            wallet: wallet.into(),
            hits: BTreeMap::new(),
            embeddings: BTreeMap::new(),
            spend: BTreeMap::new(),
            totals: Totals::default(),
        }
    }

    pub fn path_in(dir: &Path) -> PathBuf {
        dir.join("journal.json")
    }

    /// The journal in `dir`, or `None` when there is none yet.
    pub fn load(dir: &Path) -> Result<Option<Self>, SubmitterError> {
        let path = Self::path_in(dir);
        let size = match std::fs::metadata(&path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(SubmitterError::io(&path, e)),
        };
        if size > MAX_JOURNAL_BYTES {
            return Err(SubmitterError::Journal(format!(
                "{} is {size} bytes, over the {MAX_JOURNAL_BYTES} a journal may hold",
                path.display()
            )));
        }
        let bytes = std::fs::read(&path).map_err(|e| SubmitterError::io(&path, e))?;
        let journal: Journal = serde_json::from_slice(&bytes).map_err(|e| {
            SubmitterError::Journal(format!("{} does not parse: {e}", path.display()))
        })?;
        if journal.format != FORMAT || journal.version != VERSION {
            return Err(SubmitterError::Journal(format!(
                "{} is {} v{}; this build reads {FORMAT} v{VERSION}",
                path.display(),
                journal.format,
                journal.version
            )));
        }
        Ok(Some(journal))
    }

    /// Writes the journal atomically, first moving records settled long ago to
    /// `history.jsonl` (their targets can take no submission any more).
    pub fn save(&mut self, dir: &Path, epoch: u64) -> Result<(), SubmitterError> {
        let old: Vec<ObjectId> = self
            .hits
            .iter()
            .filter(|(_, h)| {
                h.state.is_settled() && h.generation_epoch + KEEP_SETTLED_EPOCHS < epoch
            })
            .map(|(id, _)| *id)
            .collect();
        if !old.is_empty() {
            let history = dir.join("history.jsonl");
            let mut lines = Vec::new();
            for id in &old {
                lines.extend(serde_json::to_vec(&self.hits[id]).expect("a hit serialises"));
                lines.push(b'\n');
            }
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&history)
                .map_err(|e| SubmitterError::io(&history, e))?;
            file.write_all(&lines)
                .and_then(|_| file.sync_all())
                .map_err(|e| SubmitterError::io(&history, e))?;
            for id in old {
                self.hits.remove(&id);
            }
            self.spend.retain(|e, _| e + KEEP_SETTLED_EPOCHS >= epoch);
        }
        // Only a hit not yet submitted may need its embedding (again, if its transaction
        // never executes).
        let needed: std::collections::HashSet<String> = self
            .hits
            .values()
            .filter(|h| matches!(h.state, State::Queued | State::Submitting { .. }))
            .map(Hit::embedding_key)
            .collect();
        self.embeddings.retain(|key, _| needed.contains(key));
        write_atomic(
            &Self::path_in(dir),
            &serde_json::to_vec(self).expect("the journal serialises"),
        )
    }

    /// Moves the hit of `target` (if the journal has it) to `state`.
    pub fn set_state(&mut self, target: &ObjectId, state: State) {
        if let Some(hit) = self.hits.get_mut(target) {
            hit.state = state;
        }
    }

    pub fn spend_in(&mut self, epoch: u64) -> &mut EpochSpend {
        self.spend.entry(epoch).or_default()
    }

    pub fn bond_outstanding(&self) -> u64 {
        self.hits.values().map(|h| h.state.bond_outstanding()).sum()
    }
}

/// Temporary file, fsync, rename, fsync of the directory; readable by the owner only.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), SubmitterError> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        drop(file);
        somatrain_model::io::finish_atomic(&tmp, path)
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        SubmitterError::io(path, e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every state, written and read back: what a restart reads is what was written.
    #[test]
    fn a_journal_with_every_state_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let tx = Inflight {
            digest: TxDigest([3; 32]),
            signed_bcs: "00".into(),
        };
        let states = [
            State::Queued,
            State::Submitting {
                inflight: tx.clone(),
                bond: 5,
            },
            State::Submitted {
                digest: TxDigest([4; 32]),
                fill_epoch: 2,
                bond: 5,
            },
            State::Claiming {
                inflight: tx,
                fill_epoch: 2,
                bond: 5,
            },
            State::Claimed {
                digest: TxDigest([5; 32]),
                epoch: 4,
                bond: 5,
                received: -7,
            },
            State::ClaimedByOther { bond: 5 },
            State::Refused {
                reason: "filled".into(),
            },
            State::Dropped {
                reason: "limit".into(),
            },
        ];
        let mut journal = Journal::new("chain", "wallet");
        for (i, state) in states.into_iter().enumerate() {
            let hit = Hit {
                target_id: ObjectId([i as u8; 32]),
                generation_epoch: 2,
                model_id: ObjectId([9; 32]),
                piece: "piece".into(),
                size: 10,
                loss: 1.5,
                distance: 0.9,
                threshold: 1.05,
                reward_pool: 100,
                state,
            };
            journal.hits.insert(hit.target_id, hit);
        }
        journal
            .embeddings
            .insert("piece/0x09".into(), vec![0.5, -1.0]);
        journal.totals.claimed_shannons = -7;
        journal.save(dir.path(), 2).unwrap();
        assert_eq!(Journal::load(dir.path()).unwrap().unwrap(), journal);
    }
}
