//! Progress reporting: bars on a terminal, plain log lines otherwise.
//!
//! Three things report progress: scoring (batches), training (optimizer steps, with the bytes
//! read from the Hub) and transfers (weights uploads and downloads). The libraries know nothing
//! of terminals: scoring and training call back into the command, and the storage crate emits
//! `somatrain::progress` events (kind, name, done, total bytes), which [`TransferLayer`] turns
//! into a bar or, without a terminal, into a log line every [`LINE_INTERVAL`].
//!
//! Log lines written while bars are drawn go through [`BarSafeStderr`], which lifts the bars
//! out of the way for the line, so neither garbles the other.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Without a terminal, a transfer or a scoring run is reported once per this interval.
pub const LINE_INTERVAL: Duration = Duration::from_secs(10);

/// The target of the storage crate's transfer events.
pub const PROGRESS_TARGET: &str = "somatrain::progress";

fn on_terminal() -> bool {
    static TERMINAL: OnceLock<bool> = OnceLock::new();
    *TERMINAL.get_or_init(|| std::io::stderr().is_terminal())
}

/// Every bar of the process, drawn on stderr (hidden without a terminal).
fn bars() -> &'static MultiProgress {
    static BARS: OnceLock<MultiProgress> = OnceLock::new();
    BARS.get_or_init(|| {
        if on_terminal() {
            MultiProgress::with_draw_target(ProgressDrawTarget::stderr())
        } else {
            MultiProgress::with_draw_target(ProgressDrawTarget::hidden())
        }
    })
}

/// The log's writer: stderr, with the bars lifted for each line.
pub struct BarSafeStderr;

pub struct BarSafeLine(Vec<u8>);

impl Write for BarSafeLine {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for BarSafeLine {
    fn drop(&mut self) {
        let line = std::mem::take(&mut self.0);
        bars().suspend(|| {
            let _ = std::io::stderr().write_all(&line);
        });
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for BarSafeStderr {
    type Writer = BarSafeLine;
    fn make_writer(&'a self) -> BarSafeLine {
        BarSafeLine(Vec::new())
    }
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .expect("valid template")
        .progress_chars("=> ")
}

/// Batches of a scoring run.
pub struct Progress {
    bar: Option<ProgressBar>,
    label: String,
    last_log: Instant,
}

impl Progress {
    pub fn new(label: impl Into<String>, total: u64) -> Self {
        let label = label.into();
        let bar = on_terminal().then(|| {
            let bar = bars().add(ProgressBar::new(total));
            bar.set_style(style("{msg} [{bar:30}] {pos}/{len} batches ({eta})"));
            bar.set_message(label.clone());
            bar
        });
        Progress {
            bar,
            label,
            last_log: Instant::now(),
        }
    }

    pub fn update(&mut self, done: usize, total: usize) {
        match &self.bar {
            Some(bar) => bar.set_position(done as u64),
            None => {
                if done == total || self.last_log.elapsed() >= LINE_INTERVAL {
                    tracing::info!("{}: {done}/{total} batches", self.label);
                    self.last_log = Instant::now();
                }
            }
        }
    }

    pub fn finish(self) {
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Optimizer steps of a `train` invocation. Without a terminal the trainer's own step lines
/// (every `--log-every` steps) are the report, so this draws nothing there.
pub struct TrainProgress {
    bar: Option<ProgressBar>,
}

impl TrainProgress {
    pub fn new() -> Self {
        let bar = on_terminal().then(|| {
            let bar = bars().add(ProgressBar::new(0));
            bar.set_style(style(
                "step {pos}/{len} [{bar:30}] {msg} ({elapsed} elapsed, {eta} left)",
            ));
            bar
        });
        TrainProgress { bar }
    }

    pub fn step(&mut self, log: &somatrain_train::trainer::StepLog) {
        let Some(bar) = &self.bar else { return };
        bar.set_length(log.until_step);
        bar.set_position(log.step);
        let hub = somatrain_hub::traffic();
        let hub = if hub.requests > 0 {
            format!(
                ", Hub {:.1} MB in {} requests",
                hub.bytes as f64 / 1e6,
                hub.requests
            )
        } else {
            String::new()
        };
        bar.set_message(format!(
            "loss {:.4}, {:.0} tok/s{hub}",
            log.loss, log.tokens_per_s
        ));
    }

    pub fn finish(self) {
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Draws the storage crate's transfer events: a bar per transfer on a terminal, else a log
/// line per transfer every [`LINE_INTERVAL`] and at its end.
#[derive(Default)]
pub struct TransferLayer {
    transfers: Mutex<HashMap<(String, String), Transfer>>,
}

struct Transfer {
    bar: Option<ProgressBar>,
    last_line: Option<Instant>,
    started: Instant,
}

#[derive(Default)]
struct TransferEvent {
    kind: String,
    name: String,
    done: u64,
    total: u64,
    abandoned: bool,
}

impl tracing::field::Visit for TransferEvent {
    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        if field.name() == "abandoned" {
            self.abandoned = value;
        }
    }
    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        match field.name() {
            "done" => self.done = value,
            "total" => self.total = value,
            _ => {}
        }
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        match field.name() {
            "kind" => self.kind = value.to_string(),
            "name" => self.name = value.to_string(),
            _ => {}
        }
    }
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "kind" => self.kind = format!("{value:?}").trim_matches('"').to_string(),
            "name" => self.name = format!("{value:?}").trim_matches('"').to_string(),
            _ => {}
        }
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for TransferLayer {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if event.metadata().target() != PROGRESS_TARGET {
            return;
        }
        let mut seen = TransferEvent::default();
        event.record(&mut seen);
        let finished = seen.done >= seen.total || seen.abandoned;
        let key = (seen.kind.clone(), seen.name.clone());
        let mut transfers = self.transfers.lock().expect("not poisoned");
        let transfer = transfers.entry(key.clone()).or_insert_with(|| Transfer {
            bar: on_terminal().then(|| {
                let bar = bars().add(ProgressBar::new(seen.total));
                bar.set_style(style(
                    "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ({eta})",
                ));
                bar.set_message(format!("{} {}", seen.kind, seen.name));
                bar
            }),
            last_line: None,
            started: Instant::now(),
        });
        match &transfer.bar {
            Some(bar) => {
                bar.set_length(seen.total);
                bar.set_position(seen.done);
            }
            None => {
                if finished
                    || transfer
                        .last_line
                        .is_none_or(|t| t.elapsed() >= LINE_INTERVAL)
                {
                    transfer.last_line = Some(Instant::now());
                    let secs = transfer.started.elapsed().as_secs_f64().max(1e-3);
                    // Written straight to stderr (re-entering the subscriber from a layer is
                    // not something to rely on), in the log's own format.
                    let mut time = String::new();
                    let _ = tracing_subscriber::fmt::time::FormatTime::format_time(
                        &tracing_subscriber::fmt::time::SystemTime,
                        &mut tracing_subscriber::fmt::format::Writer::new(&mut time),
                    );
                    let line = format!(
                        "{time}  INFO {} {}{}: {:.1} of {:.1} MB ({:.0}%), {:.1} MB/s\n",
                        seen.kind,
                        if seen.abandoned { " (stopped)" } else { "" },
                        seen.name,
                        seen.done as f64 / 1e6,
                        seen.total as f64 / 1e6,
                        100.0 * seen.done as f64 / seen.total.max(1) as f64,
                        seen.done as f64 / 1e6 / secs
                    );
                    let _ = std::io::stderr().write_all(line.as_bytes());
                }
            }
        }
        if finished {
            if let Some(bar) = &transfer.bar {
                bar.finish_and_clear();
            }
            transfers.remove(&key);
        }
    }
}
