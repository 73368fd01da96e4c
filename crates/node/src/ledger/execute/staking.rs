//! Validators and stake: delegating to a validator, withdrawing any `StakedSoma` (a
//! validator's pool or a model's), a validator's commission and its reports of other validators.

use super::*;
use somatrain_protocol::transaction::{
    AddStake, ReportValidator, SetCommissionRate, UndoReportValidator, WithdrawStake,
};

pub(super) fn run(cx: &mut Context<'_>, kind: &TransactionKind) -> Rule<()> {
    let params = cx.o.system().params.clone();
    let epoch = cx.epoch();
    let half_rate = params.value_fee_bps / 2;
    match kind {
        TransactionKind::AddStake(AddStake {
            validator: address,
            coin_ref,
            amount,
        }) => {
            if cx.o.system().validator(address).is_none() {
                return fail(
                    Kind::ValidatorNotFound,
                    format!("{address} is not a validator"),
                );
            }
            let stake = cx.take_stake(coin_ref.id, *amount)?;
            let receipt =
                cx.o.system_mut()
                    .validator_mut(address)
                    .expect("checked above")
                    .request_add_stake(stake, epoch);
            cx.staked_soma(
                receipt.pool_id,
                receipt.stake_activation_epoch,
                receipt.principal,
            );
        }
        TransactionKind::WithdrawStake(WithdrawStake { staked_soma }) => {
            let receipt =
                cx.o.object(&staked_soma.id)
                    .expect("checked input")
                    .staked_soma()
                    .map_err(|e| ExecutionFailure {
                        kind: Kind::InvalidObjectType,
                        description: e.to_string(),
                        object_id: Some(staked_soma.id),
                    })?;
            // The network's value fee is on the principal, whatever the stake is worth now.
            cx.value_fee += bps(receipt.principal, half_rate);
            if let Some(validator) =
                cx.o.system_mut()
                    .validators
                    .iter_mut()
                    .find(|v| v.pool.id == receipt.pool_id)
            {
                let amount = validator.request_withdraw_stake(&receipt, epoch);
                cx.o.delete(staked_soma.id);
                let sender = cx.sender;
                cx.new_coin(sender, amount);
                return Ok(());
            }
            let Some(mut model) =
                cx.o.system()
                    .models
                    .values()
                    .find(|m| m.staking_pool.id == receipt.pool_id)
                    .cloned()
            else {
                return fail(Kind::StakingPoolNotFound, "no pool for this stake");
            };
            let value = model.staking_pool.redeem_value(receipt.principal);
            model.staking_pool.soma_balance -= value;
            model.staking_pool.pool_token_balance -= receipt.principal;
            cx.o.put_model(model);
            cx.o.delete(staked_soma.id);
            let sender = cx.sender;
            cx.new_coin(sender, value);
        }
        TransactionKind::SetCommissionRate(SetCommissionRate { new_rate }) => {
            let sender = cx.sender;
            let Some(validator) = cx.o.system_mut().validator_mut(&sender) else {
                return fail(Kind::NotAValidator, "only a validator sets its commission");
            };
            if *new_rate > BPS_DENOMINATOR {
                return fail(
                    Kind::InvalidArguments,
                    format!("commission {new_rate} bps exceeds 10000"),
                );
            }
            validator.next_epoch_commission_rate = *new_rate;
        }
        TransactionKind::ReportValidator(ReportValidator { reportee }) => {
            cx.validator_sender()?;
            if cx.o.system().validator(reportee).is_none() {
                return fail(
                    Kind::NotAValidator,
                    format!("{reportee} is not a validator"),
                );
            }
            if *reportee == cx.sender {
                return fail(
                    Kind::CannotReportOneself,
                    "a validator cannot report itself",
                );
            }
            let sender = cx.sender;
            let system = cx.o.system_mut();
            system
                .validator_reports
                .entry(*reportee)
                .or_default()
                .insert(sender);
        }
        TransactionKind::UndoReportValidator(UndoReportValidator { reportee }) => {
            cx.validator_sender()?;
            let sender = cx.sender;
            let system = cx.o.system_mut();
            let removed = system
                .validator_reports
                .get_mut(reportee)
                .is_some_and(|reporters| reporters.remove(&sender));
            if !removed {
                return fail(
                    Kind::ReportRecordNotFound,
                    "this validator has not reported that validator",
                );
            }
            system
                .validator_reports
                .retain(|_, reporters| !reporters.is_empty());
        }
        _ => unreachable!("{} is dispatched to another family", kind.name()),
    }
    Ok(())
}
