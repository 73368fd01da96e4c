//! Targets: generation, stake-weighted KNN model assignment, funding and the difficulty step
//! (`shared/reference/protocol-targets.md`, sections 1 and 2).

use somatrain_protocol::assignment::{self, Contender};
use somatrain_protocol::hash::blake2b256;
use somatrain_protocol::object::{Target, TargetStatus};
use somatrain_protocol::{ObjectId, SomaTensor, TxDigest};

use super::system::{Model, ModelState, Params, TargetState};

/// Spread of cosine distances between random data and a random target, as the network uses it.
const EMBEDDING_DISTANCE_STD: f32 = 0.022;
/// Protocol version 5's floor on one difficulty step, in units of that spread.
const MIN_Z_STEP: f32 = 2.0;

/// `make_target_seed`: the first 8 bytes (LE) of Blake2b-256(digest ‖ n as u64 LE).
pub fn target_seed(digest: &TxDigest, n: u64) -> u64 {
    let out = blake2b256(&[&digest.0, &n.to_le_bytes()]);
    u64::from_le_bytes(out[..8].try_into().expect("8 bytes"))
}

/// The digest standing in for an epoch change's system transaction (targets are derived from it).
pub fn epoch_digest(new_epoch: u64) -> TxDigest {
    TxDigest::of_transaction_bytes(&[b"ChangeEpoch".as_slice(), &new_epoch.to_le_bytes()].concat())
}

/// Every active model with an embedding of the target's length, ranked by the chain's rule
/// ([`somatrain_protocol::assignment`]), best first; ties keep ascending id order.
pub fn rank_models<'a>(
    target: &[f32],
    models: impl Iterator<Item = &'a Model>,
) -> Vec<(ObjectId, f64)> {
    let candidates: Vec<(ObjectId, Contender)> = models
        .filter(|m| m.state == ModelState::Active)
        .filter_map(|m| {
            let embedding = m.embedding.as_ref().filter(|e| e.len() == target.len())?;
            Some((
                m.id,
                Contender {
                    distance: assignment::cosine_distance(target, embedding),
                    stake: m.staking_pool.soma_balance,
                },
            ))
        })
        .collect();
    let contenders: Vec<Contender> = candidates.iter().map(|(_, c)| *c).collect();
    assignment::rank(&contenders)
        .into_iter()
        .map(|(i, score)| (candidates[i].0, score))
        .collect()
}

/// A new open target seeded `seed`, or `None` when no model is active.
pub fn generate<'a>(
    seed: u64,
    models: impl Iterator<Item = &'a Model>,
    params: &Params,
    state: &TargetState,
    epoch: u64,
) -> Option<Target> {
    let embedding = assignment::target_embedding(seed, params.embedding_dim as usize);
    let model_ids: Vec<ObjectId> = rank_models(&embedding, models)
        .into_iter()
        .take(params.models_per_target as usize)
        .map(|(id, _)| id)
        .collect();
    if model_ids.is_empty() {
        return None;
    }
    Some(Target {
        embedding: SomaTensor::vector(&embedding),
        model_ids,
        distance_threshold: SomaTensor::scalar(state.distance_threshold),
        reward_pool: state.reward_per_target,
        generation_epoch: epoch,
        status: TargetStatus::Open,
        submitter: None,
        winning_model_id: None,
        winning_model_owner: None,
        bond_amount: 0,
        winning_data_manifest: None,
        winning_embedding: None,
        winning_distance_score: None,
        winning_loss_score: None,
        submission_reports: vec![],
    })
}

/// Shannons the chain may spend on targets in one epoch.
pub fn epoch_budget(params: &Params) -> u64 {
    super::system::bps(
        params.emission_per_epoch,
        params.target_reward_allocation_bps,
    )
}

pub fn reward_per_target(params: &Params) -> u64 {
    epoch_budget(params) / params.target_hits_per_epoch.max(1)
}

/// Whether one more target fits the emission pool and this epoch's budget.
pub fn can_fund(params: &Params, state: &TargetState, emission_pool: u64) -> bool {
    let reward = state.reward_per_target;
    reward > 0
        && emission_pool >= reward
        && (state.targets_generated_this_epoch + 1) as u128 * reward as u128
            <= epoch_budget(params) as u128
}

/// The epoch-boundary update: hits EMA, the z-based threshold step, counter reset, funding.
pub fn advance_epoch(params: &Params, state: &mut TargetState) {
    let decay = params.hits_ema_decay_bps;
    state.hits_ema = if state.hits_ema == 0 {
        state.hits_this_epoch
    } else {
        (decay * state.hits_ema + (10_000 - decay) * state.hits_this_epoch) / 10_000
    };
    if state.hits_ema > 0 && state.hits_ema != params.target_hits_per_epoch {
        let mut z = (1.0 - state.distance_threshold) / EMBEDDING_DISTANCE_STD;
        let rate = params.difficulty_adjustment_rate_bps as f32 / 10_000.0;
        let step = (z.abs() * rate).max(MIN_Z_STEP);
        if state.hits_ema > params.target_hits_per_epoch {
            z += step;
        } else {
            z -= step;
        }
        let z_min = (1.0 - params.max_distance_threshold) / EMBEDDING_DISTANCE_STD;
        let z_max = (1.0 - params.min_distance_threshold) / EMBEDDING_DISTANCE_STD;
        state.distance_threshold = 1.0 - EMBEDDING_DISTANCE_STD * z.clamp(z_min, z_max);
    }
    state.targets_generated_this_epoch = 0;
    state.hits_this_epoch = 0;
    state.reward_per_target = reward_per_target(params);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::system::NewModel;
    use somatrain_protocol::Address;

    fn model(id: u8, embedding: Vec<f32>, stake: u64) -> Model {
        Model {
            state: ModelState::Active,
            embedding: Some(embedding),
            ..Model::created(NewModel {
                id: ObjectId([id; 32]),
                owner: Address([id; 32]),
                architecture_version: 1,
                epoch: 0,
                commission_rate: 0,
                pool_id: ObjectId([id + 100; 32]),
                stake,
            })
        }
    }

    /// With equal stakes the nearest direction wins; inactive models are never picked.
    #[test]
    fn nearest_models_first_and_only_active_ones() {
        let a = model(1, vec![1.0, 0.0, 0.0], 1000);
        let b = model(2, vec![0.9, 0.1, 0.0], 1000);
        let mut c = model(3, vec![1.0, 0.0, 0.0], 1000);
        c.state = ModelState::Inactive;
        let far = model(4, vec![-1.0, 0.0, 0.0], 1000);
        let ranked: Vec<ObjectId> = rank_models(&[1.0, 0.0, 0.0], [&a, &b, &c, &far].into_iter())
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(ranked, vec![a.id, b.id, far.id]);
    }

    /// Protocol version 5's steps from the reference: 1.05 moves to about 1.10 after an epoch
    /// with too few hits, and to 1.0 after one with too many; no hits at all leaves it.
    #[test]
    fn difficulty_steps_follow_the_z_rule() {
        let params = Params::default();
        let state = |hits| TargetState {
            distance_threshold: 1.05,
            targets_generated_this_epoch: 9,
            hits_this_epoch: hits,
            hits_ema: 0,
            reward_per_target: 0,
        };
        let mut few = state(5);
        advance_epoch(&params, &mut few);
        assert!(
            (few.distance_threshold - 1.10).abs() < 1e-3,
            "{}",
            few.distance_threshold
        );
        assert_eq!(
            (
                few.hits_ema,
                few.hits_this_epoch,
                few.targets_generated_this_epoch
            ),
            (5, 0, 0)
        );
        assert_eq!(few.reward_per_target, 1_370_000_000_000 * 8 / 10 / 86_400);
        let mut many = state(100_000);
        advance_epoch(&params, &mut many);
        assert!(
            (many.distance_threshold - 1.0).abs() < 1e-4,
            "{}",
            many.distance_threshold
        );
        let mut none = state(0);
        advance_epoch(&params, &mut none);
        assert_eq!(none.distance_threshold, 1.05);
    }
}
