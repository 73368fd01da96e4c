//! Chain state as plain Rust, both ways: the epoch with its parameters, validators and models,
//! targets, and executed transactions. The node builds these from its ledger and sends
//! [`EpochView::system_state_to_proto`] and friends; the client reads the same messages back
//! with `from_proto`. A view survives view → protobuf → view unchanged (`tests/views.rs`).
//!
//! Reading is lenient where the network may leave a field out (a default that the network
//! documents, or `None`) and strict where a value is needed to act on (ids, thresholds, the
//! model's commit): those fail with a [`FieldError`] naming the field.

use std::collections::BTreeMap;

use somatrain_protocol::effects::{
    BalanceChange, ExecutionFailure, ExecutionStatus, IdOperation, TransactionEffects,
};
use somatrain_protocol::{
    Address, Commitment, Digest, Manifest, ModelState, Object, ObjectId, TransactionData, TxDigest,
    UserSignature,
};

use crate::convert::{self, FieldError, hex_id, prefixed_id};
use crate::proto;

type Result<T> = std::result::Result<T, FieldError>;

fn need<T: Copy>(value: Option<T>, field: &str) -> Result<T> {
    value.ok_or_else(|| FieldError::missing(field))
}

fn commitment(bytes: &Option<Vec<u8>>, field: &str) -> Result<Option<Commitment>> {
    bytes
        .as_ref()
        .map(|b| {
            <[u8; 32]>::try_from(b.as_slice())
                .map(Commitment)
                .map_err(|_| FieldError::new(field, format!("{} bytes, expected 32", b.len())))
        })
        .transpose()
}

fn address(text: Option<&str>, field: &str) -> Result<Address> {
    convert::parse_address(text.ok_or_else(|| FieldError::missing(field))?, field)
}

fn reporters(set: &proto::ReporterSet, field: &str) -> Result<Vec<Address>> {
    set.reporters
        .iter()
        .enumerate()
        .map(|(i, a)| convert::parse_address(a, &format!("{field}.reporters[{i}]")))
        .collect()
}

fn reporter_set(reporters: &[Address]) -> proto::ReporterSet {
    proto::ReporterSet {
        reporters: reporters.iter().map(|a| hex_id(&a.0)).collect(),
    }
}

/// Every parameter of `SystemParameters`. Those a trainer or submitter acts on are plain
/// values (with the network's documented default where a node may leave one out); the rest are
/// shown as the node sent them.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ChainParams {
    pub epoch_duration_ms: u64,
    pub model_min_stake: u64,
    pub model_architecture_version: u64,
    pub embedding_dim: u64,
    pub base_fee: u64,
    pub write_object_fee: u64,
    pub value_fee_bps: u64,
    pub submission_bond_per_byte: u64,
    pub max_submission_data_size: u64,
    /// The model owner's share of a claimed target's reward (`target_model_reward_share_bps`),
    /// where the node says.
    pub model_reward_share_bps: Option<u64>,
    /// How many models each new target is assigned to (`target_models_per_target`).
    pub models_per_target: u64,
    /// Targets generated at each epoch change (`target_initial_targets_per_epoch`); each hit
    /// spawns one more.
    pub initial_targets_per_epoch: Option<u64>,
    /// The hits the difficulty aims for, which also caps the targets funded in an epoch.
    pub target_hits_per_epoch: Option<u64>,
    /// From the system state's emission pool.
    pub emission_per_epoch: Option<u64>,
    pub validator_reward_allocation_bps: Option<u64>,
    pub model_reveal_slash_rate_bps: Option<u64>,
    pub model_tally_slash_rate_bps: Option<u64>,
    pub target_epoch_fee_collection: Option<u64>,
    pub min_value_fee_bps: Option<u64>,
    pub max_value_fee_bps: Option<u64>,
    pub fee_adjustment_rate_bps: Option<u64>,
    pub initial_distance_threshold: Option<f32>,
    pub target_reward_allocation_bps: Option<u64>,
    pub hits_ema_decay_bps: Option<u64>,
    pub difficulty_adjustment_rate_bps: Option<u64>,
    pub max_distance_threshold: Option<f32>,
    pub min_distance_threshold: Option<f32>,
    pub submitter_reward_share_bps: Option<u64>,
    pub claimer_incentive_bps: Option<u64>,
    pub challenger_bond_per_byte: Option<u64>,
}

impl ChainParams {
    fn from_proto(p: &proto::SystemParameters, emission_per_epoch: Option<u64>) -> Result<Self> {
        Ok(ChainParams {
            epoch_duration_ms: need(p.epoch_duration_ms, "parameters.epoch_duration_ms")?,
            model_min_stake: need(p.model_min_stake, "parameters.model_min_stake")?,
            model_architecture_version: p.model_architecture_version.unwrap_or(1),
            embedding_dim: need(p.target_embedding_dim, "parameters.target_embedding_dim")?,
            base_fee: p.base_fee.unwrap_or(0),
            write_object_fee: p.write_object_fee.unwrap_or(0),
            value_fee_bps: p.value_fee_bps.unwrap_or(0),
            submission_bond_per_byte: p.submission_bond_per_byte.unwrap_or(0),
            max_submission_data_size: p.max_submission_data_size.unwrap_or(u64::MAX),
            model_reward_share_bps: p.target_model_reward_share_bps,
            // The network's value since protocol version 1, where a node leaves it out.
            models_per_target: p.target_models_per_target.unwrap_or(3),
            initial_targets_per_epoch: p.target_initial_targets_per_epoch,
            target_hits_per_epoch: p.target_hits_per_epoch,
            emission_per_epoch,
            validator_reward_allocation_bps: p.validator_reward_allocation_bps,
            model_reveal_slash_rate_bps: p.model_reveal_slash_rate_bps,
            model_tally_slash_rate_bps: p.model_tally_slash_rate_bps,
            target_epoch_fee_collection: p.target_epoch_fee_collection,
            min_value_fee_bps: p.min_value_fee_bps,
            max_value_fee_bps: p.max_value_fee_bps,
            fee_adjustment_rate_bps: p.fee_adjustment_rate_bps,
            initial_distance_threshold: p.target_initial_distance_threshold,
            target_reward_allocation_bps: p.target_reward_allocation_bps,
            hits_ema_decay_bps: p.target_hits_ema_decay_bps,
            difficulty_adjustment_rate_bps: p.target_difficulty_adjustment_rate_bps,
            max_distance_threshold: p.target_max_distance_threshold,
            min_distance_threshold: p.target_min_distance_threshold,
            submitter_reward_share_bps: p.target_submitter_reward_share_bps,
            claimer_incentive_bps: p.target_claimer_incentive_bps,
            challenger_bond_per_byte: p.challenger_bond_per_byte,
        })
    }

    fn to_proto(&self) -> proto::SystemParameters {
        proto::SystemParameters {
            epoch_duration_ms: Some(self.epoch_duration_ms),
            validator_reward_allocation_bps: self.validator_reward_allocation_bps,
            model_min_stake: Some(self.model_min_stake),
            model_architecture_version: Some(self.model_architecture_version),
            model_reveal_slash_rate_bps: self.model_reveal_slash_rate_bps,
            model_tally_slash_rate_bps: self.model_tally_slash_rate_bps,
            target_epoch_fee_collection: self.target_epoch_fee_collection,
            base_fee: Some(self.base_fee),
            write_object_fee: Some(self.write_object_fee),
            value_fee_bps: Some(self.value_fee_bps),
            min_value_fee_bps: self.min_value_fee_bps,
            max_value_fee_bps: self.max_value_fee_bps,
            fee_adjustment_rate_bps: self.fee_adjustment_rate_bps,
            target_models_per_target: Some(self.models_per_target),
            target_embedding_dim: Some(self.embedding_dim),
            target_initial_distance_threshold: self.initial_distance_threshold,
            target_reward_allocation_bps: self.target_reward_allocation_bps,
            target_hits_per_epoch: self.target_hits_per_epoch,
            target_hits_ema_decay_bps: self.hits_ema_decay_bps,
            target_difficulty_adjustment_rate_bps: self.difficulty_adjustment_rate_bps,
            target_max_distance_threshold: self.max_distance_threshold,
            target_min_distance_threshold: self.min_distance_threshold,
            target_initial_targets_per_epoch: self.initial_targets_per_epoch,
            target_submitter_reward_share_bps: self.submitter_reward_share_bps,
            target_model_reward_share_bps: self.model_reward_share_bps,
            target_claimer_incentive_bps: self.claimer_incentive_bps,
            submission_bond_per_byte: Some(self.submission_bond_per_byte),
            challenger_bond_per_byte: self.challenger_bond_per_byte,
            max_submission_data_size: Some(self.max_submission_data_size),
        }
    }
}

/// The current epoch: its number, when it started, what it will take, and who is in it.
#[derive(Debug, Clone, PartialEq)]
pub struct EpochView {
    pub epoch: u64,
    pub start_ms: u64,
    pub protocol_version: Option<u64>,
    pub params: ChainParams,
    pub distance_threshold: f32,
    pub reward_per_target: u64,
    /// The moving average of hits per epoch that steers the difficulty.
    pub hits_ema: u64,
    pub hits_this_epoch: u64,
    pub targets_generated_this_epoch: u64,
    pub emission_pool: u64,
    pub total_model_stake: u64,
    /// By id.
    pub models: Vec<ModelView>,
    pub validators: Vec<ValidatorView>,
    /// Validators reported this epoch, and by whom.
    pub validator_reports: BTreeMap<Address, Vec<Address>>,
    /// Models reported this epoch, and by whom.
    pub model_reports: BTreeMap<ObjectId, Vec<Address>>,
}

impl EpochView {
    /// When the next epoch is due by the chain's clock (a localnet may advance sooner).
    pub fn next_epoch_ms(&self) -> u64 {
        self.start_ms.saturating_add(self.params.epoch_duration_ms)
    }

    pub fn model(&self, id: &ObjectId) -> Option<&ModelView> {
        self.models.iter().find(|m| m.id == *id)
    }

    pub fn from_proto(epoch: &proto::Epoch) -> Result<Self> {
        let state = epoch
            .system_state
            .as_ref()
            .ok_or_else(|| FieldError::missing("epoch.system_state"))?;
        let p = state
            .parameters
            .as_ref()
            .ok_or_else(|| FieldError::missing("system_state.parameters"))?;
        let params = ChainParams::from_proto(
            p,
            state
                .emission_pool
                .as_ref()
                .and_then(|e| e.emission_per_epoch),
        )?;
        let start_ms = match (&state.epoch_start_timestamp_ms, &epoch.start) {
            (Some(ms), _) => *ms,
            (None, Some(t)) => convert::timestamp_to_ms(t, "epoch.start")?,
            (None, None) => {
                return Err(FieldError::missing("system_state.epoch_start_timestamp_ms"));
            }
        };
        let registry = state.model_registry.clone().unwrap_or_default();
        let mut models = registry
            .models
            .iter()
            .map(|(id, m)| ModelView::from_proto(id, m))
            .collect::<Result<Vec<_>>>()?;
        models.sort_by_key(|m| m.id);
        let model_reports = registry
            .model_report_records
            .iter()
            .map(|(id, set)| {
                let field = format!("model_report_records[{id}]");
                Ok((
                    convert::parse_object_id(id, &field)?,
                    reporters(set, &field)?,
                ))
            })
            .collect::<Result<_>>()?;
        let validator_reports = state
            .validator_report_records
            .iter()
            .map(|(a, set)| {
                let field = format!("validator_report_records[{a}]");
                Ok((convert::parse_address(a, &field)?, reporters(set, &field)?))
            })
            .collect::<Result<_>>()?;
        let target_state = state.target_state.unwrap_or_default();
        Ok(EpochView {
            epoch: need(state.epoch.or(epoch.epoch), "system_state.epoch")?,
            start_ms,
            protocol_version: state.protocol_version,
            params,
            distance_threshold: target_state.distance_threshold.unwrap_or(f32::NAN),
            reward_per_target: target_state.reward_per_target.unwrap_or(0),
            hits_ema: target_state.hits_ema.unwrap_or(0),
            hits_this_epoch: target_state.hits_this_epoch.unwrap_or(0),
            targets_generated_this_epoch: target_state.targets_generated_this_epoch.unwrap_or(0),
            emission_pool: state
                .emission_pool
                .as_ref()
                .and_then(|e| e.balance)
                .unwrap_or(0),
            total_model_stake: registry.total_model_stake.unwrap_or(0),
            models,
            validators: state
                .validators
                .as_ref()
                .map(|set| {
                    set.validators
                        .iter()
                        .enumerate()
                        .map(|(i, v)| {
                            ValidatorView::from_proto(v, &format!("validators.validators[{i}]"))
                        })
                        .collect::<Result<Vec<_>>>()
                })
                .transpose()?
                .unwrap_or_default(),
            validator_reports,
            model_reports,
        })
    }

    /// The `SystemState` message: what `GetEpoch` sends under `system_state`.
    pub fn system_state_to_proto(&self) -> proto::SystemState {
        proto::SystemState {
            epoch: Some(self.epoch),
            epoch_start_timestamp_ms: Some(self.start_ms),
            protocol_version: self.protocol_version,
            parameters: Some(self.params.to_proto()),
            validators: Some(proto::ValidatorSet {
                total_stake: Some(
                    self.validators
                        .iter()
                        .fold(0, |sum, v| sum.saturating_add(v.stake)),
                ),
                validators: self
                    .validators
                    .iter()
                    .map(ValidatorView::to_proto)
                    .collect(),
                staking_pool_mappings: self
                    .validators
                    .iter()
                    .map(|v| (prefixed_id(&v.pool_id), hex_id(&v.address.0)))
                    .collect(),
                at_risk_validators: Default::default(),
            }),
            validator_report_records: self
                .validator_reports
                .iter()
                .map(|(reportee, by)| (hex_id(&reportee.0), reporter_set(by)))
                .collect(),
            emission_pool: Some(proto::EmissionPool {
                balance: Some(self.emission_pool),
                emission_per_epoch: self.params.emission_per_epoch,
            }),
            model_registry: Some(proto::ModelRegistry {
                staking_pool_mappings: self
                    .models
                    .iter()
                    .filter_map(|m| Some((prefixed_id(&m.pool_id?), prefixed_id(&m.id))))
                    .collect(),
                total_model_stake: Some(self.total_model_stake),
                model_report_records: self
                    .model_reports
                    .iter()
                    .map(|(model, by)| (prefixed_id(model), reporter_set(by)))
                    .collect(),
                models: self
                    .models
                    .iter()
                    .map(|m| (prefixed_id(&m.id), m.to_proto()))
                    .collect(),
            }),
            target_state: Some(proto::TargetState {
                distance_threshold: Some(self.distance_threshold),
                targets_generated_this_epoch: Some(self.targets_generated_this_epoch),
                hits_this_epoch: Some(self.hits_this_epoch),
                hits_ema: Some(self.hits_ema),
                reward_per_target: Some(self.reward_per_target),
            }),
            // A localnet never enters safe mode.
            safe_mode: Some(false),
            safe_mode_accumulated_fees: Some(0),
            safe_mode_accumulated_emissions: Some(0),
        }
    }
}

/// A validator as the system state shows it: its keys, addresses, pool, commission and voting
/// power.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ValidatorView {
    pub address: Address,
    pub voting_power: u64,
    pub commission_bps: u64,
    pub next_commission_bps: u64,
    pub pool_id: ObjectId,
    /// Shannons in the pool (stake and compounded rewards).
    pub stake: u64,
    /// Stake that joins at the next epoch change.
    pub pending_stake: u64,
    pub next_epoch_stake: u64,
    /// `(epoch, soma, pool tokens)` at the start of each epoch, oldest first.
    pub exchange_rates: Vec<(u64, u64, u64)>,
    pub rewards_pool: u64,
    pub pool_token_balance: u64,
    pub pending_total_soma_withdraw: u64,
    pub pending_pool_token_withdraw: u64,
    pub activation_epoch: Option<u64>,
    pub deactivation_epoch: Option<u64>,
    #[serde(skip)]
    pub keys: ValidatorKeysView,
}

/// A validator's public keys and addresses, as the network publishes them.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ValidatorKeysView {
    pub protocol_pubkey: Vec<u8>,
    pub network_pubkey: Vec<u8>,
    pub worker_pubkey: Vec<u8>,
    pub proof_of_possession: Vec<u8>,
    pub net_address: String,
    pub p2p_address: String,
    pub primary_address: String,
    pub proxy_address: String,
}

impl ValidatorView {
    pub fn from_proto(v: &proto::Validator, field: &str) -> Result<Self> {
        let f = |name: &str| format!("{field}.{name}");
        let pool = v
            .staking_pool
            .as_ref()
            .ok_or_else(|| FieldError::missing(f("staking_pool")))?;
        let mut exchange_rates: Vec<(u64, u64, u64)> = pool
            .exchange_rates
            .iter()
            .map(|(epoch, r)| {
                (
                    *epoch,
                    r.soma_amount.unwrap_or(0),
                    r.pool_token_amount.unwrap_or(0),
                )
            })
            .collect();
        exchange_rates.sort_unstable();
        Ok(ValidatorView {
            address: address(v.soma_address.as_deref(), &f("soma_address"))?,
            voting_power: v.voting_power.unwrap_or(0),
            commission_bps: v.commission_rate.unwrap_or(0),
            next_commission_bps: v.next_epoch_commission_rate.unwrap_or(0),
            pool_id: convert::parse_object_id(
                pool.id
                    .as_deref()
                    .ok_or_else(|| FieldError::missing(f("staking_pool.id")))?,
                &f("staking_pool.id"),
            )?,
            stake: pool.soma_balance.unwrap_or(0),
            pending_stake: pool.pending_stake.unwrap_or(0),
            next_epoch_stake: v.next_epoch_stake.unwrap_or(0),
            exchange_rates,
            rewards_pool: pool.rewards_pool.unwrap_or(0),
            pool_token_balance: pool.pool_token_balance.unwrap_or(0),
            pending_total_soma_withdraw: pool.pending_total_soma_withdraw.unwrap_or(0),
            pending_pool_token_withdraw: pool.pending_pool_token_withdraw.unwrap_or(0),
            activation_epoch: pool.activation_epoch,
            deactivation_epoch: pool.deactivation_epoch,
            keys: ValidatorKeysView {
                protocol_pubkey: v.protocol_pubkey.clone().unwrap_or_default(),
                network_pubkey: v.network_pubkey.clone().unwrap_or_default(),
                worker_pubkey: v.worker_pubkey.clone().unwrap_or_default(),
                proof_of_possession: v.proof_of_possession.clone().unwrap_or_default(),
                net_address: v.net_address.clone().unwrap_or_default(),
                p2p_address: v.p2p_address.clone().unwrap_or_default(),
                primary_address: v.primary_address.clone().unwrap_or_default(),
                proxy_address: v.proxy_address.clone().unwrap_or_default(),
            },
        })
    }

    pub fn to_proto(&self) -> proto::Validator {
        let keys = &self.keys;
        proto::Validator {
            soma_address: Some(hex_id(&self.address.0)),
            protocol_pubkey: Some(keys.protocol_pubkey.clone()),
            network_pubkey: Some(keys.network_pubkey.clone()),
            worker_pubkey: Some(keys.worker_pubkey.clone()),
            net_address: Some(keys.net_address.clone()),
            p2p_address: Some(keys.p2p_address.clone()),
            primary_address: Some(keys.primary_address.clone()),
            voting_power: Some(self.voting_power),
            commission_rate: Some(self.commission_bps),
            next_epoch_stake: Some(self.next_epoch_stake),
            next_epoch_commission_rate: Some(self.next_commission_bps),
            staking_pool: Some(proto::StakingPool {
                id: Some(prefixed_id(&self.pool_id)),
                activation_epoch: self.activation_epoch,
                deactivation_epoch: self.deactivation_epoch,
                soma_balance: Some(self.stake),
                rewards_pool: Some(self.rewards_pool),
                pool_token_balance: Some(self.pool_token_balance),
                exchange_rates: self
                    .exchange_rates
                    .iter()
                    .map(|&(epoch, soma, tokens)| {
                        (
                            epoch,
                            proto::PoolTokenExchangeRate {
                                soma_amount: Some(soma),
                                pool_token_amount: Some(tokens),
                            },
                        )
                    })
                    .collect(),
                pending_stake: Some(self.pending_stake),
                pending_total_soma_withdraw: Some(self.pending_total_soma_withdraw),
                pending_pool_token_withdraw: Some(self.pending_pool_token_withdraw),
            }),
            proxy_address: Some(keys.proxy_address.clone()),
            proof_of_possession: Some(keys.proof_of_possession.clone()),
        }
    }

    /// The yearly yield of one pool token over the last `epochs` epochs, compounded over a
    /// year of epochs of `epoch_duration_ms`; `None` until two rates are recorded.
    pub fn apy(&self, epochs: u64, epoch_duration_ms: u64) -> Option<f64> {
        let &(last_epoch, last_soma, last_tokens) = self.exchange_rates.last()?;
        let &(from_epoch, first_soma, first_tokens) = self
            .exchange_rates
            .iter()
            .find(|r| r.0 >= last_epoch.saturating_sub(epochs))?;
        if from_epoch == last_epoch
            || [first_soma, first_tokens, last_soma, last_tokens].contains(&0)
            || epoch_duration_ms == 0
        {
            return None;
        }
        let growth =
            (last_soma as f64 / last_tokens as f64) / (first_soma as f64 / first_tokens as f64);
        let per_epoch = growth.powf(1.0 / (last_epoch - from_epoch) as f64);
        let epochs_per_year = 365.0 * 24.0 * 3600.0 * 1000.0 / epoch_duration_ms as f64;
        Some(per_epoch.powf(epochs_per_year) - 1.0)
    }
}

/// The three commitments of a commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Commitments {
    pub weights: Commitment,
    pub embedding: Commitment,
    pub decryption_key: Commitment,
}

impl Commitments {
    fn from_proto(
        weights: &Option<Vec<u8>>,
        embedding: &Option<Vec<u8>>,
        key: &Option<Vec<u8>>,
        f: impl Fn(&str) -> String,
    ) -> Result<Option<Self>> {
        Ok(
            match (
                commitment(weights, &f("weights_commitment"))?,
                commitment(embedding, &f("embedding_commitment"))?,
                commitment(key, &f("decryption_key_commitment"))?,
            ) {
                (Some(weights), Some(embedding), Some(decryption_key)) => Some(Commitments {
                    weights,
                    embedding,
                    decryption_key,
                }),
                _ => None,
            },
        )
    }
}

/// A commit awaiting its reveal: the first one of a pending model, or an update of an active one.
#[derive(Debug, Clone, PartialEq)]
pub struct CommitView {
    pub manifest: Manifest,
    pub commitments: Commitments,
    pub commit_epoch: u64,
}

/// A model in the registry. The network shows a model that was never revealed with its first
/// commit in the top-level fields, and a revealed one with the revealed weights there and any
/// update in `pending_update`; a view tells the two apart by the decryption key, which only a
/// reveal makes public.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelView {
    pub id: ObjectId,
    pub owner: Address,
    pub state: ModelState,
    pub architecture_version: u64,
    pub create_epoch: u64,
    /// Stake in the model's pool.
    pub stake: u64,
    pub pool_token_balance: u64,
    /// The model's staking pool (`StakedSoma.pool_id` of stakes in this model).
    pub pool_id: Option<ObjectId>,
    pub activation_epoch: Option<u64>,
    pub deactivation_epoch: Option<u64>,
    pub commission_bps: u64,
    pub next_commission_bps: u64,
    /// The revealed weights (with `decryption_key` and `revealed_commitments`: all or none).
    pub manifest: Option<Manifest>,
    pub revealed_commitments: Option<Commitments>,
    pub decryption_key: Option<Digest>,
    pub embedding: Option<Vec<f32>>,
    /// The commit awaiting reveal.
    pub pending: Option<CommitView>,
}

impl ModelView {
    pub fn from_proto(key: &str, m: &proto::Model) -> Result<Self> {
        let id = convert::parse_object_id(key, "model_registry.models key")?;
        let f = |name: &str| format!("models[{key}].{name}");
        let state = m
            .state
            .as_deref()
            .and_then(ModelState::parse)
            .ok_or_else(|| FieldError::new(f("state"), format!("unknown state {:?}", m.state)))?;
        let manifest = m
            .manifest
            .as_ref()
            .map(|x| convert::manifest_from_proto(x, &f("manifest")))
            .transpose()?;
        let commitments = Commitments::from_proto(
            &m.weights_commitment,
            &m.embedding_commitment,
            &m.decryption_key_commitment,
            f,
        )?;
        let decryption_key = match &m.decryption_key {
            Some(bytes) => Some(Digest(<[u8; 32]>::try_from(bytes.as_slice()).map_err(
                |_| FieldError::new(f("decryption_key"), format!("{} bytes", bytes.len())),
            )?)),
            None => None,
        };
        let (manifest, revealed_commitments, pending) = if decryption_key.is_some() {
            let update = match &m.pending_update {
                Some(u) => {
                    let fu = |name: &str| f(&format!("pending_update.{name}"));
                    let manifest = u
                        .manifest
                        .as_ref()
                        .map(|x| convert::manifest_from_proto(x, &fu("manifest")))
                        .transpose()?;
                    match (
                        manifest,
                        Commitments::from_proto(
                            &u.weights_commitment,
                            &u.embedding_commitment,
                            &u.decryption_key_commitment,
                            fu,
                        )?,
                        u.commit_epoch,
                    ) {
                        (Some(manifest), Some(commitments), Some(commit_epoch)) => {
                            Some(CommitView {
                                manifest,
                                commitments,
                                commit_epoch,
                            })
                        }
                        _ => None,
                    }
                }
                None => None,
            };
            (manifest, commitments, update)
        } else {
            let first = match (manifest, commitments, m.commit_epoch) {
                (Some(manifest), Some(commitments), Some(commit_epoch)) => Some(CommitView {
                    manifest,
                    commitments,
                    commit_epoch,
                }),
                _ => None,
            };
            (None, None, first)
        };
        if state == ModelState::Pending && pending.is_none() {
            return Err(FieldError::new(
                f("manifest"),
                "a pending model without its commit",
            ));
        }
        let pool = m.staking_pool.clone().unwrap_or_default();
        Ok(ModelView {
            id,
            owner: address(m.owner.as_deref(), &f("owner"))?,
            state,
            architecture_version: m.architecture_version.unwrap_or(1),
            create_epoch: m.create_epoch.unwrap_or(0),
            stake: pool.soma_balance.unwrap_or(0),
            pool_token_balance: pool.pool_token_balance.unwrap_or(0),
            pool_id: pool
                .id
                .as_deref()
                .map(|id| convert::parse_object_id(id, &f("staking_pool.id")))
                .transpose()?,
            activation_epoch: pool.activation_epoch,
            deactivation_epoch: pool.deactivation_epoch,
            commission_bps: m.commission_rate.unwrap_or(0),
            next_commission_bps: m.next_epoch_commission_rate.unwrap_or(0),
            manifest,
            revealed_commitments,
            decryption_key,
            embedding: (!m.embedding.is_empty()).then(|| m.embedding.clone()),
            pending,
        })
    }

    pub fn to_proto(&self) -> proto::Model {
        let bytes = |c: Commitment| Some(c.0.to_vec());
        // Never revealed: the first commit is what the top-level fields show.
        let first_commit = self
            .decryption_key
            .is_none()
            .then_some(self.pending.as_ref())
            .flatten();
        let shown = first_commit
            .map(|c| c.commitments)
            .or(self.revealed_commitments);
        proto::Model {
            owner: Some(hex_id(&self.owner.0)),
            architecture_version: Some(self.architecture_version),
            manifest: self
                .manifest
                .as_ref()
                .or(first_commit.map(|c| &c.manifest))
                .map(convert::manifest_to_proto),
            weights_commitment: shown.and_then(|c| bytes(c.weights)),
            embedding_commitment: shown.and_then(|c| bytes(c.embedding)),
            decryption_key_commitment: shown.and_then(|c| bytes(c.decryption_key)),
            commit_epoch: self.pending.as_ref().map(|p| p.commit_epoch),
            decryption_key: self.decryption_key.map(|k| k.0.to_vec()),
            embedding: self.embedding.clone().unwrap_or_default(),
            staking_pool: Some(proto::StakingPool {
                id: self.pool_id.as_ref().map(prefixed_id),
                activation_epoch: self.activation_epoch,
                deactivation_epoch: self.deactivation_epoch,
                soma_balance: Some(self.stake),
                // No reward ever reaches a model's pool.
                rewards_pool: Some(0),
                pool_token_balance: Some(self.pool_token_balance),
                exchange_rates: Default::default(),
                pending_stake: Some(0),
                pending_total_soma_withdraw: Some(0),
                pending_pool_token_withdraw: Some(0),
            }),
            commission_rate: Some(self.commission_bps),
            next_epoch_commission_rate: Some(self.next_commission_bps),
            pending_update: self
                .pending
                .as_ref()
                .filter(|_| self.decryption_key.is_some())
                .map(|p| proto::PendingModelUpdate {
                    manifest: Some(convert::manifest_to_proto(&p.manifest)),
                    weights_commitment: bytes(p.commitments.weights),
                    embedding_commitment: bytes(p.commitments.embedding),
                    decryption_key_commitment: bytes(p.commitments.decryption_key),
                    commit_epoch: Some(p.commit_epoch),
                }),
            state: Some(self.state.name().to_string()),
            create_epoch: Some(self.create_epoch),
        }
    }
}

/// A target as `ListTargets` shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TargetView {
    pub id: ObjectId,
    pub embedding: Vec<f32>,
    /// The assigned models, in the chain's order.
    pub model_ids: Vec<ObjectId>,
    pub distance_threshold: f32,
    pub reward_pool: u64,
    pub generation_epoch: u64,
    /// open, filled, claimed or expired (as the node words it).
    pub status: String,
    pub fill_epoch: Option<u64>,
    pub submitter: Option<Address>,
    pub winning_model_id: Option<ObjectId>,
    pub winning_model_owner: Option<Address>,
    pub bond_amount: u64,
    pub data_url: Option<String>,
}

impl TargetView {
    pub fn from_proto(t: &proto::Target, field: &str) -> Result<Self> {
        let f = |name: &str| format!("{field}.{name}");
        let optional_address = |a: &Option<String>, name: &str| {
            a.as_deref()
                .map(|a| convert::parse_address(a, &f(name)))
                .transpose()
        };
        Ok(TargetView {
            id: convert::parse_object_id(
                t.id.as_deref()
                    .ok_or_else(|| FieldError::missing(f("id")))?,
                &f("id"),
            )?,
            embedding: t.embedding.clone(),
            model_ids: t
                .model_ids
                .iter()
                .enumerate()
                .map(|(i, m)| convert::parse_object_id(m, &f(&format!("model_ids[{i}]"))))
                .collect::<Result<_>>()?,
            distance_threshold: need(t.distance_threshold, &f("distance_threshold"))?,
            reward_pool: t.reward_pool.unwrap_or(0),
            generation_epoch: need(t.generation_epoch, &f("generation_epoch"))?,
            status: t.status.clone().unwrap_or_default(),
            fill_epoch: t.fill_epoch,
            submitter: optional_address(&t.submitter, "submitter")?,
            winning_model_id: t
                .winning_model_id
                .as_deref()
                .map(|m| convert::parse_object_id(m, &f("winning_model_id")))
                .transpose()?,
            winning_model_owner: optional_address(&t.winning_model_owner, "winning_model_owner")?,
            bond_amount: t.bond_amount.unwrap_or(0),
            data_url: t.data_url.clone(),
        })
    }

    pub fn to_proto(&self) -> proto::Target {
        proto::Target {
            id: Some(prefixed_id(&self.id)),
            embedding: self.embedding.clone(),
            model_ids: self.model_ids.iter().map(prefixed_id).collect(),
            distance_threshold: Some(self.distance_threshold),
            reward_pool: Some(self.reward_pool),
            generation_epoch: Some(self.generation_epoch),
            status: Some(self.status.clone()),
            fill_epoch: self.fill_epoch,
            submitter: self.submitter.map(|a| hex_id(&a.0)),
            winning_model_id: self.winning_model_id.as_ref().map(prefixed_id),
            winning_model_owner: self.winning_model_owner.map(|a| hex_id(&a.0)),
            bond_amount: Some(self.bond_amount),
            data_url: self.data_url.clone(),
        }
    }
}

/// What an executed transaction did, as `ExecuteTransaction` and `GetTransaction` answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Executed {
    pub digest: TxDigest,
    /// The transaction itself, when the reply carries it (lookups by digest do).
    pub transaction: Option<TransactionData>,
    pub signatures: Vec<UserSignature>,
    pub effects: TransactionEffects,
    pub balance_changes: Vec<BalanceChange>,
    /// The objects it wrote, in their new form, when the reply carries them.
    pub objects: Vec<Object>,
    pub checkpoint: Option<u64>,
    pub timestamp_ms: Option<u64>,
}

impl Executed {
    pub fn status(&self) -> &ExecutionStatus {
        &self.effects.status
    }

    /// The effects if the transaction succeeded, else why it failed.
    pub fn success(self) -> std::result::Result<Executed, ExecutionFailure> {
        match &self.effects.status {
            ExecutionStatus::Success => Ok(self),
            ExecutionStatus::Failure(f) => Err(f.clone()),
        }
    }

    /// The ids of objects this transaction created, in the order the chain lists them.
    pub fn created(&self) -> Vec<ObjectId> {
        self.effects
            .changed_objects
            .iter()
            .filter(|c| c.id_operation == IdOperation::Created)
            .map(|c| c.id)
            .collect()
    }

    pub fn from_proto(t: &proto::ExecutedTransaction) -> Result<Self> {
        let effects = convert::effects_from_proto(
            t.effects
                .as_ref()
                .ok_or_else(|| FieldError::missing("transaction.effects"))?,
        )?;
        Ok(Executed {
            digest: effects.transaction_digest,
            transaction: t
                .transaction
                .as_ref()
                .map(convert::transaction_from_proto)
                .transpose()?,
            signatures: t
                .signatures
                .iter()
                .enumerate()
                .map(|(i, s)| convert::signature_from_proto(s, &format!("signatures[{i}]")))
                .collect::<Result<_>>()?,
            balance_changes: t
                .balance_changes
                .iter()
                .enumerate()
                .map(|(i, b)| {
                    convert::balance_change_from_proto(b, &format!("balance_changes[{i}]"))
                })
                .collect::<Result<_>>()?,
            objects: t
                .objects
                .as_ref()
                .map(|set| {
                    set.objects
                        .iter()
                        .enumerate()
                        .map(|(i, o)| convert::object_from_proto(o, &format!("objects[{i}]")))
                        .collect::<Result<_>>()
                })
                .transpose()?
                .unwrap_or_default(),
            checkpoint: t.checkpoint,
            timestamp_ms: t
                .timestamp
                .as_ref()
                .map(|ts| convert::timestamp_to_ms(ts, "timestamp"))
                .transpose()?,
            effects,
        })
    }

    pub fn to_proto(&self) -> proto::ExecutedTransaction {
        proto::ExecutedTransaction {
            digest: Some(self.digest.to_string()),
            transaction: self.transaction.as_ref().map(convert::transaction_to_proto),
            signatures: self
                .signatures
                .iter()
                .map(convert::signature_to_proto)
                .collect(),
            effects: Some(convert::effects_to_proto(&self.effects)),
            checkpoint: self.checkpoint,
            timestamp: self.timestamp_ms.map(convert::timestamp_from_ms),
            balance_changes: self
                .balance_changes
                .iter()
                .map(convert::balance_change_to_proto)
                .collect(),
            objects: Some(proto::ObjectSet {
                objects: self.objects.iter().map(convert::object_to_proto).collect(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn validator(exchange_rates: Vec<(u64, u64, u64)>) -> ValidatorView {
        ValidatorView {
            address: Address([1; 32]),
            voting_power: 10_000,
            commission_bps: 0,
            next_commission_bps: 0,
            pool_id: ObjectId([2; 32]),
            stake: 0,
            pending_stake: 0,
            next_epoch_stake: 0,
            exchange_rates,
            rewards_pool: 0,
            pool_token_balance: 0,
            pending_total_soma_withdraw: 0,
            pending_pool_token_withdraw: 0,
            activation_epoch: Some(0),
            deactivation_epoch: None,
            keys: Default::default(),
        }
    }

    #[test]
    fn apy_compounds_the_growth_of_a_pool_token() {
        // 1% in one epoch of a day: 1.01^365 - 1 a year.
        let v = validator(vec![(0, 1_000, 1_000), (1, 1_010, 1_000)]);
        let apy = v.apy(7, 86_400_000).unwrap();
        assert!((apy - (1.01f64.powf(365.0) - 1.0)).abs() < 1e-9, "{apy}");
        // 21% over two epochs is 10% per epoch; the window skips older rates.
        let v = validator(vec![(0, 1, 1), (3, 1_000, 1_000), (5, 1_210, 1_000)]);
        let apy = v.apy(2, 365 * 86_400_000).unwrap();
        assert!((apy - 0.1).abs() < 1e-9, "{apy}");
        assert!(validator(vec![(0, 1_000, 1_000)]).apy(7, 1).is_none());
    }
}
