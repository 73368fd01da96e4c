//! The state machine: what a transaction or an epoch change does to the chain state.
//!
//! Execution never mutates the state it reads. It records every write in an [`Overlay`], and
//! the node persists those [`Changes`] in one durable batch before applying them in memory, so
//! memory and disk never disagree about a committed transaction.

use std::collections::BTreeMap;

use serde::Serialize;
use somatrain_protocol::chain::{
    Account, Commitments, Model, ModelStatus, PendingCommit, SystemState, TxRecord,
};
use somatrain_protocol::crypto::embedding_commitment;
use somatrain_protocol::tx::{ObjectId, TxBody, TxDigest, TxKind};
use somatrain_protocol::{Address, EncryptionKey};
use somatrain_store::{Batch, Table};

pub const BPS_DENOMINATOR: u64 = 10_000;

/// Everything the chain holds.
#[derive(Debug, Clone)]
pub struct ChainState {
    pub system: SystemState,
    pub accounts: BTreeMap<Address, Account>,
    pub models: BTreeMap<ObjectId, Model>,
}

impl ChainState {
    /// Shannons held anywhere; must always equal `system.total_supply`.
    pub fn accounted_supply(&self) -> u64 {
        let accounts: u64 = self.accounts.values().map(|a| a.balance).sum();
        let stakes: u64 = self.models.values().map(|m| m.stake).sum();
        accounts
            + stakes
            + self.system.faucet_reserve
            + self.system.fees_collected
            + self.system.burned
    }

    pub fn apply(&mut self, changes: Changes) {
        if let Some(system) = changes.system {
            self.system = system;
        }
        self.accounts.extend(changes.accounts);
        self.models.extend(changes.models);
    }
}

/// The writes of one transaction or epoch change.
#[derive(Debug, Default)]
pub struct Changes {
    pub system: Option<SystemState>,
    pub accounts: BTreeMap<Address, Account>,
    pub models: BTreeMap<ObjectId, Model>,
}

impl Changes {
    pub fn to_batch(&self) -> Batch {
        let mut batch = Batch::default();
        if let Some(system) = &self.system {
            batch.put(Table::System, "system", system);
        }
        for (addr, account) in &self.accounts {
            batch.put(Table::Accounts, addr.to_string(), account);
        }
        for (id, model) in &self.models {
            batch.put(Table::Models, id.to_string(), model);
        }
        batch
    }
}

/// A read view of the state with pending writes on top.
pub struct Overlay<'a> {
    base: &'a ChainState,
    pub changes: Changes,
}

impl<'a> Overlay<'a> {
    pub fn new(base: &'a ChainState) -> Self {
        Overlay {
            base,
            changes: Changes::default(),
        }
    }

    pub fn system(&self) -> &SystemState {
        self.changes.system.as_ref().unwrap_or(&self.base.system)
    }

    pub fn system_mut(&mut self) -> &mut SystemState {
        self.changes
            .system
            .get_or_insert_with(|| self.base.system.clone())
    }

    pub fn account(&self, addr: &Address) -> Account {
        self.changes
            .accounts
            .get(addr)
            .or_else(|| self.base.accounts.get(addr))
            .copied()
            .unwrap_or_default()
    }

    pub fn set_account(&mut self, addr: Address, account: Account) {
        self.changes.accounts.insert(addr, account);
    }

    pub fn model(&self, id: &ObjectId) -> Option<Model> {
        self.changes
            .models
            .get(id)
            .or_else(|| self.base.models.get(id))
            .cloned()
    }

    pub fn put_model(&mut self, model: Model) {
        self.changes.models.insert(model.id, model);
    }

    pub fn model_ids(&self) -> Vec<ObjectId> {
        let mut ids: Vec<ObjectId> = self.base.models.keys().copied().collect();
        ids.extend(
            self.changes
                .models
                .keys()
                .filter(|k| !self.base.models.contains_key(k)),
        );
        ids.sort();
        ids
    }
}

/// Why a transaction was refused. The code is stable; the message explains.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize)]
#[serde(tag = "code", content = "detail", rename_all = "snake_case")]
pub enum TxError {
    #[error(
        "sequence number {got} is not the sender's next ({expected}): a replay or an out-of-order transaction"
    )]
    SequenceMismatch { expected: u64, got: u64 },
    #[error("balance {balance} is below the {needed} shannons needed")]
    InsufficientBalance { balance: u64, needed: u64 },
    #[error("amount must be positive")]
    ZeroAmount,
    #[error("architecture version {got} is not the network's ({expected})")]
    ArchitectureMismatch { expected: u64, got: u64 },
    #[error("stake {stake} is below the minimum {minimum}")]
    MinStakeNotMet { stake: u64, minimum: u64 },
    #[error("commission {0} bps exceeds 10000")]
    CommissionTooHigh(u64),
    #[error("no model {0}")]
    ModelNotFound(String),
    #[error("only the model's owner may do this")]
    NotModelOwner,
    #[error("model is {0:?}; this needs another state")]
    InvalidModelState(ModelStatus),
    #[error("no pending commit to reveal")]
    NoPendingCommit,
    #[error("a commit of epoch {commit_epoch} can only be revealed in epoch {}, not {epoch}", commit_epoch + 1)]
    RevealEpochMismatch { commit_epoch: u64, epoch: u64 },
    #[error("decryption key is not Base58 of 32 bytes")]
    BadDecryptionKey,
    #[error("decryption key does not match its commitment")]
    DecryptionKeyCommitmentMismatch,
    #[error("embedding has {got} values; the network's dimension is {expected}")]
    EmbeddingDimensionMismatch { expected: usize, got: usize },
    #[error("embedding holds a non-finite value")]
    NonFiniteEmbedding,
    #[error("embedding does not match its commitment")]
    EmbeddingCommitmentMismatch,
    #[error("stake of {staked} is less than the {requested} requested")]
    InsufficientStake { staked: u64, requested: u64 },
}

fn bps(amount: u64, rate_bps: u64) -> u64 {
    ((amount as u128 * rate_bps as u128) / BPS_DENOMINATOR as u128) as u64
}

/// Executes one verified transaction body against `base`.
pub fn execute(
    base: &ChainState,
    body: &TxBody,
    digest: TxDigest,
) -> Result<(Changes, TxRecord), TxError> {
    let mut o = Overlay::new(base);
    let sender = body.sender;
    let mut account = o.account(&sender);
    if body.sequence != account.sequence {
        return Err(TxError::SequenceMismatch {
            expected: account.sequence,
            got: body.sequence,
        });
    }
    let fee = o.system().params.base_fee;
    if account.balance < fee {
        return Err(TxError::InsufficientBalance {
            balance: account.balance,
            needed: fee,
        });
    }
    account.balance -= fee;
    account.sequence += 1;
    o.system_mut().fees_collected += fee;
    let epoch = o.system().epoch;
    let mut created = Vec::new();
    let debit = |account: &mut Account, amount: u64| -> Result<(), TxError> {
        if amount == 0 {
            return Err(TxError::ZeroAmount);
        }
        if account.balance < amount {
            return Err(TxError::InsufficientBalance {
                balance: account.balance,
                needed: amount,
            });
        }
        account.balance -= amount;
        Ok(())
    };
    match &body.kind {
        TxKind::Transfer { to, amount } => {
            debit(&mut account, *amount)?;
            o.set_account(sender, account);
            let mut recipient = o.account(to);
            recipient.balance += amount;
            o.set_account(*to, recipient);
        }
        TxKind::CreateModel {
            stake,
            commission_bps,
            architecture_version,
        } => {
            let params = &o.system().params;
            if *architecture_version != params.model_architecture_version {
                return Err(TxError::ArchitectureMismatch {
                    expected: params.model_architecture_version,
                    got: *architecture_version,
                });
            }
            if *stake < params.model_min_stake {
                return Err(TxError::MinStakeNotMet {
                    stake: *stake,
                    minimum: params.model_min_stake,
                });
            }
            if *commission_bps > BPS_DENOMINATOR {
                return Err(TxError::CommissionTooHigh(*commission_bps));
            }
            debit(&mut account, *stake)?;
            let id = ObjectId::derive(&digest, 0);
            created.push(id);
            o.put_model(Model {
                id,
                owner: sender,
                architecture_version: *architecture_version,
                status: ModelStatus::Created,
                create_epoch: epoch,
                pending: None,
                manifest: None,
                commitments: None,
                decryption_key: None,
                embedding: None,
                commission_bps: *commission_bps,
                next_commission_bps: *commission_bps,
                stake: *stake,
                stakes: BTreeMap::from([(sender, *stake)]),
                activation_epoch: None,
                deactivation_epoch: None,
                slashed: 0,
            });
            o.set_account(sender, account);
        }
        TxKind::CommitModel {
            model_id,
            manifest,
            weights_commitment,
            embedding_commitment,
            decryption_key_commitment,
        } => {
            let mut model = owned_model(&o, model_id, sender)?;
            let pending = PendingCommit {
                manifest: manifest.clone(),
                commitments: Commitments {
                    weights: *weights_commitment,
                    embedding: *embedding_commitment,
                    decryption_key: *decryption_key_commitment,
                },
                commit_epoch: epoch,
            };
            match model.status {
                ModelStatus::Created if model.deactivation_epoch.is_none() => {
                    model.status = ModelStatus::Pending;
                    model.pending = Some(pending);
                }
                // An update; a later commit in the same window replaces an earlier one.
                ModelStatus::Active => model.pending = Some(pending),
                other => return Err(TxError::InvalidModelState(other)),
            }
            o.put_model(model);
            o.set_account(sender, account);
        }
        TxKind::RevealModel {
            model_id,
            decryption_key,
            embedding,
        } => {
            let mut model = owned_model(&o, model_id, sender)?;
            if !matches!(model.status, ModelStatus::Pending | ModelStatus::Active) {
                return Err(TxError::InvalidModelState(model.status));
            }
            let pending = model.pending.clone().ok_or(TxError::NoPendingCommit)?;
            if epoch != pending.commit_epoch + 1 {
                return Err(TxError::RevealEpochMismatch {
                    commit_epoch: pending.commit_epoch,
                    epoch,
                });
            }
            let key = EncryptionKey::from_base58(decryption_key)
                .map_err(|_| TxError::BadDecryptionKey)?;
            if key.commitment() != pending.commitments.decryption_key {
                return Err(TxError::DecryptionKeyCommitmentMismatch);
            }
            let dim = o.system().params.embedding_dim;
            if embedding.len() != dim {
                return Err(TxError::EmbeddingDimensionMismatch {
                    expected: dim,
                    got: embedding.len(),
                });
            }
            if embedding.iter().any(|x| !x.is_finite()) {
                return Err(TxError::NonFiniteEmbedding);
            }
            if embedding_commitment(embedding) != pending.commitments.embedding {
                return Err(TxError::EmbeddingCommitmentMismatch);
            }
            model.manifest = Some(pending.manifest);
            model.commitments = Some(pending.commitments);
            model.decryption_key = Some(key.to_base58());
            model.embedding = Some(embedding.clone());
            model.pending = None;
            if model.status == ModelStatus::Pending {
                model.status = ModelStatus::Active;
                model.activation_epoch = Some(epoch);
            }
            o.put_model(model);
            o.set_account(sender, account);
        }
        TxKind::DeactivateModel { model_id } => {
            let mut model = owned_model(&o, model_id, sender)?;
            if model.status != ModelStatus::Active {
                return Err(TxError::InvalidModelState(model.status));
            }
            model.status = ModelStatus::Inactive;
            model.deactivation_epoch = Some(epoch);
            model.pending = None;
            o.put_model(model);
            o.set_account(sender, account);
        }
        TxKind::SetCommission {
            model_id,
            commission_bps,
        } => {
            let mut model = owned_model(&o, model_id, sender)?;
            if model.status != ModelStatus::Active {
                return Err(TxError::InvalidModelState(model.status));
            }
            if *commission_bps > BPS_DENOMINATOR {
                return Err(TxError::CommissionTooHigh(*commission_bps));
            }
            model.next_commission_bps = *commission_bps;
            o.put_model(model);
            o.set_account(sender, account);
        }
        TxKind::AddStake { model_id, amount } => {
            let mut model = o
                .model(model_id)
                .ok_or_else(|| TxError::ModelNotFound(model_id.to_string()))?;
            if model.status == ModelStatus::Inactive {
                return Err(TxError::InvalidModelState(model.status));
            }
            debit(&mut account, *amount)?;
            model.stake += amount;
            *model.stakes.entry(sender).or_default() += amount;
            o.put_model(model);
            o.set_account(sender, account);
        }
        TxKind::WithdrawStake { model_id, amount } => {
            let mut model = o
                .model(model_id)
                .ok_or_else(|| TxError::ModelNotFound(model_id.to_string()))?;
            if *amount == 0 {
                return Err(TxError::ZeroAmount);
            }
            let staked = model.stakes.get(&sender).copied().unwrap_or(0);
            if staked < *amount {
                return Err(TxError::InsufficientStake {
                    staked,
                    requested: *amount,
                });
            }
            if staked == *amount {
                model.stakes.remove(&sender);
            } else {
                model.stakes.insert(sender, staked - amount);
            }
            model.stake -= amount;
            account.balance += amount;
            o.put_model(model);
            o.set_account(sender, account);
        }
    }
    // Accounts whose transaction only paid the fee (all arms set it; this keeps the invariant
    // obvious: the sender's new sequence and fee are always written).
    if !o.changes.accounts.contains_key(&sender) {
        o.set_account(sender, account);
    }
    let record = TxRecord {
        digest,
        sender,
        sequence: body.sequence,
        epoch,
        created,
    };
    Ok((o.changes, record))
}

fn owned_model(o: &Overlay<'_>, id: &ObjectId, sender: Address) -> Result<Model, TxError> {
    let model = o
        .model(id)
        .ok_or_else(|| TxError::ModelNotFound(id.to_string()))?;
    if model.owner != sender {
        return Err(TxError::NotModelOwner);
    }
    Ok(model)
}

/// Takes `rate_bps` of every staker's stake in `model` and burns it.
fn slash(o: &mut Overlay<'_>, model: &mut Model, rate_bps: u64) {
    let mut total = 0;
    for stake in model.stakes.values_mut() {
        let cut = bps(*stake, rate_bps);
        *stake -= cut;
        total += cut;
    }
    model.stake -= total;
    model.slashed += total;
    o.system_mut().burned += total;
}

/// The epoch change: windows close (missed reveals slashed), commissions rotate.
pub fn advance_epoch(base: &ChainState, now_ms: u64) -> Changes {
    let mut o = Overlay::new(base);
    let prev_epoch = o.system().epoch;
    let new_epoch = prev_epoch + 1;
    let slash_bps = o.system().params.model_reveal_slash_rate_bps;
    for id in o.model_ids() {
        let mut model = o.model(&id).expect("listed model exists");
        let before = model.clone();
        match model.status {
            // Created and never committed within its window: slashed once, and it can no
            // longer commit.
            ModelStatus::Created
                if model.create_epoch + 1 < new_epoch && model.deactivation_epoch.is_none() =>
            {
                slash(&mut o, &mut model, slash_bps);
                model.deactivation_epoch = Some(new_epoch);
            }
            // Committed but not revealed in commit_epoch + 1: half the stake, and inactive.
            ModelStatus::Pending
                if model
                    .pending
                    .as_ref()
                    .is_some_and(|p| p.commit_epoch < prev_epoch) =>
            {
                slash(&mut o, &mut model, slash_bps);
                model.status = ModelStatus::Inactive;
                model.deactivation_epoch = Some(new_epoch);
                model.pending = None;
            }
            ModelStatus::Active => {
                // A missed update reveal only drops the update.
                if model
                    .pending
                    .as_ref()
                    .is_some_and(|p| p.commit_epoch < prev_epoch)
                {
                    model.pending = None;
                }
                model.commission_bps = model.next_commission_bps;
            }
            _ => {}
        }
        if model != before {
            o.put_model(model);
        }
    }
    let system = o.system_mut();
    system.epoch = new_epoch;
    system.epoch_start_ms = now_ms;
    o.changes
}
