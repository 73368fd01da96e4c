//! The state machine: what a transaction or an epoch change does to the chain state.
//!
//! Execution never mutates the state it reads. It records every write in an [`Overlay`], and
//! the node persists those [`Changes`] in one durable batch before applying them in memory, so
//! memory and disk never disagree about a committed transaction.

use std::collections::BTreeMap;

use serde::Serialize;
use somatrain_protocol::chain::{
    Account, Commitments, Model, ModelStatus, PendingCommit, SystemState, Target, TargetStatus,
    TxRecord,
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
    pub targets: BTreeMap<ObjectId, Target>,
}

impl ChainState {
    /// Shannons held anywhere; must always equal `system.total_supply`.
    pub fn accounted_supply(&self) -> u64 {
        let accounts: u64 = self.accounts.values().map(|a| a.balance).sum();
        let stakes: u64 = self.models.values().map(|m| m.stake).sum();
        let targets: u64 = self
            .targets
            .values()
            .map(|t| t.reward_pool + t.bond_amount)
            .sum();
        let s = &self.system;
        accounts
            + stakes
            + targets
            + s.faucet_reserve
            + s.emission_pool
            + s.fees_collected
            + s.burned
    }

    pub fn apply(&mut self, changes: Changes) {
        if let Some(system) = changes.system {
            self.system = system;
        }
        self.accounts.extend(changes.accounts);
        self.models.extend(changes.models);
        self.targets.extend(changes.targets);
        for id in changes.deleted_targets {
            self.targets.remove(&id);
        }
    }
}

/// The writes of one transaction or epoch change.
#[derive(Debug, Default)]
pub struct Changes {
    pub system: Option<SystemState>,
    pub accounts: BTreeMap<Address, Account>,
    pub models: BTreeMap<ObjectId, Model>,
    pub targets: BTreeMap<ObjectId, Target>,
    pub deleted_targets: Vec<ObjectId>,
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
        for (id, target) in &self.targets {
            batch.put(Table::Targets, id.to_string(), target);
        }
        for id in &self.deleted_targets {
            batch.delete(Table::Targets, id.to_string());
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

    pub fn target(&self, id: &ObjectId) -> Option<Target> {
        if self.changes.deleted_targets.contains(id) {
            return None;
        }
        self.changes
            .targets
            .get(id)
            .or_else(|| self.base.targets.get(id))
            .cloned()
    }

    pub fn put_target(&mut self, target: Target) {
        self.changes.targets.insert(target.id, target);
    }

    pub fn delete_target(&mut self, id: ObjectId) {
        self.changes.targets.remove(&id);
        self.changes.deleted_targets.push(id);
    }

    /// All models with pending writes applied, in id order.
    pub fn models(&self) -> Vec<Model> {
        self.model_ids()
            .iter()
            .filter_map(|id| self.model(id))
            .collect()
    }

    /// Creates one target seeded from `(digest, n)` if a model is active and the emission pool
    /// and this epoch's budget allow; returns its id.
    pub fn spawn_target(&mut self, digest: &TxDigest, n: u64) -> Option<ObjectId> {
        let params = self.system().params.clone();
        if !crate::targets::can_fund(
            &params,
            &self.system().target_state,
            self.system().emission_pool,
        ) {
            return None;
        }
        let models = self.models();
        let id = ObjectId::derive(digest, n);
        let seed = crate::targets::target_seed(digest, n);
        let state = self.system().target_state.clone();
        let epoch = self.system().epoch;
        let target = crate::targets::generate(id, seed, models.iter(), &params, &state, epoch)?;
        let system = self.system_mut();
        system.emission_pool -= target.reward_pool;
        system.target_state.targets_generated_this_epoch += 1;
        self.put_target(target);
        Some(id)
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
    #[error("no target {0}")]
    TargetNotFound(String),
    #[error("target is already filled")]
    TargetNotOpen,
    #[error("target of epoch {generation_epoch} expired (now epoch {epoch})")]
    TargetExpired { generation_epoch: u64, epoch: u64 },
    #[error("model is not assigned to this target")]
    ModelNotInTarget,
    #[error("distance {distance} exceeds the target's threshold {threshold}")]
    DistanceExceedsThreshold { distance: String, threshold: String },
    #[error("data of {size} bytes exceeds the {max}-byte limit")]
    DataTooLarge { size: u64, max: u64 },
    #[error("balance {balance} cannot cover the bond of {bond}")]
    InsufficientBond { balance: u64, bond: u64 },
    #[error("the model is not active")]
    ModelNotActive,
    #[error("filled in epoch {fill_epoch}: claimable from epoch {}", fill_epoch + 2)]
    AuditWindowOpen { fill_epoch: u64, epoch: u64 },
    #[error("target is open until the end of epoch {0}")]
    TargetNotExpired(u64),
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
        TxKind::SubmitData {
            target_id,
            manifest,
            model_id,
            embedding,
            distance,
            loss,
        } => {
            let mut target = o
                .target(target_id)
                .ok_or_else(|| TxError::TargetNotFound(target_id.to_string()))?;
            if target.status != TargetStatus::Open {
                return Err(TxError::TargetNotOpen);
            }
            if epoch > target.generation_epoch {
                return Err(TxError::TargetExpired {
                    generation_epoch: target.generation_epoch,
                    epoch,
                });
            }
            if !target.model_ids.contains(model_id) {
                return Err(TxError::ModelNotInTarget);
            }
            if embedding.len() != target.embedding.len() {
                return Err(TxError::EmbeddingDimensionMismatch {
                    expected: target.embedding.len(),
                    got: embedding.len(),
                });
            }
            if embedding.iter().any(|x| !x.is_finite()) {
                return Err(TxError::NonFiniteEmbedding);
            }
            let within = distance.is_finite() && *distance <= target.distance_threshold;
            if !within {
                return Err(TxError::DistanceExceedsThreshold {
                    distance: distance.to_string(),
                    threshold: target.distance_threshold.to_string(),
                });
            }
            let params = o.system().params.clone();
            if manifest.size > params.max_submission_bytes {
                return Err(TxError::DataTooLarge {
                    size: manifest.size,
                    max: params.max_submission_bytes,
                });
            }
            let model = o
                .model(model_id)
                .ok_or_else(|| TxError::ModelNotFound(model_id.to_string()))?;
            if model.status != ModelStatus::Active {
                return Err(TxError::ModelNotActive);
            }
            let bond = manifest.size * params.submission_bond_per_byte;
            if account.balance < bond {
                return Err(TxError::InsufficientBond {
                    balance: account.balance,
                    bond,
                });
            }
            account.balance -= bond;
            target.status = TargetStatus::Filled { fill_epoch: epoch };
            target.submitter = Some(sender);
            target.winning_model_id = Some(*model_id);
            target.winning_model_owner = Some(model.owner);
            target.bond_amount = bond;
            target.winning_manifest = Some(manifest.clone());
            target.winning_embedding = Some(embedding.clone());
            target.winning_distance = Some(*distance);
            target.winning_loss = Some(*loss);
            o.put_target(target);
            o.set_account(sender, account);
            o.system_mut().target_state.hits_this_epoch += 1;
            if let Some(id) = o.spawn_target(&digest, 0) {
                created.push(id);
            }
        }
        TxKind::ClaimRewards { target_id } => {
            let target = o
                .target(target_id)
                .ok_or_else(|| TxError::TargetNotFound(target_id.to_string()))?;
            let params = o.system().params.clone();
            let reward = target.reward_pool;
            let claimer_share = bps(reward, params.claimer_share_bps);
            match target.status {
                TargetStatus::Filled { fill_epoch } => {
                    if epoch <= fill_epoch + 1 {
                        return Err(TxError::AuditWindowOpen { fill_epoch, epoch });
                    }
                    let model_share = bps(reward, params.model_share_bps);
                    let submitter_share = reward - model_share - claimer_share;
                    account.balance += claimer_share;
                    account.rewards += claimer_share;
                    o.set_account(sender, account);
                    let submitter = target.submitter.expect("filled targets have a submitter");
                    let mut s = o.account(&submitter);
                    s.balance += submitter_share + target.bond_amount;
                    s.rewards += submitter_share;
                    o.set_account(submitter, s);
                    let owner = target
                        .winning_model_owner
                        .expect("filled targets have a model owner");
                    let mut m = o.account(&owner);
                    m.balance += model_share;
                    m.rewards += model_share;
                    o.set_account(owner, m);
                }
                TargetStatus::Open => {
                    if epoch <= target.generation_epoch {
                        return Err(TxError::TargetNotExpired(target.generation_epoch));
                    }
                    account.balance += claimer_share;
                    account.rewards += claimer_share;
                    o.set_account(sender, account);
                    o.system_mut().emission_pool += reward - claimer_share;
                }
            }
            o.delete_target(*target_id);
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
    let params = system.params.clone();
    crate::targets::advance_epoch(&params, &mut system.target_state);
    let digest = crate::targets::epoch_digest(new_epoch);
    for n in 0..params.initial_targets_per_epoch {
        if o.spawn_target(&digest, n).is_none() {
            break;
        }
    }
    o.changes
}
