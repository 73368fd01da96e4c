//! The Hub client against the loopback fake Hub: listing by the card's configs, rows read by
//! range requests, a resume that fetches nothing of the row groups before it, retries after 429
//! and 503, and the errors for a missing token and a missing dataset.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use somatrain_hub::fake::{FakeDataset, FakeHub, parquet_of_strings};
use somatrain_hub::{
    Content, DatasetRef, HubClient, HubError, HubFile, Row, RowReader, list_parquet_files,
};

const REPO: &str = "owner/code";
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// Text that snappy cannot shrink much, so that row groups have a real size.
fn text(file: usize, row: usize, len: usize) -> String {
    let mut state = (file as u64 * 1_000_003 + row as u64) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (b'a' + (state % 26) as u8) as char
        })
        .collect()
}

/// Two Parquet files of `rows` rows each (100-row groups, ~1 KiB per row) under data/Python,
/// one under data/Rust, and a card naming a config per language.
fn serve_code(hub: &FakeHub, rows: usize) -> Vec<Vec<String>> {
    let mut files = BTreeMap::new();
    let mut contents = Vec::new();
    for (file, path) in [
        "data/Python/train-0.parquet",
        "data/Python/train-1.parquet",
        "data/Rust/train-0.parquet",
    ]
    .iter()
    .enumerate()
    {
        let docs: Vec<String> = (0..rows).map(|row| text(file, row, 1024)).collect();
        let table: Vec<Vec<Option<String>>> = docs
            .iter()
            .enumerate()
            .map(|(i, d)| vec![Some(format!("id{i}")), Some(d.clone())])
            .collect();
        files.insert(
            path.to_string(),
            Bytes::from(parquet_of_strings(&["id", "content"], &table, 100)),
        );
        contents.push(docs);
    }
    files.insert("README.md".into(), Bytes::from_static(b"# code"));
    hub.add_dataset(FakeDataset {
        repo: REPO.into(),
        commit: COMMIT.into(),
        files,
        configs: Some(serde_json::json!([
            {"config_name": "default", "data_files": [{"split": "train", "path": "data/*/*.parquet"}]},
            {"config_name": "Python", "data_files": [{"split": "train", "path": "data/Python/*.parquet"}]},
        ])),
    });
    contents
}

fn dataset(config: Option<&str>) -> DatasetRef {
    DatasetRef {
        repo: REPO.into(),
        config: config.map(str::to_string),
        split: "train".into(),
        revision: "main".into(),
        endpoint: None,
    }
}

fn all_rows(hub: &HubClient, file: &HubFile, first_row: u64, wanted: fn(u64) -> bool) -> Vec<Row> {
    let mut reader = RowReader::open(
        hub.clone(),
        file.clone(),
        Content::Column {
            name: "content".into(),
        },
        first_row,
        Arc::new(wanted),
        1 << 20,
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut rows = Vec::new();
    while let Some(row) = reader.next_row() {
        assert!(
            std::time::Instant::now() < deadline,
            "reading took over 60 s"
        );
        rows.push(row);
    }
    rows
}

#[test]
fn a_config_lists_its_files_at_the_commit_and_every_row_is_read_in_order() {
    let fake = FakeHub::start(None, Duration::ZERO);
    let contents = serve_code(&fake, 250);
    let hub = HubClient::new(&fake.endpoint(), None);

    let all = list_parquet_files(&hub, &dataset(None)).unwrap();
    assert_eq!(all.len(), 3);
    let python = list_parquet_files(&hub, &dataset(Some("Python"))).unwrap();
    let paths: Vec<&str> = python.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(
        paths,
        ["data/Python/train-0.parquet", "data/Python/train-1.parquet"]
    );
    assert!(
        python.iter().all(|f| f.commit == COMMIT),
        "files are pinned to the commit"
    );

    let rows = all_rows(&hub, &python[1], 0, |_| true);
    let expected: Vec<Row> = contents[1]
        .iter()
        .map(|d| Row::Document(d.clone().into_bytes()))
        .collect();
    assert_eq!(rows, expected);

    // Rows the caller does not want are passed over, counted, in order.
    let rows = all_rows(&hub, &python[0], 0, |n| n % 3 == 0);
    let passed: u64 = rows
        .iter()
        .map(|r| if let Row::Passed(n) = r { *n } else { 0 })
        .sum();
    let documents: Vec<&Row> = rows
        .iter()
        .filter(|r| matches!(r, Row::Document(_)))
        .collect();
    assert_eq!(passed as usize + documents.len(), 250);
    assert_eq!(documents.len(), 83);
    assert_eq!(
        documents[0],
        &Row::Document(contents[0][2].clone().into_bytes())
    );

    let error = list_parquet_files(&hub, &dataset(Some("Go"))).unwrap_err();
    assert!(
        error.to_string().contains("no config 'Go'") && error.to_string().contains("Python"),
        "{error}"
    );
}

#[test]
fn a_resume_fetches_nothing_of_the_row_groups_before_it() {
    let fake = FakeHub::start(None, Duration::ZERO);
    let contents = serve_code(&fake, 400);
    let hub = HubClient::new(&fake.endpoint(), None);
    let file = list_parquet_files(&hub, &dataset(Some("Python")))
        .unwrap()
        .remove(0);
    let served = |fake: &FakeHub| fake.bytes_served("/datasets/");

    let before = served(&fake);
    let rows = all_rows(&hub, &file, 0, |_| true);
    assert_eq!(rows.len(), 400);
    let whole = served(&fake) - before;

    // Row 321 is in the fourth of four row groups.
    let before = served(&fake);
    let rows = all_rows(&hub, &file, 320, |_| true);
    let resumed = served(&fake) - before;
    let expected: Vec<Row> = contents[0][320..]
        .iter()
        .map(|d| Row::Document(d.clone().into_bytes()))
        .collect();
    assert_eq!(rows, expected);
    // The footer request (64 KiB) and one row group's column, not the three before it.
    let group = (whole - 64 * 1024) / 4;
    assert!(
        resumed <= 64 * 1024 + group + group / 4,
        "a resume in the last row group fetched {resumed} bytes of a {whole}-byte read"
    );
}

#[test]
fn throttling_and_server_errors_are_retried() {
    let fake = FakeHub::start(None, Duration::ZERO);
    let contents = serve_code(&fake, 150);
    let hub = HubClient::new(&fake.endpoint(), None);
    fake.fail_next(&[429, 503]);
    let files = list_parquet_files(&hub, &dataset(Some("Python"))).unwrap();
    assert_eq!(fake.requests(), 3, "two failures, then the listing");
    fake.fail_next(&[503, 429, 502]);
    let rows = all_rows(&hub, &files[0], 0, |_| true);
    assert_eq!(rows.len(), 150);
    assert_eq!(
        rows[149],
        Row::Document(contents[0][149].clone().into_bytes())
    );

    // A server that keeps failing is an error naming the status, not a hang.
    fake.fail_next(&[503; 6]);
    let error = list_parquet_files(&hub, &dataset(None)).unwrap_err();
    assert!(
        matches!(error, HubError::Status { status: 503, .. }),
        "{error}"
    );
    assert!(error.to_string().contains("after 6 attempts"), "{error}");
}

#[test]
fn a_gated_dataset_without_a_token_and_a_missing_dataset_are_clear_errors() {
    let fake = FakeHub::start(Some("hf_secret_token"), Duration::ZERO);
    serve_code(&fake, 10);
    let anonymous = HubClient::new(&fake.endpoint(), None);
    let error = list_parquet_files(&anonymous, &dataset(None)).unwrap_err();
    let text = error.to_string();
    assert!(
        matches!(error, HubError::Unauthorized { status: 401, .. }),
        "{text}"
    );
    assert!(text.contains("HF_TOKEN") && text.contains(REPO), "{text}");
    let wrong = HubClient::new(&fake.endpoint(), Some("hf_wrong".into()));
    let text = list_parquet_files(&wrong, &dataset(None))
        .unwrap_err()
        .to_string();
    assert!(
        text.contains("refused access") && !text.contains("hf_wrong"),
        "{text}"
    );

    let hub = HubClient::new(&fake.endpoint(), Some("hf_secret_token".into()));
    assert_eq!(list_parquet_files(&hub, &dataset(None)).unwrap().len(), 3);
    let missing = DatasetRef {
        repo: "owner/nothing".into(),
        ..dataset(None)
    };
    let error = list_parquet_files(&hub, &missing).unwrap_err();
    assert!(matches!(error, HubError::NotFound { .. }), "{error}");
    assert!(
        error.to_string().contains("owner/nothing") && error.to_string().contains("404"),
        "{error}"
    );
    let bad_name = DatasetRef {
        repo: "nothing".into(),
        ..dataset(None)
    };
    assert!(
        list_parquet_files(&hub, &bad_name)
            .unwrap_err()
            .to_string()
            .contains("OWNER/NAME")
    );
}
