//! `somatrain plot`: the charts of a run directory's history, as SVG or PNG.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use somatrain_charts::{RoundPoint, RunHistory};
use somatrain_daemon::journal::{ROUNDS_FILE, RoundRecord};

#[derive(Args)]
pub struct PlotArgs {
    /// The run directory (its `history.jsonl`, and `rounds.jsonl` once rounds are revealed).
    #[arg(long)]
    run_dir: PathBuf,
    /// Where to write the chart: FILE.svg or FILE.png (default: RUN_DIR/chart.svg).
    #[arg(long)]
    out: Option<PathBuf>,
}

pub fn run_plot(args: PlotArgs) -> Result<()> {
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| args.run_dir.join("chart.svg"));
    let extension = out
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase());
    if !matches!(extension.as_deref(), Some("svg" | "png")) {
        bail!(
            "--out {}: give a file ending in .svg or .png",
            out.display()
        );
    }
    let steps = somatrain_train::history::read(&args.run_dir)
        .with_context(|| format!("reading the history of {}", args.run_dir.display()))?;
    let rounds: Vec<RoundRecord> =
        somatrain_train::history::read_all(&args.run_dir.join(ROUNDS_FILE))
            .with_context(|| format!("reading the rounds of {}", args.run_dir.display()))?;
    let rounds: Vec<RoundPoint> = rounds
        .iter()
        .map(|r| RoundPoint {
            round: r.round,
            step: r.step,
            heldout_loss: r.heldout_loss,
        })
        .collect();
    let history = RunHistory {
        steps: &steps,
        rounds: &rounds,
    };
    if extension.as_deref() == Some("png") {
        somatrain_charts::write_png(&history, &out)?;
    } else {
        let svg = somatrain_charts::svg(&history)?;
        super::write_private_file(&out, svg.as_bytes())?;
    }
    println!(
        "{}: {} steps, {} revealed rounds",
        out.display(),
        steps.len(),
        rounds.len()
    );
    Ok(())
}
