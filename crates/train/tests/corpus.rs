//! Every corpus format, the bad-record rules, the held-out split and exact resumption.

use std::path::Path;

use somatrain_train::corpus::{
    CorpusConfig, Position, Source, Split, TrainStream, heldout_sample, split_of,
};

fn write(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

fn config(sources: Vec<Source>) -> CorpusConfig {
    CorpusConfig {
        heldout_per_mille: 0,
        shuffle_buffer: 4,
        max_seq_len: 16,
        max_document_bytes: 1000,
        ..CorpusConfig::new(sources)
    }
}

/// Each sequence's bytes as text (PAD and EOS dropped).
fn as_text(seqs: &[Vec<u32>]) -> Vec<String> {
    seqs.iter()
        .map(|s| {
            s.iter()
                .filter(|&&t| t < 256)
                .map(|&t| t as u8 as char)
                .collect()
        })
        .collect()
}

/// All bytes a stream yields in one epoch, sequences in emission order.
fn one_epoch(c: CorpusConfig) -> (Vec<Vec<u32>>, somatrain_train::corpus::CorpusStats) {
    let mut s = TrainStream::open(c, Position::default()).unwrap();
    let mut out = Vec::new();
    loop {
        let seq = s.next_sequence().unwrap();
        if s.epoch() != 0 {
            break;
        }
        out.push(seq.tokens);
    }
    (out, s.last_epoch_stats.clone().expect("epoch 0 completed"))
}

#[test]
fn directory_with_bad_files_skips_and_counts() {
    let dir = tempfile::tempdir().unwrap();
    write(&dir.path().join("a.rs"), b"fn a() {}\n");
    write(&dir.path().join("sub/b.rs"), b"fn b() { 1 + 2 }\n");
    write(&dir.path().join("empty.rs"), b"");
    write(&dir.path().join("binary.rs"), &[0xff, 0xfe, 0x00, 0x80]);
    write(&dir.path().join("huge.rs"), &vec![b'x'; 5000]);
    write(&dir.path().join("notes.txt"), b"not rust\n");
    let mut c = config(vec![Source::Dir {
        path: dir.path().to_path_buf(),
    }]);
    c.include = vec!["**/*.rs".into()];
    c.exclude = vec!["**/skip*".into()];
    let (seqs, stats) = one_epoch(c);
    assert_eq!(stats.train_documents, 2);
    assert_eq!(stats.skipped_empty, 1);
    assert_eq!(stats.skipped_invalid_utf8, 1);
    assert_eq!(stats.skipped_too_large, 1);
    // 10 bytes -> 1 sequence; 17 bytes -> 2 sequences of 16.
    assert_eq!(seqs.len(), 3);
    let all: Vec<u32> = seqs.concat();
    assert!(all.contains(&(b'a' as u32)) && all.contains(&(b'b' as u32)));
    assert!(!all.contains(&(b'n' as u32 + 1000)));
}

#[test]
fn jsonl_records_and_bad_lines() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data.jsonl");
    let mut text = Vec::new();
    text.extend_from_slice(b"{\"content\": \"hello world\"}\n");
    text.extend_from_slice(b"not json at all\n");
    text.extend_from_slice(b"{\"other\": \"missing field\"}\n");
    text.extend_from_slice(b"{\"content\": \"\"}\n");
    text.extend_from_slice(&[b'{', 0xff, b'}', b'\n']);
    text.extend_from_slice(b"{\"content\": \"second doc\"}");
    write(&path, &text);
    let (seqs, stats) = one_epoch(config(vec![Source::Jsonl {
        path,
        field: "content".into(),
    }]));
    assert_eq!(stats.train_documents, 2);
    assert_eq!(stats.skipped_bad_record, 2);
    assert_eq!(stats.skipped_empty, 1);
    assert_eq!(stats.skipped_invalid_utf8, 1);
    assert_eq!(seqs.len(), 2);
    let first: Vec<u32> = b"hello world".iter().map(|&b| b as u32).collect();
    assert!(seqs.iter().any(|s| s.starts_with(&first)));
}

#[test]
fn file_list_reads_listed_paths() {
    let dir = tempfile::tempdir().unwrap();
    write(&dir.path().join("docs/one.txt"), b"first document");
    write(&dir.path().join("docs/two.txt"), b"second");
    write(
        &dir.path().join("list.txt"),
        b"# comment\ndocs/one.txt\n\ndocs/two.txt\ndocs/missing.txt\n",
    );
    let (seqs, stats) = one_epoch(config(vec![Source::List {
        path: dir.path().join("list.txt"),
    }]));
    assert_eq!(stats.train_documents, 2);
    assert_eq!(stats.skipped_unreadable, 1);
    assert_eq!(seqs.len(), 2);
}

#[test]
fn heldout_split_is_disjoint_and_stable() {
    let dir = tempfile::tempdir().unwrap();
    for i in 0..200 {
        write(
            &dir.path().join(format!("f{i:03}.txt")),
            format!("document number {i}\n").as_bytes(),
        );
    }
    let mut c = config(vec![Source::Dir {
        path: dir.path().to_path_buf(),
    }]);
    c.heldout_per_mille = 100;
    let held: Vec<String> = (0..200)
        .map(|i| format!("f{i:03}.txt"))
        .filter(|p| split_of(p, 100) == Split::Heldout)
        .collect();
    assert!(
        held.len() > 5 && held.len() < 50,
        "{} held out of 200",
        held.len()
    );
    let (sample, stats) = heldout_sample(&c, 1 << 20).unwrap();
    assert_eq!(stats.heldout_documents as usize, held.len());
    let (_, train_stats) = one_epoch(c);
    assert_eq!(train_stats.train_documents as usize + held.len(), 200);
    // No held-out document's text reaches training.
    let text = String::from_utf8(sample).unwrap();
    assert_eq!(text.matches("document number").count(), held.len());
}

#[test]
fn reopening_at_a_position_continues_exactly() {
    let dir = tempfile::tempdir().unwrap();
    for i in 0..30 {
        write(
            &dir.path().join(format!("f{i:02}.txt")),
            format!("file {i} {}\n", "abc".repeat(i)).as_bytes(),
        );
    }
    let c = config(vec![Source::Dir {
        path: dir.path().to_path_buf(),
    }]);
    let mut a = TrainStream::open(c.clone(), Position::default()).unwrap();
    let mut reference = Vec::new();
    for _ in 0..200 {
        reference.push(a.next_sequence().unwrap());
    }
    for cut in [0usize, 1, 17, 60, 150] {
        let mut s = TrainStream::open(c.clone(), Position::default()).unwrap();
        for _ in 0..cut {
            s.next_sequence().unwrap();
        }
        let mut resumed = TrainStream::open(c.clone(), s.position()).unwrap();
        for (i, expected) in reference.iter().enumerate().skip(cut) {
            assert_eq!(
                &resumed.next_sequence().unwrap(),
                expected,
                "cut {cut}, sequence {i}"
            );
        }
    }
    // Several epochs went by, each in a different order.
    assert!(a.position().epoch >= 1);
}

#[test]
fn empty_corpus_is_an_error_not_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    write(&dir.path().join("empty.txt"), b"");
    let mut s = TrainStream::open(
        config(vec![Source::Dir {
            path: dir.path().to_path_buf(),
        }]),
        Position::default(),
    )
    .unwrap();
    assert!(s.next_sequence().is_err());
}

/// A Parquet file with an optional `content` column (as The Stack v2 dumps have), snappy-compressed,
/// written with the parquet crate's own writer; `None` is a null.
fn write_parquet(path: &Path, rows: &[Option<&[u8]>], row_group_size: usize) {
    use parquet::basic::Compression;
    use parquet::data_type::{ByteArray, ByteArrayType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    let schema = std::sync::Arc::new(
        parquet::schema::parser::parse_message_type(
            "message schema { OPTIONAL BYTE_ARRAY content (UTF8); REQUIRED INT64 size; }",
        )
        .unwrap(),
    );
    let props = std::sync::Arc::new(
        WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .build(),
    );
    let mut writer =
        SerializedFileWriter::new(std::fs::File::create(path).unwrap(), schema, props).unwrap();
    for group in rows.chunks(row_group_size) {
        let mut rg = writer.next_row_group().unwrap();
        let values: Vec<ByteArray> = group
            .iter()
            .flatten()
            .map(|b| ByteArray::from(b.to_vec()))
            .collect();
        let defs: Vec<i16> = group.iter().map(|r| i16::from(r.is_some())).collect();
        let sizes: Vec<i64> = group
            .iter()
            .map(|r| r.map_or(0, |b| b.len() as i64))
            .collect();
        let mut column = rg.next_column().unwrap().unwrap();
        column
            .typed::<ByteArrayType>()
            .write_batch(&values, Some(&defs), None)
            .unwrap();
        column.close().unwrap();
        let mut column = rg.next_column().unwrap().unwrap();
        column
            .typed::<parquet::data_type::Int64Type>()
            .write_batch(&sizes, None, None)
            .unwrap();
        column.close().unwrap();
        rg.close().unwrap();
    }
    writer.close().unwrap();
}

#[test]
fn parquet_content_column_and_bad_rows() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stack.parquet");
    let huge = vec![b'x'; 5000];
    let rows: Vec<Option<&[u8]>> = vec![
        Some(b"fn main() {}\n"),
        None,
        Some(b""),
        Some(&[0xff, 0xfe, 0x41]),
        Some(&huge),
        Some(b"def second(): pass\n"),
        Some(b"third document"),
    ];
    // Two row groups, so reading continues across groups.
    write_parquet(&path, &rows, 4);
    write(
        &dir.path().join("garbage.parquet"),
        b"PAR1 this is not parquet",
    );
    let (seqs, stats) = one_epoch(config(vec![
        Source::Parquet {
            path: path.clone(),
            column: "content".into(),
        },
        Source::Parquet {
            path: dir.path().join("garbage.parquet"),
            column: "content".into(),
        },
        Source::Parquet {
            path,
            column: "no_such_column".into(),
        },
    ]));
    assert_eq!(stats.train_documents, 3);
    assert_eq!(stats.skipped_empty, 1);
    assert_eq!(stats.skipped_invalid_utf8, 1);
    assert_eq!(stats.skipped_too_large, 1);
    // The null row and the file without the column.
    assert_eq!(stats.skipped_bad_record, 2);
    assert_eq!(stats.skipped_unreadable, 1);
    // 13 and 14 bytes fit one sequence of 16; 19 bytes take two.
    assert_eq!(seqs.len(), 4);
    let texts = as_text(&seqs);
    for expected in ["fn main() {}", "def second(): pa", "third document"] {
        assert!(
            texts.iter().any(|t| t.starts_with(expected)),
            "{expected} missing from {texts:?}"
        );
    }
}

/// A JSON Lines file of `n` short documents, each one sequence of 16 or less.
fn numbered_jsonl(path: &Path, n: usize, letter: char) {
    let text: String = (0..n)
        .map(|i| format!("{{\"content\": \"{letter}{i:05}\"}}\n"))
        .collect();
    write(path, text.as_bytes());
}

#[test]
fn a_large_unit_is_read_a_document_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.jsonl");
    numbered_jsonl(&path, 5000, 'a');
    let mut c = config(vec![Source::Jsonl {
        path,
        field: "content".into(),
    }]);
    c.shuffle_buffer = 16;
    let mut s = TrainStream::open(c, Position::default()).unwrap();
    let mut most = 0;
    let mut seen = std::collections::HashSet::new();
    while s.epoch() == 0 {
        let seq = s.next_sequence().unwrap();
        most = most.max(s.buffered());
        seen.insert(seq.tokens);
    }
    // Every document once, yet never more than the buffer's worth held.
    assert!(seen.len() >= 5000, "{} distinct sequences", seen.len());
    assert!(most <= 16, "the buffer held {most} chunks");
}

/// Sequences `from..to` of a stream, by token.
fn run_stream(c: &CorpusConfig, position: Position, count: usize) -> Vec<Vec<u32>> {
    let mut s = TrainStream::open(c.clone(), position).unwrap();
    (0..count)
        .map(|_| s.next_sequence().unwrap().tokens)
        .collect()
}

#[test]
fn a_saved_cursor_resumes_exactly_across_every_unit_kind() {
    let dir = tempfile::tempdir().unwrap();
    numbered_jsonl(&dir.path().join("lines.jsonl"), 90, 'j');
    let texts: Vec<String> = (0..70)
        .map(|i| format!("row {i} {}", "p".repeat(i % 23)))
        .collect();
    let rows: Vec<Option<&[u8]>> = texts.iter().map(|t| Some(t.as_bytes())).collect();
    write_parquet(&dir.path().join("rows.parquet"), &rows, 9);
    for i in 0..12 {
        write(
            &dir.path().join(format!("docs/f{i}.txt")),
            format!("file {i} {}", "d".repeat(3 * i)).as_bytes(),
        );
    }
    let c = config(vec![
        Source::Jsonl {
            path: dir.path().join("lines.jsonl"),
            field: "content".into(),
        },
        Source::Parquet {
            path: dir.path().join("rows.parquet"),
            column: "content".into(),
        },
        Source::Dir {
            path: dir.path().join("docs"),
        },
    ]);
    let reference = run_stream(&c, Position::default(), 700);
    let mut s = TrainStream::open(c.clone(), Position::default()).unwrap();
    let mut taken = 0;
    for cut in [0usize, 1, 5, 37, 88, 150, 230, 401, 650] {
        while taken < cut {
            s.next_sequence().unwrap();
            taken += 1;
        }
        let position = s.position();
        assert!(position.has_cursor());
        let saved = Position::from_bytes(&position.to_bytes()).unwrap();
        assert_eq!(saved, position);
        let rest = reference.len() - cut;
        assert_eq!(
            run_stream(&c, saved, rest),
            reference[cut..],
            "resumed from the cursor at {cut}"
        );
        let replayed = Position::replay(position.epoch, position.sequences);
        assert_eq!(
            run_stream(&c, replayed, rest),
            reference[cut..],
            "replayed to {cut}"
        );
    }
    assert!(s.position().epoch >= 1, "the cuts span an epoch boundary");
}

#[test]
fn a_cursor_continues_without_rereading_what_came_before() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lines.jsonl");
    numbered_jsonl(&path, 400, 'a');
    let c = config(vec![Source::Jsonl {
        path: path.clone(),
        field: "content".into(),
    }]);
    let mut s = TrainStream::open(c.clone(), Position::default()).unwrap();
    for _ in 0..200 {
        s.next_sequence().unwrap();
    }
    let position = s.position();
    let reference = run_stream(&c, position.clone(), 150);
    // Spoil the first 100 lines (long since read: 200 one-sequence documents came out of a
    // 4-slot buffer) without moving the rest: they become malformed records of the same length.
    // A stream that read them again would skip them and come out elsewhere.
    let text = std::fs::read_to_string(&path).unwrap();
    let (head, tail) = text.split_at(text.match_indices('\n').nth(99).unwrap().0 + 1);
    std::fs::write(&path, head.replace('{', "x") + tail).unwrap();
    assert_eq!(run_stream(&c, position.clone(), 150), reference);
    let replayed = Position::replay(position.epoch, position.sequences);
    assert_ne!(run_stream(&c, replayed, 150), reference);
}

#[test]
fn a_cursor_from_another_corpus_starts_the_next_epoch() {
    let dir = tempfile::tempdir().unwrap();
    for i in 0..10 {
        write(
            &dir.path().join(format!("f{i}.txt")),
            format!("doc {i}").as_bytes(),
        );
    }
    let c = config(vec![Source::Dir {
        path: dir.path().to_path_buf(),
    }]);
    let mut s = TrainStream::open(c.clone(), Position::default()).unwrap();
    for _ in 0..3 {
        s.next_sequence().unwrap();
    }
    let position = s.position();
    write(&dir.path().join("new.txt"), b"a new document");
    let resumed = TrainStream::open(c, position).unwrap();
    assert_eq!(
        (resumed.position().epoch, resumed.position().sequences),
        (1, 0)
    );
}

#[test]
fn malformed_positions_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    numbered_jsonl(&dir.path().join("lines.jsonl"), 50, 'a');
    let c = config(vec![Source::Jsonl {
        path: dir.path().join("lines.jsonl"),
        field: "content".into(),
    }]);
    let mut s = TrainStream::open(c, Position::default()).unwrap();
    for _ in 0..7 {
        s.next_sequence().unwrap();
    }
    let bytes = s.position().to_bytes();
    assert!(Position::from_bytes(&bytes).is_ok());
    for (what, bad) in [
        ("truncated", bytes[..bytes.len() - 1].to_vec()),
        ("trailing", [bytes.clone(), b"x".to_vec()].concat()),
        ("no header", b"{}".to_vec()),
        (
            "other format",
            String::from_utf8_lossy(&bytes)
                .replacen("somatrain-stream", "other", 1)
                .into_bytes(),
        ),
    ] {
        assert!(Position::from_bytes(&bad).is_err(), "{what} was accepted");
    }
}

/// `text` compressed with gzip.
fn gzip(text: &str) -> Vec<u8> {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(text.as_bytes()).unwrap();
    encoder.finish().unwrap()
}

fn lines(prefix: &str, n: usize) -> String {
    (0..n)
        .map(|i| {
            format!(
                "{{\"content\": \"{prefix} line {i} {}\"}}\n",
                "z".repeat(i % 11)
            )
        })
        .collect()
}

#[test]
fn directories_of_compressed_json_lines_and_parquet_files() {
    let dir = tempfile::tempdir().unwrap();
    let jsonl = dir.path().join("jsonl");
    write(&jsonl.join("a.jsonl"), lines("plain", 30).as_bytes());
    write(&jsonl.join("deep/b.jsonl.gz"), &gzip(&lines("gzip", 40)));
    write(
        &jsonl.join("deep/c.jsonl.zst"),
        &zstd::encode_all(lines("zstd", 50).as_bytes(), 3).unwrap(),
    );
    write(
        &jsonl.join("notes.txt"),
        b"{\"content\": \"not a JSON Lines file\"}\n",
    );
    write(&jsonl.join("broken.jsonl.gz"), b"not gzip at all");
    let parquet = dir.path().join("parquet");
    for sub in ["Python", "Rust"] {
        std::fs::create_dir_all(parquet.join(sub)).unwrap();
    }
    let rows: Vec<String> = (0..25).map(|i| format!("python row {i}\n")).collect();
    let rows: Vec<Option<&[u8]>> = rows.iter().map(|r| Some(r.as_bytes())).collect();
    write_parquet(&parquet.join("Python/train-0.parquet"), &rows, 7);
    let rows: Vec<String> = (0..15).map(|i| format!("rust row {i}\n")).collect();
    let rows: Vec<Option<&[u8]>> = rows.iter().map(|r| Some(r.as_bytes())).collect();
    write_parquet(&parquet.join("Rust/train-0.parquet"), &rows, 7);
    let mut c = config(vec![
        Source::Jsonl {
            path: jsonl,
            field: "content".into(),
        },
        Source::Parquet {
            path: parquet,
            column: "content".into(),
        },
    ]);
    c.max_seq_len = 64;
    let (seqs, stats) = one_epoch(c.clone());
    assert_eq!(stats.train_documents, 30 + 40 + 50 + 25 + 15);
    assert_eq!(seqs.len(), 160, "one sequence per document");
    let text = as_text(&seqs);
    for prefix in [
        "plain line",
        "gzip line",
        "zstd line",
        "python row",
        "rust row",
    ] {
        assert!(text.iter().any(|t| t.starts_with(prefix)), "no {prefix}");
    }
    assert!(!text.iter().any(|t| t.contains("not a JSON Lines file")));
    assert_eq!(stats.skipped_unreadable, 1, "the broken gzip file");

    // Files of the same name in different directories are different documents to the split.
    // (Row 3 of each falls on different sides; by file name alone both would be on one.)
    let python = split_of("Python/train-0.parquet:3", 500);
    let rust = split_of("Rust/train-0.parquet:3", 500);
    assert_ne!(python, rust);
    c.heldout_per_mille = 500;
    let (held, _) = heldout_sample(&c, 1 << 20).unwrap();
    let held = String::from_utf8(held).unwrap();
    assert_eq!(held.contains("python row 2\n"), python == Split::Heldout);
    assert_eq!(held.contains("rust row 2\n"), rust == Split::Heldout);

    // A cursor inside a compressed file resumes exactly.
    c.heldout_per_mille = 0;
    let reference = run_stream(&c, Position::default(), 300);
    let mut s = TrainStream::open(c.clone(), Position::default()).unwrap();
    for cut in 1..=300 {
        s.next_sequence().unwrap();
        if cut % 23 == 0 {
            let saved = Position::from_bytes(&s.position().to_bytes()).unwrap();
            assert_eq!(
                run_stream(&c, saved, 300 - cut),
                reference[cut..],
                "cut {cut}"
            );
        }
    }
}

/// A data submitter's pieces: the same draw as the sequences, as raw bytes of at most
/// `max_seq_len`, and they resume from a position exactly as sequences do.
#[test]
fn pieces_are_the_sequences_raw_bytes_and_resume() {
    let dir = tempfile::tempdir().unwrap();
    write(
        &dir.path().join("a.txt"),
        b"the first document, long enough for three pieces",
    );
    write(&dir.path().join("b.txt"), b"second");
    let c = config(vec![Source::Dir {
        path: dir.path().to_path_buf(),
    }]);
    let (sequences, _) = one_epoch(c.clone());
    let mut stream = TrainStream::open(c.clone(), Position::default()).unwrap();
    let pieces: Vec<Vec<u8>> = (0..sequences.len())
        .map(|_| stream.next_piece().unwrap())
        .collect();
    assert!(pieces.iter().all(|p| !p.is_empty() && p.len() <= 16));
    assert_eq!(
        pieces
            .iter()
            .map(|p| String::from_utf8(p.clone()).unwrap())
            .collect::<Vec<_>>(),
        as_text(&sequences)
    );
    // Stopped after three pieces and reopened at its position: the same pieces follow.
    let mut first = TrainStream::open(c.clone(), Position::default()).unwrap();
    for _ in 0..3 {
        first.next_piece().unwrap();
    }
    let mut resumed = TrainStream::open(c, first.position()).unwrap();
    for expected in &pieces[3..] {
        assert_eq!(&resumed.next_piece().unwrap(), expected);
    }
}
