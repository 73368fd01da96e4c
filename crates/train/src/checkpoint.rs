//! Crash-safe checkpoints: weights, Adam moments, step, schedule and corpus position, together.
//!
//! A checkpoint is a directory `checkpoints/step-NNNNNNNNNN/` holding `weights.safetensors` (the
//! canonical layout, publishable as is), `optimizer.safetensors` (`m.*`, `v.*`), `corpus.bin`
//! (the training stream's cursor and shuffle buffer, see [`Position`]) and `state.json`.
//! It is built in a temporary directory, every file fsynced, then renamed into place: the rename
//! is the commit, so a crash at any moment leaves only complete checkpoints (plus a stray
//! temporary directory that the next save removes). `state.json` carries the Blake2b-256 of the
//! other files and of itself, so a corrupted or truncated checkpoint is detected on load and
//! the previous one is used instead.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use blake2::digest::consts::U32;
use blake2::{Blake2b, Digest};
use serde::{Deserialize, Serialize};
use somatrain_model::io::{LoadOptions, load_bytes, load_named_into, save_file, save_named};
use somatrain_model::{ModelConfig, Weights};

use crate::corpus::Position;
use crate::optim::AdamState;

pub const FORMAT: &str = "somatrain-checkpoint";
pub const VERSION: u32 = 1;
const WEIGHTS_FILE: &str = "weights.safetensors";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const STATE_FILE: &str = "state.json";
const CORPUS_FILE: &str = "corpus.bin";

/// The stream's place as `state.json` shows it (the full cursor is in `corpus.bin`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CorpusMark {
    pub epoch: u64,
    pub sequences: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("checkpoint {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    /// A save that could not be written (a full disk, say); the earlier checkpoints are intact.
    #[error(
        "writing the checkpoint in {path} failed: {reason}; the earlier checkpoints are untouched"
    )]
    Write { path: PathBuf, reason: String },
}

/// Everything besides tensors that a resumed run needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointState {
    pub format: String,
    pub version: u32,
    /// Optimizer steps completed.
    pub step: u64,
    pub model: ModelConfig,
    /// Where the training stream continues.
    pub corpus: CorpusMark,
    /// Loss of the last step, for the logs.
    pub last_loss: f32,
    /// Blake2b-256 (Base58) of each other file of the checkpoint.
    pub files: BTreeMap<String, String>,
}

/// A checkpoint read back and verified.
pub struct Loaded {
    pub path: PathBuf,
    pub state: CheckpointState,
    pub weights: Weights,
    pub adam: AdamState,
    /// Where the training stream continues (replayed from `state.corpus` for checkpoints older
    /// than `corpus.bin`).
    pub corpus: Position,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn digest_b58(bytes: &[u8]) -> String {
    bs58::encode(Blake2b::<U32>::digest(bytes)).into_string()
}

fn dir_name(step: u64) -> String {
    format!("step-{step:010}")
}

/// Checkpoint directories under `root`, newest first.
pub fn list(root: &Path) -> Vec<(u64, PathBuf)> {
    let Ok(entries) = fs::read_dir(root) else {
        return Vec::new();
    };
    let mut found: Vec<(u64, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let step = name.strip_prefix("step-")?.parse().ok()?;
            Some((step, e.path()))
        })
        .collect();
    found.sort_by_key(|e| std::cmp::Reverse(e.0));
    found
}

/// Saves a checkpoint of `step` under `root` and returns its directory.
pub fn save(
    root: &Path,
    weights: &Weights,
    adam: &AdamState,
    corpus: &Position,
    last_loss: f32,
) -> Result<PathBuf, CheckpointError> {
    somatrain_model::io::create_private_dir(root).map_err(io_err(root))?;
    // Leftovers of a save that was killed half-way.
    if let Ok(entries) = fs::read_dir(root) {
        for e in entries.filter_map(|e| e.ok()) {
            if e.file_name().to_string_lossy().starts_with(".tmp-") {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
    let step = adam.step;
    let final_dir = root.join(dir_name(step));
    let tmp = root.join(format!(".tmp-{}-{}", dir_name(step), std::process::id()));
    somatrain_model::io::create_private_dir(&tmp).map_err(io_err(&tmp))?;
    let failed = |reason: String| CheckpointError::Write {
        path: tmp.clone(),
        reason,
    };

    let weights_path = tmp.join(WEIGHTS_FILE);
    save_file(weights, &weights_path).map_err(|e| failed(e.to_string()))?;
    fault_injection_pause();
    let specs = Weights::specs(&weights.config);
    let mut moments = Vec::with_capacity(specs.len() * 2);
    for (prefix, w) in [("m.", &adam.m), ("v.", &adam.v)] {
        for (spec, (name, data)) in specs.iter().zip(w.tensors()) {
            moments.push((format!("{prefix}{name}"), spec.shape.clone(), data));
        }
    }
    let optimizer_path = tmp.join(OPTIMIZER_FILE);
    save_named(&optimizer_path, moments, HashMap::new()).map_err(|e| failed(e.to_string()))?;
    fault_injection_pause();
    write_synced(&tmp.join(CORPUS_FILE), &corpus.to_bytes())?;

    let mut files = BTreeMap::new();
    for name in [WEIGHTS_FILE, OPTIMIZER_FILE, CORPUS_FILE] {
        let path = tmp.join(name);
        let bytes = fs::read(&path).map_err(io_err(&path))?;
        files.insert(name.to_string(), digest_b58(&bytes));
    }
    let state = CheckpointState {
        format: FORMAT.into(),
        version: VERSION,
        step,
        model: weights.config,
        corpus: CorpusMark {
            epoch: corpus.epoch,
            sequences: corpus.sequences,
        },
        last_loss,
        files,
    };
    let body = serde_json::to_string_pretty(&state).expect("state serialises");
    let text = format!("{body}\n{}\n", digest_b58(body.as_bytes()));
    write_synced(&tmp.join(STATE_FILE), text.as_bytes())?;
    File::open(&tmp)
        .and_then(|d| d.sync_all())
        .map_err(io_err(&tmp))?;
    if final_dir.exists() {
        // Same step saved twice (a resumed run re-saving): replace the older copy.
        fs::remove_dir_all(&final_dir).map_err(io_err(&final_dir))?;
    }
    fs::rename(&tmp, &final_dir).map_err(io_err(&final_dir))?;
    File::open(root)
        .and_then(|d| d.sync_all())
        .map_err(io_err(root))?;
    Ok(final_dir)
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err(path))?;
    file.write_all(bytes).map_err(io_err(path))?;
    file.sync_all().map_err(io_err(path))
}

/// Tests kill the process while a checkpoint is being written; this widens that window.
fn fault_injection_pause() {
    if let Some(ms) = std::env::var("SOMATRAIN_CHECKPOINT_PAUSE_MS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

/// Reads and verifies a checkpoint's `state.json` alone.
pub fn read_state(dir: &Path) -> Result<CheckpointState, CheckpointError> {
    let corrupt = |reason: String| CheckpointError::Corrupt {
        path: dir.to_path_buf(),
        reason,
    };
    let state_path = dir.join(STATE_FILE);
    let text = fs::read_to_string(&state_path).map_err(|e| corrupt(format!("state.json: {e}")))?;
    let trimmed = text.trim_end_matches('\n');
    let (body, checksum) = trimmed
        .rsplit_once('\n')
        .ok_or_else(|| corrupt("state.json has no checksum".into()))?;
    if digest_b58(body.as_bytes()) != checksum {
        return Err(corrupt("state.json checksum mismatch".into()));
    }
    let state: CheckpointState =
        serde_json::from_str(body).map_err(|e| corrupt(format!("state.json: {e}")))?;
    if state.format != FORMAT || state.version != VERSION {
        return Err(corrupt(format!(
            "format {} v{} (this build reads {FORMAT} v{VERSION})",
            state.format, state.version
        )));
    }
    Ok(state)
}

/// The verified `state.json` of the newest checkpoint under `root` whose state verifies (the
/// tensors are not read, so this is cheap enough for a status display).
pub fn latest_state(root: &Path) -> Option<(PathBuf, CheckpointState)> {
    list(root)
        .into_iter()
        .find_map(|(_, dir)| read_state(&dir).ok().map(|state| (dir, state)))
}

/// Reads and verifies one checkpoint directory.
pub fn load(dir: &Path) -> Result<Loaded, CheckpointError> {
    let corrupt = |reason: String| CheckpointError::Corrupt {
        path: dir.to_path_buf(),
        reason,
    };
    let state = read_state(dir)?;
    let read_checked = |name: &str| -> Result<Vec<u8>, CheckpointError> {
        let bytes = fs::read(dir.join(name)).map_err(|e| corrupt(format!("{name}: {e}")))?;
        let expected = state
            .files
            .get(name)
            .ok_or_else(|| corrupt(format!("{name} not listed")))?;
        if &digest_b58(&bytes) != expected {
            return Err(corrupt(format!("{name} checksum mismatch")));
        }
        Ok(bytes)
    };
    let weights_bytes = read_checked(WEIGHTS_FILE)?;
    let optimizer_bytes = read_checked(OPTIMIZER_FILE)?;
    let options = LoadOptions {
        num_heads: Some(state.model.num_heads),
        preset: None,
    };
    let weights = load_bytes(&weights_bytes, options).map_err(|e| corrupt(e.to_string()))?;
    if weights.config != state.model {
        return Err(corrupt("weights shape differs from state.json".into()));
    }
    let mut adam = AdamState::new(&weights);
    load_named_into(&optimizer_bytes, "m.", &mut adam.m).map_err(|e| corrupt(e.to_string()))?;
    load_named_into(&optimizer_bytes, "v.", &mut adam.v).map_err(|e| corrupt(e.to_string()))?;
    adam.step = state.step;
    let corpus = if state.files.contains_key(CORPUS_FILE) {
        let position = Position::from_bytes(&read_checked(CORPUS_FILE)?)
            .map_err(|e| corrupt(format!("{CORPUS_FILE}: {e}")))?;
        if (position.epoch, position.sequences) != (state.corpus.epoch, state.corpus.sequences) {
            return Err(corrupt(format!("{CORPUS_FILE} disagrees with state.json")));
        }
        position
    } else {
        Position::replay(state.corpus.epoch, state.corpus.sequences)
    };
    Ok(Loaded {
        path: dir.to_path_buf(),
        state,
        weights,
        adam,
        corpus,
    })
}

/// The newest checkpoint that verifies, with the reasons the newer ones were rejected.
pub fn load_latest(root: &Path) -> (Option<Loaded>, Vec<CheckpointError>) {
    let mut rejected = Vec::new();
    for (_, dir) in list(root) {
        match load(&dir) {
            Ok(loaded) => return (Some(loaded), rejected),
            Err(e) => rejected.push(e),
        }
    }
    (None, rejected)
}

/// Deletes all but the newest `keep` checkpoints, and only those older than `newest_good`, which
/// must verify (its `state.json` read back): no checkpoint goes unless a newer one is sound.
pub fn prune(root: &Path, keep: usize, newest_good: &Path) {
    let Ok(good) = read_state(newest_good) else {
        tracing::warn!(
            "{} does not verify; no older checkpoint is deleted",
            newest_good.display()
        );
        return;
    };
    for (step, dir) in list(root).into_iter().skip(keep.max(1)) {
        if step < good.step && dir != newest_good {
            let _ = fs::remove_dir_all(dir);
        }
    }
}
