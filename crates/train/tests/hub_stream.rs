//! A Hub dataset as a corpus source, against the loopback fake Hub: The Stack v2's layout (rows
//! that name their files by blob id, files gzip-compressed in a bucket, in their own encodings),
//! resumed exactly from a saved cursor without fetching the row groups before it again.
//!
//! One test in this binary: the Hub client reads `HF_ENDPOINT`, which is set once, here.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use somatrain_hub::fake::{FakeDataset, FakeHub, gzip, parquet_of_strings};
use somatrain_hub::{BlobSource, Content, DatasetRef};
use somatrain_train::corpus::{CorpusConfig, Position, Source, TrainStream, heldout_sample};

const ROWS: usize = 400;

fn blob_id(file: usize, row: usize) -> String {
    format!("{:040x}", (file as u128) << 64 | row as u128)
}

fn source_text(file: usize, row: usize) -> String {
    format!(
        "// file {file} row {row}\nfn f{row}() -> u32 {{ {} }}\n",
        "7 + ".repeat(row % 40) + "1"
    )
}

fn run_stream(c: &CorpusConfig, position: Position, count: usize) -> Vec<Vec<u32>> {
    let mut s = TrainStream::open(c.clone(), position).unwrap();
    (0..count)
        .map(|_| s.next_sequence().unwrap().tokens)
        .collect()
}

#[test]
fn the_stack_v2_layout_streams_and_resumes_from_a_cursor() {
    let fake = FakeHub::start(Some("hf_test_token"), Duration::ZERO);
    // SAFETY: the only test of this binary sets these before anything reads the environment.
    unsafe {
        std::env::set_var("HF_ENDPOINT", fake.endpoint());
        std::env::set_var("HF_TOKEN", "hf_test_token");
    }
    let mut files = BTreeMap::new();
    let mut largest_file = 0;
    for file in 0..2 {
        let mut table = Vec::new();
        for row in 0..ROWS {
            let text = source_text(file, row);
            let (encoding, bytes) = match row % 10 {
                // Latin-1 text, decoded to UTF-8 on the way.
                3 => ("ISO-8859-1", {
                    let mut b = text.clone().into_bytes();
                    b.extend_from_slice(b"// caf\xe9\n");
                    b
                }),
                // Not valid in its declared encoding: skipped and counted.
                7 => ("UTF-8", b"\xff\xfe broken".to_vec()),
                _ => ("UTF-8", text.into_bytes()),
            };
            let id = blob_id(file, row);
            // Row 5 of each file names a blob that is not in the bucket.
            if row != 5 {
                fake.put_object(&format!("swh/content/{id}"), gzip(&bytes));
            }
            table.push(vec![
                Some(id),
                Some(encoding.to_string()),
                Some("Rust".to_string()),
            ]);
        }
        let parquet = parquet_of_strings(&["blob_id", "src_encoding", "language"], &table, 25);
        largest_file = largest_file.max(parquet.len() as u64);
        files.insert(
            format!("data/Rust/train-{file}.parquet"),
            Bytes::from(parquet),
        );
    }
    fake.add_dataset(FakeDataset {
        repo: "bigcode/stack-like".into(),
        commit: "c0ffee".into(),
        files,
        configs: Some(serde_json::json!([
            {"config_name": "Rust", "data_files": [{"split": "train", "path": "data/Rust/*.parquet"}]}
        ])),
    });
    let config = CorpusConfig {
        heldout_per_mille: 100,
        shuffle_buffer: 8,
        max_seq_len: 32,
        max_document_bytes: 4096,
        ..CorpusConfig::new(vec![Source::Hub {
            dataset: DatasetRef {
                repo: "bigcode/stack-like".into(),
                config: Some("Rust".into()),
                split: "train".into(),
                revision: "main".into(),
                endpoint: None,
            },
            content: Content::Blobs(BlobSource {
                location: "s3://swh/content".into(),
                endpoint: Some(fake.endpoint()),
                in_flight: 8,
            }),
        }])
    };

    // One epoch: every training row's file, decoded; the bad ones counted.
    let mut stream = TrainStream::open(config.clone(), Position::default()).unwrap();
    let mut text = Vec::new();
    let mut epoch_sequences = 0;
    while stream.epoch() == 0 {
        let seq = stream.next_sequence().unwrap();
        if stream.epoch() == 0 {
            epoch_sequences += 1;
            text.extend(seq.tokens.iter().filter(|&&t| t < 256).map(|&t| t as u8));
        }
    }
    let epoch_blobs = fake.bytes_served("/swh/");
    let epoch_parquet = fake.bytes_served("/datasets/");
    let stats = stream.last_epoch_stats.clone().unwrap();
    drop(stream);
    let text = String::from_utf8(text).unwrap();
    for file in 0..2 {
        assert!(
            text.contains(&format!("file {file} row {}", ROWS - 2)),
            "the last rows arrive"
        );
    }
    assert!(text.contains("// café"), "Latin-1 decoded to UTF-8");
    assert!(!text.contains("broken"));
    // Per file: 40 rows not UTF-8 and 1 missing blob, minus the ~10% held out.
    assert!((60..=90).contains(&stats.skipped_invalid_utf8), "{stats:?}");
    assert!((1..=2).contains(&stats.skipped_unreadable), "{stats:?}");
    assert!((600..=700).contains(&stats.train_documents), "{stats:?}");

    // Held-out rows are a disjoint, stable part of the dataset.
    let (heldout, heldout_stats) = heldout_sample(&config, 1 << 20).unwrap();
    assert!(
        (60..=100).contains(&heldout_stats.heldout_documents),
        "{heldout_stats:?}"
    );
    assert!(!text.contains(std::str::from_utf8(&heldout[..40]).unwrap()));

    // A cursor three quarters into the epoch resumes exactly, and fetches nothing of the row
    // groups and blobs already read.
    let cut = epoch_sequences * 3 / 4;
    let reference = run_stream(&config, Position::default(), cut + 100);
    let mut stream = TrainStream::open(config.clone(), Position::default()).unwrap();
    for _ in 0..cut {
        stream.next_sequence().unwrap();
    }
    let saved = Position::from_bytes(&stream.position().to_bytes()).unwrap();
    drop(stream);
    let (blobs_before, parquet_before) =
        (fake.bytes_served("/swh/"), fake.bytes_served("/datasets/"));
    assert_eq!(run_stream(&config, saved, 100), reference[cut..]);
    let blobs = fake.bytes_served("/swh/") - blobs_before;
    let parquet = fake.bytes_served("/datasets/") - parquet_before;
    assert!(
        blobs < epoch_blobs / 2,
        "the resume fetched {blobs} bytes of blobs; a whole epoch is {epoch_blobs}"
    );
    // (These files fit in the first request's 64 KiB, so this shows that only the file the
    // cursor was in is opened; the hub crate's tests show the row-group seek in larger files.)
    assert!(
        parquet <= largest_file,
        "the resume fetched {parquet} bytes of Parquet; the file is {largest_file}, an epoch {epoch_parquet}"
    );
    eprintln!("resume: blobs {blobs} of {epoch_blobs}, parquet {parquet} of {epoch_parquet}");
}
