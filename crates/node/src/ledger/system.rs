//! The system state of the object chain: parameters, epoch, supply pools, target difficulty and
//! the model registry. It lives in the system state object (`0x…05`), which clients read through
//! `GetEpoch`, never as BCS, so this is a storage type, not a wire type.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use somatrain_protocol::{Address, Commitment, Digest, Manifest, ObjectId};

use super::validators::Validator;

pub use somatrain_protocol::SHANNONS_PER_SOMA;
/// Total supply: 10 million SOMA. On a localnet half starts in the faucet, half in emissions.
pub const TOTAL_SUPPLY: u64 = 10_000_000 * SHANNONS_PER_SOMA;
pub const BPS_DENOMINATOR: u64 = 10_000;
/// The protocol version whose parameters the localnet follows.
pub const PROTOCOL_VERSION: u64 = 5;

/// `amount × rate_bps / 10⁴`, rounded down, without overflow.
pub fn bps(amount: u64, rate_bps: u64) -> u64 {
    ((amount as u128 * rate_bps as u128) / BPS_DENOMINATOR as u128) as u64
}

/// The network's `SystemParameters` (protocol version 5), plus what only a localnet has.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    pub epoch_duration_ms: u64,
    pub validator_reward_allocation_bps: u64,
    pub model_min_stake: u64,
    pub model_architecture_version: u64,
    pub model_reveal_slash_rate_bps: u64,
    pub model_tally_slash_rate_bps: u64,
    pub target_epoch_fee_collection: u64,
    pub base_fee: u64,
    pub write_object_fee: u64,
    /// Fixed on a localnet (the network adjusts it each epoch).
    pub value_fee_bps: u64,
    pub min_value_fee_bps: u64,
    pub max_value_fee_bps: u64,
    pub fee_adjustment_rate_bps: u64,
    pub models_per_target: u64,
    pub embedding_dim: u64,
    pub initial_distance_threshold: f32,
    pub target_reward_allocation_bps: u64,
    pub target_hits_per_epoch: u64,
    pub hits_ema_decay_bps: u64,
    pub difficulty_adjustment_rate_bps: u64,
    pub max_distance_threshold: f32,
    pub min_distance_threshold: f32,
    pub initial_targets_per_epoch: u64,
    pub submitter_share_bps: u64,
    pub model_share_bps: u64,
    pub claimer_share_bps: u64,
    pub submission_bond_per_byte: u64,
    pub max_submission_bytes: u64,
    pub emission_per_epoch: u64,
    /// Localnet only: shannons per faucet request (one coin).
    pub faucet_amount: u64,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            epoch_duration_ms: 24 * 60 * 60 * 1000,
            validator_reward_allocation_bps: 7000,
            model_min_stake: SHANNONS_PER_SOMA,
            model_architecture_version: 1,
            model_reveal_slash_rate_bps: 5000,
            model_tally_slash_rate_bps: 9500,
            target_epoch_fee_collection: SHANNONS_PER_SOMA,
            base_fee: 1000,
            write_object_fee: 300,
            value_fee_bps: 10,
            min_value_fee_bps: 1,
            max_value_fee_bps: 50,
            fee_adjustment_rate_bps: 1250,
            models_per_target: 3,
            embedding_dim: 2048,
            initial_distance_threshold: 1.05,
            target_reward_allocation_bps: 8000,
            target_hits_per_epoch: 86_400,
            hits_ema_decay_bps: 9000,
            difficulty_adjustment_rate_bps: 10_000,
            max_distance_threshold: 2.0,
            min_distance_threshold: 0.95,
            initial_targets_per_epoch: 100,
            submitter_share_bps: 4975,
            model_share_bps: 4975,
            claimer_share_bps: 50,
            submission_bond_per_byte: 65,
            max_submission_bytes: 1 << 20,
            emission_per_epoch: 1_370 * SHANNONS_PER_SOMA,
            faucet_amount: 2 * SHANNONS_PER_SOMA,
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

pub use somatrain_protocol::ModelState;

/// A commit waiting for its reveal: the first one, or an update of an active model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PendingCommit {
    pub manifest: Manifest,
    pub weights_commitment: Commitment,
    pub embedding_commitment: Commitment,
    pub decryption_key_commitment: Commitment,
    pub commit_epoch: u64,
}

/// A model's staking pool. Pool tokens are minted 1:1 with stake and redeemed pro rata, so a
/// slash (which lowers `soma_balance` only) is shared by every staker. The network keeps model
/// pools with its validator-pool rule ([`super::validators::ValidatorPool`]); no reward ever
/// reaches a model pool, so the two agree until a slash, after which the network pays each
/// withdrawal its whole principal out of what is left (the last stakers can find it empty).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StakingPool {
    pub id: ObjectId,
    pub activation_epoch: Option<u64>,
    pub deactivation_epoch: Option<u64>,
    pub soma_balance: u64,
    pub pool_token_balance: u64,
}

impl StakingPool {
    /// Shannons a `StakedSoma` of `principal` redeems for now.
    pub fn redeem_value(&self, principal: u64) -> u64 {
        if self.pool_token_balance == 0 {
            return 0;
        }
        ((principal as u128 * self.soma_balance as u128) / self.pool_token_balance as u128) as u64
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Model {
    pub id: ObjectId,
    pub owner: Address,
    pub architecture_version: u64,
    pub state: ModelState,
    pub create_epoch: u64,
    /// The first commit while pending; an update while active.
    pub pending: Option<PendingCommit>,
    /// The revealed weights.
    pub manifest: Option<Manifest>,
    pub weights_commitment: Option<Commitment>,
    pub embedding_commitment: Option<Commitment>,
    pub decryption_key_commitment: Option<Commitment>,
    pub decryption_key: Option<Digest>,
    pub embedding: Option<Vec<f32>>,
    pub commission_rate: u64,
    pub next_epoch_commission_rate: u64,
    pub staking_pool: StakingPool,
    /// Set when a created model misses its commit window: it can no longer commit.
    pub commit_window_missed: bool,
}

/// A model as `CreateModel` makes it.
pub struct NewModel {
    pub id: ObjectId,
    pub owner: Address,
    pub architecture_version: u64,
    pub epoch: u64,
    pub commission_rate: u64,
    pub pool_id: ObjectId,
    pub stake: u64,
}

impl Model {
    /// A created model: no commit yet, its stake active in its pool from `epoch`.
    pub fn created(new: NewModel) -> Model {
        Model {
            id: new.id,
            owner: new.owner,
            architecture_version: new.architecture_version,
            state: ModelState::Created,
            create_epoch: new.epoch,
            pending: None,
            manifest: None,
            weights_commitment: None,
            embedding_commitment: None,
            decryption_key_commitment: None,
            decryption_key: None,
            embedding: None,
            commission_rate: new.commission_rate,
            next_epoch_commission_rate: new.commission_rate,
            staking_pool: StakingPool {
                id: new.pool_id,
                activation_epoch: Some(new.epoch),
                deactivation_epoch: None,
                soma_balance: new.stake,
                pool_token_balance: new.stake,
            },
            commit_window_missed: false,
        }
    }
}

/// Chain-wide state. Every shannon of the fixed supply is in exactly one place: a coin, a staking
/// pool, a target's reward pool or bond, the faucet reserve, the emission pool, collected fees,
/// or the burned (slashed) total.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SystemState {
    pub epoch: u64,
    pub epoch_start_ms: u64,
    pub params: Params,
    pub total_supply: u64,
    pub faucet_reserve: u64,
    pub emission_pool: u64,
    /// Fees of the current epoch; the epoch change pays them out as rewards.
    pub fees_collected: u64,
    pub burned: u64,
    pub target_state: TargetState,
    /// Stored apart, one entry per model, so that a checkpoint writes only the models that
    /// changed; read from the system value only in data directories of earlier builds. A
    /// persistent map: every transaction copies the system state it changes, and a copy shares
    /// the models instead of copying each embedding.
    #[serde(
        default,
        skip_serializing,
        deserialize_with = "models_of_earlier_builds"
    )]
    pub models: imbl::OrdMap<ObjectId, Model>,
    /// Checkpoints sealed so far.
    pub checkpoint_height: u64,
    /// The active validators (a chain created before validators existed has none).
    #[serde(default)]
    pub validators: Vec<Validator>,
    /// Validators reported by validators this epoch: reportee → reporters.
    #[serde(default)]
    pub validator_reports: BTreeMap<Address, BTreeSet<Address>>,
    /// Models reported by validators this epoch: model → reporters.
    #[serde(default)]
    pub model_reports: BTreeMap<ObjectId, BTreeSet<Address>>,
    /// Models that revealed weights this epoch (first reveals and updates), in order: the
    /// localnet's validators check them before the epoch closes.
    #[serde(default)]
    pub revealed_this_epoch: Vec<ObjectId>,
}

impl SystemState {
    /// A new chain at `now_ms` whose validators' stake (already in their pools) comes out of
    /// the faucet's half of the supply.
    pub fn genesis(params: Params, now_ms: u64, mut validators: Vec<Validator>) -> Self {
        super::validators::set_voting_power(&mut validators);
        let staked: u64 = validators.iter().map(|v| v.pool.held()).sum();
        let target_state = TargetState {
            distance_threshold: params.initial_distance_threshold,
            targets_generated_this_epoch: 0,
            hits_this_epoch: 0,
            hits_ema: 0,
            reward_per_target: crate::ledger::targets::reward_per_target(&params),
        };
        SystemState {
            epoch: 0,
            epoch_start_ms: now_ms,
            params,
            total_supply: TOTAL_SUPPLY,
            faucet_reserve: TOTAL_SUPPLY / 2 - staked,
            emission_pool: TOTAL_SUPPLY - TOTAL_SUPPLY / 2,
            fees_collected: 0,
            burned: 0,
            target_state,
            models: imbl::OrdMap::new(),
            checkpoint_height: 0,
            validators,
            validator_reports: BTreeMap::new(),
            model_reports: BTreeMap::new(),
            revealed_this_epoch: Vec::new(),
        }
    }

    /// Shannons held outside objects.
    pub fn pooled_supply(&self) -> u128 {
        let pools: u128 = self
            .models
            .values()
            .map(|m| m.staking_pool.soma_balance as u128)
            .sum();
        let validator_pools: u128 = self.validators.iter().map(|v| v.pool.held() as u128).sum();
        pools
            + validator_pools
            + self.faucet_reserve as u128
            + self.emission_pool as u128
            + self.fees_collected as u128
            + self.burned as u128
    }

    pub fn validator(&self, address: &Address) -> Option<&Validator> {
        self.validators.iter().find(|v| v.address == *address)
    }

    pub fn validator_mut(&mut self, address: &Address) -> Option<&mut Validator> {
        self.validators.iter_mut().find(|v| v.address == *address)
    }

    pub fn next_epoch_ms(&self) -> u64 {
        self.epoch_start_ms + self.params.epoch_duration_ms
    }
}

fn models_of_earlier_builds<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<imbl::OrdMap<ObjectId, Model>, D::Error> {
    Ok(BTreeMap::<ObjectId, Model>::deserialize(d)?
        .into_iter()
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Data directories of earlier builds keep the models inside the system value; they still
    /// load, and a system value written now leaves them out.
    #[test]
    fn models_inside_the_system_value_of_earlier_builds_are_read() {
        let id = ObjectId([3; 32]);
        let model = Model {
            embedding: Some(vec![0.5, -0.25]),
            ..Model::created(NewModel {
                id,
                owner: Address([4; 32]),
                architecture_version: 1,
                epoch: 0,
                commission_rate: 100,
                pool_id: ObjectId([5; 32]),
                stake: 7,
            })
        };
        let mut system = SystemState::genesis(Params::default(), 0, vec![]);
        system.models.insert(id, model.clone());
        let mut stored = serde_json::to_value(&system).unwrap();
        assert!(stored.get("models").is_none(), "written without its models");
        stored["models"] = serde_json::to_value(BTreeMap::from([(id, model.clone())])).unwrap();
        let read: SystemState = serde_json::from_value(stored).unwrap();
        assert_eq!(read.models.get(&id), Some(&model));
        assert_eq!(read, system);
    }
}
