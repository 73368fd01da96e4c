//! Progress reporting: a bar on a terminal, plain log lines otherwise.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

pub struct Progress {
    bar: Option<ProgressBar>,
    label: String,
    last_log: Instant,
}

impl Progress {
    pub fn new(label: impl Into<String>, total: u64) -> Self {
        let label = label.into();
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} batches ({eta})")
                    .expect("valid template")
                    .progress_chars("=> "),
            );
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
                if done == total || self.last_log.elapsed() >= Duration::from_secs(10) {
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
