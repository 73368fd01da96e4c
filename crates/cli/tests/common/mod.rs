//! Shared by the CLI tests: the binary under test, a localnet process on free ports, the
//! official SDK's Python, and what a wallet has sent.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_somatrain"))
}

/// This repository's trainer sources: a small corpus for the tests.
pub fn sources() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../train/src")
}

/// The tiny preset's training shape in the CLI tests: sequences of 64, micro-batches of 2, no
/// accumulation.
pub const TINY_SHAPE: [&str; 8] = [
    "--preset",
    "tiny",
    "--seq-len",
    "64",
    "--micro-batch",
    "2",
    "--accumulation",
    "1",
];

/// `somatrain train` of the tiny preset on [`sources`] into `run` (sequences of 64,
/// micro-batches of 2, no accumulation, 2 KiB held out), with `extra` flags (the steps, at
/// least); the run must succeed.
pub fn train_tiny(run: &Path, extra: &[&str]) {
    let out = bin()
        .args(["train", "--run-dir", run.to_str().unwrap()])
        .args(["--corpus-dir", sources().to_str().unwrap()])
        .args(TINY_SHAPE)
        .args(["--heldout-bytes", "2048"])
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "training failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `somatrain localnet` (the gRPC node) as a child process on free ports; SIGKILLed when
/// dropped.
pub struct GrpcLocalnet {
    child: Child,
    pub rpc: String,
    pub faucet: String,
    pub scoring: String,
    pub admin: String,
    pub blobs: String,
    pub dir: PathBuf,
}

impl GrpcLocalnet {
    /// Starts a node on `dir` with every port chosen by the system, and waits (at most 60 s)
    /// for the URLs it prints.
    pub fn start(dir: &Path, extra: &[&str]) -> GrpcLocalnet {
        let mut child = bin()
            .args(["localnet", "--data-dir", dir.to_str().unwrap()])
            .args([
                "--rpc-port",
                "0",
                "--faucet-port",
                "0",
                "--scoring-port",
                "0",
            ])
            .args(["--admin-port", "0", "--blob-port", "0"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (lines_tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if lines_tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let mut urls = std::collections::HashMap::new();
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = match lines.recv_timeout(left) {
                Ok(line) => line,
                Err(e) => {
                    let _ = child.kill();
                    panic!("the localnet did not report ready within 60 s ({e}); saw {urls:?}");
                }
            };
            if line.starts_with("localnet ready") {
                break;
            }
            if let Some((name, url)) = line.split_once(' ') {
                urls.insert(name.to_string(), url.to_string());
            }
        }
        let url = |name: &str| {
            urls.get(name)
                .unwrap_or_else(|| panic!("the localnet printed no {name} URL"))
                .clone()
        };
        GrpcLocalnet {
            rpc: url("rpc"),
            faucet: url("faucet"),
            scoring: url("scoring"),
            admin: url("admin"),
            blobs: url("blobs"),
            dir: dir.to_path_buf(),
            child,
        }
    }

    /// `--network RPC --faucet-url F --admin-url A --blob-url B`: what a command needs to use
    /// this localnet.
    pub fn args(&self) -> Vec<String> {
        [
            ("--network", &self.rpc),
            ("--faucet-url", &self.faucet),
            ("--admin-url", &self.admin),
            ("--blob-url", &self.blobs),
        ]
        .iter()
        .flat_map(|(flag, url)| [flag.to_string(), url.to_string()])
        .collect()
    }

    /// As [`GrpcLocalnet::args`], for commands that upload nothing.
    pub fn chain_args(&self) -> Vec<String> {
        let mut args = self.args();
        args.truncate(6);
        args
    }

    pub fn endpoints(&self) -> somatrain_client::chain::Endpoints {
        somatrain_client::chain::Endpoints {
            rpc: self.rpc.clone(),
            faucet: Some(self.faucet.clone()),
            scoring: Some(self.scoring.clone()),
            admin: Some(self.admin.clone()),
        }
    }

    pub fn client(&self) -> somatrain_client::chain::ChainClient {
        somatrain_client::chain::ChainClient::new(self.endpoints()).unwrap()
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for GrpcLocalnet {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The Python of the official SDK's virtual environment (`scripts/setup-sdk`):
/// `SOMATRAIN_SDK_PYTHON`, else `.venv-sdk` at the workspace root.
pub fn sdk_python() -> PathBuf {
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

/// Runs one of `tests/sdk/*.py` with the SDK's Python; fails the test with its output if it
/// fails or runs past `deadline`.
pub fn run_sdk_script(script: &str, args: &[&str], deadline: std::time::Duration) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/sdk")
        .join(script);
    let mut child = Command::new(sdk_python())
        .arg(&path)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the SDK's python");
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || std::io::read_to_string(stdout).unwrap_or_default());
    let err = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    match status {
        Some(s) if s.success() => out,
        Some(s) => panic!("{script} failed ({s}):\n{out}\n{err}"),
        None => panic!("{script} ran past {deadline:?}:\n{out}\n{err}"),
    }
}

/// Every transaction `sender` has executed, in checkpoint order, with its data. Read from the
/// chain's checkpoints, not from anything the command under test wrote.
pub async fn executed_by(
    chain: &somatrain_client::chain::ChainClient,
    sender: &somatrain_protocol::Address,
) -> Vec<(
    somatrain_protocol::TransactionData,
    somatrain_client::chain::Executed,
)> {
    let mut sent = Vec::new();
    let mut sequence = 0;
    while let Some(digests) = chain.checkpoint_transactions(sequence).await.unwrap() {
        for digest in digests {
            let executed = chain
                .transaction(&digest)
                .await
                .unwrap()
                .expect("a checkpoint's transaction can be looked up");
            // Epoch changes and faucet grants are the system's, and carry no signed data.
            if let Some(data) = executed.transaction.clone()
                && data.sender == *sender
            {
                sent.push((data, executed));
            }
        }
        sequence += 1;
    }
    sent
}

/// What `sender` has executed: each kind's name and whether it succeeded.
pub async fn sent_by(
    chain: &somatrain_client::chain::ChainClient,
    sender: &somatrain_protocol::Address,
) -> Vec<(String, bool)> {
    executed_by(chain, sender)
        .await
        .into_iter()
        .map(|(data, executed)| {
            let ok = matches!(
                executed.status(),
                somatrain_protocol::effects::ExecutionStatus::Success
            );
            (data.kind.name().to_string(), ok)
        })
        .collect()
}

/// Polls `check` every 50 ms until it returns Some, failing with `what` after `limit`.
pub fn wait_until<T>(
    limit: std::time::Duration,
    what: &str,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not within {limit:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The fees `sender` paid for its executed transactions of `kind`, from their effects.
pub async fn sent_fees(
    chain: &somatrain_client::chain::ChainClient,
    sender: &somatrain_protocol::Keypair,
    kind: &str,
) -> u64 {
    executed_by(chain, &sender.address())
        .await
        .iter()
        .filter(|(data, _)| data.kind.name() == kind)
        .map(|(_, executed)| executed.effects.fee.total_fee)
        .sum()
}
