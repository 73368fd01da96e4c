//! Targets and submissions: submitting data that hits a target, and claiming its reward.

use super::*;
use somatrain_protocol::transaction::{
    ClaimRewards, ReportSubmission, SubmitData, UndoReportSubmission,
};

pub(super) fn run(cx: &mut Context<'_>, kind: &TransactionKind) -> Rule<()> {
    match kind {
        TransactionKind::SubmitData(SubmitData {
            target_id,
            data_manifest,
            model_id,
            embedding,
            distance_score,
            loss_score,
            bond_coin,
        }) => submit_data(
            cx,
            *target_id,
            data_manifest,
            *model_id,
            embedding,
            distance_score,
            loss_score,
            bond_coin.id,
        )?,
        TransactionKind::ClaimRewards(ClaimRewards { target_id }) => claim_rewards(cx, *target_id)?,
        TransactionKind::ReportSubmission(ReportSubmission { target_id }) => {
            report_submission(cx, *target_id, Report::Add)?
        }
        TransactionKind::UndoReportSubmission(UndoReportSubmission { target_id }) => {
            report_submission(cx, *target_id, Report::Undo)?
        }
        _ => unreachable!("{} is dispatched to another family", kind.name()),
    }
    Ok(())
}

fn target_object(
    cx: &Context<'_>,
    id: ObjectId,
) -> Rule<(Object, somatrain_protocol::object::Target)> {
    let object =
        cx.o.object(&id)
            .filter(|o| o.object_type() == ObjectType::Target)
            .ok_or(ExecutionFailure {
                kind: Kind::TargetNotFound,
                description: format!("no target {id}"),
                object_id: Some(id),
            })?;
    let target = object.target().map_err(|e| ExecutionFailure {
        kind: Kind::TargetNotFound,
        description: e.to_string(),
        object_id: Some(id),
    })?;
    Ok((object, target))
}

/// Writes `target` back as `object`'s new contents (execution ends by giving every written
/// object the lamport version).
fn write_target(
    cx: &mut Context<'_>,
    object: &Object,
    target: &somatrain_protocol::object::Target,
) {
    let id = object.id().expect("a stored target has an id");
    cx.o.write(Object::new(
        ObjectType::Target,
        id,
        object.version(),
        target,
        object.owner,
        object.previous_transaction,
    ));
}

#[allow(clippy::too_many_arguments)]
fn submit_data(
    cx: &mut Context<'_>,
    target_id: ObjectId,
    manifest: &somatrain_protocol::Manifest,
    model_id: ObjectId,
    embedding: &somatrain_protocol::SomaTensor,
    distance: &somatrain_protocol::SomaTensor,
    loss: &somatrain_protocol::SomaTensor,
    bond_coin: ObjectId,
) -> Rule<()> {
    let params = cx.o.system().params.clone();
    let epoch = cx.epoch();
    let (object, mut target) = target_object(cx, target_id)?;
    if target.status != TargetStatus::Open {
        return fail_on(
            Kind::TargetNotOpen,
            target_id,
            "the target is already filled",
        );
    }
    if epoch > target.generation_epoch {
        return fail_on(
            Kind::TargetExpired,
            target_id,
            format!(
                "a target of epoch {} expired (now epoch {epoch})",
                target.generation_epoch
            ),
        );
    }
    if !target.model_ids.contains(&model_id) {
        return fail_on(
            Kind::ModelNotInTarget,
            model_id,
            "the model is not assigned to this target",
        );
    }
    let invalid = |e: somatrain_protocol::tensor::TensorError| ExecutionFailure {
        kind: Kind::InvalidArguments,
        description: e.to_string(),
        object_id: None,
    };
    let values = embedding.vector_values().map_err(invalid)?;
    let target_dim = target.embedding.shape().first().copied().unwrap_or(0);
    if values.len() as u64 != target_dim {
        return fail(
            Kind::EmbeddingDimensionMismatch,
            format!(
                "embedding has {} values; the target has {target_dim}",
                values.len()
            ),
        );
    }
    if values.iter().any(|v| !v.is_finite()) {
        return fail(Kind::InvalidArguments, "embedding holds a non-finite value");
    }
    let distance_value = distance.scalar_value().map_err(invalid)?;
    loss.values().map_err(invalid)?;
    let threshold = target.distance_threshold.scalar_value().unwrap_or(0.0);
    if !(distance_value.is_finite() && distance_value <= threshold) {
        return fail_on(
            Kind::DistanceExceedsThreshold,
            target_id,
            format!("distance {distance_value} exceeds the threshold {threshold}"),
        );
    }
    if manifest.size > params.max_submission_bytes {
        return fail(
            Kind::DataExceedsMaxSize,
            format!(
                "data of {} bytes exceeds the {}-byte limit",
                manifest.size, params.max_submission_bytes
            ),
        );
    }
    let model =
        cx.o.model(&model_id)
            .cloned()
            .ok_or_else(|| model_not_found(&model_id))?;
    if model.state != ModelState::Active {
        return fail_on(Kind::ModelNotActive, model_id, "the model is not active");
    }
    let bond = manifest
        .size
        .saturating_mul(params.submission_bond_per_byte);
    cx.debit(bond_coin, Some(bond), Kind::InsufficientBond)?;
    target.status = TargetStatus::Filled { fill_epoch: epoch };
    target.submitter = Some(cx.sender);
    target.winning_model_id = Some(model_id);
    target.winning_model_owner = Some(model.owner);
    target.bond_amount = bond;
    target.winning_data_manifest = Some(manifest.clone());
    target.winning_embedding = Some(embedding.clone());
    target.winning_distance_score = Some(distance.clone());
    target.winning_loss_score = Some(loss.clone());
    write_target(cx, &object, &target);
    cx.o.system_mut().target_state.hits_this_epoch += 1;
    let n = cx.next_id;
    cx.next_id += 1;
    let digest = cx.digest;
    crate::ledger::epoch::spawn_target(&mut cx.o, &digest, n);
    Ok(())
}

fn claim_rewards(cx: &mut Context<'_>, target_id: ObjectId) -> Rule<()> {
    let params = cx.o.system().params.clone();
    let epoch = cx.epoch();
    let (_, target) = target_object(cx, target_id)?;
    let reward = target.reward_pool;
    let claimer_share = bps(reward, params.claimer_share_bps);
    let sender = cx.sender;
    match target.status {
        TargetStatus::Filled { fill_epoch } => {
            if epoch <= fill_epoch + 1 {
                return fail_on(
                    Kind::ChallengeWindowOpen,
                    target_id,
                    format!(
                        "filled in epoch {fill_epoch}: claimable from epoch {}",
                        fill_epoch + 2
                    ),
                );
            }
            let reporters: BTreeSet<Address> = target.submission_reports.iter().copied().collect();
            let validators = &cx.o.system().validators;
            if crate::ledger::validators::voting_power_of(validators, &reporters)
                >= crate::ledger::validators::QUORUM_THRESHOLD
            {
                // Reported by a quorum: the bond goes to the reporters that are validators,
                // evenly, the first by address taking the remainder; the reward goes back to
                // the emission pool. The network mints the claimer's share on top of the
                // returned reward; here it comes out of the reward, so supply is conserved.
                let paid: Vec<Address> = reporters
                    .iter()
                    .filter(|a| validators.iter().any(|v| v.address == **a))
                    .copied()
                    .collect();
                let each = target.bond_amount / paid.len() as u64;
                let remainder = target.bond_amount % paid.len() as u64;
                for (i, reporter) in paid.into_iter().enumerate() {
                    let amount = if i == 0 { each + remainder } else { each };
                    if amount > 0 {
                        cx.new_coin(reporter, amount);
                    }
                }
                cx.o.system_mut().emission_pool += reward - claimer_share;
                cx.new_coin(sender, claimer_share);
            } else {
                let model_share = bps(reward, params.model_share_bps);
                let submitter_share = reward - model_share - claimer_share;
                let submitter = target.submitter.expect("filled targets have a submitter");
                let owner = target
                    .winning_model_owner
                    .expect("filled targets have a model owner");
                cx.new_coin(submitter, submitter_share + target.bond_amount);
                cx.new_coin(owner, model_share);
                cx.new_coin(sender, claimer_share);
            }
        }
        TargetStatus::Open => {
            if epoch <= target.generation_epoch {
                return fail_on(
                    Kind::TargetNotFilled,
                    target_id,
                    format!(
                        "the target is open until the end of epoch {}",
                        target.generation_epoch
                    ),
                );
            }
            cx.new_coin(sender, claimer_share);
            cx.o.system_mut().emission_pool += reward - claimer_share;
        }
        TargetStatus::Claimed => {
            return fail_on(Kind::TargetAlreadyClaimed, target_id, "already claimed");
        }
    }
    cx.o.delete(target_id);
    cx.value_fee += bps(reward, params.value_fee_bps / 2);
    Ok(())
}

enum Report {
    Add,
    Undo,
}

/// A validator's report of a filled target's submission, or its withdrawal: only in the audit
/// window, the epoch after the fill. The reports are the target's sorted set.
fn report_submission(cx: &mut Context<'_>, target_id: ObjectId, report: Report) -> Rule<()> {
    cx.validator_sender()?;
    let epoch = cx.epoch();
    let (object, mut target) = target_object(cx, target_id)?;
    let fill_epoch = match target.status {
        TargetStatus::Filled { fill_epoch } => fill_epoch,
        TargetStatus::Open => {
            return fail_on(Kind::TargetNotFilled, target_id, "the target is not filled");
        }
        TargetStatus::Claimed => {
            return fail_on(Kind::TargetAlreadyClaimed, target_id, "already claimed");
        }
    };
    if epoch != fill_epoch + 1 {
        return fail_on(
            Kind::ChallengeWindowClosed,
            target_id,
            format!(
                "filled in epoch {fill_epoch}: reports are taken in epoch {} only",
                fill_epoch + 1
            ),
        );
    }
    let sender = cx.sender;
    let position = target.submission_reports.binary_search(&sender);
    match (report, position) {
        (Report::Add, Ok(_)) => {}
        (Report::Add, Err(at)) => target.submission_reports.insert(at, sender),
        (Report::Undo, Ok(at)) => {
            target.submission_reports.remove(at);
        }
        (Report::Undo, Err(_)) => {
            return fail_on(
                Kind::ReportRecordNotFound,
                target_id,
                "this validator has not reported the submission",
            );
        }
    }
    write_target(cx, &object, &target);
    Ok(())
}
