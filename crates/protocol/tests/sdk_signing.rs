//! The official SDK (soma-sdk 0.1.15, installed by `scripts/setup-sdk`) signs each of the 26
//! transaction kinds; our envelope must equal its bytes exactly, and must verify.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use somatrain_protocol::fixtures::{all_kinds, gas};
use somatrain_protocol::{Keypair, SignedTransaction, TransactionData};

/// The Python of the SDK's virtual environment: `SOMATRAIN_SDK_PYTHON`, else `.venv-sdk` at the
/// workspace root.
fn sdk_python() -> PathBuf {
    let python = std::env::var_os("SOMATRAIN_SDK_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.venv-sdk/bin/python")
        });
    assert!(
        python.exists(),
        "the official SDK is needed: run `bash scripts/setup-sdk` (looked for {})",
        python.display()
    );
    python
}

const SIGN_WITH_SDK: &str = r#"
import sys
from soma_sdk import Keypair
for line in sys.stdin:
    secret, data = line.split()
    signed = Keypair.from_secret_key(bytes.fromhex(secret)).sign(bytes.fromhex(data))
    print(bytes(signed).hex(), flush=True)
"#;

/// Signs every `(secret, TransactionData)` with the SDK, in one process, within a deadline.
fn sign_with_sdk(inputs: &[([u8; 32], Vec<u8>)]) -> Vec<Vec<u8>> {
    let mut child = Command::new(sdk_python())
        .args(["-c", SIGN_WITH_SDK])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the SDK's python");
    let mut stdin = child.stdin.take().unwrap();
    for (secret, data) in inputs {
        writeln!(stdin, "{} {}", hex::encode(secret), hex::encode(data)).unwrap();
    }
    drop(stdin);
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().ok();
            panic!("the SDK did not finish signing within 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "the SDK failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|l| hex::decode(l).unwrap())
        .collect()
}

#[test]
fn our_signature_of_every_kind_equals_the_sdks() {
    let secrets: [[u8; 32]; 2] = [std::array::from_fn(|i| i as u8), [0x5a; 32]];
    let mut inputs = Vec::new();
    let mut ours = Vec::new();
    for secret in secrets {
        let keypair = Keypair::from_secret(secret);
        for kind in all_kinds() {
            let data = TransactionData::new(kind, keypair.address(), vec![gas()]);
            let signed = SignedTransaction::sign(&keypair, data.clone());
            signed.verify().unwrap();
            inputs.push((secret, data.to_bcs()));
            ours.push(signed);
        }
    }
    let theirs = sign_with_sdk(&inputs);
    assert_eq!(theirs.len(), ours.len(), "one signed transaction per input");
    for (ours, theirs) in ours.iter().zip(&theirs) {
        let name = ours.data.kind.name();
        assert_eq!(
            &ours.to_bcs(),
            theirs,
            "{name}: envelope differs from the SDK's"
        );
        let decoded = SignedTransaction::from_bcs(theirs).unwrap();
        decoded.verify().unwrap();
        assert_eq!(&decoded, ours, "{name}");
    }
}
