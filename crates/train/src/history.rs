//! A run's step history: `DIR/history.jsonl`, one JSON line per optimizer step, and the
//! append-only JSON Lines file under it ([`JsonLines`], also the daemon's `rounds.jsonl`).
//!
//! Lines are appended with one `write` each, so a process killed at any moment leaves at most
//! one partial line, at the end. On every start the file is read back: a partial or unreadable
//! last line is dropped, and so is every line past the step the run resumes from (those steps
//! are trained again and logged again), so the file always holds exactly one line per step up
//! to where training stands. The rewrite is atomic (temporary file, fsync, rename).

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Name of the history inside the run directory.
pub const HISTORY_FILE: &str = "history.jsonl";

/// One optimizer step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// Optimizer steps completed with this one.
    pub step: u64,
    /// The network's loss (cross-entropy + SIGReg), averaged over the step's micro-batches.
    pub loss: f32,
    pub cross_entropy: f32,
    pub bits_per_byte: f32,
    pub lr: f32,
    pub grad_norm: f32,
    /// Bytes trained per second in this step.
    pub tokens_per_s: f64,
    /// Model FLOP utilisation against the device's measured peak, where the engine knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mfu: Option<f64>,
    /// When the step ended, ms since the Unix epoch.
    pub time_ms: u64,
}

/// An append-only JSON Lines file whose torn or unwanted lines are cut away when it is opened.
pub struct JsonLines {
    path: PathBuf,
    file: File,
}

impl JsonLines {
    /// Opens `path` for appending, keeping only the complete lines that parse as `T` and pass
    /// `keep` (the file is rewritten atomically when anything is left out).
    pub fn open_keeping<T: DeserializeOwned>(
        path: &Path,
        keep: impl Fn(&T) -> bool,
    ) -> std::io::Result<JsonLines> {
        let (kept, dropped) = match File::open(path) {
            Ok(file) => read_kept(file, &keep)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (Vec::new(), false),
            Err(e) => return Err(e),
        };
        if dropped {
            let (tmp, mut out) = somatrain_model::io::create_private_temp(path)?;
            for line in &kept {
                out.write_all(line.as_bytes())?;
                out.write_all(b"\n")?;
            }
            drop(out);
            somatrain_model::io::finish_atomic(&tmp, path)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(JsonLines {
            path: path.to_path_buf(),
            file,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one record, as one write.
    pub fn append<T: Serialize>(&mut self, record: &T) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(record).map_err(std::io::Error::other)?;
        line.push(b'\n');
        self.file.write_all(&line)
    }
}

/// The open history of a run, appended to step by step.
pub struct History(JsonLines);

impl History {
    /// Opens `run_dir`'s history for a run that resumes after `resume_step` steps: complete
    /// lines of steps up to `resume_step` are kept, everything else is cut away.
    pub fn open(run_dir: &Path, resume_step: u64) -> std::io::Result<History> {
        JsonLines::open_keeping(&run_dir.join(HISTORY_FILE), |r: &StepRecord| {
            r.step <= resume_step
        })
        .map(History)
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }

    /// Appends one step, as one write.
    pub fn append(&mut self, record: &StepRecord) -> std::io::Result<()> {
        self.0.append(record)
    }
}

/// The complete lines that parse as `T` and pass `keep`, and whether anything was left out.
fn read_kept<T: DeserializeOwned>(
    file: File,
    keep: &impl Fn(&T) -> bool,
) -> std::io::Result<(Vec<String>, bool)> {
    let mut reader = BufReader::new(file);
    let mut kept = Vec::new();
    let mut dropped = false;
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok((kept, dropped));
        }
        // A line without its newline is the torn end of a killed write.
        let complete = line.strip_suffix('\n');
        match complete.and_then(|l| serde_json::from_str::<T>(l).ok()) {
            Some(record) if keep(&record) => kept.push(complete.expect("parsed").to_string()),
            _ => dropped = true,
        }
    }
}

/// Every complete record of the JSON Lines file at `path`, in order (none if it is missing).
pub fn read_all<T: DeserializeOwned>(path: &Path) -> std::io::Result<Vec<T>> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let (lines, _) = read_kept(file, &|_: &T| true)?;
    Ok(lines
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

/// Every step of `run_dir`'s history, in order (a torn last line is left out).
pub fn read(run_dir: &Path) -> std::io::Result<Vec<StepRecord>> {
    read_all(&run_dir.join(HISTORY_FILE))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(step: u64) -> StepRecord {
        StepRecord {
            step,
            loss: 5.0,
            cross_entropy: 4.9,
            bits_per_byte: 7.0,
            lr: 1e-3,
            grad_norm: 0.5,
            tokens_per_s: 1000.0,
            mfu: None,
            time_ms: 1,
        }
    }

    #[test]
    fn a_torn_last_line_and_steps_past_the_resume_point_are_cut() {
        let dir = tempfile::tempdir().unwrap();
        let mut history = History::open(dir.path(), 0).unwrap();
        for step in 1..=5 {
            history.append(&record(step)).unwrap();
        }
        drop(history);
        let path = dir.path().join(HISTORY_FILE);
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(b"{\"step\": 6, \"lo").unwrap();
        drop(file);
        // The run resumes from its checkpoint at step 3: steps 4 and 5 are trained again.
        let mut history = History::open(dir.path(), 3).unwrap();
        history.append(&record(4)).unwrap();
        let steps: Vec<u64> = read(dir.path()).unwrap().iter().map(|r| r.step).collect();
        assert_eq!(steps, [1, 2, 3, 4]);
    }
}
