//! The localnet's state objects, as stored by the node and returned by its API.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::crypto::Commitment;
use crate::keys::Address;
use crate::tx::{Manifest, ObjectId, TxDigest};

/// Wall-clock time in milliseconds since the Unix epoch: the unit of every epoch time on chain.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Chain parameters; the defaults are the public network's (protocol version 5) except where a
/// localnet needs a different value, which is said.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    pub epoch_duration_ms: u64,
    pub model_min_stake: u64,
    pub model_architecture_version: u64,
    pub model_reveal_slash_rate_bps: u64,
    /// Length of revealed embeddings (2048 on the network; smaller for small-model localnets).
    pub embedding_dim: usize,
    pub base_fee: u64,
    /// Shannons handed out per faucet request (2 SOMA: enough for the minimum stake plus fees).
    pub faucet_amount: u64,
    pub models_per_target: usize,
    pub initial_targets_per_epoch: u64,
    pub emission_per_epoch: u64,
    pub target_reward_allocation_bps: u64,
    pub target_hits_per_epoch: u64,
    pub hits_ema_decay_bps: u64,
    pub difficulty_adjustment_rate_bps: u64,
    pub initial_distance_threshold: f32,
    pub min_distance_threshold: f32,
    pub max_distance_threshold: f32,
    pub submission_bond_per_byte: u64,
    pub max_submission_bytes: u64,
    pub submitter_share_bps: u64,
    pub model_share_bps: u64,
    pub claimer_share_bps: u64,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            epoch_duration_ms: 24 * 60 * 60 * 1000,
            model_min_stake: 1_000_000_000,
            model_architecture_version: 1,
            model_reveal_slash_rate_bps: 5000,
            embedding_dim: 2048,
            base_fee: 1000,
            faucet_amount: 2_000_000_000,
            models_per_target: 3,
            initial_targets_per_epoch: 100,
            emission_per_epoch: 1_370_000_000_000,
            target_reward_allocation_bps: 8000,
            target_hits_per_epoch: 86_400,
            hits_ema_decay_bps: 9000,
            difficulty_adjustment_rate_bps: 10_000,
            initial_distance_threshold: 1.05,
            min_distance_threshold: 0.95,
            max_distance_threshold: 2.0,
            submission_bond_per_byte: 65,
            max_submission_bytes: 1 << 20,
            submitter_share_bps: 4975,
            model_share_bps: 4975,
            claimer_share_bps: 50,
        }
    }
}

/// Difficulty and funding of targets (the network's `TargetState`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetState {
    pub distance_threshold: f32,
    pub targets_generated_this_epoch: u64,
    pub hits_this_epoch: u64,
    pub hits_ema: u64,
    pub reward_per_target: u64,
}

/// Chain-wide state. Every shannon of the fixed supply is in exactly one place: an account, a
/// model's stake, the faucet reserve, the emission pool, a target's reward pool or bond,
/// collected fees or the burned (slashed) total.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SystemState {
    pub epoch: u64,
    pub epoch_start_ms: u64,
    pub params: Params,
    pub total_supply: u64,
    pub faucet_reserve: u64,
    pub emission_pool: u64,
    pub fees_collected: u64,
    pub burned: u64,
    pub target_state: TargetState,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Account {
    pub balance: u64,
    /// Transactions this account has sent (the next body must carry this sequence number).
    pub sequence: u64,
    /// Shannons received as rewards: submitter, model-owner and claimer shares of targets.
    #[serde(default)]
    pub rewards: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelStatus {
    Created,
    Pending,
    Active,
    Inactive,
}

/// The three commitments of a commit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Commitments {
    pub weights: Commitment,
    pub embedding: Commitment,
    pub decryption_key: Commitment,
}

/// A commit waiting for its reveal (the first one, or an update of an active model).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PendingCommit {
    pub manifest: Manifest,
    pub commitments: Commitments,
    pub commit_epoch: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Model {
    pub id: ObjectId,
    pub owner: Address,
    pub architecture_version: u64,
    pub status: ModelStatus,
    pub create_epoch: u64,
    /// The commit awaiting reveal: the first commit while Pending, an update while Active.
    pub pending: Option<PendingCommit>,
    /// The revealed weights: manifest, commitments, key (Base58) and embedding.
    pub manifest: Option<Manifest>,
    pub commitments: Option<Commitments>,
    pub decryption_key: Option<String>,
    pub embedding: Option<Vec<f32>>,
    pub commission_bps: u64,
    pub next_commission_bps: u64,
    /// Total stake in the model's pool.
    pub stake: u64,
    /// Stake by staker (the owner's initial stake included).
    pub stakes: BTreeMap<Address, u64>,
    pub activation_epoch: Option<u64>,
    pub deactivation_epoch: Option<u64>,
    /// Shannons slashed from this model so far.
    pub slashed: u64,
}

/// The outcome of an executed transaction, kept by digest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TxRecord {
    pub digest: TxDigest,
    pub sender: Address,
    pub sequence: u64,
    pub epoch: u64,
    /// Ids of objects the transaction created (a new model's id first).
    pub created: Vec<ObjectId>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum TargetStatus {
    Open,
    Filled { fill_epoch: u64 },
}

/// A point in embedding space that data submitters try to hit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    pub id: ObjectId,
    pub embedding: Vec<f32>,
    /// The assigned models, best (lowest stake-weighted distance) first.
    pub model_ids: Vec<ObjectId>,
    pub distance_threshold: f32,
    pub reward_pool: u64,
    pub generation_epoch: u64,
    pub status: TargetStatus,
    pub submitter: Option<Address>,
    pub winning_model_id: Option<ObjectId>,
    pub winning_model_owner: Option<Address>,
    pub bond_amount: u64,
    pub winning_manifest: Option<Manifest>,
    pub winning_embedding: Option<Vec<f32>>,
    pub winning_distance: Option<f32>,
    pub winning_loss: Option<f32>,
}

impl Target {
    /// A new open target, not yet hit.
    pub fn open(
        id: ObjectId,
        embedding: Vec<f32>,
        model_ids: Vec<ObjectId>,
        distance_threshold: f32,
        reward_pool: u64,
        generation_epoch: u64,
    ) -> Self {
        Target {
            id,
            embedding,
            model_ids,
            distance_threshold,
            reward_pool,
            generation_epoch,
            status: TargetStatus::Open,
            submitter: None,
            winning_model_id: None,
            winning_model_owner: None,
            bond_amount: 0,
            winning_manifest: None,
            winning_embedding: None,
            winning_distance: None,
            winning_loss: None,
        }
    }
}
