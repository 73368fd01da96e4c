//! End-to-end: the real `somatrain` binary on the conformance cases.

mod common;
use common::{COMMAND_DEADLINE, OutputWithin};
use std::path::PathBuf;
use std::process::Output;

use somatrain_protocol::EncryptionKey;
use somatrain_protocol::crypto::apply_keystream;

fn case_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/conformance/scoring")
        .join(name)
}

fn expected(name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(case_dir(name).join("expected.json"))
        .expect("conformance cases are required");
    serde_json::from_str(&text).unwrap()
}

fn somatrain(args: &[&str]) -> Output {
    common::bin()
        .args(args)
        .output_within(COMMAND_DEADLINE)
        .unwrap()
}

fn path(p: &std::path::Path) -> &str {
    p.to_str().unwrap()
}

fn json_of(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("stdout is one JSON object")
}

fn assert_loss(value: &serde_json::Value, expected: f64) {
    let got = value.as_f64().unwrap();
    assert!(
        ((got - expected) / expected).abs() < 1e-5,
        "loss {got} vs {expected}"
    );
}

#[test]
fn scores_a_case_as_json() {
    let dir = case_dir("tiny_3000b");
    let e = expected("tiny_3000b");
    let weights = dir.join("weights.safetensors");
    let data = dir.join("data.bin");
    let out = somatrain(&[
        "score",
        "--weights",
        path(&weights),
        "--data",
        path(&data),
        "--num-heads",
        "4",
        "--seed",
        "0",
        "--json",
    ]);
    let report = json_of(&out);
    assert_eq!(report["winner"], 0);
    assert_loss(&report["models"][0]["loss"], e["loss"].as_f64().unwrap());
    assert_eq!(
        report["models"][0]["embedding"].as_array().unwrap().len(),
        16
    );
    assert!(report.get("distance").is_none());
}

#[test]
fn reads_data_from_stdin_and_uses_the_seed() {
    let dir = case_dir("tiny_3000b_seed7");
    let e = expected("tiny_3000b_seed7");
    let out = common::bin()
        .args([
            "score",
            "--weights",
            path(&dir.join("weights.safetensors")),
            "--data",
            "-",
        ])
        .args(["--num-heads", "4", "--seed", "7", "--json"])
        .output_with_input(
            &std::fs::read(dir.join("data.bin")).unwrap(),
            COMMAND_DEADLINE,
        )
        .unwrap();
    let report = json_of(&out);
    assert_loss(&report["models"][0]["loss"], e["loss"].as_f64().unwrap());
}

#[test]
fn encrypted_weights_tie_and_distance() {
    let dir = case_dir("small_40kb");
    let e = expected("small_40kb");
    let tmp = tempfile::tempdir().unwrap();
    let key = EncryptionKey::generate();
    let mut bytes = std::fs::read(dir.join("weights.safetensors")).unwrap();
    apply_keystream(&key, &mut bytes);
    let encrypted = tmp.path().join("weights.enc");
    std::fs::write(&encrypted, &bytes).unwrap();
    let target = tmp.path().join("target.json");
    std::fs::write(&target, serde_json::to_string(&e["embedding"]).unwrap()).unwrap();
    let key_text = key.to_base58();
    // The encrypted copy is listed first, so on the exact tie it must win.
    let out = somatrain(&[
        "score",
        "--encrypted-weights",
        path(&encrypted),
        "--key",
        &key_text,
        "--weights",
        path(&dir.join("weights.safetensors")),
        "--data",
        path(&dir.join("data.bin")),
        "--num-heads",
        "4",
        "--seed",
        "1",
        "--distance-to",
        path(&target),
        "--json",
    ]);
    let report = json_of(&out);
    assert_loss(&report["models"][0]["loss"], e["loss"].as_f64().unwrap());
    assert_eq!(report["models"][0]["loss"], report["models"][1]["loss"]);
    assert_eq!(report["winner"], 0);
    assert!(
        report["models"][0]["weights"]
            .as_str()
            .unwrap()
            .ends_with("weights.enc")
    );
    let distance = report["distance"].as_f64().unwrap();
    assert!(
        distance.abs() < 1e-5,
        "distance to its own embedding: {distance}"
    );

    let negated: Vec<f64> = e["embedding"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| -x.as_f64().unwrap())
        .collect();
    std::fs::write(&target, serde_json::to_string(&negated).unwrap()).unwrap();
    let out = somatrain(&[
        "score",
        "--weights",
        path(&dir.join("weights.safetensors")),
        "--data",
        path(&dir.join("data.bin")),
        "--num-heads",
        "4",
        "--seed",
        "1",
        "--distance-to",
        path(&target),
        "--json",
    ]);
    let distance = json_of(&out)["distance"].as_f64().unwrap();
    assert!(
        (distance - 2.0).abs() < 1e-5,
        "distance to the opposite embedding: {distance}"
    );
}

#[test]
fn wrong_key_is_refused_without_leaking_it() {
    let dir = case_dir("tiny_1b");
    let tmp = tempfile::tempdir().unwrap();
    let right = EncryptionKey::generate();
    let wrong = EncryptionKey::generate();
    let mut bytes = std::fs::read(dir.join("weights.safetensors")).unwrap();
    apply_keystream(&right, &mut bytes);
    let encrypted = tmp.path().join("w.enc");
    std::fs::write(&encrypted, &bytes).unwrap();
    let wrong_text = wrong.to_base58();
    let out = somatrain(&[
        "score",
        "--encrypted-weights",
        path(&encrypted),
        "--key",
        &wrong_text,
        "--data",
        path(&dir.join("data.bin")),
        "--num-heads",
        "4",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not a valid safetensors"), "{stderr}");
    assert!(
        !stderr.contains(&wrong_text),
        "the key leaked into the error: {stderr}"
    );
}

#[test]
fn missing_inputs_give_clear_errors() {
    let empty_dir = tempfile::tempdir().unwrap();
    let empty = empty_dir.path().join("empty.bin");
    std::fs::write(&empty, b"").unwrap();
    let out = somatrain(&[
        "score",
        "--weights",
        "/nonexistent/w.safetensors",
        "--data",
        empty.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("empty"));
    // A device is no data file: refused before it is opened.
    let out = somatrain(&["score", "--weights", "w.safetensors", "--data", "/dev/null"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a regular file"));
    let dir = case_dir("tiny_1b");
    let out = somatrain(&[
        "score",
        "--weights",
        "/nonexistent/w.safetensors",
        "--data",
        path(&dir.join("data.bin")),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/w.safetensors"));
    let out = somatrain(&[
        "score",
        "--weights",
        path(&dir.join("weights.safetensors")),
        "--data",
        path(&dir.join("data.bin")),
    ]);
    assert!(
        !out.status.success(),
        "no head count for a width-16 file without metadata"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("--num-heads"));
}

#[test]
fn eval_and_embed_agree_with_the_scorer() {
    let dir = case_dir("small_40kb");
    let e = expected("small_40kb");
    let weights = dir.join("weights.safetensors");
    let data = dir.join("data.bin");
    let out = somatrain(&[
        "eval",
        "--weights",
        path(&weights),
        "--data",
        path(&data),
        "--num-heads",
        "4",
        "--seed",
        "1",
        "--json",
    ]);
    let report = json_of(&out);
    assert_loss(&report["network_loss"], e["loss"].as_f64().unwrap());
    let bpb = report["bits_per_byte"].as_f64().unwrap();
    let ce = report["cross_entropy"].as_f64().unwrap();
    assert!((bpb - ce / std::f64::consts::LN_2).abs() < 1e-4, "{report}");
    assert_eq!(report["bytes"].as_u64().unwrap(), 40_000);

    let out = somatrain(&[
        "embed",
        "--weights",
        path(&weights),
        "--data",
        path(&data),
        "--num-heads",
        "4",
    ]);
    let embedding = json_of(&out);
    let expected_embedding = e["embedding"].as_array().unwrap();
    assert_eq!(
        embedding.as_array().unwrap().len(),
        expected_embedding.len()
    );
    for (a, b) in embedding.as_array().unwrap().iter().zip(expected_embedding) {
        assert!((a.as_f64().unwrap() - b.as_f64().unwrap()).abs() < 1e-5);
    }
}
