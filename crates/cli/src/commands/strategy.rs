//! `somatrain strategy`: what an embedding is worth under the chain's assignment rule, and a
//! search for a better one. The chain is read here; the estimates are `somatrain-strategy`'s.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::json;
use somatrain_client::view::{EpochView, ModelState};
use somatrain_protocol::{ObjectId, format_soma};
use somatrain_strategy::{Candidate, Economy, Estimate, Field, Rival, earnings};

use super::network::ChainOptions;

/// Embedding files larger than this are refused before they are parsed (2048 floats as JSON
/// take about 50 KB).
const MAX_EMBEDDING_FILE: u64 = 16 << 20;

#[derive(Args)]
pub struct StrategyArgs {
    #[command(flatten)]
    chain: ChainOptions,
    /// The embedding to evaluate, a JSON array (what `somatrain embed` prints).
    #[arg(long, conflicts_with_all = ["run_dir", "model"])]
    embedding: Option<PathBuf>,
    /// A run directory: the embedding of its current round (`round/round.json`).
    #[arg(long, conflicts_with = "model")]
    run_dir: Option<PathBuf>,
    /// A model on chain: its revealed embedding and stake, against every other model.
    #[arg(long)]
    model: Option<String>,
    /// Stakes to evaluate at, in SOMA, comma-separated (default: the model's stake with
    /// --model, else the chain's minimum).
    #[arg(long, value_delimiter = ',')]
    stake: Vec<String>,
    /// Also search N candidate positions (random directions at the scale of the chain's
    /// embeddings, and near the embedding given) for the best rate.
    #[arg(long, value_name = "N")]
    search: Option<usize>,
    /// Where the search writes the best embedding found (a JSON array, atomically).
    #[arg(long, requires = "search")]
    out: Option<PathBuf>,
    /// Targets drawn per estimate (the standard error falls as 1/sqrt of it).
    #[arg(long, default_value_t = 20_000)]
    samples: usize,
    /// Seed of the drawn targets: the same seed gives the same estimates.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long)]
    json: bool,
}

fn read_embedding(path: &Path) -> Result<Vec<f32>> {
    let size = std::fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    if size > MAX_EMBEDDING_FILE {
        bail!(
            "{} is {size} bytes; an embedding file is at most {MAX_EMBEDDING_FILE}",
            path.display()
        );
    }
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let embedding: Vec<f32> = serde_json::from_slice(&bytes)
        .with_context(|| format!("{} is not a JSON array of numbers", path.display()))?;
    if embedding.is_empty() || embedding.iter().any(|x| !x.is_finite()) {
        bail!("{} must hold finite numbers", path.display());
    }
    Ok(embedding)
}

fn round_embedding(run_dir: &Path) -> Result<Vec<f32>> {
    let path = run_dir.join("round/round.json");
    let size = std::fs::metadata(&path)
        .with_context(|| format!("reading {} (run `somatrain train` first)", path.display()))?
        .len();
    if size > MAX_EMBEDDING_FILE {
        bail!("{} is {size} bytes: not a round", path.display());
    }
    let round: somatrain_train::trainer::RoundArtifacts =
        serde_json::from_slice(&std::fs::read(&path)?)
            .with_context(|| format!("reading {}", path.display()))?;
    Ok(round.embedding)
}

/// The position under study, and the model it is (left out of the field).
struct Subject {
    embedding: Option<Vec<f32>>,
    model: Option<ObjectId>,
    default_stake: Option<u64>,
    described: String,
}

fn subject(args: &StrategyArgs, view: &EpochView) -> Result<Subject> {
    if let Some(text) = &args.model {
        let id: ObjectId = text
            .parse()
            .map_err(|e| anyhow::anyhow!("--model {text}: {e}"))?;
        let model = view
            .model(&id)
            .with_context(|| format!("model {id} is not in the registry"))?;
        let embedding = model
            .embedding
            .clone()
            .filter(|_| model.state == ModelState::Active)
            .with_context(|| {
                format!(
                    "model {id} is {} and has no revealed embedding to evaluate",
                    model.state.name()
                )
            })?;
        return Ok(Subject {
            embedding: Some(embedding),
            model: Some(id),
            default_stake: Some(model.stake),
            described: format!("model {id}"),
        });
    }
    if let Some(path) = &args.embedding {
        return Ok(Subject {
            embedding: Some(read_embedding(path)?),
            model: None,
            default_stake: None,
            described: path.display().to_string(),
        });
    }
    if let Some(dir) = &args.run_dir {
        return Ok(Subject {
            embedding: Some(round_embedding(dir)?),
            model: None,
            default_stake: None,
            described: format!("the round of {}", dir.display()),
        });
    }
    if args.search.is_none() {
        bail!("give --embedding FILE, --run-dir RUN or --model ID, or --search N");
    }
    Ok(Subject {
        embedding: None,
        model: None,
        default_stake: None,
        described: "no embedding of yours".into(),
    })
}

fn estimate_json(stake: u64, e: &Estimate, economy: &Economy) -> serde_json::Value {
    json!({
        "stake_shannons": stake,
        "rate": e.rate,
        "standard_error": e.standard_error,
        "samples": e.samples,
        "exact": e.exact,
        "per_epoch": earnings(e.rate, economy),
        "shares_targets_with": e.shared_with.iter().map(|(id, f)| json!({
            "model": id.to_string(),
            "fraction": f,
        })).collect::<Vec<_>>(),
    })
}

fn soma(shannons: Option<f64>) -> String {
    shannons
        .map(|s| format!("{:.4}", s / somatrain_protocol::SHANNONS_PER_SOMA as f64))
        .unwrap_or_else(|| "unknown".into())
}

fn print_rows(rows: &[(u64, Estimate)], economy: &Economy) {
    println!(
        "{:>16} {:>22} {:>14} {:>16} {:>16}",
        "stake (SOMA)", "share of new targets", "assigned/epoch", "wins all", "wins 1 in 3"
    );
    for (stake, e) in rows {
        let rate = if e.exact {
            format!("{:.4} (exact)", e.rate)
        } else {
            format!("{:.4} ± {:.4}", e.rate, e.standard_error)
        };
        let money = earnings(e.rate, economy);
        println!(
            "{:>16} {:>22} {:>14.2} {:>16} {:>16}",
            format_soma(*stake),
            rate,
            money.assigned_per_epoch,
            soma(money.if_it_wins_every_one),
            soma(money.if_it_wins_one_in_three)
        );
    }
}

pub fn run_strategy(args: StrategyArgs) -> Result<()> {
    let view = super::publish::runtime()?.block_on(async {
        let chain = args.chain.client()?;
        anyhow::Ok(chain.epoch_view().await?)
    })?;
    let subject = subject(&args, &view)?;
    let dim = view.params.embedding_dim as usize;
    let rivals: Vec<Rival> = view
        .models
        .iter()
        .filter(|m| m.state == ModelState::Active && Some(m.id) != subject.model)
        .filter_map(|m| {
            Some(Rival {
                id: m.id,
                embedding: m.embedding.clone()?,
                stake: m.stake,
            })
        })
        .collect();
    let field = Field::new(rivals, view.params.models_per_target as usize, dim);
    let stakes: Vec<u64> = if args.stake.is_empty() {
        vec![subject.default_stake.unwrap_or(view.params.model_min_stake)]
    } else {
        args.stake
            .iter()
            .map(|s| super::model::parse_soma(s))
            .collect::<Result<_>>()?
    };
    let economy = Economy {
        initial_targets_per_epoch: view.params.initial_targets_per_epoch.unwrap_or(0),
        hits_ema: view.hits_ema,
        max_targets_per_epoch: view.params.target_hits_per_epoch.unwrap_or(u64::MAX),
        reward_per_target: view.reward_per_target,
        model_share_bps: view.params.model_reward_share_bps,
    };
    let note = field.everyone_is_assigned().then(|| {
        format!(
            "the chain has {} active model(s) besides this one, fewer than models_per_target \
             ({}): every new model is assigned every new target",
            field.rivals().len(),
            field.models_per_target()
        )
    });

    let own_rows: Vec<(u64, Estimate)> = match &subject.embedding {
        Some(embedding) => {
            let candidates: Vec<Candidate> = stakes
                .iter()
                .map(|&stake| Candidate {
                    embedding: embedding.clone(),
                    stake,
                })
                .collect();
            stakes
                .iter()
                .copied()
                .zip(field.estimate(&candidates, args.samples, args.seed)?)
                .collect()
        }
        None => Vec::new(),
    };
    let search = match args.search {
        Some(count) => {
            let found = field.search(
                subject.embedding.as_deref(),
                stakes[0],
                count,
                args.samples,
                args.seed,
            )?;
            // The winner at every stake asked about, on targets neither the screening nor
            // its first estimate used.
            let at_stakes: Vec<Candidate> = stakes
                .iter()
                .map(|&stake| Candidate {
                    embedding: found.best.embedding.clone(),
                    stake,
                })
                .collect();
            let rows: Vec<(u64, Estimate)> = stakes
                .iter()
                .copied()
                .zip(field.estimate(&at_stakes, args.samples, args.seed ^ 0xB357)?)
                .collect();
            if let Some(out) = &args.out {
                write_embedding(out, &found.best.embedding)?;
            }
            Some((found, rows))
        }
        None => None,
    };

    if args.json {
        let mut report = json!({
            "epoch": view.epoch,
            "active_models": field.rivals().len() + usize::from(subject.model.is_some()),
            "rivals": field.rivals().len(),
            "models_per_target": field.models_per_target(),
            "embedding_dim": dim,
            "everyone_is_assigned": field.everyone_is_assigned(),
            "note": note,
            "subject": subject.described,
            "estimates": own_rows.iter().map(|(s, e)| estimate_json(*s, e, &economy)).collect::<Vec<_>>(),
        });
        if let Some((found, rows)) = &search {
            report["search"] = json!({
                "candidates": found.candidates,
                "origin": found.origin,
                "screened_rate": found.screened_rate,
                "rate": found.estimate.rate,
                "standard_error": found.estimate.standard_error,
                "embedding": found.best.embedding,
                "written_to": args.out.as_ref().map(|p| p.display().to_string()),
                "estimates": rows.iter().map(|(s, e)| estimate_json(*s, e, &economy)).collect::<Vec<_>>(),
            });
        }
        println!("{report}");
        return Ok(());
    }

    println!(
        "epoch {}: {} other active model(s), {} model(s) per target, embeddings of {dim}",
        view.epoch,
        field.rivals().len(),
        field.models_per_target()
    );
    let money = earnings(0.0, &economy);
    println!(
        "about {:.0} targets per epoch ({} at the epoch change + {} hits on average, at most {}), \
         {} SOMA each, the model's share {}",
        money.targets_per_epoch,
        economy.initial_targets_per_epoch,
        economy.hits_ema,
        economy.max_targets_per_epoch,
        format_soma(economy.reward_per_target),
        economy
            .model_share_bps
            .map(|b| format!("{:.2}%", b as f64 / 100.0))
            .unwrap_or_else(|| "unknown".into())
    );
    if let Some(note) = &note {
        println!("note: {note}");
    }
    if !own_rows.is_empty() {
        println!("\n{}:", subject.described);
        print_rows(&own_rows, &economy);
        let shared = &own_rows[0].1.shared_with;
        if !shared.is_empty() {
            println!("shares its targets most with:");
            for (id, fraction) in shared.iter().take(5) {
                println!("  {id}  {:.1}% of its targets", fraction * 100.0);
            }
        }
    }
    if let Some((found, rows)) = &search {
        println!(
            "\nsearch: best of {} positions is a {} (rate {:.4} ± {:.4} on fresh targets; {:.4} \
             when screened){}",
            found.candidates,
            found.origin,
            found.estimate.rate,
            found.estimate.standard_error,
            found.screened_rate,
            args.out
                .as_ref()
                .map(|p| format!("; written to {}", p.display()))
                .unwrap_or_default()
        );
        print_rows(rows, &economy);
    }
    println!(
        "\nrewards assume each assigned target is filled by a submitter; targets nobody fills \
         expire and pay nobody"
    );
    Ok(())
}

fn write_embedding(path: &Path, embedding: &[f32]) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(embedding)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    somatrain_model::io::finish_atomic(&tmp, path)
        .with_context(|| format!("writing {}", path.display()))
}
