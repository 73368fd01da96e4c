//! Shared by the CLI tests: the binary under test and a localnet process on a free port.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

pub const TOKEN: &str = "cli-test-admin-token";

pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_somatrain"))
}

/// `somatrain localnet` as a child process; killed (SIGKILL) when dropped.
pub struct Localnet {
    child: Child,
    pub url: String,
    pub dir: PathBuf,
}

impl Localnet {
    /// Starts a node on `dir` with `extra` flags and the admin token [`TOKEN`], and waits for
    /// the address it prints.
    pub fn start(dir: &Path, extra: &[&str]) -> Localnet {
        let mut child = bin()
            .args([
                "localnet-json",
                "--data-dir",
                dir.to_str().unwrap(),
                "--port",
                "0",
            ])
            .args(extra)
            .env("SOMATRAIN_ADMIN_TOKEN", TOKEN)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let url = line
            .trim()
            .strip_prefix("listening on ")
            .expect("the node prints its address")
            .to_string();
        Localnet {
            child,
            url,
            dir: dir.to_path_buf(),
        }
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Localnet {
    fn drop(&mut self) {
        self.kill();
    }
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
            child,
        }
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
