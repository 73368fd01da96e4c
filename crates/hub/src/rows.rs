//! A remote Parquet file's rows as documents, read ahead on their own thread.
//!
//! The reading thread opens the file, skips the row groups before the first wanted row
//! without fetching them, and reads one row group at a time: only the needed columns. Each row
//! becomes one [`Row`] in file order, so the caller counts rows exactly as it consumes them and
//! its cursor is a plain row count. Rows the caller does not want (the other side of its
//! held-out split) are passed over without fetching anything for them.
//!
//! With [`Content::Blobs`] a row names its file (`blob_id`) and the file's encoding
//! (`src_encoding`), as The Stack v2 does: the file is fetched from the bucket (gzip),
//! decompressed within the size limit and decoded to UTF-8, with several fetches in flight and
//! the results still delivered in row order.

use std::io::Read;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

use futures::StreamExt;
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;
use serde::{Deserialize, Serialize};

use crate::remote_file::RemoteFile;
use crate::{HubClient, HubError, HubFile, new_runtime};

/// Rows read ahead of the consumer (beyond the fetches in flight): enough to hide a request's
/// latency, little enough that a dropped reader wasted little.
const READ_AHEAD: usize = 64;

/// Where each row's text is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Content {
    /// In a string or binary column of the row.
    Column { name: String },
    /// In a bucket, under the row's `blob_id`, gzip-compressed, in the row's `src_encoding`.
    Blobs(BlobSource),
}

/// A bucket of files named by blob id, read without credentials.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobSource {
    /// As given: `s3://BUCKET/PREFIX` or an `http(s)://` prefix.
    pub location: String,
    /// An S3 endpoint to use instead of AWS's (a mirror, or a local S3 server).
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Files fetched at once.
    pub in_flight: usize,
}

impl BlobSource {
    /// The HTTP address prefix that `/{blob_id}` is appended to: path-style under `endpoint`
    /// when one is given, else AWS's virtual-hosted form of the bucket.
    pub fn base_url(&self) -> Result<String, HubError> {
        let location = self.location.trim_end_matches('/');
        if let Some(rest) = location.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(HubError::Usage(format!(
                    "'{}' names no bucket; give s3://BUCKET/PREFIX",
                    self.location
                )));
            }
            let prefix = if prefix.is_empty() {
                String::new()
            } else {
                format!("/{prefix}")
            };
            return Ok(match &self.endpoint {
                Some(endpoint) => {
                    format!("{}/{bucket}{prefix}", endpoint.trim_end_matches('/'))
                }
                None => format!("https://{bucket}.s3.amazonaws.com{prefix}"),
            });
        }
        if location.starts_with("http://") || location.starts_with("https://") {
            return Ok(location.to_string());
        }
        Err(HubError::Usage(format!(
            "'{}' is not a bucket location; give s3://BUCKET/PREFIX or an http(s):// prefix",
            self.location
        )))
    }
}

/// One row of the file, in order.
#[derive(Debug, PartialEq, Eq)]
pub enum Row {
    /// This many rows the caller did not want.
    Passed(u64),
    /// A wanted row's text, valid UTF-8, at most the size limit.
    Document(Vec<u8>),
    /// A wanted row whose text is not valid in its encoding.
    NotText,
    /// A wanted row whose text is larger than the limit.
    TooLarge,
    /// A wanted row without usable text (a null, a malformed blob id, an unknown encoding).
    BadRecord,
    /// A wanted row whose blob could not be fetched.
    Unfetchable(String),
    /// The rest of the file cannot be read; nothing follows.
    FileFailed(String),
}

/// Which rows the caller wants, by their 1-based number in the file.
pub type Wanted = Arc<dyn Fn(u64) -> bool + Send + Sync>;

/// The rows of one file after `first_row`, read ahead on a thread of their own. Dropping it
/// stops the thread at its next row.
pub struct RowReader {
    rows: Receiver<Row>,
}

impl RowReader {
    pub fn open(
        hub: HubClient,
        file: HubFile,
        content: Content,
        first_row: u64,
        wanted: Wanted,
        max_document_bytes: u64,
    ) -> RowReader {
        let (sender, rows) = sync_channel(READ_AHEAD);
        let spawned = std::thread::Builder::new()
            .name("hub-rows".into())
            .spawn(move || {
                let reading = Reading {
                    hub,
                    content,
                    wanted,
                    max_document_bytes,
                    sender: sender.clone(),
                };
                if let Err(stop) = reading.read(&file, first_row)
                    && let Stop::Failed(reason) = stop
                {
                    let _ = sender.send(Row::FileFailed(reason));
                }
            });
        if let Err(e) = spawned {
            let (sender, rows) = sync_channel(1);
            let _ = sender.send(Row::FileFailed(format!(
                "cannot start a reading thread: {e}"
            )));
            return RowReader { rows };
        }
        RowReader { rows }
    }

    /// The next row, or `None` after the last.
    pub fn next_row(&mut self) -> Option<Row> {
        self.rows.recv().ok()
    }
}

enum Stop {
    /// The reader was dropped.
    Dropped,
    Failed(String),
}

impl From<HubError> for Stop {
    fn from(error: HubError) -> Stop {
        Stop::Failed(error.to_string())
    }
}

struct Reading {
    hub: HubClient,
    content: Content,
    wanted: Wanted,
    max_document_bytes: u64,
    sender: SyncSender<Row>,
}

/// What a wanted row needs before it is a [`Row`].
enum Pending {
    Ready(Row),
    Blob { id: String, encoding: String },
}

impl Reading {
    fn send(&self, row: Row) -> Result<(), Stop> {
        self.sender.send(row).map_err(|_| Stop::Dropped)
    }

    fn read(&self, file: &HubFile, first_row: u64) -> Result<(), Stop> {
        let runtime = Arc::new(new_runtime());
        let what = format!("{}/{} at {}", file.repo, file.path, file.commit);
        let remote = RemoteFile::open(&self.hub, &file.url(), &what, runtime.clone())?;
        let reader = SerializedFileReader::new(remote.clone())
            .map_err(|e| Stop::Failed(format!("{what}: {e}")))?;
        let columns: Vec<&str> = match &self.content {
            Content::Column { name } => vec![name.as_str()],
            Content::Blobs(_) => vec!["blob_id", "src_encoding"],
        };
        let metadata = reader.metadata();
        let schema = metadata.file_metadata().schema();
        let mut leaves = Vec::new();
        for column in &columns {
            if !schema.get_fields().iter().any(|f| f.name() == *column) {
                return Err(Stop::Failed(format!("{what} has no column '{column}'")));
            }
            let descr = metadata.file_metadata().schema_descr();
            let leaf = (0..descr.num_columns())
                .find(|&i| descr.column(i).path().parts() == [column.to_string()])
                .ok_or_else(|| {
                    Stop::Failed(format!("{what}: column '{column}' is not a plain column"))
                })?;
            leaves.push(leaf);
        }
        // The projection keeps the file's column order; values are looked up by name.
        let fields = schema
            .get_fields()
            .iter()
            .filter(|f| columns.contains(&f.name()))
            .cloned()
            .collect();
        let projection = parquet::schema::types::Type::group_type_builder(schema.name())
            .with_fields(fields)
            .build()
            .map_err(|e| Stop::Failed(format!("{what}: {e}")))?;
        let blob_base = match &self.content {
            Content::Blobs(source) => Some(source.base_url()?),
            Content::Column { .. } => None,
        };
        let mut row_number = 0u64;
        for (index, group) in metadata.row_groups().iter().enumerate() {
            let rows_in_group = group.num_rows().max(0) as u64;
            if row_number + rows_in_group <= first_row {
                row_number += rows_in_group;
                continue;
            }
            let ranges: Vec<(u64, u64)> = leaves
                .iter()
                .map(|&leaf| group.column(leaf).byte_range())
                .collect();
            remote.prefetch(&ranges)?;
            let group_reader = reader
                .get_row_group(index)
                .map_err(|e| Stop::Failed(format!("{what}: row group {index}: {e}")))?;
            let rows = group_reader
                .get_row_iter(Some(projection.clone()))
                .map_err(|e| Stop::Failed(format!("{what}: row group {index}: {e}")))?;
            let mut pending = Vec::new();
            let mut passed = 0u64;
            for row in rows {
                row_number += 1;
                if row_number <= first_row {
                    continue;
                }
                if !(self.wanted)(row_number) {
                    passed += 1;
                    continue;
                }
                if passed > 0 {
                    pending.push(Pending::Ready(Row::Passed(passed)));
                    passed = 0;
                }
                let item = match row {
                    Err(e) if e.to_string().contains("as String") => Pending::Ready(Row::NotText),
                    Err(_) => Pending::Ready(Row::BadRecord),
                    Ok(row) => {
                        let mut values = row.into_columns();
                        let mut take = |name: &str| {
                            values
                                .iter()
                                .position(|(n, _)| n == name)
                                .map(|i| values.swap_remove(i).1)
                        };
                        if blob_base.is_some() {
                            let id = take("blob_id");
                            let encoding = take("src_encoding");
                            match (id, encoding) {
                                (Some(Field::Str(id)), Some(Field::Str(encoding))) => {
                                    Pending::Blob { id, encoding }
                                }
                                _ => Pending::Ready(Row::BadRecord),
                            }
                        } else {
                            Pending::Ready(self.text(take(columns[0])))
                        }
                    }
                };
                match item {
                    // Text rows go straight out: a row group of text can be large.
                    Pending::Ready(row) if blob_base.is_none() => {
                        for ready in pending.drain(..) {
                            if let Pending::Ready(ready) = ready {
                                self.send(ready)?;
                            }
                        }
                        self.send(row)?;
                    }
                    item => pending.push(item),
                }
            }
            if passed > 0 {
                pending.push(Pending::Ready(Row::Passed(passed)));
            }
            match &blob_base {
                Some(base) => self.fetch_blobs(base, pending, &runtime)?,
                None => {
                    for item in pending {
                        if let Pending::Ready(row) = item {
                            self.send(row)?;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn text(&self, value: Option<Field>) -> Row {
        let bytes = match value {
            Some(Field::Str(text)) => text.into_bytes(),
            Some(Field::Bytes(bytes)) => {
                if std::str::from_utf8(bytes.data()).is_err() {
                    return Row::NotText;
                }
                bytes.data().to_vec()
            }
            _ => return Row::BadRecord,
        };
        if bytes.len() as u64 > self.max_document_bytes {
            return Row::TooLarge;
        }
        Row::Document(bytes)
    }

    /// Fetches the row group's blobs, `in_flight` at a time, and sends every row in order.
    fn fetch_blobs(
        &self,
        base: &str,
        pending: Vec<Pending>,
        runtime: &tokio::runtime::Runtime,
    ) -> Result<(), Stop> {
        let Content::Blobs(source) = &self.content else {
            unreachable!("blobs are fetched only for blob content")
        };
        let max = self.max_document_bytes;
        let hub = &self.hub;
        let rows = futures::stream::iter(pending)
            .map(|item| async move {
                match item {
                    Pending::Ready(row) => row,
                    Pending::Blob { id, encoding } => {
                        fetch_blob(hub, base, &id, &encoding, max).await
                    }
                }
            })
            .buffered(source.in_flight.max(1));
        runtime.block_on(rows.map(Ok).forward(RowSink(&self.sender)))
    }
}

/// Sends rows on; stops the stream once the receiver is gone.
struct RowSink<'a>(&'a SyncSender<Row>);

impl futures::Sink<Row> for RowSink<'_> {
    type Error = Stop;

    fn poll_ready(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Stop>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn start_send(self: std::pin::Pin<&mut Self>, row: Row) -> Result<(), Stop> {
        // Blocks this file's own runtime while the consumer is behind: the fetches in flight
        // wait with it, and retry if their connections time out meanwhile.
        self.0.send(row).map_err(|_| Stop::Dropped)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Stop>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_close(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Stop>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// One blob: fetched, gunzipped within `max` bytes, decoded from `encoding` to UTF-8.
async fn fetch_blob(hub: &HubClient, base: &str, id: &str, encoding: &str, max: u64) -> Row {
    // Blob ids are hex digests; anything else must not become a path.
    if id.is_empty() || id.len() > 128 || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Row::BadRecord;
    }
    let Some(encoding) = encoding_rs::Encoding::for_label(encoding.trim().as_bytes()) else {
        return Row::BadRecord;
    };
    let url = format!("{base}/{id}");
    // Compressed text is rarely larger than the text; a little slack for tiny files.
    let limit = max + (64 << 10);
    let body = match hub.fetch(&url, None, limit, &format!("blob {id}")).await {
        Ok(fetched) => fetched.body,
        Err(HubError::TooLarge { .. }) => return Row::TooLarge,
        Err(e) => return Row::Unfetchable(e.to_string()),
    };
    let mut raw = Vec::new();
    let decoded = if body.starts_with(&[0x1f, 0x8b]) {
        flate2::read::MultiGzDecoder::new(&body[..])
            .take(max + 1)
            .read_to_end(&mut raw)
    } else {
        return Row::BadRecord;
    };
    if decoded.is_err() {
        return Row::BadRecord;
    }
    if raw.len() as u64 > max {
        return Row::TooLarge;
    }
    match encoding.decode_without_bom_handling_and_without_replacement(&raw) {
        Some(text) => {
            let text = text.into_owned().into_bytes();
            if text.len() as u64 > max {
                Row::TooLarge
            } else {
                Row::Document(text)
            }
        }
        None => Row::NotText,
    }
}
