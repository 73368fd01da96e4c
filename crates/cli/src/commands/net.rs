//! `somatrain status`: the chain's epoch, models and open targets, the wallet's balance, and
//! the loop of a run directory.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use super::network::{ChainOptions, soma};

#[derive(Args)]
pub struct StatusArgs {
    #[command(flatten)]
    chain: ChainOptions,
    /// Show this account's balance (default: the wallet's address, if a key is configured).
    #[arg(long)]
    address: Option<String>,
    /// Also show the loop of this run directory (`somatrain run`): phase, deadline, scores.
    #[arg(long)]
    run_dir: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

pub fn run_status(args: StatusArgs) -> Result<()> {
    // The run directory's part is read first and shown even when the node cannot be reached:
    // a pending reveal's deadline matters most exactly then.
    let journal = match &args.run_dir {
        Some(dir) => Some(somatrain_daemon::Journal::load(
            &somatrain_daemon::Journal::path_in(dir),
        )?),
        None => None,
    };
    let training = args
        .run_dir
        .as_ref()
        .and_then(|dir| somatrain_train::checkpoint::latest_state(&dir.join("checkpoints")));
    let rounds = match &args.run_dir {
        Some(dir) => {
            somatrain_train::history::read_all(&dir.join(somatrain_daemon::journal::ROUNDS_FILE))
                .with_context(|| format!("reading the rounds of {}", dir.display()))?
        }
        None => Vec::new(),
    };
    let earnings = args.run_dir.as_ref().and_then(|dir| {
        somatrain_daemon::earnings::Earnings::load(dir)
            .ok()
            .filter(|e| e.model_id.is_some())
            .map(|e| e.summary())
    });
    let mut local = LocalStatus {
        journal,
        training,
        rounds,
        earnings,
    };
    let runtime = tokio::runtime::Runtime::new()?;
    let model = local.journal.as_ref().and_then(|j| j.model_id);
    let chain = runtime.block_on(chain_status(&args, model));
    let now = somatrain_daemon::now_ms();
    let chain = match chain {
        Ok(chain) => chain,
        Err(error) => {
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({ "status": null, "run": local.json(), "chain_error": format!("{error:#}") })
                );
            } else if local.journal.is_some() || local.training.is_some() {
                println!("chain: unavailable (the error follows)");
                local.print(now);
            }
            return Err(error.context("the chain's part of the status"));
        }
    };
    let ChainStatus {
        epoch,
        targets,
        balance,
        earnings,
    } = chain;
    if earnings.is_some() {
        local.earnings = earnings;
    }
    if args.json {
        let models: Vec<serde_json::Value> = epoch
            .models
            .iter()
            .map(|m| {
                serde_json::json!({
                    "id": m.id.to_string(),
                    "owner": m.owner.to_string(),
                    "state": m.state,
                    "stake": m.stake,
                    "commission_bps": m.commission_bps,
                    "commit_epoch": m.pending.as_ref().map(|p| p.commit_epoch),
                    "weights_url": m.manifest.as_ref().map(|x| x.url.clone()),
                })
            })
            .collect();
        let account =
            balance.map(|(a, b)| serde_json::json!({"address": a.to_string(), "balance": b}));
        let status = serde_json::json!({
            "epoch": epoch.epoch,
            "epoch_start_ms": epoch.start_ms,
            "next_epoch_ms": epoch.next_epoch_ms(),
            "now_ms": now,
            "distance_threshold": epoch.distance_threshold,
            "reward_per_target": epoch.reward_per_target,
            "emission_pool": epoch.emission_pool,
        });
        println!(
            "{}",
            serde_json::json!({ "status": status, "account": account, "models": models, "open_targets": targets, "run": local.json() })
        );
        return Ok(());
    }
    let left_s = epoch.next_epoch_ms().saturating_sub(now) / 1000;
    println!(
        "epoch {}  (next due in {}h{:02}m{:02}s)",
        epoch.epoch,
        left_s / 3600,
        left_s / 60 % 60,
        left_s % 60
    );
    println!(
        "emission pool {} SOMA, model stake {} SOMA",
        soma(epoch.emission_pool),
        soma(epoch.total_model_stake)
    );
    println!(
        "\n{:<68} {:<9} {:>16} {:>6}  owner",
        "model", "state", "stake (SOMA)", "comm"
    );
    for m in &epoch.models {
        println!(
            "{:<68} {:<9} {:>16} {:>6}  {}",
            m.id.to_string(),
            m.state.name(),
            soma(m.stake),
            m.commission_bps,
            m.owner
        );
    }
    if epoch.models.is_empty() {
        println!("(no models)");
    }
    println!(
        "\n{} open targets (threshold {:.4}, reward {} SOMA each)",
        targets.len(),
        epoch.distance_threshold,
        soma(epoch.reward_per_target)
    );
    for t in targets.iter().take(10) {
        let models: Vec<String> = t
            .model_ids
            .iter()
            .map(|m| m.to_string()[..10].to_string())
            .collect();
        println!("  {}  models {}", t.id, models.join(","));
    }
    if let Some((a, b)) = balance {
        println!("\naccount {a}: {} SOMA", soma(b));
    }
    local.print(now);
    Ok(())
}

/// What the chain says: the epoch, its open targets, the account's balance, and what the run's
/// model has won (written down in the run directory's `earnings.json` as it is seen).
struct ChainStatus {
    epoch: somatrain_client::view::EpochView,
    targets: Vec<somatrain_client::view::TargetView>,
    balance: Option<(somatrain_protocol::Address, u64)>,
    earnings: Option<somatrain_daemon::earnings::EarningsSummary>,
}

async fn chain_status(
    args: &StatusArgs,
    model: Option<somatrain_protocol::ObjectId>,
) -> Result<ChainStatus> {
    let chain = args.chain.client()?;
    let epoch = chain.epoch_view().await?;
    let targets = chain.target_views("open").await?;
    let address = match &args.address {
        Some(a) => Some(
            a.parse::<somatrain_protocol::Address>()
                .map_err(|e| anyhow::anyhow!("--address: {e}"))?,
        ),
        None => super::wallet::load_keypair(None).ok().map(|k| k.address()),
    };
    let balance = match address {
        Some(a) => Some((a, chain.balance(&a).await?)),
        None => None,
    };
    let earnings = match (&args.run_dir, model) {
        (Some(dir), Some(model)) => {
            match somatrain_daemon::earnings::observe(&chain, dir, model).await {
                Ok(summary) => Some(summary),
                Err(e) => {
                    tracing::warn!("recording the model's earnings: {e}");
                    None
                }
            }
        }
        _ => None,
    };
    Ok(ChainStatus {
        epoch,
        targets,
        balance,
        earnings,
    })
}

/// What the run directory says: the loop's journal and the newest checkpoint.
struct LocalStatus {
    journal: Option<somatrain_daemon::Journal>,
    training: Option<(PathBuf, somatrain_train::checkpoint::CheckpointState)>,
    /// `rounds.jsonl`, oldest first.
    rounds: Vec<somatrain_daemon::journal::RoundRecord>,
    earnings: Option<somatrain_daemon::earnings::EarningsSummary>,
}

/// Rounds shown in the terminal (the newest); `--json` and the status page have them all.
const ROUNDS_SHOWN: usize = 10;

impl LocalStatus {
    /// The loop's state (when the run directory has a journal) and where training stands;
    /// null for neither.
    fn json(&self) -> serde_json::Value {
        if self.journal.is_none() && self.training.is_none() {
            return serde_json::Value::Null;
        }
        let mut run = self
            .journal
            .as_ref()
            .map_or_else(|| serde_json::json!({}), loop_json);
        run["training"] = self
            .training
            .as_ref()
            .map_or(serde_json::Value::Null, |(dir, state)| {
                serde_json::json!({
                    "step": state.step,
                    "last_loss": state.last_loss,
                    "corpus_epoch": state.corpus.epoch,
                    "corpus_sequences": state.corpus.sequences,
                    "checkpoint": dir,
                })
            });
        run["rounds"] = serde_json::json!(self.rounds);
        run["earnings"] = serde_json::json!(self.earnings);
        run
    }

    fn print(&self, now_ms: u64) {
        if let Some(j) = &self.journal {
            print_loop(j, now_ms);
        }
        if let Some((dir, state)) = &self.training {
            println!(
                "  training: step {} (last loss {:.4}), corpus epoch {} at sequence {}; checkpoint {}",
                state.step,
                state.last_loss,
                state.corpus.epoch,
                state.corpus.sequences,
                dir.display()
            );
        }
        if self.journal.as_ref().is_some_and(|j| j.model_id.is_some()) {
            match &self.earnings {
                Some(e) => println!(
                    "  earnings: {} SOMA claimed from {} targets won; {} SOMA awaiting a claim",
                    soma(e.claimed_shannons),
                    e.targets_won,
                    soma(e.pending_shannons)
                ),
                None => println!("  earnings: none yet (no target won by the model seen)"),
            }
        }
        if !self.rounds.is_empty() {
            println!(
                "  rounds (newest first): round, step, held-out loss, commit -> reveal epoch, stake, balance"
            );
            for r in self.rounds.iter().rev().take(ROUNDS_SHOWN) {
                println!(
                    "    {:>5} {:>8} {:>9} {:>6} -> {:<6} {:>14} {:>14}",
                    r.round,
                    r.step,
                    r.heldout_loss.map_or("-".into(), |l| format!("{l:.4}")),
                    r.commit_epoch,
                    r.reveal_epoch,
                    r.stake.map_or("-".into(), soma),
                    r.balance.map_or("-".into(), soma),
                );
            }
        }
    }
}

/// The loop's state without its secrets (the pending key is never shown).
fn loop_json(j: &somatrain_daemon::Journal) -> serde_json::Value {
    serde_json::json!({
        "phase": j.phase,
        "model_id": j.model_id.map(|m| m.to_string()),
        "rounds_revealed": j.rounds_revealed,
        "missed_reveals": j.missed_reveals,
        "pending_round": j.pending.as_ref().map(|p| serde_json::json!({
            "round": p.round, "step": p.step, "commit_epoch": p.commit_epoch, "url": p.manifest.url,
            "reveal_opens_ms": p.reveal_opens_ms, "reveal_closes_ms": p.reveal_closes_ms,
        })),
        "reveal_deadline_ms": j.reveal_deadline_ms,
        "last_revealed": j.last_revealed,
        "weights_to_serve": j.reupload.as_ref().map(|u| serde_json::json!({
            "round": u.round, "url": u.manifest.url, "missing_since_ms": u.since_ms,
        })),
    })
}

fn print_loop(j: &somatrain_daemon::Journal, now_ms: u64) {
    println!("\nloop: {}", j.phase.name());
    if let Some(id) = j.model_id {
        println!("  model {id}");
    }
    println!(
        "  rounds revealed {}, missed reveals {}",
        j.rounds_revealed, j.missed_reveals
    );
    if let Some(p) = &j.pending {
        match p.commit_epoch {
            Some(e) => println!(
                "  round {} committed in epoch {e}, reveal due in epoch {}",
                p.round,
                e + 1
            ),
            None => println!("  round {} uploaded, not yet committed", p.round),
        }
    }
    if let Some(deadline) = j.reveal_deadline_ms {
        let left = deadline.saturating_sub(now_ms) / 1000;
        println!(
            "  next deadline: reveal within {}h{:02}m{:02}s",
            left / 3600,
            left / 60 % 60,
            left % 60
        );
    }
    if let Some(u) = &j.reupload {
        match u.since_ms {
            Some(since) => println!(
                "  WARNING: the weights of round {} have been missing at {} for {} s; they are \
                 uploaded again until they read back whole (validators that cannot fetch them \
                 report the model)",
                u.round,
                u.manifest.url,
                now_ms.saturating_sub(since) / 1000
            ),
            None => println!(
                "  the weights of round {} at {} are being confirmed served",
                u.round, u.manifest.url
            ),
        }
    }
    if let Some(r) = &j.last_revealed {
        print!(
            "  last round {} (step {}) revealed in epoch {}",
            r.round, r.step, r.reveal_epoch
        );
        match &r.heldout {
            Some(h) => println!(
                ": held-out loss {:.4}, {:.3} bits/byte",
                h.loss, h.bits_per_byte
            ),
            None => println!(),
        }
    }
}
