//! Streaming a local corpus into training batches, deterministically.
//!
//! Sources are listed (never loaded whole), their units (files, JSON Lines files, Parquet files)
//! visited in a seeded order per epoch and read one document at a time, split into train and
//! held-out documents by a hash of each document's identity, tokenized with the network's data
//! contract (`somatrain-data`), passed through a bounded shuffle buffer and batched. The
//! stream's [`Position`] is all a checkpoint needs: it holds the open unit's read offset and the
//! shuffle buffer, so a resumed run continues at once, without rereading the epoch, and sees
//! exactly the batches an uninterrupted one would have.
//!
//! Bad records never stop a run: invalid UTF-8, empty and oversized documents and malformed
//! JSON lines are skipped and counted in [`CorpusStats`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use blake2::digest::consts::U32;
use blake2::{Blake2b, Digest};
use globset::{Glob, GlobSet, GlobSetBuilder};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use somatrain_data::{Batch, Sequence, sequence, sequence_count};

mod reader;
use reader::UnitReader;

#[derive(Debug, thiserror::Error)]
pub enum CorpusError {
    #[error("cannot read {what} {}: {error}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("invalid glob '{glob}': {reason}")]
    Glob { glob: String, reason: String },
    #[error("the corpus has no training documents (checked {checked} documents)")]
    Empty { checked: u64 },
    #[error("{0}")]
    Hub(#[from] somatrain_hub::HubError),
}

/// Where documents come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Source {
    /// Every regular file under a directory (filtered by the include/exclude globs).
    Dir { path: PathBuf },
    /// JSON Lines: one document per line, its text in `field`. Plain, gzip (`.gz`) or zstd
    /// (`.zst`). A directory means every `.jsonl`, `.ndjson`, `.jsonl.gz` and `.jsonl.zst` file
    /// under it (filtered by the include/exclude globs).
    Jsonl { path: PathBuf, field: String },
    /// A text file listing one document path per line (relative to the list's directory).
    List { path: PathBuf },
    /// A Parquet file, one document per row, its text in the string or binary `column` (The
    /// Stack v1 and most code dumps use `content`). Read row group by row group, only that column. A
    /// directory means every `.parquet` file under it (filtered by the include/exclude globs).
    Parquet { path: PathBuf, column: String },
    /// A dataset on the Hugging Face Hub: its Parquet files for a config and split, read by
    /// HTTP range requests (endpoint and token from `HF_ENDPOINT` and `HF_TOKEN`), each row's
    /// text in a column or, for The Stack v2, fetched from a bucket by its `blob_id`.
    Hub {
        #[serde(flatten)]
        dataset: somatrain_hub::DatasetRef,
        content: somatrain_hub::Content,
    },
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
    /// A directory never read as corpus: the run directory, set by the trainer, so that a run
    /// kept inside a corpus directory does not train on its own checkpoints (and its corpus does
    /// not change under it as they are written). Never stored.
    #[serde(skip)]
    pub skip_dir: Option<PathBuf>,
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
            skip_dir: None,
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
    /// Files that could not be opened or read, and directories that could not be listed.
    pub skipped_unreadable: u64,
}

impl std::fmt::Display for CorpusStats {
    /// One line: the documents read and, when anything was skipped, why, e.g. "120 training
    /// documents, 3 held-out; skipped: 2 unreadable, 1 too large".
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} training documents, {} held-out",
            self.train_documents, self.heldout_documents
        )?;
        let skipped: Vec<String> = [
            (self.skipped_unreadable, "unreadable"),
            (self.skipped_invalid_utf8, "not UTF-8"),
            (self.skipped_too_large, "too large"),
            (self.skipped_bad_record, "bad records"),
            (self.skipped_empty, "empty"),
        ]
        .iter()
        .filter(|(count, _)| *count > 0)
        .map(|(count, why)| format!("{count} {why}"))
        .collect();
        if !skipped.is_empty() {
            write!(f, "; skipped: {}", skipped.join(", "))?;
        }
        Ok(())
    }
}

/// One readable unit: a file holding one document, or a JSON Lines or Parquet file holding many.
/// Each carries a name that document identities build on: the path relative to its source (the
/// file name for a file given directly), so that the held-out split does not depend on where the
/// corpus sits on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Unit {
    /// A file and its identity.
    Document(PathBuf, String),
    /// A JSON Lines file, its text field and its name.
    Jsonl(PathBuf, String, String),
    /// A Parquet file, its text column and its name.
    Parquet(PathBuf, String, String),
    /// A Hub dataset's Parquet file, where its text is, and its name (`OWNER/NAME/PATH`, without
    /// the commit, so that the held-out split survives a new revision).
    Hub(somatrain_hub::HubFile, somatrain_hub::Content, String),
}

const JSONL_SUFFIXES: &[&str] = &[".jsonl", ".ndjson", ".jsonl.gz", ".jsonl.zst"];

/// The files of a multi-document source: the file itself, or every file under the directory
/// whose name ends in one of `suffixes` and that the globs admit, each with its name.
fn record_files(
    path: &Path,
    suffixes: &[&str],
    include: Option<&GlobSet>,
    exclude: Option<&GlobSet>,
    skip: Option<DirId>,
    unreadable: &mut Vec<String>,
) -> Vec<(PathBuf, String)> {
    if !path.is_dir() {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        return vec![(path.to_path_buf(), name)];
    }
    let mut files = walk(path, include, exclude, skip, unreadable);
    files.retain(|(_, rel)| suffixes.iter().any(|s| rel.ends_with(s)));
    files
}

/// Regular files under `dir` in a stable order, with their paths relative to it, filtered by the
/// globs. Entries that cannot be read (a directory without permission) are described in
/// `unreadable`.
fn walk(
    dir: &Path,
    include: Option<&GlobSet>,
    exclude: Option<&GlobSet>,
    skip: Option<DirId>,
    unreadable: &mut Vec<String>,
) -> Vec<(PathBuf, String)> {
    walkdir::WalkDir::new(dir)
        .sort_by_file_name()
        .into_iter()
        .filter_entry(|entry| {
            skip.is_none() || !entry.file_type().is_dir() || DirId::of(entry.path()) != skip
        })
        .filter_map(|entry| match entry {
            Ok(entry) => Some(entry),
            Err(e) => {
                unreadable.push(format!(
                    "{}: cannot be read ({e}); skipped",
                    e.path().unwrap_or(dir).display()
                ));
                None
            }
        })
        .filter(|entry| entry.file_type().is_file())
        .filter_map(move |entry| {
            let rel = entry.path().strip_prefix(dir).unwrap_or(entry.path());
            if include.is_some_and(|g| !g.is_match(rel)) || exclude.is_some_and(|g| g.is_match(rel))
            {
                return None;
            }
            let rel = rel.to_string_lossy().into_owned();
            Some((entry.path().to_path_buf(), rel))
        })
        .collect()
}

fn io_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> CorpusError + 'a {
    move |error| CorpusError::Io {
        what,
        path: path.to_path_buf(),
        error,
    }
}

/// The most a file list, or the data for an embedding, may hold: 1 GiB.
pub const MAX_LISTED_BYTES: u64 = 1 << 30;

/// Reads at most `max_bytes` of `path`; more is an error rather than an unbounded read (of
/// `/dev/zero`, say).
pub(crate) fn read_bounded(path: &Path, max_bytes: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(max_bytes.saturating_add(1))
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max_bytes {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("holds more than {max_bytes} bytes, the most read from it"),
        ));
    }
    Ok(bytes)
}

#[cfg(test)]
mod bounded_read_tests {
    use super::read_bounded;

    #[test]
    fn an_endless_file_is_cut_at_the_cap() {
        let error = read_bounded(std::path::Path::new("/dev/zero"), 4096).unwrap_err();
        assert!(
            error.to_string().contains("more than 4096 bytes"),
            "{error}"
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("list.txt");
        std::fs::write(&path, b"a.txt\nb.txt\n").unwrap();
        assert_eq!(read_bounded(&path, 12).unwrap(), b"a.txt\nb.txt\n");
        assert!(read_bounded(&path, 11).is_err());
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

/// A directory's identity (device and inode), so that a directory is recognised whatever path
/// leads to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DirId(u64, u64);

impl DirId {
    fn of(path: &Path) -> Option<DirId> {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path)
            .ok()
            .map(|meta| DirId(meta.dev(), meta.ino()))
    }
}

/// The units of a corpus and what listing them could not read.
struct Listing {
    /// Every unit, in a stable order.
    units: Vec<Unit>,
    /// Directories (or other entries) under a source that could not be read, each described.
    unreadable: Vec<String>,
}

/// All units of the corpus in a stable order.
fn list_units(config: &CorpusConfig) -> Result<Listing, CorpusError> {
    let include = globset(&config.include)?;
    let exclude = globset(&config.exclude)?;
    let mut units = Vec::new();
    let mut unreadable = Vec::new();
    let skip = config.skip_dir.as_deref().and_then(DirId::of);
    for source in &config.sources {
        match source {
            Source::Dir { path } => {
                if !path.is_dir() {
                    return Err(CorpusError::Io {
                        what: "the corpus directory",
                        path: path.clone(),
                        error: std::io::Error::new(std::io::ErrorKind::NotFound, "not a directory"),
                    });
                }
                std::fs::read_dir(path).map_err(io_err("the corpus directory", path))?;
                units.extend(
                    walk(
                        path,
                        include.as_ref(),
                        exclude.as_ref(),
                        skip,
                        &mut unreadable,
                    )
                    .into_iter()
                    .map(|(file, identity)| Unit::Document(file, identity)),
                );
            }
            Source::Jsonl { path, field } => units.extend(
                record_files(
                    path,
                    JSONL_SUFFIXES,
                    include.as_ref(),
                    exclude.as_ref(),
                    skip,
                    &mut unreadable,
                )
                .into_iter()
                .map(|(file, name)| Unit::Jsonl(file, field.clone(), name)),
            ),
            Source::Parquet { path, column } => units.extend(
                record_files(
                    path,
                    &[".parquet"],
                    include.as_ref(),
                    exclude.as_ref(),
                    skip,
                    &mut unreadable,
                )
                .into_iter()
                .map(|(file, name)| Unit::Parquet(file, column.clone(), name)),
            ),
            Source::Hub { dataset, content } => {
                let hub = somatrain_hub::HubClient::from_env(dataset.endpoint.as_deref());
                for file in somatrain_hub::list_parquet_files(&hub, dataset)? {
                    let name = format!("{}/{}", file.repo, file.path);
                    units.push(Unit::Hub(file, content.clone(), name));
                }
            }
            Source::List { path } => {
                let text = read_bounded(path, MAX_LISTED_BYTES)
                    .and_then(|bytes| {
                        String::from_utf8(bytes).map_err(|_| {
                            std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8 text")
                        })
                    })
                    .map_err(io_err("the file list", path))?;
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
    Ok(Listing { units, unreadable })
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

/// One chunk waiting in the shuffle buffer: a document and which of its sequences.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Chunk {
    document: Arc<Vec<u8>>,
    index: usize,
}

/// A unit being read when the position was taken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct OpenUnit {
    records: u64,
    offset: u64,
}

/// Everything beyond (epoch, sequences) that reopening a stream without rereading it needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Cursor {
    /// Which corpus this cursor belongs to (a digest of the unit list).
    units_digest: String,
    /// Units of the epoch's order opened so far.
    next_unit: u64,
    /// The last opened unit, when it is not exhausted yet.
    open_unit: Option<OpenUnit>,
    emitted_any: bool,
    stats: CorpusStats,
    last_epoch_stats: Option<CorpusStats>,
    /// The shuffle buffer in order: (index into the saved documents, chunk index).
    chunks: Vec<(u64, u64)>,
    #[serde(skip)]
    documents: Vec<Arc<Vec<u8>>>,
}

/// Where a stream stands. `epoch` and `sequences` (emitted in that epoch) name the place; the
/// cursor, when present, lets [`TrainStream::open`] continue there directly: it holds the open
/// unit's read offset and the shuffle buffer, so nothing before it is read again. Without one
/// (checkpoints written before cursors existed) the epoch is replayed up to `sequences`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Position {
    pub epoch: u64,
    pub sequences: u64,
    cursor: Option<Cursor>,
}

const POSITION_FORMAT: &str = "somatrain-stream";
const POSITION_VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PositionHeader {
    format: String,
    version: u32,
    epoch: u64,
    sequences: u64,
    cursor: Option<Cursor>,
    document_lengths: Vec<u64>,
}

impl Position {
    /// The place `sequences` into `epoch`, reached by replaying the epoch.
    pub fn replay(epoch: u64, sequences: u64) -> Position {
        Position {
            epoch,
            sequences,
            cursor: None,
        }
    }

    /// Whether reopening here continues directly (rather than replaying the epoch).
    pub fn has_cursor(&self) -> bool {
        self.cursor.is_some()
    }

    /// A JSON header line, then the shuffle buffer's documents back to back.
    pub fn to_bytes(&self) -> Vec<u8> {
        let documents = self
            .cursor
            .as_ref()
            .map_or(&[][..], |c| c.documents.as_slice());
        let header = PositionHeader {
            format: POSITION_FORMAT.into(),
            version: POSITION_VERSION,
            epoch: self.epoch,
            sequences: self.sequences,
            cursor: self.cursor.clone(),
            document_lengths: documents.iter().map(|d| d.len() as u64).collect(),
        };
        let mut out = serde_json::to_vec(&header).expect("the header serialises");
        out.push(b'\n');
        for d in documents {
            out.extend_from_slice(d);
        }
        out
    }

    /// Reads what [`Position::to_bytes`] wrote; a reason on anything malformed.
    pub fn from_bytes(bytes: &[u8]) -> Result<Position, String> {
        let end = bytes
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("no header line")?;
        let header: PositionHeader =
            serde_json::from_slice(&bytes[..end]).map_err(|e| format!("header: {e}"))?;
        if header.format != POSITION_FORMAT || header.version != POSITION_VERSION {
            return Err(format!(
                "format {} v{} (this build reads {POSITION_FORMAT} v{POSITION_VERSION})",
                header.format, header.version
            ));
        }
        let mut rest = &bytes[end + 1..];
        let mut documents = Vec::with_capacity(header.document_lengths.len());
        for &len in &header.document_lengths {
            let len = usize::try_from(len).map_err(|_| "document length overflows")?;
            if len > rest.len() {
                return Err("truncated documents".into());
            }
            let (doc, tail) = rest.split_at(len);
            documents.push(Arc::new(doc.to_vec()));
            rest = tail;
        }
        if !rest.is_empty() {
            return Err("trailing bytes after the documents".into());
        }
        let mut cursor = header.cursor;
        if let Some(c) = &mut cursor {
            if c.chunks.iter().any(|&(d, _)| d as usize >= documents.len()) {
                return Err("a chunk names a document that is not there".into());
            }
            c.documents = documents;
        } else if !documents.is_empty() {
            return Err("documents without a cursor".into());
        }
        Ok(Position {
            epoch: header.epoch,
            sequences: header.sequences,
            cursor,
        })
    }
}

/// A digest of the unit list, so a cursor is never applied to a different corpus.
fn units_digest(units: &[Unit]) -> String {
    let mut hasher = Blake2b::<U32>::new();
    for unit in units {
        let (kind, path, field, name) = match unit {
            Unit::Document(path, identity) => ("file", path.clone(), String::new(), identity),
            Unit::Jsonl(path, field, name) => ("jsonl", path.clone(), field.clone(), name),
            Unit::Parquet(path, column, name) => ("parquet", path.clone(), column.clone(), name),
            Unit::Hub(file, content, name) => (
                "hub",
                PathBuf::from(format!("{}@{}/{}", file.repo, file.commit, file.path)),
                serde_json::to_string(content).expect("content serialises"),
                name,
            ),
        };
        for part in [
            kind.as_bytes(),
            path.as_os_str().as_encoded_bytes(),
            field.as_bytes(),
            name.as_bytes(),
        ] {
            hasher.update((part.len() as u64).to_le_bytes());
            hasher.update(part);
        }
    }
    bs58::encode(hasher.finalize()).into_string()
}

/// splitmix64's finaliser: a well-mixed 64-bit value from any input.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Which buffer slot the `draw`-th draw of `epoch` takes: a pure function of its inputs, so the
/// shuffle needs no generator state in a checkpoint.
fn draw_slot(seed: u64, epoch: u64, draw: u64, len: usize) -> usize {
    let z = mix(mix(mix(seed) ^ epoch) ^ draw);
    ((z as u128 * len as u128) >> 64) as usize
}

/// Training sequences, shuffled and endless (epoch after epoch).
///
/// Units are visited in a seeded order that changes every epoch; documents are read one at a
/// time into a bounded shuffle buffer of chunks (at most `shuffle_buffer` plus one document's
/// worth), and each draw takes a slot chosen by `draw_slot`.
pub struct TrainStream {
    config: CorpusConfig,
    units: Vec<Unit>,
    units_digest: String,
    /// Entries listing the corpus could not read: counted again in every epoch's stats.
    unreadable_in_listing: u64,
    epoch: u64,
    sequences: u64,
    epoch_order: Vec<usize>,
    next_unit: usize,
    reader: Option<UnitReader>,
    buffer: Vec<Chunk>,
    /// What reading met so far in the current epoch.
    pub stats: CorpusStats,
    /// What the last complete epoch met.
    pub last_epoch_stats: Option<CorpusStats>,
    emitted_any_in_epoch: bool,
}

impl TrainStream {
    /// Opens the stream at `position` (the default position is the very start).
    pub fn open(config: CorpusConfig, position: Position) -> Result<Self, CorpusError> {
        let listing = list_units(&config)?;
        for entry in &listing.unreadable {
            // Said once, when the stream opens, rather than train on less than the user thinks.
            tracing::warn!("{entry}");
        }
        let digest = units_digest(&listing.units);
        let mut stream = TrainStream {
            config,
            units: listing.units,
            units_digest: digest,
            unreadable_in_listing: listing.unreadable.len() as u64,
            epoch: 0,
            sequences: 0,
            epoch_order: Vec::new(),
            next_unit: 0,
            reader: None,
            buffer: Vec::new(),
            stats: CorpusStats::default(),
            last_epoch_stats: None,
            emitted_any_in_epoch: false,
        };
        match position.cursor {
            Some(cursor) if cursor.units_digest == stream.units_digest => {
                stream.start_epoch(position.epoch);
                stream.sequences = position.sequences;
                stream.next_unit = (cursor.next_unit as usize).min(stream.units.len());
                stream.emitted_any_in_epoch = cursor.emitted_any;
                stream.stats = cursor.stats;
                stream.last_epoch_stats = cursor.last_epoch_stats;
                stream.buffer = cursor
                    .chunks
                    .iter()
                    .map(|&(d, index)| Chunk {
                        document: cursor.documents[d as usize].clone(),
                        index: index as usize,
                    })
                    .collect();
                if let (Some(open), Some(current)) =
                    (cursor.open_unit, stream.next_unit.checked_sub(1))
                {
                    let unit = &stream.units[stream.epoch_order[current]];
                    stream.reader = Some(UnitReader::open(
                        unit,
                        open.records,
                        open.offset,
                        &mut stream.stats,
                    ));
                }
            }
            Some(_) => {
                tracing::warn!(
                    "the corpus is not the one this position was taken on (files were added, \
                     removed or moved); starting epoch {} afresh",
                    position.epoch + 1
                );
                stream.start_epoch(position.epoch + 1);
            }
            None => {
                stream.start_epoch(position.epoch);
                for _ in 0..position.sequences {
                    stream.next_sequence()?;
                }
            }
        }
        Ok(stream)
    }

    /// Where the stream stands, with the cursor that reopens it here without rereading.
    pub fn position(&self) -> Position {
        let mut documents: Vec<Arc<Vec<u8>>> = Vec::new();
        let mut index_of: std::collections::HashMap<*const Vec<u8>, u64> = Default::default();
        let chunks = self
            .buffer
            .iter()
            .map(|chunk| {
                let d = *index_of
                    .entry(Arc::as_ptr(&chunk.document))
                    .or_insert_with(|| {
                        documents.push(chunk.document.clone());
                        documents.len() as u64 - 1
                    });
                (d, chunk.index as u64)
            })
            .collect();
        Position {
            epoch: self.epoch,
            sequences: self.sequences,
            cursor: Some(Cursor {
                units_digest: self.units_digest.clone(),
                next_unit: self.next_unit as u64,
                open_unit: self.reader.as_ref().map(|r| OpenUnit {
                    records: r.records,
                    offset: r.offset(),
                }),
                emitted_any: self.emitted_any_in_epoch,
                stats: self.stats.clone(),
                last_epoch_stats: self.last_epoch_stats.clone(),
                chunks,
                documents,
            }),
        }
    }

    /// The epoch being read (cheaper than [`TrainStream::position`], which copies the buffer).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Chunks waiting in the shuffle buffer.
    pub fn buffered(&self) -> usize {
        self.buffer.len()
    }

    fn start_epoch(&mut self, epoch: u64) {
        self.epoch = epoch;
        self.sequences = 0;
        let mut rng =
            StdRng::seed_from_u64(self.config.seed ^ epoch.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        self.epoch_order = (0..self.units.len()).collect();
        for i in (1..self.epoch_order.len()).rev() {
            let j = rng.random_range(0..=i);
            self.epoch_order.swap(i, j);
        }
        self.next_unit = 0;
        self.reader = None;
        self.buffer.clear();
        self.emitted_any_in_epoch = false;
        self.stats.skipped_unreadable += self.unreadable_in_listing;
    }

    /// Reads the next training document of the epoch into the buffer; false once every unit of
    /// the epoch is exhausted.
    fn read_document(&mut self) -> bool {
        loop {
            if let Some(reader) = &mut self.reader {
                if let Some(doc) = reader.next_document(&self.config, Split::Train, &mut self.stats)
                {
                    let document = Arc::new(doc);
                    let count = sequence_count(document.len(), self.config.max_seq_len);
                    self.buffer.extend((0..count).map(|index| Chunk {
                        document: document.clone(),
                        index,
                    }));
                    return true;
                }
                self.reader = None;
            }
            let Some(&unit) = self.epoch_order.get(self.next_unit) else {
                return false;
            };
            self.next_unit += 1;
            self.reader = Some(UnitReader::open(&self.units[unit], 0, 0, &mut self.stats));
        }
    }

    /// The next training sequence.
    pub fn next_sequence(&mut self) -> Result<Sequence, CorpusError> {
        let chunk = self.next_chunk()?;
        Ok(sequence(
            &chunk.document,
            self.config.max_seq_len,
            chunk.index,
        ))
    }

    /// The next piece of raw document bytes: the same draw as [`TrainStream::next_sequence`],
    /// untokenized, so each piece is at most `max_seq_len` bytes of one document (what a data
    /// submitter submits).
    pub fn next_piece(&mut self) -> Result<Vec<u8>, CorpusError> {
        let chunk = self.next_chunk()?;
        let start = chunk.index * self.config.max_seq_len;
        let end = (start + self.config.max_seq_len).min(chunk.document.len());
        Ok(chunk.document[start..end].to_vec())
    }

    fn next_chunk(&mut self) -> Result<Chunk, CorpusError> {
        let capacity = self.config.shuffle_buffer.max(1);
        loop {
            while self.buffer.len() < capacity && self.read_document() {}
            if !self.buffer.is_empty() {
                let slot = draw_slot(
                    self.config.seed,
                    self.epoch,
                    self.sequences,
                    self.buffer.len(),
                );
                let chunk = self.buffer.swap_remove(slot);
                self.sequences += 1;
                self.emitted_any_in_epoch = true;
                return Ok(chunk);
            }
            if !self.emitted_any_in_epoch {
                return Err(CorpusError::Empty {
                    checked: self.stats.train_documents + self.stats.heldout_documents,
                });
            }
            self.last_epoch_stats = Some(std::mem::take(&mut self.stats));
            self.start_epoch(self.epoch + 1);
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
    let listing = list_units(config)?;
    let mut stats = CorpusStats {
        skipped_unreadable: listing.unreadable.len() as u64,
        ..CorpusStats::default()
    };
    let mut out = Vec::new();
    for unit in &listing.units {
        let mut reader = UnitReader::open(unit, 0, 0, &mut stats);
        while out.len() < max_bytes {
            let Some(doc) = reader.next_document(config, split, &mut stats) else {
                break;
            };
            let room = max_bytes - out.len();
            out.extend_from_slice(&doc[..doc.len().min(room)]);
        }
        if out.len() >= max_bytes {
            break;
        }
    }
    Ok((out, stats))
}
