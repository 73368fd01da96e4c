//! `encrypt`, `decrypt` and `commitment` through the real binary, against the SDK's vectors.

mod common;
use common::{COMMAND_DEADLINE, OutputWithin};
use std::path::PathBuf;
use std::process::Output;

fn somatrain(args: &[&str]) -> Output {
    common::bin()
        .args(args)
        .output_within(COMMAND_DEADLINE)
        .unwrap()
}

fn vectors() -> serde_json::Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/conformance/crypto/vectors.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("vectors are required")).unwrap()
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn encrypt_decrypt_and_commit_match_the_sdk() {
    let v = vectors();
    let tmp = tempfile::tempdir().unwrap();
    for (i, case) in v["encryption"].as_array().unwrap().iter().enumerate() {
        let plain = tmp.path().join(format!("p{i}"));
        let enc = tmp.path().join(format!("e{i}"));
        let back = tmp.path().join(format!("b{i}"));
        std::fs::write(&plain, hex(case["plaintext_hex"].as_str().unwrap())).unwrap();
        let key = case["key_base58"].as_str().unwrap();
        let out = somatrain(&[
            "encrypt",
            "--key",
            key,
            plain.to_str().unwrap(),
            enc.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.stdout.is_empty(), "a given key is not echoed");
        assert_eq!(
            std::fs::read(&enc).unwrap(),
            hex(case["ciphertext_hex"].as_str().unwrap())
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(case["ciphertext_commitment"].as_str().unwrap()),
            "{stderr}"
        );
        assert!(!stderr.contains(key), "the key leaked into the log");
        let out = somatrain(&["commitment", enc.to_str().unwrap()]);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            case["ciphertext_commitment"].as_str().unwrap()
        );
        let out = somatrain(&[
            "decrypt",
            "--raw",
            "--key",
            key,
            enc.to_str().unwrap(),
            back.to_str().unwrap(),
        ]);
        assert!(out.status.success());
        assert_eq!(
            std::fs::read(&back).unwrap(),
            std::fs::read(&plain).unwrap()
        );
    }
    for (i, case) in v["embedding_commitments"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        let path = tmp.path().join(format!("emb{i}.json"));
        std::fs::write(&path, serde_json::to_string(&case["embedding"]).unwrap()).unwrap();
        let out = somatrain(&["commitment", "--embedding", path.to_str().unwrap()]);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            case["commitment"].as_str().unwrap()
        );
    }
}

#[test]
fn generated_key_goes_to_stdout_and_round_trips() {
    let tmp = tempfile::tempdir().unwrap();
    let plain = tmp.path().join("w.safetensors");
    std::fs::write(&plain, vec![7u8; 3 << 20]).unwrap();
    let enc = tmp.path().join("w.enc");
    let out = somatrain(&["encrypt", plain.to_str().unwrap(), enc.to_str().unwrap()]);
    assert!(out.status.success());
    let key = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_eq!(bs58::decode(&key).into_vec().unwrap().len(), 32);
    assert!(!String::from_utf8_lossy(&out.stderr).contains(&key));
    let back = tmp.path().join("w.back");
    let out = somatrain(&[
        "decrypt",
        "--raw",
        "--key",
        &key,
        enc.to_str().unwrap(),
        back.to_str().unwrap(),
    ]);
    assert!(out.status.success());
    assert_eq!(
        std::fs::read(&back).unwrap(),
        std::fs::read(&plain).unwrap()
    );
    // A wrong key is a clear error that does not echo the key; a missing input loses nothing.
    let out = somatrain(&[
        "decrypt",
        "--key",
        "notakey0",
        enc.to_str().unwrap(),
        back.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).contains("notakey0"));
    let out = somatrain(&[
        "encrypt",
        "--key",
        &key,
        "/nonexistent",
        back.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert_eq!(
        std::fs::read(&back).unwrap(),
        std::fs::read(&plain).unwrap(),
        "output untouched"
    );
}
