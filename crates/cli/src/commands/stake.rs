//! `somatrain stake`, `unstake` and `validators`: delegating SOMA to a validator (or a model)
//! as the official CLI does, and the validators a delegator chooses between.

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::json;
use somatrain_client::view::ValidatorView;
use somatrain_protocol::transaction::{AddStake, AddStakeToModel, WithdrawStake};
use somatrain_protocol::{Address, ObjectId, ObjectType, TransactionKind};

use super::model::{AccountOptions, parse_soma, succeeded};
use super::network::{ChainOptions, soma};

#[derive(Args)]
#[command(group = clap::ArgGroup::new("pool").required(true).args(["validator", "model"]))]
pub struct StakeArgs {
    #[command(flatten)]
    account: AccountOptions,
    /// The validator's address (`somatrain validators` lists them).
    #[arg(long)]
    validator: Option<String>,
    /// A model's id, to stake with its pool instead.
    #[arg(long)]
    model: Option<String>,
    /// SOMA to stake, e.g. 2.5 (default: the richest coin, less the transaction's fees).
    #[arg(long)]
    amount: Option<String>,
}

#[derive(Args)]
pub struct UnstakeArgs {
    #[command(flatten)]
    account: AccountOptions,
    /// The StakedSoma object to withdraw (`somatrain objects --type staked-soma`).
    staked_soma: String,
}

#[derive(Args)]
pub struct ValidatorsArgs {
    #[command(flatten)]
    chain: ChainOptions,
    /// Epochs the yield is measured over.
    #[arg(long, default_value_t = 7)]
    apy_epochs: u64,
    #[arg(long)]
    json: bool,
}

pub fn run_stake(args: StakeArgs) -> Result<()> {
    let amount = args.amount.as_deref().map(parse_soma).transpose()?;
    super::publish::runtime()?.block_on(async {
        let keypair = super::wallet::load_keypair(args.account.keystore.as_deref())?;
        let chain = args.account.chain.client()?;
        let executed = match (&args.validator, &args.model) {
            (Some(text), _) => {
                let validator: Address = text
                    .parse()
                    .map_err(|e| anyhow::anyhow!("--validator {text}: {e}"))?;
                let epoch = chain.epoch_view().await?;
                if !epoch.validators.iter().any(|v| v.address == validator) {
                    bail!(
                        "{validator} is not a validator in epoch {} (`somatrain validators` \
                         lists them)",
                        epoch.epoch
                    );
                }
                chain
                    .sign_and_execute(&keypair, |gas| TransactionKind::AddStake(AddStake {
                        validator,
                        coin_ref: gas[0],
                        amount,
                    }))
                    .await?
            }
            (None, Some(text)) => {
                let model_id: ObjectId = text
                    .parse()
                    .map_err(|e| anyhow::anyhow!("--model {text}: {e}"))?;
                chain
                    .sign_and_execute(&keypair, |gas| TransactionKind::AddStakeToModel(AddStakeToModel {
                        model_id,
                        coin_ref: gas[0],
                        amount,
                    }))
                    .await?
            }
            (None, None) => unreachable!("clap requires one"),
        };
        let executed = succeeded(executed)?;
        let receipt = executed
            .effects
            .changed_objects
            .iter()
            .filter(|c| c.input.is_none() && c.output.is_some())
            .map(|c| c.id)
            .next()
            .context("the stake transaction created no StakedSoma")?;
        let object = chain
            .object(&receipt)
            .await?
            .context("the new StakedSoma is not on the chain")?;
        let staked = object.staked_soma()?;
        println!(
            "staked {} SOMA: StakedSoma {receipt}, earning from epoch {} (transaction {}, fee {} SOMA)",
            soma(staked.principal),
            staked.stake_activation_epoch,
            executed.digest,
            soma(executed.effects.fee.total_fee),
        );
        Ok(())
    })
}

pub fn run_unstake(args: UnstakeArgs) -> Result<()> {
    let id: ObjectId = args
        .staked_soma
        .parse()
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.staked_soma))?;
    super::publish::runtime()?.block_on(async {
        let keypair = super::wallet::load_keypair(args.account.keystore.as_deref())?;
        let chain = args.account.chain.client()?;
        let object = chain
            .object(&id)
            .await?
            .with_context(|| format!("no object {id} on the chain"))?;
        if object.object_type() != ObjectType::StakedSoma {
            bail!(
                "{id} is a {}, not a StakedSoma",
                object.object_type().name()
            );
        }
        let staked = object.staked_soma()?;
        let reference = object.reference()?;
        let executed = succeeded(
            chain
                .sign_and_execute(&keypair, |_| {
                    TransactionKind::WithdrawStake(WithdrawStake {
                        staked_soma: reference,
                    })
                })
                .await?,
        )?;
        // The withdrawn coin is the one object this transaction created.
        let received = executed
            .effects
            .changed_objects
            .iter()
            .filter(|c| c.input.is_none() && c.output.is_some())
            .map(|c| c.id)
            .next();
        let amount = match received {
            Some(coin) => chain
                .object(&coin)
                .await?
                .and_then(|o| o.coin_balance().ok())
                .unwrap_or(0),
            None => 0,
        };
        println!(
            "withdrew StakedSoma {id}: {} SOMA ({} principal, {} rewards) in epoch {} \
             (transaction {}, fee {} SOMA)",
            soma(amount),
            soma(staked.principal),
            soma(amount.saturating_sub(staked.principal)),
            executed.effects.executed_epoch,
            executed.digest,
            soma(executed.effects.fee.total_fee),
        );
        Ok(())
    })
}

fn validator_json(v: &ValidatorView, apy: Option<f64>) -> serde_json::Value {
    json!({
        "address": v.address.to_string(),
        "voting_power": v.voting_power,
        "commission_bps": v.commission_bps,
        "next_commission_bps": v.next_commission_bps,
        "pool_id": v.pool_id.to_string(),
        "stake": v.stake,
        "pending_stake": v.pending_stake,
        "next_epoch_stake": v.next_epoch_stake,
        "apy": apy,
        "exchange_rates": v.exchange_rates.iter().map(|(epoch, soma, tokens)| {
            json!({"epoch": epoch, "soma": soma, "pool_tokens": tokens})
        }).collect::<Vec<_>>(),
    })
}

pub fn run_validators(args: ValidatorsArgs) -> Result<()> {
    super::publish::runtime()?.block_on(async {
        let epoch = args.chain.client()?.epoch_view().await?;
        let duration = epoch.params.epoch_duration_ms;
        if args.json {
            let list: Vec<_> = epoch
                .validators
                .iter()
                .map(|v| validator_json(v, v.apy(args.apy_epochs, duration)))
                .collect();
            println!("{}", json!({"epoch": epoch.epoch, "validators": list}));
            return Ok(());
        }
        if epoch.validators.is_empty() {
            println!("epoch {}: no validators", epoch.epoch);
            return Ok(());
        }
        println!(
            "epoch {}: {} validator(s); APY over the last {} epochs of {} h",
            epoch.epoch,
            epoch.validators.len(),
            args.apy_epochs,
            duration as f64 / 3.6e6
        );
        println!(
            "{:<66} {:>6} {:>11} {:>18} {:>14} {:>10}",
            "address", "power", "commission", "stake (SOMA)", "pending", "APY"
        );
        for v in &epoch.validators {
            let apy = v
                .apy(args.apy_epochs, duration)
                .map_or("-".to_string(), |a| format!("{:.2}%", a * 100.0));
            let commission = if v.next_commission_bps == v.commission_bps {
                format!("{:.2}%", v.commission_bps as f64 / 100.0)
            } else {
                format!(
                    "{:.2}%→{:.2}%",
                    v.commission_bps as f64 / 100.0,
                    v.next_commission_bps as f64 / 100.0
                )
            };
            println!(
                "0x{:<64} {:>6} {:>11} {:>18} {:>14} {:>10}",
                v.address,
                v.voting_power,
                commission,
                soma(v.stake),
                soma(v.pending_stake),
                apy
            );
        }
        Ok(())
    })
}
