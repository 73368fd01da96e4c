//! What commands read from a chain, in plain Rust: the epoch and its clock, models as the
//! registry holds them, and targets. Built from the protobuf replies of [`crate::chain`], with
//! every missing or malformed field reported as [`ChainError::Protocol`] naming the field.

use somatrain_protocol::{Address, Commitment, Digest, Manifest, ObjectId};
use somatrain_rpc::{convert, proto};

use crate::chain::ChainError;

fn protocol(field: &str, reason: impl std::fmt::Display) -> ChainError {
    ChainError::Protocol(format!("{field}: {reason}"))
}

fn need<T: Copy>(value: Option<T>, field: &str) -> Result<T, ChainError> {
    value.ok_or_else(|| protocol(field, "missing"))
}

fn commitment(bytes: &Option<Vec<u8>>, field: &str) -> Result<Option<Commitment>, ChainError> {
    bytes
        .as_ref()
        .map(|b| {
            <[u8; 32]>::try_from(b.as_slice())
                .map(Commitment)
                .map_err(|_| protocol(field, format!("{} bytes, expected 32", b.len())))
        })
        .transpose()
}

fn object_id(text: &str, field: &str) -> Result<ObjectId, ChainError> {
    convert::parse_object_id(text, field).map_err(|e| ChainError::Protocol(e.to_string()))
}

fn address(text: &str, field: &str) -> Result<Address, ChainError> {
    convert::parse_address(text, field).map_err(|e| ChainError::Protocol(e.to_string()))
}

/// The chain's parameters a trainer or submitter needs.
#[derive(Debug, Clone, PartialEq)]
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
    pub emission_per_epoch: Option<u64>,
}

/// The current epoch: its number, when it started and what it will take.
#[derive(Debug, Clone, PartialEq)]
pub struct EpochView {
    pub epoch: u64,
    pub start_ms: u64,
    pub params: ChainParams,
    pub distance_threshold: f32,
    pub reward_per_target: u64,
    /// The moving average of hits per epoch that steers the difficulty.
    pub hits_ema: u64,
    pub targets_generated_this_epoch: u64,
    pub emission_pool: u64,
    pub total_model_stake: u64,
    pub models: Vec<ModelView>,
    pub validators: Vec<ValidatorView>,
}

/// A validator as the system state shows it: its pool, commission and voting power.
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
}

impl ValidatorView {
    pub fn from_proto(v: &proto::Validator, field: &str) -> Result<Self, ChainError> {
        let pool = v
            .staking_pool
            .as_ref()
            .ok_or_else(|| protocol(field, "no staking_pool"))?;
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
            address: address(
                v.soma_address
                    .as_deref()
                    .ok_or_else(|| protocol(field, "no soma_address"))?,
                field,
            )?,
            voting_power: v.voting_power.unwrap_or(0),
            commission_bps: v.commission_rate.unwrap_or(0),
            next_commission_bps: v.next_epoch_commission_rate.unwrap_or(0),
            pool_id: object_id(
                pool.id
                    .as_deref()
                    .ok_or_else(|| protocol(field, "no staking_pool.id"))?,
                field,
            )?,
            stake: pool.soma_balance.unwrap_or(0),
            pending_stake: pool.pending_stake.unwrap_or(0),
            next_epoch_stake: v.next_epoch_stake.unwrap_or(0),
            exchange_rates,
        })
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

impl EpochView {
    /// When the next epoch is due by the chain's clock (a localnet may advance sooner).
    pub fn next_epoch_ms(&self) -> u64 {
        self.start_ms.saturating_add(self.params.epoch_duration_ms)
    }

    pub fn model(&self, id: &ObjectId) -> Option<&ModelView> {
        self.models.iter().find(|m| m.id == *id)
    }

    pub fn from_proto(epoch: &proto::Epoch) -> Result<Self, ChainError> {
        let state = epoch
            .system_state
            .as_ref()
            .ok_or_else(|| protocol("epoch.system_state", "missing"))?;
        let p = state
            .parameters
            .as_ref()
            .ok_or_else(|| protocol("system_state.parameters", "missing"))?;
        let params = ChainParams {
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
            emission_per_epoch: state
                .emission_pool
                .as_ref()
                .and_then(|e| e.emission_per_epoch),
        };
        let start_ms = match (&state.epoch_start_timestamp_ms, &epoch.start) {
            (Some(ms), _) => *ms,
            (None, Some(t)) => convert::timestamp_to_ms(t, "epoch.start")
                .map_err(|e| ChainError::Protocol(e.to_string()))?,
            (None, None) => {
                return Err(protocol("system_state.epoch_start_timestamp_ms", "missing"));
            }
        };
        let registry = state.model_registry.clone().unwrap_or_default();
        let mut models = registry
            .models
            .iter()
            .map(|(id, m)| ModelView::from_proto(id, m))
            .collect::<Result<Vec<_>, _>>()?;
        models.sort_by_key(|m| m.id);
        let target_state = state.target_state.unwrap_or_default();
        Ok(EpochView {
            epoch: need(state.epoch.or(epoch.epoch), "system_state.epoch")?,
            start_ms,
            params,
            distance_threshold: target_state.distance_threshold.unwrap_or(f32::NAN),
            reward_per_target: target_state.reward_per_target.unwrap_or(0),
            hits_ema: target_state.hits_ema.unwrap_or(0),
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
                        .collect::<Result<Vec<_>, _>>()
                })
                .transpose()?
                .unwrap_or_default(),
        })
    }
}

pub use somatrain_protocol::ModelState;

/// The three commitments of a commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Commitments {
    pub weights: Commitment,
    pub embedding: Commitment,
    pub decryption_key: Commitment,
}

/// A commit awaiting its reveal: the first one of a pending model, or an update of an active one.
#[derive(Debug, Clone, PartialEq)]
pub struct CommitView {
    pub manifest: Manifest,
    pub commitments: Commitments,
    pub commit_epoch: u64,
}

/// A model in the registry.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelView {
    pub id: ObjectId,
    pub owner: Address,
    pub state: ModelState,
    pub architecture_version: u64,
    pub create_epoch: u64,
    /// Stake in the model's pool.
    pub stake: u64,
    /// The model's staking pool (`StakedSoma.pool_id` of stakes in this model).
    pub pool_id: Option<ObjectId>,
    pub activation_epoch: Option<u64>,
    pub deactivation_epoch: Option<u64>,
    pub commission_bps: u64,
    pub next_commission_bps: u64,
    /// The revealed weights (for an active or inactive model).
    pub manifest: Option<Manifest>,
    pub decryption_key: Option<Digest>,
    pub embedding: Option<Vec<f32>>,
    /// The commit awaiting reveal.
    pub pending: Option<CommitView>,
}

impl ModelView {
    pub fn from_proto(key: &str, m: &proto::Model) -> Result<Self, ChainError> {
        let id = object_id(key, "model_registry.models key")?;
        let f = |name: &str| format!("models[{key}].{name}");
        let state = m
            .state
            .as_deref()
            .and_then(ModelState::parse)
            .ok_or_else(|| protocol(&f("state"), format!("unknown state {:?}", m.state)))?;
        let manifest = m
            .manifest
            .as_ref()
            .map(|x| convert::manifest_from_proto(x, &f("manifest")))
            .transpose()
            .map_err(|e| ChainError::Protocol(e.to_string()))?;
        let commitments = |w: &Option<Vec<u8>>, e: &Option<Vec<u8>>, k: &Option<Vec<u8>>| {
            Ok::<_, ChainError>(
                match (
                    commitment(w, &f("weights_commitment"))?,
                    commitment(e, &f("embedding_commitment"))?,
                    commitment(k, &f("decryption_key_commitment"))?,
                ) {
                    (Some(weights), Some(embedding), Some(decryption_key)) => Some(Commitments {
                        weights,
                        embedding,
                        decryption_key,
                    }),
                    _ => None,
                },
            )
        };
        // A pending model shows its first commit as its manifest; an active one shows the
        // revealed weights and any update in `pending_update`.
        let (revealed, pending) = match state {
            ModelState::Pending => {
                let pending = match (
                    &manifest,
                    commitments(
                        &m.weights_commitment,
                        &m.embedding_commitment,
                        &m.decryption_key_commitment,
                    )?,
                    m.commit_epoch,
                ) {
                    (Some(manifest), Some(commitments), Some(commit_epoch)) => Some(CommitView {
                        manifest: manifest.clone(),
                        commitments,
                        commit_epoch,
                    }),
                    _ => {
                        return Err(protocol(
                            &f("manifest"),
                            "a pending model without its commit",
                        ));
                    }
                };
                (None, pending)
            }
            ModelState::Created => (None, None),
            ModelState::Active | ModelState::Inactive => {
                let update = match &m.pending_update {
                    Some(u) => {
                        let manifest = u
                            .manifest
                            .as_ref()
                            .map(|x| convert::manifest_from_proto(x, &f("pending_update.manifest")))
                            .transpose()
                            .map_err(|e| ChainError::Protocol(e.to_string()))?;
                        match (
                            manifest,
                            commitments(
                                &u.weights_commitment,
                                &u.embedding_commitment,
                                &u.decryption_key_commitment,
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
                (manifest, update)
            }
        };
        let decryption_key = match &m.decryption_key {
            Some(bytes) => Some(Digest(<[u8; 32]>::try_from(bytes.as_slice()).map_err(
                |_| protocol(&f("decryption_key"), format!("{} bytes", bytes.len())),
            )?)),
            None => None,
        };
        Ok(ModelView {
            id,
            owner: address(
                m.owner
                    .as_deref()
                    .ok_or_else(|| protocol(&f("owner"), "missing"))?,
                &f("owner"),
            )?,
            state,
            architecture_version: m.architecture_version.unwrap_or(1),
            create_epoch: m.create_epoch.unwrap_or(0),
            stake: m
                .staking_pool
                .as_ref()
                .and_then(|p| p.soma_balance)
                .unwrap_or(0),
            pool_id: m
                .staking_pool
                .as_ref()
                .and_then(|p| p.id.as_deref())
                .map(|id| object_id(id, &f("staking_pool.id")))
                .transpose()?,
            activation_epoch: m.staking_pool.as_ref().and_then(|p| p.activation_epoch),
            deactivation_epoch: m.staking_pool.as_ref().and_then(|p| p.deactivation_epoch),
            commission_bps: m.commission_rate.unwrap_or(0),
            next_commission_bps: m.next_epoch_commission_rate.unwrap_or(0),
            manifest: revealed,
            decryption_key,
            embedding: (!m.embedding.is_empty()).then(|| m.embedding.clone()),
            pending,
        })
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
    pub bond_amount: u64,
    pub data_url: Option<String>,
}

impl TargetView {
    pub fn from_proto(t: &proto::Target, field: &str) -> Result<Self, ChainError> {
        let f = |name: &str| format!("{field}.{name}");
        let id = object_id(
            t.id.as_deref()
                .ok_or_else(|| protocol(&f("id"), "missing"))?,
            &f("id"),
        )?;
        Ok(TargetView {
            id,
            embedding: t.embedding.clone(),
            model_ids: t
                .model_ids
                .iter()
                .enumerate()
                .map(|(i, m)| object_id(m, &f(&format!("model_ids[{i}]"))))
                .collect::<Result<_, _>>()?,
            distance_threshold: need(t.distance_threshold, &f("distance_threshold"))?,
            reward_pool: t.reward_pool.unwrap_or(0),
            generation_epoch: need(t.generation_epoch, &f("generation_epoch"))?,
            status: t.status.clone().unwrap_or_default(),
            fill_epoch: t.fill_epoch,
            submitter: t
                .submitter
                .as_deref()
                .map(|a| address(a, &f("submitter")))
                .transpose()?,
            winning_model_id: t
                .winning_model_id
                .as_deref()
                .map(|m| object_id(m, &f("winning_model_id")))
                .transpose()?,
            bond_amount: t.bond_amount.unwrap_or(0),
            data_url: t.data_url.clone(),
        })
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
