//! `somatrain model show|stake|unstake|commission|deactivate` and `somatrain transfer`: managing
//! a model and an account after `commit` created them. Every write is one signed transaction;
//! the node's refusal (with its stable code) is the error.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use somatrain_client::Client;
use somatrain_protocol::chain::Model;
use somatrain_protocol::tx::{SHANNONS_PER_SOMA, TxKind};
use somatrain_protocol::{Address, ObjectId};

use super::net::soma;

#[derive(Args, Clone)]
pub struct AccountOptions {
    /// The node's URL.
    #[arg(long, env = "SOMATRAIN_NODE", default_value = "http://127.0.0.1:9000")]
    node: String,
    /// Keystore file (default: $HOME/.somatrain/keystore.json; SOMA_SECRET_KEY wins).
    #[arg(long, env = "SOMATRAIN_KEYSTORE")]
    keystore: Option<PathBuf>,
}

/// Which model: an id, or the one a run directory's journal created.
#[derive(Args, Clone)]
pub struct ModelChoice {
    /// The model's id.
    #[arg(long, conflicts_with = "run_dir")]
    model: Option<String>,
    /// A run directory whose journal names the model (`commit` or `run` created it).
    #[arg(long)]
    run_dir: Option<PathBuf>,
}

impl ModelChoice {
    fn id(&self) -> Result<ObjectId> {
        if let Some(text) = &self.model {
            return text
                .parse()
                .map_err(|e| anyhow::anyhow!("--model {text}: {e}"));
        }
        let Some(dir) = &self.run_dir else {
            bail!("name the model with --model ID or --run-dir RUN");
        };
        let journal = somatrain_daemon::Journal::load(&somatrain_daemon::Journal::path_in(dir))?;
        journal
            .model_id
            .with_context(|| format!("{} has not created a model yet", dir.display()))
    }
}

#[derive(Subcommand)]
pub enum ModelCommand {
    /// A model's status, stake, stakers, commission and pending commit.
    Show {
        #[command(flatten)]
        which: ModelChoice,
        #[arg(long, env = "SOMATRAIN_NODE", default_value = "http://127.0.0.1:9000")]
        node: String,
        #[arg(long)]
        json: bool,
    },
    /// Add stake to a model's pool (any account may; more stake, more routing priority).
    Stake {
        #[command(flatten)]
        which: ModelChoice,
        #[command(flatten)]
        account: AccountOptions,
        /// SOMA to stake, e.g. 2.5.
        #[arg(long)]
        amount: String,
    },
    /// Withdraw this account's stake from a model's pool.
    Unstake {
        #[command(flatten)]
        which: ModelChoice,
        #[command(flatten)]
        account: AccountOptions,
        /// SOMA to withdraw, or `all`.
        #[arg(long)]
        amount: String,
    },
    /// Set the model's commission (basis points of stakers' rewards), effective next epoch.
    Commission {
        #[command(flatten)]
        which: ModelChoice,
        #[command(flatten)]
        account: AccountOptions,
        #[arg(long)]
        bps: u64,
    },
    /// Take the model out of competition for good.
    Deactivate {
        #[command(flatten)]
        which: ModelChoice,
        #[command(flatten)]
        account: AccountOptions,
        /// Required: deactivation cannot be undone.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Args)]
pub struct TransferArgs {
    #[command(flatten)]
    account: AccountOptions,
    /// The recipient's address.
    #[arg(long)]
    to: String,
    /// SOMA to send, e.g. 0.25.
    #[arg(long)]
    amount: String,
}

/// An exact SOMA amount in shannons: digits with at most nine decimals, no rounding.
pub fn parse_soma(text: &str) -> Result<u64> {
    let invalid =
        || anyhow::anyhow!("'{text}' is not an amount of SOMA (e.g. 1, 2.5, 0.000000001)");
    let (whole, fraction) = text.trim().split_once('.').unwrap_or((text.trim(), ""));
    if whole.is_empty() && fraction.is_empty()
        || !whole.bytes().all(|b| b.is_ascii_digit())
        || !fraction.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(invalid());
    }
    if fraction.len() > 9 {
        bail!("'{text}' has more than 9 decimals (1 shannon = 0.000000001 SOMA)");
    }
    let whole: u64 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| invalid())?
    };
    let fraction: u64 = format!("{fraction:0<9}").parse().map_err(|_| invalid())?;
    let shannons = whole
        .checked_mul(SHANNONS_PER_SOMA)
        .and_then(|w| w.checked_add(fraction))
        .ok_or_else(invalid)?;
    if shannons == 0 {
        bail!("the amount must be positive");
    }
    Ok(shannons)
}

fn signer(account: &AccountOptions) -> Result<(Client, somatrain_protocol::Keypair)> {
    let keypair = super::wallet::load_keypair(account.keystore.as_deref())?;
    Ok((Client::new(&account.node), keypair))
}

fn print_model(m: &Model) {
    println!("model {}", m.id);
    println!("  owner {}", m.owner);
    println!(
        "  status {:?} (created epoch {}{}{})",
        m.status,
        m.create_epoch,
        m.activation_epoch
            .map_or(String::new(), |e| format!(", active from epoch {e}")),
        m.deactivation_epoch
            .map_or(String::new(), |e| format!(", deactivated in epoch {e}"))
    );
    println!("  stake {} SOMA", soma(m.stake));
    for (staker, amount) in &m.stakes {
        println!("    {staker}: {} SOMA", soma(*amount));
    }
    if m.next_commission_bps != m.commission_bps {
        println!(
            "  commission {} bps ({} bps from next epoch)",
            m.commission_bps, m.next_commission_bps
        );
    } else {
        println!("  commission {} bps", m.commission_bps);
    }
    if let Some(manifest) = &m.manifest {
        println!("  weights {} ({} bytes)", manifest.url, manifest.size);
    }
    if let Some(p) = &m.pending {
        println!(
            "  pending commit of epoch {}: reveal in epoch {}",
            p.commit_epoch,
            p.commit_epoch + 1
        );
    }
    if m.slashed > 0 {
        println!("  slashed {} SOMA", soma(m.slashed));
    }
}

pub fn run_model(command: ModelCommand) -> Result<()> {
    super::publish::runtime()?.block_on(async {
        let (account, which, kind) = match command {
            ModelCommand::Show { which, node, json } => {
                let model = Client::new(&node).model(&which.id()?).await?;
                if json {
                    println!("{}", serde_json::to_string(&model)?);
                } else {
                    print_model(&model);
                }
                return Ok(());
            }
            ModelCommand::Stake {
                which,
                account,
                amount,
            } => {
                let model_id = which.id()?;
                let amount = parse_soma(&amount)?;
                (account, model_id, TxKind::AddStake { model_id, amount })
            }
            ModelCommand::Unstake {
                which,
                account,
                amount,
            } => {
                let model_id = which.id()?;
                let amount = if amount == "all" {
                    let (client, keypair) = signer(&account)?;
                    let model = client.model(&model_id).await?;
                    let staked = model.stakes.get(&keypair.address()).copied().unwrap_or(0);
                    if staked == 0 {
                        bail!("{} has no stake in model {model_id}", keypair.address());
                    }
                    staked
                } else {
                    parse_soma(&amount)?
                };
                (
                    account,
                    model_id,
                    TxKind::WithdrawStake { model_id, amount },
                )
            }
            ModelCommand::Commission {
                which,
                account,
                bps,
            } => {
                if bps > 10_000 {
                    bail!("--bps {bps} is above 10000 (100%)");
                }
                let model_id = which.id()?;
                (
                    account,
                    model_id,
                    TxKind::SetCommission {
                        model_id,
                        commission_bps: bps,
                    },
                )
            }
            ModelCommand::Deactivate {
                which,
                account,
                yes,
            } => {
                if !yes {
                    bail!("deactivating a model cannot be undone; pass --yes to do it");
                }
                let model_id = which.id()?;
                (account, model_id, TxKind::DeactivateModel { model_id })
            }
        };
        let (client, keypair) = signer(&account)?;
        let record = client.send(&keypair, kind).await?;
        println!(
            "done in epoch {} (transaction {})",
            record.epoch, record.digest
        );
        print_model(&client.model(&which).await?);
        Ok(())
    })
}

pub fn run_transfer(args: TransferArgs) -> Result<()> {
    let to: Address = args
        .to
        .parse()
        .map_err(|e| anyhow::anyhow!("--to {}: {e}", args.to))?;
    let amount = parse_soma(&args.amount)?;
    super::publish::runtime()?.block_on(async {
        let (client, keypair) = signer(&args.account)?;
        let record = client
            .send(&keypair, TxKind::Transfer { to, amount })
            .await?;
        let after = client.account(&keypair.address()).await?;
        println!(
            "sent {} SOMA to {to} in epoch {} (transaction {}); balance {} SOMA",
            soma(amount),
            record.epoch,
            record.digest,
            soma(after.balance)
        );
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::parse_soma;

    #[test]
    fn amounts_are_exact_decimal_soma() {
        assert_eq!(parse_soma("1").unwrap(), 1_000_000_000);
        assert_eq!(parse_soma("2.5").unwrap(), 2_500_000_000);
        assert_eq!(parse_soma("0.000000001").unwrap(), 1);
        assert_eq!(parse_soma(".5").unwrap(), 500_000_000);
        assert_eq!(
            parse_soma("18446744073").unwrap(),
            18_446_744_073_000_000_000
        );
        for bad in [
            "",
            ".",
            "-1",
            "1e9",
            "abc",
            "1.2.3",
            "0",
            "0.0",
            "0.0000000001",
            "18446744074",
        ] {
            assert!(parse_soma(bad).is_err(), "{bad} was accepted");
        }
    }
}
