//! `somatrain localnet` (run the node) and `somatrain status` (read it).

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use somatrain_client::Client;
use somatrain_node::{Node, NodeConfig};
use somatrain_protocol::chain::Params;

#[derive(Args)]
pub struct LocalnetArgs {
    /// Where the chain's database and hosted blobs live.
    #[arg(long, default_value = ".somatrain/localnet")]
    data_dir: PathBuf,
    #[arg(long, default_value = "127.0.0.1")]
    bind: String,
    #[arg(long, default_value_t = 9000)]
    port: u16,
    /// Epoch length for a new chain (default 24 h; use the admin endpoint to advance at once).
    #[arg(long, default_value_t = 86_400_000)]
    epoch_duration_ms: u64,
    /// Embedding length models must reveal (2048 for V1; smaller for small-model localnets).
    #[arg(long, default_value_t = 2048)]
    embedding_dim: usize,
    /// Shannons per faucet request.
    #[arg(long, default_value_t = 2_000_000_000)]
    faucet_amount: u64,
    /// Re-score every data submission (download data and weights, score with this project's
    /// scorer) and refuse those whose model, loss, embedding or distance do not match.
    #[arg(long)]
    verify_submissions: bool,
    /// Admin token; by default one is generated and written to DATA_DIR/admin-token (mode 0600).
    #[arg(long, env = "SOMATRAIN_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
}

pub fn run_localnet(args: LocalnetArgs) -> Result<()> {
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating {}", args.data_dir.display()))?;
    let token_path = args.data_dir.join("admin-token");
    let token = match args.admin_token {
        Some(t) => t,
        None => match std::fs::read_to_string(&token_path) {
            Ok(t) => t.trim().to_string(),
            Err(_) => {
                let t = somatrain_protocol::EncryptionKey::generate().to_base58();
                super::write_private_file(&token_path, t.as_bytes())?;
                t
            }
        },
    };
    let config = NodeConfig {
        data_dir: args.data_dir.clone(),
        genesis: Params {
            epoch_duration_ms: args.epoch_duration_ms,
            embedding_dim: args.embedding_dim,
            faucet_amount: args.faucet_amount,
            ..Params::default()
        },
        admin_token: Some(token),
    };
    let node = Node::open(&config).context("opening the localnet")?;
    if args.verify_submissions {
        node.enable_verification(&args.data_dir.join("verify"));
        tracing::info!("data submissions are re-scored before they execute");
    }
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind((args.bind.as_str(), args.port))
            .await
            .with_context(|| format!("binding {}:{}", args.bind, args.port))?;
        let addr = listener.local_addr()?;
        tracing::info!(
            "localnet listening on http://{addr} (data in {}, admin token in {})",
            args.data_dir.display(),
            token_path.display()
        );
        // A line scripts can wait for.
        println!("listening on http://{addr}");
        std::io::stdout().flush()?;
        let shutdown = async {
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("shutting down");
        };
        somatrain_node::serve(node, listener, shutdown).await?;
        Ok(())
    })
}

#[derive(Args)]
pub struct StatusArgs {
    /// The node's URL.
    #[arg(long, env = "SOMATRAIN_NODE", default_value = "http://127.0.0.1:9000")]
    node: String,
    /// Show this account's balance (default: the wallet's address, if a key is configured).
    #[arg(long)]
    address: Option<String>,
    /// Also show the loop of this run directory (`somatrain run`): phase, deadline, scores.
    #[arg(long)]
    run_dir: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

pub fn soma(shannons: u64) -> String {
    format!(
        "{}.{:09}",
        shannons / 1_000_000_000,
        shannons % 1_000_000_000
    )
}

pub fn run_status(args: StatusArgs) -> Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let client = Client::new(&args.node);
        let status = client.status().await?;
        let models = client.models().await?;
        let targets = client.targets("open").await?;
        let address = match &args.address {
            Some(a) => Some(a.parse::<somatrain_protocol::Address>().map_err(|e| anyhow::anyhow!("--address: {e}"))?),
            None => super::wallet::load_keypair(None).ok().map(|k| k.address()),
        };
        let account = match address {
            Some(a) => Some((a, client.account(&a).await?)),
            None => None,
        };
        let journal = match &args.run_dir {
            Some(dir) => Some(somatrain_daemon::Journal::load(&somatrain_daemon::Journal::path_in(dir))?),
            None => None,
        };
        let training = args
            .run_dir
            .as_ref()
            .and_then(|dir| somatrain_train::checkpoint::latest_state(&dir.join("checkpoints")));
        if args.json {
            let account = account.map(|(a, acc)| serde_json::json!({"address": a, "balance": acc.balance, "sequence": acc.sequence, "rewards": acc.rewards}));
            let run = journal.as_ref().map(|j| {
                let mut run = loop_json(j);
                run["training"] = training.as_ref().map_or(serde_json::Value::Null, |(dir, state)| {
                    serde_json::json!({
                        "step": state.step,
                        "last_loss": state.last_loss,
                        "corpus_epoch": state.corpus.epoch,
                        "corpus_sequences": state.corpus.sequences,
                        "checkpoint": dir,
                    })
                });
                run
            });
            println!("{}", serde_json::json!({ "status": status, "account": account, "models": models, "open_targets": targets, "run": run }));
            return Ok(());
        }
        let left_s = status.next_epoch_ms.saturating_sub(status.now_ms) / 1000;
        println!(
            "epoch {}  (next in {}h{:02}m{:02}s)",
            status.epoch,
            left_s / 3600,
            left_s / 60 % 60,
            left_s % 60
        );
        println!(
            "supply {} SOMA: faucet {}, fees {}, burned {}",
            soma(status.total_supply),
            soma(status.faucet_reserve),
            soma(status.fees_collected),
            soma(status.burned)
        );
        println!(
            "\n{:<68} {:<9} {:>16} {:>6}  owner",
            "model", "status", "stake (SOMA)", "comm"
        );
        for m in &models {
            println!(
                "{:<68} {:<9} {:>16} {:>6}  {}",
                m.id.to_string(),
                format!("{:?}", m.status).to_lowercase(),
                soma(m.stake),
                m.commission_bps,
                m.owner
            );
        }
        if models.is_empty() {
            println!("(no models)");
        }
        println!(
            "\n{} open targets (threshold {:.4}, reward {} SOMA each)",
            targets.len(),
            status.target_state.distance_threshold,
            soma(status.target_state.reward_per_target)
        );
        for t in targets.iter().take(10) {
            let models: Vec<String> = t.model_ids.iter().map(|m| m.to_string()[..10].to_string()).collect();
            println!("  {}  models {}", t.id, models.join(","));
        }
        if let Some((a, acc)) = account {
            println!(
                "\naccount {a}: {} SOMA, earned {} SOMA in rewards (next sequence {})",
                soma(acc.balance),
                soma(acc.rewards),
                acc.sequence
            );
        }
        if let Some(j) = &journal {
            print_loop(j, status.now_ms);
        }
        if let Some((dir, state)) = &training {
            println!(
                "  training: step {} (last loss {:.4}), corpus epoch {} at sequence {}; checkpoint {}",
                state.step,
                state.last_loss,
                state.corpus.epoch,
                state.corpus.sequences,
                dir.display()
            );
        }
        Ok(())
    })
}

/// The loop's state without its secrets (the pending key is never shown).
fn loop_json(j: &somatrain_daemon::Journal) -> serde_json::Value {
    serde_json::json!({
        "phase": j.phase,
        "model_id": j.model_id,
        "rounds_revealed": j.rounds_revealed,
        "missed_reveals": j.missed_reveals,
        "pending_round": j.pending.as_ref().map(|p| serde_json::json!({
            "round": p.round, "step": p.step, "commit_epoch": p.commit_epoch, "url": p.manifest.url,
        })),
        "reveal_deadline_ms": j.reveal_deadline_ms,
        "last_revealed": j.last_revealed,
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
