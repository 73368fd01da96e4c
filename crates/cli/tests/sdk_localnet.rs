//! The official SDK (soma-sdk 0.1.15 from PyPI) as a real client of `somatrain localnet`: the
//! quickstart's whole flow over gRPC with exact balance arithmetic and the refusals, then
//! `kill -9`, a restart on the same data, and the SDK sees the same state.

mod common;

use std::time::Duration;

use common::{GrpcLocalnet, run_sdk_script};

fn conformance_case() -> String {
    let case = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/conformance/scoring/tiny_1025b");
    assert!(
        case.exists(),
        "the conformance cases are needed at {}",
        case.display()
    );
    case.to_str().unwrap().to_string()
}

#[test]
fn the_sdk_quickstart_runs_against_our_localnet_and_survives_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    let data = dir.path().join("chain");
    let case = conformance_case();
    let mut node = GrpcLocalnet::start(&data, &["--embedding-dim", "16"]);
    let out = run_sdk_script(
        "quickstart.py",
        &[
            &node.rpc,
            &node.faucet,
            &node.scoring,
            &node.admin,
            &node.blobs,
            &case,
            state.to_str().unwrap(),
        ],
        Duration::from_secs(300),
    );
    assert!(out.contains("quickstart flow passed"), "{out}");
    for refusal in [
        "NotModelOwner",
        "ModelRevealEpochMismatch",
        "ModelDecryptionKeyCommitmentMismatch",
        "TargetNotOpen",
        "AuditWindowOpen",
    ] {
        assert!(out.contains(refusal), "missing refusal {refusal}:\n{out}");
    }

    node.kill();
    let node = GrpcLocalnet::start(&data, &["--embedding-dim", "16"]);
    let out = run_sdk_script(
        "after_restart.py",
        &[
            &node.rpc,
            &node.faucet,
            &node.scoring,
            &node.admin,
            state.to_str().unwrap(),
        ],
        Duration::from_secs(120),
    );
    assert!(out.contains("state after restart matches"), "{out}");
}
