//! Charts of a run: the training loss per step with the held-out loss of each revealed round,
//! the learning rate, and the throughput, stacked in one picture, as SVG or PNG.
//!
//! Owns drawing only: it takes the history as values ([`StepRecord`]s from the trainer's
//! `history.jsonl`, [`RoundPoint`]s from the publisher's `rounds.jsonl`) and reads no file and
//! talks to no network. Text is laid out and, in a PNG, drawn with DejaVu Sans embedded in the
//! binary (`dejavu` crate, through plotters' `ab_glyph`), so a machine without fonts draws the
//! same picture.

#![forbid(unsafe_code)]

use std::path::Path;

use plotters::coord::Shift;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
pub use somatrain_train::history::StepRecord;

/// A revealed round, placed at the step its weights were trained to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoundPoint {
    pub round: u64,
    pub step: u64,
    /// The round's network loss on held-out data (None when it had none).
    pub heldout_loss: Option<f32>,
}

/// Everything a chart shows.
#[derive(Debug, Clone, Copy)]
pub struct RunHistory<'a> {
    pub steps: &'a [StepRecord],
    pub rounds: &'a [RoundPoint],
}

#[derive(Debug, thiserror::Error)]
pub enum ChartError {
    #[error("the run has no training steps in its history yet: nothing to draw")]
    Empty,
    #[error("drawing the chart: {0}")]
    Draw(String),
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

fn draw_error(e: impl std::fmt::Display) -> ChartError {
    ChartError::Draw(e.to_string())
}

/// The picture's size in pixels (width, height).
pub const SIZE: (u32, u32) = (1200, 1050);

const FONT: &str = "sans-serif";

/// The colour of each series (red, green, blue), for a reader of the picture or a test.
pub const LOSS_RGB: (u8, u8, u8) = (31, 119, 180);
pub const HELDOUT_RGB: (u8, u8, u8) = (214, 39, 40);
pub const LR_RGB: (u8, u8, u8) = (44, 160, 44);
pub const THROUGHPUT_RGB: (u8, u8, u8) = (148, 103, 189);

const fn color((r, g, b): (u8, u8, u8)) -> RGBColor {
    RGBColor(r, g, b)
}
const LOSS_COLOR: RGBColor = color(LOSS_RGB);
const HELDOUT_COLOR: RGBColor = color(HELDOUT_RGB);
const LR_COLOR: RGBColor = color(LR_RGB);
const THROUGHPUT_COLOR: RGBColor = color(THROUGHPUT_RGB);

/// Registers the embedded font under the family the charts use (once per process).
fn register_font() -> Result<(), ChartError> {
    static REGISTERED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular())
                .map_err(|_| "the embedded DejaVu Sans does not load".to_string())
        })
        .clone()
        .map_err(ChartError::Draw)
}

/// The chart as an SVG document.
pub fn svg(history: &RunHistory) -> Result<String, ChartError> {
    register_font()?;
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, SIZE).into_drawing_area();
        draw(&root, history)?;
        root.present().map_err(draw_error)?;
    }
    Ok(out)
}

/// Writes the chart to `path` as a PNG, atomically (a temporary file renamed into place).
pub fn write_png(history: &RunHistory, path: &Path) -> Result<(), ChartError> {
    register_font()?;
    let io = |source| ChartError::Io {
        path: path.to_path_buf(),
        source,
    };
    // The encoder picks the format from the extension, so the temporary name keeps `.png`.
    let tmp = path.with_extension(format!("tmp-{}.png", std::process::id()));
    let drawn = (|| {
        let root = BitMapBackend::new(&tmp, SIZE).into_drawing_area();
        draw(&root, history)?;
        root.present().map_err(draw_error)
    })();
    if let Err(e) = drawn {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path).map_err(io)
}

/// The range `values` span, widened a little (and made non-empty) so no point sits on a border.
fn padded_range(values: impl Iterator<Item = f64>) -> std::ops::Range<f64> {
    let (mut low, mut high) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite()) {
        low = low.min(v);
        high = high.max(v);
    }
    if !low.is_finite() {
        return 0.0..1.0;
    }
    // A flat series (a constant learning rate) gets a tenth of its size either side, so the
    // axis labels differ.
    let pad = if high - low <= high.abs() * 1e-3 {
        (high.abs() * 0.1).max(1e-9)
    } else {
        (high - low) * 0.05
    };
    (low - pad)..(high + pad)
}

/// One panel over the optimizer step: its caption, axes, grid and labels.
fn panel<'a, DB: DrawingBackend>(
    area: &'a DrawingArea<DB, Shift>,
    caption: &str,
    y_desc: &str,
    x_range: std::ops::Range<f64>,
    y_range: std::ops::Range<f64>,
    y_label: &dyn Fn(&f64) -> String,
) -> Result<ChartContext<'a, DB, Cartesian2d<RangedCoordf64, RangedCoordf64>>, ChartError> {
    let mut chart = ChartBuilder::on(area)
        .caption(caption, (FONT, 24))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(70)
        .build_cartesian_2d(x_range, y_range)
        .map_err(draw_error)?;
    chart
        .configure_mesh()
        .x_desc("optimizer step")
        .y_desc(y_desc)
        .label_style((FONT, 14))
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(y_label)
        .draw()
        .map_err(draw_error)?;
    Ok(chart)
}

/// The legend of a panel, in its upper right corner.
fn draw_legend<'a, DB: DrawingBackend + 'a>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<RangedCoordf64, RangedCoordf64>>,
) -> Result<(), ChartError> {
    chart
        .configure_series_labels()
        .label_font((FONT, 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(draw_error)
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    history: &RunHistory,
) -> Result<(), ChartError> {
    let steps = history.steps;
    if steps.is_empty() {
        return Err(ChartError::Empty);
    }
    root.fill(&WHITE).map_err(draw_error)?;
    let last_step = steps
        .iter()
        .map(|r| r.step)
        .chain(history.rounds.iter().map(|r| r.step))
        .max()
        .unwrap_or(1);
    let x_range = 0f64..(last_step.max(1) as f64);
    let panels = root.split_evenly((3, 1));

    // Loss, with the held-out loss of each revealed round.
    let heldout: Vec<(f64, f64)> = history
        .rounds
        .iter()
        .filter_map(|r| Some((r.step as f64, f64::from(r.heldout_loss?))))
        .collect();
    let y = padded_range(
        steps
            .iter()
            .map(|r| f64::from(r.loss))
            .chain(heldout.iter().map(|p| p.1)),
    );
    let mut chart = panel(
        &panels[0],
        "Loss",
        "loss (nats per byte)",
        x_range.clone(),
        y,
        &|v| format!("{v:.2}"),
    )?;
    chart
        .draw_series(LineSeries::new(
            steps.iter().map(|r| (r.step as f64, f64::from(r.loss))),
            LOSS_COLOR.stroke_width(2),
        ))
        .map_err(draw_error)?
        .label("training loss (cross-entropy + SIGReg)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], LOSS_COLOR.stroke_width(2)));
    if !heldout.is_empty() {
        chart
            .draw_series(
                heldout
                    .iter()
                    .map(|&p| Circle::new(p, 6, HELDOUT_COLOR.filled())),
            )
            .map_err(draw_error)?
            .label("held-out loss of each revealed round")
            .legend(|(x, y)| Circle::new((x + 10, y), 6, HELDOUT_COLOR.filled()));
    }
    draw_legend(&mut chart)?;

    // The learning rate, then the throughput.
    type Value = fn(&StepRecord) -> f64;
    type Label = fn(&f64) -> String;
    let lines: [(&str, &str, &str, RGBColor, Value, Label); 2] = [
        (
            "Learning rate",
            "learning rate",
            "learning rate (AdamW schedule)",
            LR_COLOR,
            |r| f64::from(r.lr),
            |v| format!("{v:.2e}"),
        ),
        (
            "Throughput",
            "bytes per second",
            "bytes trained per second",
            THROUGHPUT_COLOR,
            |r| r.tokens_per_s,
            |v| format!("{v:.0}"),
        ),
    ];
    for (area, (caption, y_desc, label, color, value, y_label)) in panels[1..].iter().zip(lines) {
        let y = padded_range(steps.iter().map(value));
        let mut chart = panel(area, caption, y_desc, x_range.clone(), y, &y_label)?;
        chart
            .draw_series(LineSeries::new(
                steps.iter().map(|r| (r.step as f64, value(r))),
                color.stroke_width(2),
            ))
            .map_err(draw_error)?
            .label(label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        draw_legend(&mut chart)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_history_is_an_error_not_an_empty_picture() {
        let history = RunHistory {
            steps: &[],
            rounds: &[],
        };
        assert!(matches!(svg(&history), Err(ChartError::Empty)));
    }
}
