//! One unit of the corpus (a file, a JSON Lines file, a Parquet file) read a document at a time,
//! from its start or from a saved place, so that neither a large unit nor a resumed run ever
//! needs more than the document at hand.
//!
//! A reader counts the records it has consumed (a file: 0 or 1, a line, a row) and, for JSON
//! Lines, the byte offset after them: that pair is all a checkpoint needs to reopen it.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::file::serialized_reader::ReadOptionsBuilder;
use parquet::record::reader::RowIter;

use super::{CorpusConfig, CorpusStats, Split, Unit, admit, split_of};

pub(super) struct UnitReader {
    kind: Kind,
    /// Records consumed so far.
    pub records: u64,
}

enum Kind {
    Document {
        path: PathBuf,
        identity: String,
    },
    Jsonl {
        name: String,
        field: String,
        reader: BufReader<Box<dyn Read>>,
        /// Bytes of (decompressed) text consumed.
        offset: u64,
    },
    Parquet {
        name: String,
        rows: RowIter<'static>,
    },
    /// Rows of a Hub dataset's file; the reading thread starts at the first read, when the
    /// split is known.
    Hub {
        file: somatrain_hub::HubFile,
        content: somatrain_hub::Content,
        name: String,
        rows: Option<somatrain_hub::RowReader>,
    },
    Finished,
}

/// A JSON Lines file positioned `offset` bytes into its text: a plain file seeks there; a gzip or
/// zstd file (by extension) cannot, so its text is decoded and dropped up to that point.
fn open_lines(path: &Path, offset: u64) -> std::io::Result<BufReader<Box<dyn Read>>> {
    let mut file = File::open(path)?;
    let name = path.to_string_lossy();
    let text: Box<dyn Read> = if name.ends_with(".gz") {
        Box::new(flate2::read::MultiGzDecoder::new(file))
    } else if name.ends_with(".zst") {
        Box::new(zstd::stream::read::Decoder::new(file)?)
    } else {
        file.seek(SeekFrom::Start(offset))?;
        return Ok(BufReader::with_capacity(1 << 16, Box::new(file)));
    };
    let mut reader = BufReader::with_capacity(1 << 16, text);
    let skipped = std::io::copy(&mut reader.by_ref().take(offset), &mut std::io::sink())?;
    if skipped < offset {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(reader)
}

impl UnitReader {
    /// Opens `unit` after its first `records` records (for JSON Lines, `offset` bytes in). A unit
    /// that cannot be opened is counted as unreadable and reads as empty.
    pub fn open(unit: &Unit, records: u64, offset: u64, stats: &mut CorpusStats) -> UnitReader {
        let kind = match unit {
            Unit::Document(..) if records > 0 => Kind::Finished,
            Unit::Document(path, identity) => Kind::Document {
                path: path.clone(),
                identity: identity.clone(),
            },
            Unit::Jsonl(path, field, name) => match open_lines(path, offset) {
                Ok(reader) => Kind::Jsonl {
                    name: name.clone(),
                    field: field.clone(),
                    reader,
                    offset,
                },
                Err(_) => {
                    stats.skipped_unreadable += 1;
                    Kind::Finished
                }
            },
            Unit::Parquet(path, column, name) => open_parquet(path, column, name, records, stats),
            Unit::Hub(file, content, name) => Kind::Hub {
                file: file.clone(),
                content: content.clone(),
                name: name.clone(),
                rows: None,
            },
        };
        UnitReader { kind, records }
    }

    /// For JSON Lines, the byte offset after the records consumed; 0 otherwise.
    pub fn offset(&self) -> u64 {
        match &self.kind {
            Kind::Jsonl { offset, .. } => *offset,
            _ => 0,
        }
    }

    /// The next document on `split`, or `None` once the unit is exhausted. What is skipped on the
    /// way is counted in `stats`.
    pub fn next_document(
        &mut self,
        config: &CorpusConfig,
        split: Split,
        stats: &mut CorpusStats,
    ) -> Option<Vec<u8>> {
        let found = match &mut self.kind {
            Kind::Finished => None,
            Kind::Document { path, identity } => {
                self.records = 1;
                read_document(path, identity, config, split, stats)
            }
            Kind::Jsonl {
                name,
                field,
                reader,
                offset,
            } => next_jsonl(
                reader,
                offset,
                &mut self.records,
                name,
                field,
                config,
                split,
                stats,
            ),
            Kind::Parquet { name, rows } => {
                next_row(rows, &mut self.records, name, config, split, stats)
            }
            Kind::Hub {
                file,
                content,
                name,
                rows,
            } => {
                let rows = rows.get_or_insert_with(|| {
                    let name = name.clone();
                    let per_mille = config.heldout_per_mille;
                    somatrain_hub::RowReader::open(
                        somatrain_hub::HubClient::from_env(Some(&file.endpoint)),
                        file.clone(),
                        content.clone(),
                        self.records,
                        std::sync::Arc::new(move |row| {
                            split_of(&format!("{name}:{row}"), per_mille) == split
                        }),
                        config.max_document_bytes,
                    )
                });
                next_hub_row(rows, &mut self.records, name, config, split, stats)
            }
        };
        if found.is_none() || matches!(self.kind, Kind::Document { .. }) {
            self.kind = Kind::Finished;
        }
        found
    }
}

fn read_document(
    path: &Path,
    identity: &str,
    config: &CorpusConfig,
    split: Split,
    stats: &mut CorpusStats,
) -> Option<Vec<u8>> {
    if split_of(identity, config.heldout_per_mille) != split {
        return None;
    }
    let Ok(meta) = std::fs::metadata(path) else {
        stats.skipped_unreadable += 1;
        return None;
    };
    if meta.len() > config.max_document_bytes {
        stats.skipped_too_large += 1;
        return None;
    }
    let Ok(bytes) = std::fs::read(path) else {
        stats.skipped_unreadable += 1;
        return None;
    };
    if std::str::from_utf8(&bytes).is_err() {
        stats.skipped_invalid_utf8 += 1;
        return None;
    }
    admit(bytes.len(), config, split, stats).then_some(bytes)
}

#[allow(clippy::too_many_arguments)]
fn next_jsonl(
    reader: &mut BufReader<Box<dyn Read>>,
    offset: &mut u64,
    records: &mut u64,
    name: &str,
    field: &str,
    config: &CorpusConfig,
    split: Split,
    stats: &mut CorpusStats,
) -> Option<Vec<u8>> {
    let mut line = Vec::new();
    // Bounded read: a huge line is consumed without being held whole.
    let limit = config.max_document_bytes * 2 + 1024;
    loop {
        line.clear();
        match reader.by_ref().take(limit).read_until(b'\n', &mut line) {
            Ok(0) => return None,
            Ok(n) => *offset += n as u64,
            Err(_) => {
                stats.skipped_unreadable += 1;
                return None;
            }
        }
        *records += 1;
        if line.last() != Some(&b'\n') && line.len() as u64 >= limit {
            stats.skipped_too_large += 1;
            *offset += reader.skip_until(b'\n').unwrap_or(0) as u64;
            continue;
        }
        let identity = format!("{name}:{records}");
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
        if admit(content.len(), config, split, stats) {
            return Some(content.as_bytes().to_vec());
        }
    }
}

/// Opens a Parquet file's `column` for row-by-row reading after its first `records` rows: whole
/// row groups before that point are not read at all.
fn open_parquet(
    path: &Path,
    column: &str,
    name: &str,
    records: u64,
    stats: &mut CorpusStats,
) -> Kind {
    let reader = match File::open(path).map(SerializedFileReader::new) {
        Ok(Ok(reader)) => reader,
        _ => {
            stats.skipped_unreadable += 1;
            return Kind::Finished;
        }
    };
    let schema = reader.metadata().file_metadata().schema().clone();
    let Some(field) = schema.get_fields().iter().find(|f| f.name() == column) else {
        tracing::warn!("{} has no column '{column}'; skipped", path.display());
        stats.skipped_bad_record += 1;
        return Kind::Finished;
    };
    let projection = match parquet::schema::types::Type::group_type_builder(schema.name())
        .with_fields(vec![field.clone()])
        .build()
    {
        Ok(p) => p,
        Err(_) => {
            stats.skipped_unreadable += 1;
            return Kind::Finished;
        }
    };
    let mut first_group = 0;
    let mut rows_before = 0u64;
    for group in reader.metadata().row_groups() {
        let rows = group.num_rows().max(0) as u64;
        if rows_before + rows > records {
            break;
        }
        rows_before += rows;
        first_group += 1;
    }
    let reader: Box<dyn FileReader> = if first_group == 0 {
        Box::new(reader)
    } else {
        let options = ReadOptionsBuilder::new()
            .with_predicate(Box::new(move |_, index| index >= first_group))
            .build();
        match File::open(path).map(|f| SerializedFileReader::new_with_options(f, options)) {
            Ok(Ok(reader)) => Box::new(reader),
            _ => {
                stats.skipped_unreadable += 1;
                return Kind::Finished;
            }
        }
    };
    let Ok(mut rows) = RowIter::from_file_into(reader).project(Some(projection)) else {
        stats.skipped_unreadable += 1;
        return Kind::Finished;
    };
    for _ in rows_before..records {
        if rows.next().is_none() {
            break;
        }
    }
    Kind::Parquet {
        name: name.to_string(),
        rows,
    }
}

fn next_row(
    rows: &mut RowIter<'static>,
    records: &mut u64,
    name: &str,
    config: &CorpusConfig,
    split: Split,
    stats: &mut CorpusStats,
) -> Option<Vec<u8>> {
    use parquet::record::Field;
    loop {
        let row = rows.next()?;
        *records += 1;
        let identity = format!("{name}:{records}");
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
        if admit(content.len(), config, split, stats) {
            return Some(content);
        }
    }
}

fn next_hub_row(
    rows: &mut somatrain_hub::RowReader,
    records: &mut u64,
    name: &str,
    config: &CorpusConfig,
    split: Split,
    stats: &mut CorpusStats,
) -> Option<Vec<u8>> {
    use somatrain_hub::Row;
    loop {
        let row = rows.next_row()?;
        *records += match row {
            Row::Passed(n) => n,
            Row::FileFailed(_) => 0,
            _ => 1,
        };
        match row {
            Row::Passed(_) => {}
            Row::Document(text) => {
                if admit(text.len(), config, split, stats) {
                    return Some(text);
                }
            }
            Row::NotText => stats.skipped_invalid_utf8 += 1,
            Row::TooLarge => stats.skipped_too_large += 1,
            Row::BadRecord => stats.skipped_bad_record += 1,
            Row::Unfetchable(reason) => {
                tracing::warn!("{name}, row {records}: {reason}; skipped");
                stats.skipped_unreadable += 1;
            }
            Row::FileFailed(reason) => {
                tracing::warn!("{name}: {reason}; the rest of the file is skipped");
                stats.skipped_unreadable += 1;
                return None;
            }
        }
    }
}
