//! Models: create, commit, reveal, stake, commission, deactivation, and validators' reports
//! of a model.

use super::*;
use somatrain_protocol::transaction::{
    AddStakeToModel, CommitModel, CreateModel, DeactivateModel, ReportModel, RevealModel,
    SetModelCommissionRate, UndoReportModel,
};

pub(super) fn run(cx: &mut Context<'_>, kind: &TransactionKind) -> Rule<()> {
    let params = cx.o.system().params.clone();
    let epoch = cx.epoch();
    let half_rate = params.value_fee_bps / 2;
    match kind {
        TransactionKind::CreateModel(CreateModel {
            stake_amount,
            commission_rate,
            architecture_version,
        }) => {
            if *architecture_version != params.model_architecture_version {
                return fail(
                    Kind::ModelArchitectureVersionMismatch,
                    format!(
                        "architecture {architecture_version}; the network runs {}",
                        params.model_architecture_version
                    ),
                );
            }
            if *stake_amount < params.model_min_stake {
                return fail(
                    Kind::ModelMinStakeNotMet,
                    format!("stake {stake_amount} is below {}", params.model_min_stake),
                );
            }
            if *commission_rate > BPS_DENOMINATOR {
                return fail(
                    Kind::ModelCommissionRateTooHigh,
                    format!("commission {commission_rate} bps exceeds 10000"),
                );
            }
            let value_fee = bps(*stake_amount, half_rate);
            let needed = stake_amount
                .saturating_add(value_fee)
                .saturating_add(params.write_object_fee * 3);
            let balance = cx.coin_balance(&cx.gas);
            if balance < needed {
                return fail_on(
                    Kind::InsufficientCoinBalance,
                    cx.gas,
                    format!("gas coin holds {balance}; stake and fees need {needed}"),
                );
            }
            let gas = cx.gas;
            cx.set_coin(gas, balance - stake_amount);
            let model_id = cx.fresh_id();
            let pool_id = cx.fresh_id();
            cx.o.put_model(Model::created(NewModel {
                id: model_id,
                owner: cx.sender,
                architecture_version: *architecture_version,
                epoch,
                commission_rate: *commission_rate,
                pool_id,
                stake: *stake_amount,
            }));
            cx.staked_soma(pool_id, epoch + 1, *stake_amount);
            cx.value_fee += value_fee;
        }
        TransactionKind::CommitModel(CommitModel {
            model_id,
            manifest,
            weights_commitment,
            embedding_commitment,
            decryption_key_commitment,
        }) => {
            let mut model = cx.owned_model(model_id)?;
            let pending = PendingCommit {
                manifest: manifest.clone(),
                weights_commitment: *weights_commitment,
                embedding_commitment: *embedding_commitment,
                decryption_key_commitment: *decryption_key_commitment,
                commit_epoch: epoch,
            };
            match model.state {
                ModelState::Created if !model.commit_window_missed => {
                    model.state = ModelState::Pending;
                    model.pending = Some(pending);
                }
                // An update; a later commit in the same window replaces an earlier one.
                ModelState::Active => model.pending = Some(pending),
                ModelState::Created => {
                    return fail_on(
                        Kind::ModelNotActive,
                        *model_id,
                        "the model missed its commit window",
                    );
                }
                other => {
                    return fail_on(
                        Kind::ModelNotActive,
                        *model_id,
                        format!("a {} model cannot commit", other.name()),
                    );
                }
            }
            cx.o.put_model(model);
        }
        TransactionKind::RevealModel(RevealModel {
            model_id,
            decryption_key,
            embedding,
        }) => {
            let mut model = cx.owned_model(model_id)?;
            let Some(pending) = model.pending.clone() else {
                return match model.state {
                    ModelState::Active => {
                        fail_on(Kind::ModelNoPendingUpdate, *model_id, "no update to reveal")
                    }
                    other => fail_on(
                        Kind::ModelNotPending,
                        *model_id,
                        format!("a {} model has nothing to reveal", other.name()),
                    ),
                };
            };
            if epoch != pending.commit_epoch + 1 {
                return fail_on(
                    Kind::ModelRevealEpochMismatch,
                    *model_id,
                    format!(
                        "a commit of epoch {} is revealed in epoch {}, not {epoch}",
                        pending.commit_epoch,
                        pending.commit_epoch + 1
                    ),
                );
            }
            let key = EncryptionKey::from_bytes(decryption_key.0);
            if key.commitment() != pending.decryption_key_commitment {
                return fail_on(
                    Kind::ModelDecryptionKeyCommitmentMismatch,
                    *model_id,
                    "the key does not match its commitment",
                );
            }
            let values = embedding.vector_values().map_err(|e| ExecutionFailure {
                kind: Kind::InvalidArguments,
                description: e.to_string(),
                object_id: None,
            })?;
            if values.len() as u64 != params.embedding_dim {
                return fail(
                    Kind::EmbeddingDimensionMismatch,
                    format!(
                        "embedding has {} values; the network's dimension is {}",
                        values.len(),
                        params.embedding_dim
                    ),
                );
            }
            if values.iter().any(|v| !v.is_finite()) {
                return fail(Kind::InvalidArguments, "embedding holds a non-finite value");
            }
            if embedding_commitment(&values) != pending.embedding_commitment {
                return fail_on(
                    Kind::ModelEmbeddingCommitmentMismatch,
                    *model_id,
                    "the embedding does not match its commitment",
                );
            }
            model.manifest = Some(pending.manifest);
            model.weights_commitment = Some(pending.weights_commitment);
            model.embedding_commitment = Some(pending.embedding_commitment);
            model.decryption_key_commitment = Some(pending.decryption_key_commitment);
            model.decryption_key = Some(*decryption_key);
            model.embedding = Some(values);
            model.pending = None;
            if model.state == ModelState::Pending {
                model.state = ModelState::Active;
            }
            cx.o.put_model(model);
            // The validators check these weights before the epoch closes.
            let revealed = &mut cx.o.system_mut().revealed_this_epoch;
            if !revealed.contains(model_id) {
                revealed.push(*model_id);
            }
        }
        TransactionKind::AddStakeToModel(AddStakeToModel {
            model_id,
            coin_ref,
            amount,
        }) => {
            let mut model =
                cx.o.model(model_id)
                    .cloned()
                    .ok_or_else(|| model_not_found(model_id))?;
            if model.state == ModelState::Inactive {
                return fail_on(
                    Kind::ModelAlreadyInactive,
                    *model_id,
                    "the model is inactive",
                );
            }
            let staked = cx.take_stake(coin_ref.id, *amount)?;
            let pool = &mut model.staking_pool;
            let tokens = if pool.soma_balance == 0 || pool.pool_token_balance == 0 {
                staked
            } else {
                ((staked as u128 * pool.pool_token_balance as u128) / pool.soma_balance as u128)
                    as u64
            };
            pool.soma_balance += staked;
            pool.pool_token_balance += tokens;
            let pool_id = pool.id;
            cx.o.put_model(model);
            cx.staked_soma(pool_id, epoch + 1, tokens);
        }
        TransactionKind::SetModelCommissionRate(SetModelCommissionRate { model_id, new_rate }) => {
            let mut model = cx.owned_model(model_id)?;
            if model.state != ModelState::Active {
                return fail_on(Kind::ModelNotActive, *model_id, "the model is not active");
            }
            if *new_rate > BPS_DENOMINATOR {
                return fail(
                    Kind::ModelCommissionRateTooHigh,
                    format!("commission {new_rate} bps exceeds 10000"),
                );
            }
            model.next_epoch_commission_rate = *new_rate;
            cx.o.put_model(model);
        }
        TransactionKind::DeactivateModel(DeactivateModel { model_id }) => {
            let mut model = cx.owned_model(model_id)?;
            match model.state {
                ModelState::Active => {}
                ModelState::Inactive => {
                    return fail_on(Kind::ModelAlreadyInactive, *model_id, "already inactive");
                }
                other => {
                    return fail_on(
                        Kind::ModelNotActive,
                        *model_id,
                        format!("a {} model cannot be deactivated", other.name()),
                    );
                }
            }
            model.state = ModelState::Inactive;
            model.staking_pool.deactivation_epoch = Some(epoch);
            model.pending = None;
            cx.o.put_model(model);
            cx.o.system_mut().model_reports.remove(model_id);
        }
        TransactionKind::ReportModel(ReportModel { model_id }) => {
            cx.validator_sender()?;
            let model =
                cx.o.model(model_id)
                    .ok_or_else(|| model_not_found(model_id))?;
            if model.state != ModelState::Active {
                return fail_on(Kind::ModelNotActive, *model_id, "the model is not active");
            }
            let sender = cx.sender;
            let system = cx.o.system_mut();
            system
                .model_reports
                .entry(*model_id)
                .or_default()
                .insert(sender);
        }
        TransactionKind::UndoReportModel(UndoReportModel { model_id }) => {
            cx.validator_sender()?;
            let sender = cx.sender;
            let system = cx.o.system_mut();
            let removed = system
                .model_reports
                .get_mut(model_id)
                .is_some_and(|reporters| reporters.remove(&sender));
            if !removed {
                return fail_on(
                    Kind::ReportRecordNotFound,
                    *model_id,
                    "this validator has not reported the model",
                );
            }
            system
                .model_reports
                .retain(|_, reporters| !reporters.is_empty());
        }
        _ => unreachable!("{} is dispatched to another family", kind.name()),
    }
    Ok(())
}
