//! `train --hf-dataset` end to end: a gated dataset on a loopback Hub (the fake Hub: the Hub's
//! listing and file endpoints with range requests) whose rows name their files by blob id, the
//! files gzip-compressed in a real S3 server (moto) as in Software Heritage's bucket. The run
//! trains, resumes, and the errors for a missing token and a missing dataset are clear.

mod common;
use common::{COMMAND_DEADLINE, OutputWithin, TINY_SHAPE};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use somatrain_hub::fake::{Bytes, FakeDataset, FakeHub, gzip, parquet_of_strings};
use somatrain_storage::testing::MotoServer;

const TOKEN: &str = "hf_cli_test_token_0123";

fn train(run: &Path, hub: &FakeHub, moto: &MotoServer, repo: &str, until: u64) -> Command {
    let mut cmd = common::bin();
    cmd.args(["train", "--run-dir", run.to_str().unwrap()])
        .args(["--hf-dataset", repo, "--hf-config", "Rust"])
        .args(["--content-from-blob-id", "s3://swh/content"])
        .args(["--blob-endpoint", &moto.endpoint()])
        .args(TINY_SHAPE)
        .args(["--heldout-bytes", "2048", "--heldout-per-mille", "100"])
        .args(["--until-step", &until.to_string()])
        .env("HF_ENDPOINT", hub.endpoint())
        .env("HF_TOKEN", TOKEN);
    cmd
}

fn history_steps(run: &Path) -> Vec<u64> {
    std::fs::read_to_string(run.join("history.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect()
}

#[test]
fn a_gated_stack_v2_like_dataset_trains_resumes_and_explains_its_errors() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let moto = runtime.block_on(MotoServer::start("swh"));
    let hub = FakeHub::start(Some(TOKEN), Duration::ZERO);
    let http = somatrain_client::http_client();
    let put = |url: String, body: Vec<u8>| {
        runtime.block_on(async {
            let answer = http.put(url).body(body).send().await.expect("moto answers");
            assert!(
                answer.status().is_success(),
                "moto refused a blob: {answer:?}"
            );
        })
    };
    let mut files = BTreeMap::new();
    for file in 0..2 {
        let mut table = Vec::new();
        for row in 0..60 {
            let id = format!("{:040x}", (file as u128) << 32 | row as u128);
            let text = format!(
                "fn row_{file}_{row}() -> usize {{ {} }}\n",
                "1 + ".repeat(row) + "0"
            );
            put(
                format!("{}/swh/content/{id}", moto.endpoint()),
                gzip(text.as_bytes()),
            );
            table.push(vec![Some(id), Some("UTF-8".to_string())]);
        }
        files.insert(
            format!("data/Rust/train-{file}.parquet"),
            Bytes::from(parquet_of_strings(&["blob_id", "src_encoding"], &table, 20)),
        );
    }
    hub.add_dataset(FakeDataset {
        repo: "bigcode/stack-like".into(),
        commit: "5eed".into(),
        files,
        configs: Some(serde_json::json!([
            {"config_name": "Rust", "data_files": [{"split": "train", "path": "data/Rust/*.parquet"}]}
        ])),
    });
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");

    let out = train(&run, &hub, &moto, "bigcode/stack-like", 2)
        .output_within(COMMAND_DEADLINE)
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "training failed:\n{stderr}");
    assert_eq!(history_steps(&run), [1, 2]);
    let settings = std::fs::read_to_string(run.join("settings.json")).unwrap_or_default();
    assert!(!settings.contains(TOKEN), "the token is never stored");

    let out = train(&run, &hub, &moto, "bigcode/stack-like", 4)
        .output_within(COMMAND_DEADLINE)
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the resumed run failed:\n{stderr}");
    assert_eq!(history_steps(&run), [1, 2, 3, 4]);
    assert!(!stderr.contains(TOKEN), "the token is never logged");

    // Without the token: the Hub's 401, explained, and nothing of the token in the output.
    let out = train(
        &dir.path().join("anonymous"),
        &hub,
        &moto,
        "bigcode/stack-like",
        1,
    )
    .env_remove("HF_TOKEN")
    .output_within(COMMAND_DEADLINE)
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("HTTP 401") && stderr.contains("HF_TOKEN"),
        "{stderr}"
    );

    let out = train(
        &dir.path().join("missing"),
        &hub,
        &moto,
        "bigcode/no-such-dataset",
        1,
    )
    .output_within(COMMAND_DEADLINE)
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("bigcode/no-such-dataset") && stderr.contains("HTTP 404"),
        "{stderr}"
    );
    assert!(!stderr.contains(TOKEN), "{stderr}");
}
