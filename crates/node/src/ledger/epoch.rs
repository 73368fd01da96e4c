//! The epoch change: the epoch's rewards go to the validators, reveal and commit windows close
//! (missed ones slashed, models reported by a quorum slashed), commissions rotate, the
//! difficulty steps, and new targets are generated as shared objects.

use somatrain_protocol::{Object, ObjectId, ObjectType, Owner, TxDigest};

use super::system::{ModelState, bps};
use super::{Changes, Ledger, Model, Overlay, targets, validators};

/// Targets are shared objects whose initial shared version is 1.
pub const TARGET_INITIAL_VERSION: u64 = 1;

/// Takes `rate_bps` of a model's pool and burns it; every staker shares the loss.
fn slash(o: &mut Overlay<'_>, model: &mut Model, rate_bps: u64) {
    let cut = bps(model.staking_pool.soma_balance, rate_bps);
    model.staking_pool.soma_balance -= cut;
    o.system_mut().burned += cut;
}

/// Creates one target derived from `(digest, n)` if a model is active and the emission pool and
/// this epoch's budget allow it; returns its id.
pub fn spawn_target(o: &mut Overlay<'_>, digest: &TxDigest, n: u64) -> Option<ObjectId> {
    let system = o.system();
    if !targets::can_fund(&system.params, &system.target_state, system.emission_pool) {
        return None;
    }
    let target = targets::generate(
        targets::target_seed(digest, n),
        system.models.values(),
        &system.params,
        &system.target_state,
        system.epoch,
    )?;
    let id = ObjectId::derive(digest, n);
    let reward = target.reward_pool;
    o.write(Object::new(
        ObjectType::Target,
        id,
        TARGET_INITIAL_VERSION,
        &target,
        Owner::Shared {
            initial_shared_version: TARGET_INITIAL_VERSION,
        },
        *digest,
    ));
    let system = o.system_mut();
    system.emission_pool -= reward;
    system.target_state.targets_generated_this_epoch += 1;
    Some(id)
}

/// The id of the `StakedSoma` that pays validator `index` its commission at the change into
/// `new_epoch`.
fn commission_receipt_id(new_epoch: u64, index: u64) -> ObjectId {
    ObjectId::derive(&targets::epoch_digest(new_epoch), u64::MAX - index)
}

/// Closes the current epoch at `now_ms`, in the network's order: rewards (this epoch's fees,
/// plus one epoch of emission when the epoch ran its full length; the validators' allocation
/// of it paid out, the rest back to the emission pool), the difficulty step, the validators
/// (rewards, commissions, pools, voting power), the models' windows, then new targets.
pub fn advance_epoch(ledger: &Ledger, now_ms: u64) -> Changes {
    let mut o = Overlay::new(ledger);
    let prev_epoch = o.system().epoch;
    let new_epoch = prev_epoch + 1;

    let system = o.system_mut();
    let mut rewards = std::mem::take(&mut system.fees_collected);
    if now_ms >= system.epoch_start_ms + system.params.epoch_duration_ms {
        let emission = system.params.emission_per_epoch.min(system.emission_pool);
        system.emission_pool -= emission;
        rewards += emission;
    }
    let allocation = bps(rewards, system.params.validator_reward_allocation_bps);
    system.emission_pool += rewards - allocation;
    system.epoch = new_epoch;
    system.epoch_start_ms = now_ms;
    let params = system.params.clone();
    targets::advance_epoch(&params, &mut system.target_state);
    let validator_reports = std::mem::take(&mut system.validator_reports);
    let paid = validators::advance_epoch(
        &mut system.validators,
        &validator_reports,
        allocation,
        new_epoch,
    );
    system.emission_pool += allocation - paid.distributed;
    for (index, (validator, receipt)) in paid.commissions.into_iter().enumerate() {
        let id = commission_receipt_id(new_epoch, index as u64);
        o.write(Object::new(
            ObjectType::StakedSoma,
            id,
            0,
            &receipt,
            Owner::AddressOwner(validator),
            targets::epoch_digest(new_epoch),
        ));
    }

    let system = o.system_mut();
    system.revealed_this_epoch.clear();
    let model_reports = std::mem::take(&mut system.model_reports);
    let reported: Vec<ObjectId> = model_reports
        .iter()
        .filter(|(_, reporters)| {
            validators::voting_power_of(&system.validators, reporters)
                >= validators::QUORUM_THRESHOLD
        })
        .map(|(id, _)| *id)
        .collect();
    let slash_bps = params.model_reveal_slash_rate_bps;
    let ids: Vec<ObjectId> = o.system().models.keys().copied().collect();
    for id in ids {
        let mut model = o.model(&id).expect("listed model exists").clone();
        let before = model.clone();
        if model.state == ModelState::Active && reported.contains(&id) {
            // A quorum of validators found its weights unusable.
            slash(&mut o, &mut model, params.model_tally_slash_rate_bps);
            model.state = ModelState::Inactive;
            model.staking_pool.deactivation_epoch = Some(new_epoch);
            model.pending = None;
            tracing::warn!(
                "model {id} was reported by a quorum of validators: {} bps of its stake slashed",
                params.model_tally_slash_rate_bps
            );
        }
        match model.state {
            // Created and never committed within its window: slashed once, and it can no
            // longer commit.
            ModelState::Created
                if model.create_epoch + 1 < new_epoch && !model.commit_window_missed =>
            {
                slash(&mut o, &mut model, slash_bps);
                model.commit_window_missed = true;
            }
            // Committed but not revealed in commit_epoch + 1: slashed, and inactive.
            ModelState::Pending
                if model
                    .pending
                    .as_ref()
                    .is_some_and(|p| p.commit_epoch < prev_epoch) =>
            {
                slash(&mut o, &mut model, slash_bps);
                model.state = ModelState::Inactive;
                model.staking_pool.deactivation_epoch = Some(new_epoch);
                model.pending = None;
            }
            ModelState::Active => {
                // A missed update reveal only drops the update.
                if model
                    .pending
                    .as_ref()
                    .is_some_and(|p| p.commit_epoch < prev_epoch)
                {
                    model.pending = None;
                }
                model.commission_rate = model.next_epoch_commission_rate;
            }
            _ => {}
        }
        if model != before {
            o.put_model(model);
        }
    }
    let digest = targets::epoch_digest(new_epoch);
    for n in 0..params.initial_targets_per_epoch {
        if spawn_target(&mut o, &digest, n).is_none() {
            break;
        }
    }
    o.changes
}
