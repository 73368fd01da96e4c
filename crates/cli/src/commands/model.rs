//! `somatrain model show|stake|unstake|commission|deactivate|download` and `somatrain transfer`:
//! managing a model and an account after `commit` created them, and reading what any model
//! published. Every write is one signed transaction
//! paid from the wallet's richest coin; a refusal, or an executed transaction that failed (with
//! the network's error kind), is the error.

use somatrain_protocol::transaction::{
    AddStakeToModel, DeactivateModel, SetModelCommissionRate, TransferCoin, WithdrawStake,
};
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use somatrain_client::chain::{ChainClient, Executed};
use somatrain_client::view::ModelView;
use somatrain_protocol::SHANNONS_PER_SOMA;
use somatrain_protocol::effects::ExecutionStatus;
use somatrain_protocol::{Address, Keypair, ObjectId, ObjectType, TransactionKind};

use super::network::{ChainOptions, soma};

#[derive(Args, Clone)]
pub struct AccountOptions {
    #[command(flatten)]
    pub chain: ChainOptions,
    /// Keystore file (default: $HOME/.somatrain/keystore.json; SOMA_SECRET_KEY wins).
    #[arg(long, env = "SOMATRAIN_KEYSTORE")]
    pub keystore: Option<PathBuf>,
}

/// Which model: an id, or the one a run directory's journal created.
#[derive(Args, Clone)]
pub struct ModelChoice {
    /// The model's id (or give it with --model).
    #[arg(value_name = "MODEL_ID", conflicts_with_all = ["model", "run_dir"])]
    id: Option<String>,
    /// The model's id.
    #[arg(long, conflicts_with = "run_dir")]
    model: Option<String>,
    /// A run directory whose journal names the model (`commit` or `run` created it).
    #[arg(long)]
    run_dir: Option<PathBuf>,
}

impl ModelChoice {
    fn id(&self) -> Result<ObjectId> {
        if let Some(text) = self.id.as_ref().or(self.model.as_ref()) {
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
        #[command(flatten)]
        chain: ChainOptions,
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
    /// Withdraw this account's stake from a model's pool: every `StakedSoma` object it holds
    /// there, or the one named (the network withdraws whole objects).
    Unstake {
        #[command(flatten)]
        which: ModelChoice,
        #[command(flatten)]
        account: AccountOptions,
        /// One StakedSoma object to withdraw (default: all of this account's in the pool).
        #[arg(long)]
        staked_soma: Option<String>,
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
    /// The weights a model revealed, downloaded (size and checksum checked against its
    /// commitment), decrypted with its revealed key and checked to load as V1, into a file:
    /// to study what wins, or to train on from there (`train --init-weights`).
    Download {
        #[command(flatten)]
        which: ModelChoice,
        #[command(flatten)]
        chain: ChainOptions,
        /// Where the weights go (safetensors; written atomically, never over a directory).
        #[arg(long)]
        out: PathBuf,
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

/// Builds a transaction kind from the gas coins chosen for it.
type KindFor = Box<dyn Fn(&[somatrain_protocol::ObjectRef]) -> TransactionKind>;

fn signer(account: &AccountOptions) -> Result<(ChainClient, Keypair)> {
    let keypair = super::wallet::load_keypair(account.keystore.as_deref())?;
    Ok((account.chain.client()?, keypair))
}

/// The executed transaction if it succeeded, else the failure as an error.
pub fn succeeded(executed: Executed) -> Result<Executed> {
    match executed.status() {
        ExecutionStatus::Success => Ok(executed),
        ExecutionStatus::Failure(f) => bail!(
            "transaction {} executed and failed ({}): {}; its fee was paid",
            executed.digest,
            f.kind.name(),
            f.description
        ),
    }
}

/// `model`'s revealed weights into `out`: the encrypted file verified against the commitment,
/// decrypted, loaded as V1 (any width), and only then renamed into place.
async fn download_weights(model: &ModelView, out: &std::path::Path) -> Result<()> {
    let (Some(manifest), Some(key)) = (&model.manifest, &model.decryption_key) else {
        bail!(
            "model {} has no revealed weights (it is {}; weights are public once revealed)",
            model.id,
            model.state.name()
        );
    };
    if out.is_dir() {
        bail!("{} is a directory; give a file", out.display());
    }
    let dir = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let scratch = tempfile::tempdir_in(&dir)
        .with_context(|| format!("a scratch folder in {}", dir.display()))?;
    let encrypted = scratch.path().join("weights.enc");
    let http = somatrain_client::http_client();
    somatrain_storage::download_verified(&http, manifest, &encrypted).await?;
    let plain = scratch.path().join("weights.safetensors");
    let key = somatrain_protocol::crypto::EncryptionKey::from_bytes(key.0);
    let (from, to) = (encrypted.clone(), plain.clone());
    tokio::task::spawn_blocking(move || -> Result<()> {
        let input = std::fs::File::open(&from)?;
        let output = std::fs::File::create(&to)?;
        somatrain_protocol::crypto::decrypt_stream(
            &key,
            std::io::BufReader::new(input),
            std::io::BufWriter::new(output),
        )
        .map_err(|e| anyhow::anyhow!("decrypting: {e}"))?;
        somatrain_model::io::load_file_any_width(&to)
            .map_err(|e| anyhow::anyhow!("the decrypted weights do not load: {e}"))?;
        std::fs::File::open(&to)?.sync_all()?;
        Ok(())
    })
    .await??;
    std::fs::rename(&plain, out).with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}

async fn model_view(chain: &ChainClient, id: &ObjectId) -> Result<ModelView> {
    chain
        .model(id)
        .await?
        .with_context(|| format!("no model {id} on chain"))
}

fn print_model(m: &ModelView) {
    println!("model {}", m.id);
    println!("  owner {}", m.owner);
    println!(
        "  state {} (created epoch {}{}{})",
        m.state.name(),
        m.create_epoch,
        m.activation_epoch
            .map_or(String::new(), |e| format!(", pool active from epoch {e}")),
        m.deactivation_epoch
            .map_or(String::new(), |e| format!(", deactivated in epoch {e}"))
    );
    println!("  stake {} SOMA", soma(m.stake));
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
}

fn model_json(m: &ModelView) -> serde_json::Value {
    serde_json::json!({
        "id": m.id.to_string(),
        "owner": m.owner.to_string(),
        "state": m.state,
        "create_epoch": m.create_epoch,
        "stake": m.stake,
        "commission_bps": m.commission_bps,
        "next_commission_bps": m.next_commission_bps,
        "weights_url": m.manifest.as_ref().map(|x| x.url.clone()),
        "commit_epoch": m.pending.as_ref().map(|p| p.commit_epoch),
        "pool_id": m.pool_id.map(|p| p.to_string()),
    })
}

/// This account's StakedSoma objects in the pool of `model`.
async fn stakes_in(
    chain: &ChainClient,
    keypair: &Keypair,
    model: &ModelView,
) -> Result<Vec<somatrain_protocol::ObjectRef>> {
    let pool = model
        .pool_id
        .with_context(|| format!("model {} shows no staking pool", model.id))?;
    let mut refs = Vec::new();
    for object in chain
        .owned_objects(&keypair.address(), Some(ObjectType::StakedSoma))
        .await?
    {
        if object.staked_soma().is_ok_and(|s| s.pool_id == pool) {
            refs.push(object.reference()?);
        }
    }
    Ok(refs)
}

pub fn run_model(command: ModelCommand) -> Result<()> {
    super::publish::runtime()?.block_on(async {
        let (account, model_id, kind) = match command {
            ModelCommand::Download { which, chain, out } => {
                let model = model_view(&chain.client()?, &which.id()?).await?;
                download_weights(&model, &out).await?;
                println!(
                    "model {}: {} bytes of weights into {}",
                    model.id,
                    std::fs::metadata(&out)?.len(),
                    out.display()
                );
                return Ok(());
            }
            ModelCommand::Show { which, chain, json } => {
                let model = model_view(&chain.client()?, &which.id()?).await?;
                if json {
                    println!("{}", model_json(&model));
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
                let kind: KindFor = Box::new(move |gas| {
                    TransactionKind::AddStakeToModel(AddStakeToModel {
                        model_id,
                        coin_ref: gas[0],
                        amount: Some(amount),
                    })
                });
                (account, model_id, kind)
            }
            ModelCommand::Unstake {
                which,
                account,
                staked_soma,
            } => {
                let model_id = which.id()?;
                let (chain, keypair) = signer(&account)?;
                let model = model_view(&chain, &model_id).await?;
                let mut stakes = stakes_in(&chain, &keypair, &model).await?;
                if let Some(text) = &staked_soma {
                    let id: ObjectId = text
                        .parse()
                        .map_err(|e| anyhow::anyhow!("--staked-soma {text}: {e}"))?;
                    stakes.retain(|s| s.id == id);
                }
                if stakes.is_empty() {
                    bail!(
                        "{} holds no StakedSoma in model {model_id}'s pool{}",
                        keypair.address(),
                        staked_soma.map_or(String::new(), |s| format!(" named {s}"))
                    );
                }
                for staked in stakes {
                    let executed = succeeded(
                        chain
                            .sign_and_execute(&keypair, |_| {
                                TransactionKind::WithdrawStake(WithdrawStake {
                                    staked_soma: staked,
                                })
                            })
                            .await?,
                    )?;
                    println!(
                        "withdrew StakedSoma {} in epoch {} (transaction {})",
                        staked.id, executed.effects.executed_epoch, executed.digest
                    );
                }
                print_model(&model_view(&chain, &model_id).await?);
                return Ok(());
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
                let kind: KindFor = Box::new(move |_| {
                    TransactionKind::SetModelCommissionRate(SetModelCommissionRate {
                        model_id,
                        new_rate: bps,
                    })
                });
                (account, model_id, kind)
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
                let kind: KindFor = Box::new(move |_| {
                    TransactionKind::DeactivateModel(DeactivateModel { model_id })
                });
                (account, model_id, kind)
            }
        };
        let (chain, keypair) = signer(&account)?;
        let executed = succeeded(chain.sign_and_execute(&keypair, kind).await?)?;
        println!(
            "done in epoch {} (transaction {})",
            executed.effects.executed_epoch, executed.digest
        );
        print_model(&model_view(&chain, &model_id).await?);
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
        let (chain, keypair) = signer(&args.account)?;
        let executed = succeeded(
            chain
                .sign_and_execute(&keypair, |gas| {
                    TransactionKind::TransferCoin(TransferCoin {
                        coin: gas[0],
                        amount: Some(amount),
                        recipient: to,
                    })
                })
                .await?,
        )?;
        let after = chain.balance(&keypair.address()).await?;
        println!(
            "sent {} SOMA to {to} in epoch {} (transaction {}); balance {} SOMA",
            soma(amount),
            executed.effects.executed_epoch,
            executed.digest,
            soma(after)
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
