//! The official SDK (soma-sdk 0.1.15 from PyPI) as a real client of `somatrain localnet`: the
//! quickstart's whole flow over gRPC with exact balance arithmetic and the refusals, then
//! `kill -9`, a restart on the same data, and the SDK sees the same state.

mod common;
use common::{COMMAND_DEADLINE, OutputWithin};

use std::time::Duration;

use common::{GrpcLocalnet, bin, run_sdk_script};

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

    // Our commands read what the SDK wrote.
    let state: serde_json::Value = serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    let model_id = state["model_id"].as_str().unwrap();
    let shown = bin()
        .args(["model", "show", "--model", model_id, "--json"])
        .args(node.chain_args())
        .output_within(COMMAND_DEADLINE)
        .unwrap();
    assert!(
        shown.status.success(),
        "{}",
        String::from_utf8_lossy(&shown.stderr)
    );
    let shown: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(shown["state"], "active");
    assert_eq!(
        shown["id"]
            .as_str()
            .unwrap()
            .parse::<somatrain_protocol::ObjectId>()
            .unwrap(),
        model_id.parse::<somatrain_protocol::ObjectId>().unwrap()
    );
    let targets = bin()
        .args(["targets", "--json"])
        .args(node.chain_args())
        .output_within(COMMAND_DEADLINE)
        .unwrap();
    let targets: Vec<serde_json::Value> = serde_json::from_slice(&targets.stdout).unwrap();
    let mut ids: Vec<String> = targets
        .iter()
        .map(|t| {
            t["id"]
                .as_str()
                .unwrap()
                .parse::<somatrain_protocol::ObjectId>()
                .unwrap()
                .to_string()
        })
        .collect();
    ids.sort();
    let mut expected: Vec<String> = state["open_targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            t.as_str()
                .unwrap()
                .parse::<somatrain_protocol::ObjectId>()
                .unwrap()
                .to_string()
        })
        .collect();
    expected.sort();
    assert_eq!(
        ids, expected,
        "`targets` lists the open targets the SDK saw"
    );
    for (name, address) in state["addresses"].as_object().unwrap() {
        let status = bin()
            .args(["status", "--json", "--address", address.as_str().unwrap()])
            .args(node.chain_args())
            .output_within(COMMAND_DEADLINE)
            .unwrap();
        let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
        assert_eq!(
            status["account"]["balance"], state["balances"][name],
            "{name}'s balance as `status` reads it"
        );
    }
}

#[test]
fn the_sdk_reads_what_our_publisher_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let node = GrpcLocalnet::start(&dir.path().join("chain"), &["--embedding-dim", "16"]);
    let kp = somatrain_protocol::Keypair::generate();
    let run = dir.path().join("run");
    let ok = |out: std::process::Output| {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    common::train_tiny(&run, &["--steps", "2"]);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let _inside = runtime.enter();
    let chain = node.client();
    runtime.block_on(chain.faucet(&kp.address())).unwrap();
    let publish = |verb: &str| {
        ok(bin()
            .args([verb, "--run-dir", run.to_str().unwrap()])
            .args(node.args())
            .env("SOMA_SECRET_KEY", kp.secret_hex())
            .env_remove("S3_BUCKET")
            .output_within(COMMAND_DEADLINE)
            .unwrap())
    };
    publish("commit");
    runtime.block_on(chain.advance_epoch()).unwrap();
    publish("reveal");
    runtime.block_on(chain.advance_epoch()).unwrap();
    let journal: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("journal.json")).unwrap()).unwrap();
    let model_id = journal["model_id"].as_str().unwrap();
    let url = journal["last_revealed"]["url"].as_str().unwrap();
    let out = run_sdk_script(
        "reads_ours.py",
        &[
            &node.rpc,
            &node.faucet,
            &node.scoring,
            &node.admin,
            model_id,
            url,
        ],
        Duration::from_secs(120),
    );
    assert!(out.contains("the SDK reads what somatrain wrote"), "{out}");
}

#[test]
fn the_sdk_stakes_with_the_validator_and_withdraws_rewards() {
    let dir = tempfile::tempdir().unwrap();
    let node = GrpcLocalnet::start(
        &dir.path().join("chain"),
        &[
            "--embedding-dim",
            "16",
            "--faucet-amount",
            "100000000000000",
        ],
    );
    let out = run_sdk_script(
        "staking.py",
        &[&node.rpc, &node.faucet, &node.admin],
        Duration::from_secs(180),
    );
    assert!(out.contains("staking flow passed"), "{out}");
}
