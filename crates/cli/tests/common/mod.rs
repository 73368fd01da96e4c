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
                "localnet",
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
