//! `somatrain wallet`: keystores are private, secrets never printed, SOMA_SECRET_KEY wins.

mod common;
use common::{COMMAND_DEADLINE, OutputWithin};
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

fn somatrain() -> Command {
    let mut c = common::bin();
    c.env_remove("SOMA_SECRET_KEY");
    c
}

#[test]
fn new_import_show() {
    let dir = tempfile::tempdir().unwrap();
    let ks = dir.path().join("ks.json");
    let ks_s = ks.to_str().unwrap();
    let out = somatrain()
        .args(["wallet", "new", "--keystore", ks_s])
        .output_within(COMMAND_DEADLINE)
        .unwrap();
    assert!(out.status.success());
    let address = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_eq!(address.len(), 64);
    assert_eq!(
        std::fs::metadata(&ks).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let secret = serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(&ks).unwrap())
        .unwrap()["secret_hex"]
        .as_str()
        .unwrap()
        .to_string();
    let out = somatrain()
        .args(["wallet", "show", "--keystore", ks_s])
        .output_within(COMMAND_DEADLINE)
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), address);
    assert!(!String::from_utf8_lossy(&out.stdout).contains(&secret));
    // No silent overwrite.
    let out = somatrain()
        .args(["wallet", "new", "--keystore", ks_s])
        .output_within(COMMAND_DEADLINE)
        .unwrap();
    assert!(!out.status.success());

    // Import the SDK's test seed from standard input: its address is known.
    let imported = dir.path().join("imported.json");
    let seed: String = (0..32u8).map(|b| format!("{b:02x}")).collect();
    let out = somatrain()
        .args(["wallet", "import", "--keystore", imported.to_str().unwrap()])
        .output_with_input(seed.as_bytes(), COMMAND_DEADLINE)
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "160179a1565ea7cff27ead23f54cc7f50893bf58155cd7285156e57afa31c3ac"
    );
    // SOMA_SECRET_KEY takes precedence over the keystore; a bad one is refused without echo.
    let out = somatrain()
        .args(["wallet", "show", "--keystore", ks_s])
        .env("SOMA_SECRET_KEY", &seed)
        .output_within(COMMAND_DEADLINE)
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "160179a1565ea7cff27ead23f54cc7f50893bf58155cd7285156e57afa31c3ac"
    );
    let out = somatrain()
        .args(["wallet", "show"])
        .env("SOMA_SECRET_KEY", "zz-not-a-key")
        .output_within(COMMAND_DEADLINE)
        .unwrap();
    assert!(!out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).contains("zz-not-a-key"));
}

#[test]
fn a_keystore_that_is_not_a_regular_file_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo.json");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    // A FIFO with no writer would block an open forever; a directory is no key either.
    for keystore in [fifo.as_path(), dir.path()] {
        let out = somatrain()
            .args(["wallet", "show", "--keystore", keystore.to_str().unwrap()])
            .output_within(std::time::Duration::from_secs(10))
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        assert!(stderr.contains("is not a regular file"), "{stderr}");
        assert!(!stderr.contains("wallet new"), "{stderr}");
    }
    // Writable by others is named as such (not "readable").
    let ks = dir.path().join("ks.json");
    let out = somatrain()
        .args(["wallet", "new", "--keystore", ks.to_str().unwrap()])
        .output_within(COMMAND_DEADLINE)
        .unwrap();
    assert!(out.status.success());
    std::fs::set_permissions(&ks, std::fs::Permissions::from_mode(0o602)).unwrap();
    let out = somatrain()
        .args(["wallet", "show", "--keystore", ks.to_str().unwrap()])
        .output_within(COMMAND_DEADLINE)
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("is writable by others"), "{stderr}");
}
