//! Streaming a local corpus into training batches, deterministically.
//!
//! Sources are listed (never loaded whole), shuffled per epoch with a seeded RNG, read one unit
//! at a time, split into train and held-out documents by a hash of each document's identity,
//! tokenized with the network's data contract (`somatrain-data`), passed through a bounded
//! shuffle buffer and batched. The stream's [`Position`] (epoch, sequences emitted) is all a
//! checkpoint needs: reopening at a position replays the epoch and skips what was emitted, so a
//! resumed run sees exactly the batches an uninterrupted one would have.
//!
//! Bad records never stop a run: invalid UTF-8, empty and oversized documents and malformed
//! JSON lines are skipped and counted in [`CorpusStats`].

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use blake2::digest::consts::U32;
use blake2::{Blake2b, Digest};
use globset::{Glob, GlobSet, GlobSetBuilder};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use somatrain_data::{Batch, Sequence, sequences};

#[derive(Debug, thiserror::Error)]
pub enum CorpusError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid glob '{glob}': {reason}")]
    Glob { glob: String, reason: String },
    #[error("the corpus has no training documents (checked {checked} documents)")]
    Empty { checked: u64 },
}

/// Where documents come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Source {
    /// Every regular file under a directory (filtered by the include/exclude globs).
    Dir { path: PathBuf },
    /// JSON Lines: one document per line, its text in `field`.
    Jsonl { path: PathBuf, field: String },
    /// A text file listing one document path per line (relative to the list's directory).
    List { path: PathBuf },
    /// A Parquet file, one document per row, its text in the string or binary `column` (The
    /// Stack v2 dumps use `content`). Read row group by row group, only that column.
    Parquet { path: PathBuf, column: String },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorpusConfig {
    pub sources: Vec<Source>,
    /// Globs a directory file's relative path must match (empty: everything).
    #[serde(default)]
    pub include: Vec<String>,
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Documents larger than this are skipped.
    pub max_document_bytes: u64,
    /// Documents whose identity hashes below this many per mille are held out.
    pub heldout_per_mille: u32,
    /// Sequences held in the shuffle buffer.
    pub shuffle_buffer: usize,
    pub seed: u64,
    pub max_seq_len: usize,
}

impl CorpusConfig {
    pub fn new(sources: Vec<Source>) -> Self {
        CorpusConfig {
            sources,
            include: Vec::new(),
            exclude: Vec::new(),
            max_document_bytes: 1 << 20,
            heldout_per_mille: 20,
            shuffle_buffer: 512,
            seed: 0,
            max_seq_len: 1024,
        }
    }
}

/// Which side of the split a document is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Heldout,
}

/// Counts of what reading the corpus met.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CorpusStats {
    pub train_documents: u64,
    pub heldout_documents: u64,
    pub skipped_invalid_utf8: u64,
    pub skipped_empty: u64,
    pub skipped_too_large: u64,
    pub skipped_bad_record: u64,
    pub skipped_unreadable: u64,
}

/// Where a stream stands: the epoch and the number of sequences emitted in it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    pub epoch: u64,
    pub sequences: u64,
}

/// One readable unit: a file holding one document, or a JSONL file holding many.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Unit {
    /// A file and its identity: its path relative to its source, so that the held-out split
    /// does not depend on where the corpus sits on disk.
    Document(PathBuf, String),
    Jsonl(PathBuf, String),
    Parquet(PathBuf, String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CorpusError + '_ {
    move |source| CorpusError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn globset(globs: &[String]) -> Result<Option<GlobSet>, CorpusError> {
    if globs.is_empty() {
        return Ok(None);
    }
    let mut builder = GlobSetBuilder::new();
    for g in globs {
        let glob = Glob::new(g).map_err(|e| CorpusError::Glob {
            glob: g.clone(),
            reason: e.to_string(),
        })?;
        builder.add(glob);
    }
    builder.build().map(Some).map_err(|e| CorpusError::Glob {
        glob: globs.join(","),
        reason: e.to_string(),
    })
}

/// All units of the corpus in a stable order.
fn list_units(config: &CorpusConfig) -> Result<Vec<Unit>, CorpusError> {
    let include = globset(&config.include)?;
    let exclude = globset(&config.exclude)?;
    let mut units = Vec::new();
    for source in &config.sources {
        match source {
            Source::Dir { path } => {
                if !path.is_dir() {
                    return Err(CorpusError::Io {
                        path: path.clone(),
                        source: std::io::Error::new(
                            std::io::ErrorKind::NotFound,
                            "not a directory",
                        ),
                    });
                }
                for entry in walkdir::WalkDir::new(path).sort_by_file_name() {
                    let Ok(entry) = entry else { continue };
                    if !entry.file_type().is_file() {
                        continue;
                    }
                    let rel = entry.path().strip_prefix(path).unwrap_or(entry.path());
                    if include.as_ref().is_some_and(|g| !g.is_match(rel))
                        || exclude.as_ref().is_some_and(|g| g.is_match(rel))
                    {
                        continue;
                    }
                    let identity = rel.to_string_lossy().into_owned();
                    units.push(Unit::Document(entry.path().to_path_buf(), identity));
                }
            }
            Source::Jsonl { path, field } => units.push(Unit::Jsonl(path.clone(), field.clone())),
            Source::Parquet { path, column } => {
                units.push(Unit::Parquet(path.clone(), column.clone()))
            }
            Source::List { path } => {
                let text = std::fs::read_to_string(path).map_err(io_err(path))?;
                let base = path.parent().unwrap_or(Path::new("."));
                for line in text
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                {
                    units.push(Unit::Document(base.join(line), line.to_string()));
                }
            }
        }
    }
    Ok(units)
}

/// Held-out membership from a hash of the document's identity (stable across runs and seeds).
pub fn split_of(identity: &str, heldout_per_mille: u32) -> Split {
    let digest = Blake2b::<U32>::digest(identity.as_bytes());
    let bucket = u64::from_le_bytes(digest[..8].try_into().expect("8 bytes")) % 1000;
    if bucket < heldout_per_mille as u64 {
        Split::Heldout
    } else {
        Split::Train
    }
}

/// Reads a unit's documents and hands those on `split` to `sink`; counts what it skips.
fn read_unit(
    unit: &Unit,
    config: &CorpusConfig,
    split: Split,
    stats: &mut CorpusStats,
    sink: &mut dyn FnMut(Vec<u8>) -> bool,
) -> bool {
    let count = |stats: &mut CorpusStats, s: Split| match s {
        Split::Train => stats.train_documents += 1,
        Split::Heldout => stats.heldout_documents += 1,
    };
    match unit {
        Unit::Document(path, identity) => {
            let doc_split = split_of(identity, config.heldout_per_mille);
            if doc_split != split {
                return true;
            }
            let Ok(meta) = std::fs::metadata(path) else {
                stats.skipped_unreadable += 1;
                return true;
            };
            if meta.len() > config.max_document_bytes {
                stats.skipped_too_large += 1;
                return true;
            }
            let Ok(bytes) = std::fs::read(path) else {
                stats.skipped_unreadable += 1;
                return true;
            };
            if bytes.is_empty() {
                stats.skipped_empty += 1;
                return true;
            }
            if std::str::from_utf8(&bytes).is_err() {
                stats.skipped_invalid_utf8 += 1;
                return true;
            }
            count(stats, split);
            sink(bytes)
        }
        Unit::Parquet(path, column) => read_parquet(path, column, config, split, stats, sink),
        Unit::Jsonl(path, field) => {
            let Ok(file) = File::open(path) else {
                stats.skipped_unreadable += 1;
                return true;
            };
            let mut reader = BufReader::new(file);
            let mut line = Vec::new();
            let mut number = 0u64;
            loop {
                line.clear();
                // Bounded read: a huge line is consumed without being held whole.
                let limit = config.max_document_bytes * 2 + 1024;
                match (&mut reader).take(limit).read_until(b'\n', &mut line) {
                    Ok(0) => return true,
                    Ok(_) => {}
                    Err(_) => {
                        stats.skipped_unreadable += 1;
                        return true;
                    }
                }
                number += 1;
                if line.last() != Some(&b'\n') && line.len() as u64 >= limit {
                    stats.skipped_too_large += 1;
                    let _ = reader.skip_until(b'\n');
                    continue;
                }
                let name = path
                    .file_name()
                    .map(|n| n.to_string_lossy())
                    .unwrap_or_default();
                let identity = format!("{name}:{number}");
                if split_of(&identity, config.heldout_per_mille) != split {
                    continue;
                }
                let Ok(text) = std::str::from_utf8(&line) else {
                    stats.skipped_invalid_utf8 += 1;
                    continue;
                };
                if text.trim().is_empty() {
                    continue;
                }
                let Ok(value) = serde_json::from_str::<serde_json::Value>(text) else {
                    stats.skipped_bad_record += 1;
                    continue;
                };
                let Some(content) = value.get(field).and_then(|v| v.as_str()) else {
                    stats.skipped_bad_record += 1;
                    continue;
                };
                if !admit(content.len(), config, split, stats) {
                    continue;
                }
                if !sink(content.as_bytes().to_vec()) {
                    return false;
                }
            }
        }
    }
}

/// Counts a record's document as taken, or as skipped for being empty or too large.
fn admit(len: usize, config: &CorpusConfig, split: Split, stats: &mut CorpusStats) -> bool {
    if len == 0 {
        stats.skipped_empty += 1;
        return false;
    }
    if len as u64 > config.max_document_bytes {
        stats.skipped_too_large += 1;
        return false;
    }
    match split {
        Split::Train => stats.train_documents += 1,
        Split::Heldout => stats.heldout_documents += 1,
    }
    true
}

/// The documents of one Parquet file (see [`Source::Parquet`]); identities are `file:row`.
fn read_parquet(
    path: &Path,
    column: &str,
    config: &CorpusConfig,
    split: Split,
    stats: &mut CorpusStats,
    sink: &mut dyn FnMut(Vec<u8>) -> bool,
) -> bool {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    use parquet::record::Field;
    let reader = match File::open(path).map(SerializedFileReader::new) {
        Ok(Ok(reader)) => reader,
        _ => {
            stats.skipped_unreadable += 1;
            return true;
        }
    };
    let schema = reader.metadata().file_metadata().schema();
    let Some(field) = schema.get_fields().iter().find(|f| f.name() == column) else {
        tracing::warn!("{} has no column '{column}'; skipped", path.display());
        stats.skipped_bad_record += 1;
        return true;
    };
    let projection = parquet::schema::types::Type::group_type_builder(schema.name())
        .with_fields(vec![field.clone()])
        .build();
    let Ok(rows) = projection.and_then(|p| reader.get_row_iter(Some(p))) else {
        stats.skipped_unreadable += 1;
        return true;
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    for (index, row) in rows.enumerate() {
        let identity = format!("{name}:{}", index + 1);
        if split_of(&identity, config.heldout_per_mille) != split {
            continue;
        }
        let content = match row {
            Ok(row) => match row.into_columns().pop().map(|(_, value)| value) {
                Some(Field::Str(text)) => text.into_bytes(),
                Some(Field::Bytes(bytes)) => {
                    if std::str::from_utf8(bytes.data()).is_err() {
                        stats.skipped_invalid_utf8 += 1;
                        continue;
                    }
                    bytes.data().to_vec()
                }
                _ => {
                    stats.skipped_bad_record += 1;
                    continue;
                }
            },
            // The reader refuses a UTF-8 column's invalid bytes for that row only.
            Err(e) if e.to_string().contains("as String") => {
                stats.skipped_invalid_utf8 += 1;
                continue;
            }
            Err(_) => {
                stats.skipped_bad_record += 1;
                continue;
            }
        };
        if !admit(content.len(), config, split, stats) {
            continue;
        }
        if !sink(content) {
            return false;
        }
    }
    true
}

/// Training sequences, shuffled and endless (epoch after epoch).
pub struct TrainStream {
    config: CorpusConfig,
    units: Vec<Unit>,
    position: Position,
    epoch_order: Vec<usize>,
    next_unit: usize,
    rng: StdRng,
    buffer: Vec<Sequence>,
    ready: VecDeque<Sequence>,
    /// What reading met so far in the current epoch.
    pub stats: CorpusStats,
    /// What the last complete epoch met.
    pub last_epoch_stats: Option<CorpusStats>,
    emitted_any_in_epoch: bool,
}

impl TrainStream {
    /// Opens the stream at `position` (the default position is the very start).
    pub fn open(config: CorpusConfig, position: Position) -> Result<Self, CorpusError> {
        let units = list_units(&config)?;
        let mut stream = TrainStream {
            config,
            units,
            position: Position {
                epoch: position.epoch,
                sequences: 0,
            },
            epoch_order: Vec::new(),
            next_unit: 0,
            rng: StdRng::seed_from_u64(0),
            buffer: Vec::new(),
            ready: VecDeque::new(),
            stats: CorpusStats::default(),
            last_epoch_stats: None,
            emitted_any_in_epoch: false,
        };
        stream.start_epoch(position.epoch);
        for _ in 0..position.sequences {
            stream.next_sequence()?;
        }
        Ok(stream)
    }

    pub fn position(&self) -> Position {
        self.position
    }

    fn start_epoch(&mut self, epoch: u64) {
        self.position = Position {
            epoch,
            sequences: 0,
        };
        self.rng =
            StdRng::seed_from_u64(self.config.seed ^ epoch.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        self.epoch_order = (0..self.units.len()).collect();
        for i in (1..self.epoch_order.len()).rev() {
            let j = self.rng.random_range(0..=i);
            self.epoch_order.swap(i, j);
        }
        self.next_unit = 0;
        self.buffer.clear();
        self.ready.clear();
        self.emitted_any_in_epoch = false;
    }

    /// The next training sequence.
    pub fn next_sequence(&mut self) -> Result<Sequence, CorpusError> {
        loop {
            if let Some(seq) = self.ready.pop_front() {
                self.position.sequences += 1;
                self.emitted_any_in_epoch = true;
                return Ok(seq);
            }
            let capacity = self.config.shuffle_buffer.max(1);
            if self.buffer.len() >= capacity {
                let i = self.rng.random_range(0..self.buffer.len());
                let seq = self.buffer.swap_remove(i);
                self.ready.push_back(seq);
                continue;
            }
            if self.next_unit < self.epoch_order.len() {
                let unit = self.units[self.epoch_order[self.next_unit]].clone();
                self.next_unit += 1;
                let max_seq_len = self.config.max_seq_len;
                let buffer = &mut self.buffer;
                read_unit(
                    &unit,
                    &self.config,
                    Split::Train,
                    &mut self.stats,
                    &mut |doc| {
                        buffer.extend(sequences(&doc, max_seq_len));
                        true
                    },
                );
                continue;
            }
            if !self.buffer.is_empty() {
                let i = self.rng.random_range(0..self.buffer.len());
                let seq = self.buffer.swap_remove(i);
                self.ready.push_back(seq);
                continue;
            }
            if !self.emitted_any_in_epoch {
                return Err(CorpusError::Empty {
                    checked: self.stats.train_documents + self.stats.heldout_documents,
                });
            }
            let next = self.position.epoch + 1;
            self.last_epoch_stats = Some(std::mem::take(&mut self.stats));
            self.start_epoch(next);
        }
    }

    /// The next `batch_size` sequences as a batch.
    pub fn next_batch(&mut self, batch_size: usize) -> Result<Batch, CorpusError> {
        let seqs = (0..batch_size)
            .map(|_| self.next_sequence())
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Batch::from_sequences(&seqs))
    }
}

/// The held-out documents in stable order, concatenated up to `max_bytes` (the network scores
/// at most 1 MiB per submission, so that is the natural size of an evaluation sample).
pub fn heldout_sample(
    config: &CorpusConfig,
    max_bytes: usize,
) -> Result<(Vec<u8>, CorpusStats), CorpusError> {
    sample(config, Split::Heldout, max_bytes)
}

/// The documents of `split` in stable (unshuffled) order, concatenated up to `max_bytes`.
pub fn sample(
    config: &CorpusConfig,
    split: Split,
    max_bytes: usize,
) -> Result<(Vec<u8>, CorpusStats), CorpusError> {
    let units = list_units(config)?;
    let mut stats = CorpusStats::default();
    let mut out = Vec::new();
    for unit in &units {
        let keep_going = read_unit(unit, config, split, &mut stats, &mut |doc| {
            let room = max_bytes - out.len();
            out.extend_from_slice(&doc[..doc.len().min(room)]);
            out.len() < max_bytes
        });
        if !keep_going {
            break;
        }
    }
    Ok((out, stats))
}
