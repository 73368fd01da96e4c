//! Shared by the CLI tests: the binary under test, a localnet process on free ports, the
//! official SDK's Python, and what a wallet has sent.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The most one CLI command in these tests may take: far more than any needs on a loaded CI
/// machine, and a failure with its output rather than a hang.
pub const COMMAND_DEADLINE: Duration = Duration::from_secs(300);

/// `Command::output` with a deadline.
pub trait OutputWithin {
    /// Runs the command to its end (standard input empty, both outputs captured), like
    /// `output`; a process still running after `limit` is killed and the test fails with what
    /// it printed. Only a failure to start is an error.
    fn output_within(&mut self, limit: Duration) -> std::io::Result<Output>;

    /// The same with `input` on standard input.
    fn output_with_input(&mut self, input: &[u8], limit: Duration) -> std::io::Result<Output>;
}

impl OutputWithin for Command {
    fn output_within(&mut self, limit: Duration) -> std::io::Result<Output> {
        self.output_with_input(&[], limit)
    }

    fn output_with_input(&mut self, input: &[u8], limit: Duration) -> std::io::Result<Output> {
        use std::io::{Read, Write};
        let mut child = self
            .stdin(if input.is_empty() {
                Stdio::null()
            } else {
                Stdio::piped()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let feed = child.stdin.take().map(|mut stdin| {
            let input = input.to_vec();
            // Closing it when done is the end of input.
            std::thread::spawn(move || {
                let _ = stdin.write_all(&input);
            })
        });
        let drain = |pipe: Option<Box<dyn Read + Send>>| {
            std::thread::spawn(move || {
                let mut bytes = Vec::new();
                if let Some(mut pipe) = pipe {
                    let _ = pipe.read_to_end(&mut bytes);
                }
                bytes
            })
        };
        let stdout = drain(child.stdout.take().map(|p| Box::new(p) as _));
        let stderr = drain(child.stderr.take().map(|p| Box::new(p) as _));
        let started = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break Some(status);
            }
            if started.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if let Some(feed) = feed {
            let _ = feed.join();
        }
        let (stdout, stderr) = (stdout.join().unwrap(), stderr.join().unwrap());
        match status {
            Some(status) => Ok(Output {
                status,
                stdout,
                stderr,
            }),
            None => panic!(
                "{:?} ran past {limit:?}:\n{}\n{}",
                self.get_program(),
                String::from_utf8_lossy(&stdout),
                String::from_utf8_lossy(&stderr)
            ),
        }
    }
}

/// A child process that is killed (SIGKILL) and reaped when dropped, so a failing test leaves
/// no process running behind it.
pub struct KillOnDrop(pub Child);

impl std::ops::Deref for KillOnDrop {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

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
        .output_within(COMMAND_DEADLINE)
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
        Self::start_with_blob_port(dir, 0, extra)
    }

    /// As [`GrpcLocalnet::start`], with the blob host on `blob_port` (a restarted host keeps
    /// its URLs).
    pub fn start_with_blob_port(dir: &Path, blob_port: u16, extra: &[&str]) -> GrpcLocalnet {
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
            .args(["--admin-port", "0", "--blob-port", &blob_port.to_string()])
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
pub fn run_sdk_script(script: &str, args: &[&str], deadline: Duration) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/sdk")
        .join(script);
    let out = Command::new(sdk_python())
        .arg(&path)
        .args(args)
        .output_within(deadline)
        .expect("start the SDK's python");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "{script} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    stdout
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

/// Asserts that a command succeeded, failing with everything it printed; its stdout then
/// stderr, for the assertions that follow.
pub fn succeeded(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        out.status.success(),
        "{}\n{stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
    format!("{}{stderr}", String::from_utf8_lossy(&out.stdout))
}

/// Sends SIGINT to `child`, as Ctrl-C does.
pub fn interrupt(child: &Child) {
    let sent = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success(), "kill -INT {}", child.id());
}

/// Waits until `run_dir`'s `history.jsonl` holds at least `steps` steps, failing if `child`
/// ends first or [`COMMAND_DEADLINE`] passes.
pub fn wait_for_logged_steps(child: &mut Child, run_dir: &Path, steps: usize) {
    let history = run_dir.join("history.jsonl");
    wait_until(COMMAND_DEADLINE, "steps in history.jsonl", || {
        if let Some(ended) = child.try_wait().unwrap() {
            panic!("the process ended before logging {steps} steps: {ended:?}");
        }
        std::fs::read_to_string(&history)
            .ok()
            .filter(|text| text.lines().count() >= steps)
    });
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

/// Runs the binary with `args` as `kp` against `net` (chain flags only); (success, stdout,
/// stderr).
pub fn run_as(
    net: &GrpcLocalnet,
    kp: &somatrain_protocol::Keypair,
    args: &[&str],
) -> (bool, String, String) {
    let out = bin()
        .args(args)
        .args(net.chain_args())
        .env("SOMA_SECRET_KEY", kp.secret_hex())
        .output_within(COMMAND_DEADLINE)
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
