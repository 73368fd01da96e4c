//! What a careless user types gets a clear error and a failing exit code, never a panic, an
//! unbounded read or silent garbage.

use std::path::Path;
use std::process::Output;

use somatrain_model::{Preset, Weights};

mod common;
use common::bin;

fn run(args: &[&str]) -> Output {
    bin()
        .args(args)
        .env_remove("SOMA_SECRET_KEY")
        .output()
        .unwrap()
}

/// Fails with exit code 1 (an error, not a panic's 101) and `needle` in the message.
fn refused(out: Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.contains(needle), "{needle:?} not in: {stderr}");
}

fn tiny_weights(dir: &Path) -> String {
    let path = dir.join("w.safetensors");
    somatrain_model::io::save_file(&Weights::init(Preset::Tiny.config(), 7), &path).unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn score_refuses_nonsense_settings_and_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let weights = tiny_weights(dir.path());
    let data = dir.path().join("data.txt");
    std::fs::write(&data, "some bytes to score").unwrap();
    let data = data.to_str().unwrap();
    let score = |extra: &[&str]| {
        let mut args = vec!["score", "--weights", &weights, "--data", data];
        args.extend_from_slice(extra);
        run(&args)
    };
    refused(
        score(&["--max-seq-len", "0"]),
        "--max-seq-len 0 is out of range",
    );
    refused(
        score(&["--batch-size", "0"]),
        "--batch-size 0 is out of range",
    );
    refused(
        score(&["--max-seq-len", "99999999999"]),
        "--max-seq-len 99999999999 is out of range",
    );
    refused(
        score(&["--batch-size", "1000000000"]),
        "--batch-size 1000000000 is out of range",
    );
    let zero = dir.path().join("zero.json");
    std::fs::write(&zero, "[0, 0, 0]").unwrap();
    refused(
        score(&["--distance-to", zero.to_str().unwrap()]),
        "no direction",
    );
    let nan = dir.path().join("nan.json");
    std::fs::write(&nan, "[1, 1e999, 0]").unwrap();
    let out = score(&["--distance-to", nan.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    // A directory where a weights file belongs.
    refused(
        run(&[
            "score",
            "--weights",
            dir.path().to_str().unwrap(),
            "--data",
            data,
        ]),
        "is a directory, not a weights file",
    );
    // /dev/zero never ends: refused at the cap instead of read forever.
    refused(
        run(&["score", "--weights", &weights, "--data", "/dev/zero"]),
        "the most this command reads",
    );
}

#[test]
fn decrypt_checks_the_result_and_nothing_is_overwritten_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let weights = tiny_weights(dir.path());
    let enc = dir.path().join("w.enc");
    let out = run(&["encrypt", &weights, enc.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = String::from_utf8_lossy(&out.stdout).trim().to_string();
    // Over an existing file: refused, the file untouched.
    let before = std::fs::read(&enc).unwrap();
    refused(
        run(&["encrypt", &weights, enc.to_str().unwrap()]),
        "pass --force to replace it",
    );
    assert_eq!(std::fs::read(&enc).unwrap(), before);
    // A wrong key gives random bytes: refused, nothing written.
    let plain = dir.path().join("plain.safetensors");
    let wrong = somatrain_protocol::EncryptionKey::generate().to_base58();
    refused(
        run(&[
            "decrypt",
            "--key",
            &wrong,
            enc.to_str().unwrap(),
            plain.to_str().unwrap(),
        ]),
        "most likely a wrong key",
    );
    assert!(!plain.exists());
    // --raw keeps them anyway; the right key gives the weights back; --force replaces.
    let raw = run(&[
        "decrypt",
        "--key",
        &wrong,
        "--raw",
        enc.to_str().unwrap(),
        plain.to_str().unwrap(),
    ]);
    assert!(raw.status.success());
    refused(
        run(&[
            "decrypt",
            "--key",
            &key,
            enc.to_str().unwrap(),
            plain.to_str().unwrap(),
        ]),
        "pass --force",
    );
    let good = run(&[
        "decrypt",
        "--key",
        &key,
        "--force",
        enc.to_str().unwrap(),
        plain.to_str().unwrap(),
    ]);
    assert!(
        good.status.success(),
        "{}",
        String::from_utf8_lossy(&good.stderr)
    );
    assert_eq!(
        std::fs::read(&plain).unwrap(),
        std::fs::read(&weights).unwrap()
    );
}

#[test]
fn a_keystore_others_can_read_is_refused_with_the_fix() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let keystore = dir.path().join("keystore.json");
    let ks = keystore.to_str().unwrap();
    let out = run(&["wallet", "new", "--keystore", ks]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::set_permissions(&keystore, std::fs::Permissions::from_mode(0o644)).unwrap();
    refused(
        run(&[
            "transfer",
            "--keystore",
            ks,
            "--to",
            &"1".repeat(64),
            "--amount",
            "1",
        ]),
        &format!("chmod 600 {ks}"),
    );
}
