//! The account commands the official CLI has and a trainer needs: `balance`, `pay`,
//! `merge-coins`, `objects` and `tx`.

use anyhow::{Result, bail};
use clap::Args;
use serde_json::json;
use somatrain_protocol::effects::ExecutionStatus;
use somatrain_protocol::transaction::PayCoins;
use somatrain_protocol::{Address, ObjectType, TransactionKind, TxDigest};

use super::model::{AccountOptions, parse_soma};
use super::network::{ChainOptions, soma};

/// Whose account: `--address`, or the wallet's.
#[derive(Args)]
pub struct Whose {
    /// Any address (default: the wallet's, from the keystore or SOMA_SECRET_KEY).
    #[arg(long)]
    address: Option<String>,
    #[command(flatten)]
    chain: ChainOptions,
    #[arg(long, env = "SOMATRAIN_KEYSTORE")]
    keystore: Option<std::path::PathBuf>,
}

impl Whose {
    fn address(&self) -> Result<Address> {
        match &self.address {
            Some(text) => text
                .parse()
                .map_err(|e| anyhow::anyhow!("--address {text}: {e}")),
            None => Ok(super::wallet::load_keypair(self.keystore.as_deref())?.address()),
        }
    }
}

#[derive(Args)]
pub struct BalanceArgs {
    #[command(flatten)]
    whose: Whose,
    /// Also list every coin (id, version, balance).
    #[arg(long)]
    with_coins: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct PayArgs {
    #[command(flatten)]
    account: AccountOptions,
    /// Recipients, comma-separated (one per amount).
    #[arg(long, value_delimiter = ',', required = true)]
    to: Vec<String>,
    /// SOMA to each recipient, comma-separated, in the order of --to.
    #[arg(long, value_delimiter = ',', required = true)]
    amount: Vec<String>,
}

#[derive(Args)]
pub struct MergeCoinsArgs {
    #[command(flatten)]
    account: AccountOptions,
}

#[derive(Args)]
pub struct ObjectsArgs {
    #[command(flatten)]
    whose: Whose,
    /// Only objects of this type: coin, staked-soma.
    #[arg(long = "type")]
    object_type: Option<String>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct TxArgs {
    /// The transaction's digest (Base58).
    digest: String,
    #[command(flatten)]
    chain: ChainOptions,
    #[arg(long)]
    json: bool,
}

pub fn run_balance(args: BalanceArgs) -> Result<()> {
    let address = args.whose.address()?;
    super::publish::runtime()?.block_on(async {
        let chain = args.whose.chain.client()?;
        let mut coins: Vec<(String, u64, u64)> = chain
            .owned_objects(&address, Some(ObjectType::Coin))
            .await?
            .iter()
            .filter_map(|o| {
                Some((
                    o.id().ok()?.to_string(),
                    o.version(),
                    o.coin_balance().ok()?,
                ))
            })
            .collect();
        coins.sort_by_key(|c| std::cmp::Reverse(c.2));
        let total: u64 = coins.iter().map(|c| c.2).sum();
        if args.json {
            let mut out = json!({
                "address": address.to_string(),
                "balance_shannons": total,
                "coins": coins.len(),
            });
            if args.with_coins {
                out["coin_list"] = coins
                    .iter()
                    .map(|(id, version, balance)| {
                        json!({"id": id, "version": version, "balance_shannons": balance})
                    })
                    .collect();
            }
            println!("{out}");
            return Ok(());
        }
        println!("{address}: {} SOMA in {} coins", soma(total), coins.len());
        if args.with_coins {
            for (id, version, balance) in &coins {
                println!("  {id}  v{version}  {} SOMA", soma(*balance));
            }
        }
        Ok(())
    })
}

pub fn run_pay(args: PayArgs) -> Result<()> {
    if args.to.len() != args.amount.len() {
        bail!(
            "{} recipients and {} amounts: give one amount per recipient",
            args.to.len(),
            args.amount.len()
        );
    }
    let recipients: Vec<Address> = args
        .to
        .iter()
        .map(|t| t.parse().map_err(|e| anyhow::anyhow!("--to {t}: {e}")))
        .collect::<Result<_>>()?;
    let amounts: Vec<u64> = args
        .amount
        .iter()
        .map(|a| parse_soma(a))
        .collect::<Result<_>>()?;
    super::publish::runtime()?.block_on(async {
        let chain = args.account.chain.client()?;
        let keypair = super::wallet::load_keypair(args.account.keystore.as_deref())?;
        let executed = chain
            .sign_and_execute(&keypair, |gas| {
                TransactionKind::PayCoins(PayCoins {
                    coins: vec![gas[0]],
                    amounts: Some(amounts.clone()),
                    recipients: recipients.clone(),
                })
            })
            .await?;
        let executed = super::model::succeeded(executed)?;
        println!(
            "paid {} SOMA to {} recipients in transaction {} (fee {} SOMA); balance {} SOMA",
            soma(amounts.iter().sum()),
            recipients.len(),
            executed.digest,
            soma(executed.effects.fee.total_fee),
            soma(chain.balance(&keypair.address()).await?)
        );
        Ok(())
    })
}

pub fn run_merge_coins(args: MergeCoinsArgs) -> Result<()> {
    super::publish::runtime()?.block_on(async {
        let chain = args.account.chain.client()?;
        let keypair = super::wallet::load_keypair(args.account.keystore.as_deref())?;
        let before = chain
            .owned_objects(&keypair.address(), Some(ObjectType::Coin))
            .await?
            .len();
        let Some(executed) = chain.merge_coins(&keypair, 1).await? else {
            println!("{before} coin(s): nothing to merge");
            return Ok(());
        };
        let executed = super::model::succeeded(executed)?;
        let after = chain
            .owned_objects(&keypair.address(), Some(ObjectType::Coin))
            .await?
            .len();
        println!(
            "merged {before} coins into {after} in transaction {} (fee {} SOMA)",
            executed.digest,
            soma(executed.effects.fee.total_fee)
        );
        Ok(())
    })
}

pub fn run_objects(args: ObjectsArgs) -> Result<()> {
    let address = args.whose.address()?;
    let filter = match args.object_type.as_deref() {
        None => None,
        Some("coin") => Some(ObjectType::Coin),
        Some("staked-soma") => Some(ObjectType::StakedSoma),
        Some(other) => bail!("--type {other}: an account owns coin or staked-soma objects"),
    };
    super::publish::runtime()?.block_on(async {
        let chain = args.whose.chain.client()?;
        let objects = chain.owned_objects(&address, filter).await?;
        let rows: Vec<serde_json::Value> = objects
            .iter()
            .map(|o| {
                let mut row = json!({
                    "id": o.id().map(|id| id.to_string()).unwrap_or_default(),
                    "type": o.object_type().name(),
                    "version": o.version(),
                    "digest": o.digest().to_string(),
                });
                if let Ok(balance) = o.coin_balance() {
                    row["balance_shannons"] = json!(balance);
                }
                if let Ok(staked) = o.staked_soma() {
                    row["pool_id"] = json!(staked.pool_id.to_string());
                    row["principal_shannons"] = json!(staked.principal);
                    row["activation_epoch"] = json!(staked.stake_activation_epoch);
                }
                row
            })
            .collect();
        if args.json {
            println!("{}", serde_json::Value::Array(rows));
            return Ok(());
        }
        println!("{address}: {} objects", rows.len());
        for row in &rows {
            let detail = match (&row["balance_shannons"], &row["principal_shannons"]) {
                (serde_json::Value::Number(b), _) => {
                    format!("{} SOMA", soma(b.as_u64().unwrap_or(0)))
                }
                (_, serde_json::Value::Number(p)) => format!(
                    "{} SOMA staked in pool {} from epoch {}",
                    soma(p.as_u64().unwrap_or(0)),
                    row["pool_id"].as_str().unwrap_or("?"),
                    row["activation_epoch"]
                ),
                _ => String::new(),
            };
            println!(
                "  {}  {:<10} v{}  {detail}",
                row["id"].as_str().unwrap_or("?"),
                row["type"].as_str().unwrap_or("?"),
                row["version"]
            );
        }
        Ok(())
    })
}

pub fn run_tx(args: TxArgs) -> Result<()> {
    let digest: TxDigest = args
        .digest
        .parse()
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.digest))?;
    super::publish::runtime()?.block_on(async {
        let chain = args.chain.client()?;
        let Some(executed) = chain.transaction(&digest).await? else {
            bail!("no transaction {digest} on this network");
        };
        let (status, kind, description) = match executed.status() {
            ExecutionStatus::Success => ("success", None, None),
            ExecutionStatus::Failure(f) => (
                "failure",
                Some(f.kind.name().to_string()),
                Some(f.description.clone()),
            ),
        };
        let fee = &executed.effects.fee;
        let what = executed
            .transaction
            .as_ref()
            .map(|t| (t.kind.name().to_string(), t.sender.to_string()));
        if args.json {
            println!(
                "{}",
                json!({
                    "digest": digest.to_string(),
                    "kind": what.as_ref().map(|w| &w.0),
                    "sender": what.as_ref().map(|w| &w.1),
                    "status": status,
                    "error_kind": kind,
                    "error": description,
                    "epoch": executed.effects.executed_epoch,
                    "checkpoint": executed.checkpoint,
                    "fee": {
                        "base": fee.base_fee,
                        "operation": fee.operation_fee,
                        "value": fee.value_fee,
                        "total": fee.total_fee,
                    },
                    "changed_objects": executed.effects.changed_objects.len(),
                    "balance_changes": executed.balance_changes.iter().map(|c| json!({
                        "address": c.address.to_string(),
                        "amount_shannons": c.amount.to_string(),
                    })).collect::<Vec<_>>(),
                })
            );
            return Ok(());
        }
        match &what {
            Some((kind, sender)) => println!("transaction {digest}: {kind} from {sender}"),
            None => println!("transaction {digest}"),
        }
        match (&kind, &description) {
            (Some(kind), Some(description)) => println!("  status: failed ({kind}): {description}"),
            _ => println!("  status: success"),
        }
        println!(
            "  epoch {}, checkpoint {}",
            executed.effects.executed_epoch,
            executed
                .checkpoint
                .map(|c| c.to_string())
                .unwrap_or_else(|| "?".into())
        );
        println!(
            "  fee {} SOMA (base {}, operation {}, value {} shannons); {} objects changed",
            soma(fee.total_fee),
            fee.base_fee,
            fee.operation_fee,
            fee.value_fee,
            executed.effects.changed_objects.len()
        );
        for change in &executed.balance_changes {
            let sign = if change.amount < 0 { "-" } else { "+" };
            println!(
                "  {}: {sign}{} SOMA",
                change.address,
                soma(change.amount.unsigned_abs() as u64)
            );
        }
        Ok(())
    })
}
