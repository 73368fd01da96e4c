//! `somatrain wallet new|import|show`: the account key, kept in a keystore file (mode 0600) or
//! taken from `SOMA_SECRET_KEY`. The secret is never printed, logged or put in an error.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};
use somatrain_protocol::Keypair;

#[derive(Subcommand)]
pub enum WalletCommand {
    /// Create a new key pair in the keystore.
    New(KeystoreArgs),
    /// Store an existing secret key (hex or Base58), read from standard input or SOMA_SECRET_KEY.
    Import(KeystoreArgs),
    /// Print the address of the active key.
    Show(KeystoreArgs),
}

#[derive(Args)]
pub struct KeystoreArgs {
    /// Keystore file (default: $HOME/.somatrain/keystore.json).
    #[arg(long, env = "SOMATRAIN_KEYSTORE")]
    keystore: Option<PathBuf>,
    /// Replace an existing keystore.
    #[arg(long)]
    force: bool,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeystoreFile {
    address: String,
    secret_hex: String,
}

pub fn default_keystore() -> PathBuf {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".somatrain").join("keystore.json")
}

fn keystore_path(args: &KeystoreArgs) -> PathBuf {
    args.keystore.clone().unwrap_or_else(default_keystore)
}

fn write_keystore(path: &Path, kp: &Keypair, force: bool) -> Result<()> {
    if path.exists() && !force {
        bail!(
            "{} already holds a key; pass --force to replace it",
            path.display()
        );
    }
    let body = serde_json::to_string_pretty(&KeystoreFile {
        address: kp.address().to_string(),
        secret_hex: kp.secret_hex(),
    })?;
    super::write_private_file(path, body.as_bytes())
}

/// The signing key: `SOMA_SECRET_KEY` if set, else the keystore.
pub fn load_keypair(keystore: Option<&Path>) -> Result<Keypair> {
    if let Ok(secret) = std::env::var("SOMA_SECRET_KEY") {
        return Keypair::from_secret_text(&secret)
            .context("SOMA_SECRET_KEY is not a valid secret key");
    }
    let path = keystore
        .map(Path::to_path_buf)
        .unwrap_or_else(default_keystore);
    let meta = match std::fs::metadata(&path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "no key: set SOMA_SECRET_KEY or run `somatrain wallet new` ({} does not exist)",
            path.display()
        ),
        Err(e) => bail!("reading the keystore {}: {e}", path.display()),
    };
    if !meta.is_file() {
        bail!(
            "the keystore {} is not a regular file (a directory, FIFO or device); point \
             --keystore (or SOMATRAIN_KEYSTORE) at the keystore file itself",
            path.display()
        );
    }
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        let others = match (mode & 0o044 != 0, mode & 0o022 != 0) {
            (true, true) => Some(
                "readable and writable by others: anyone on this machine could take or replace the key",
            ),
            (true, false) => Some("readable by others: anyone on this machine could take the key"),
            (false, true) => Some(
                "writable by others: anyone on this machine could replace the key with their own",
            ),
            (false, false) => None,
        };
        if let Some(others) = others {
            bail!(
                "{} is {others} (mode {mode:o}). Fix it with `chmod 600 {}`",
                path.display(),
                path.display()
            );
        }
    }
    let text = super::read_text(&path, super::MAX_KEY_FILE_BYTES)
        .with_context(|| format!("reading the keystore {}", path.display()))?;
    let file: KeystoreFile = serde_json::from_str(&text)
        .map_err(|_| anyhow::anyhow!("{} is not a somatrain keystore", path.display()))?;
    let kp = Keypair::from_secret_text(&file.secret_hex)
        .map_err(|_| anyhow::anyhow!("{} holds an invalid secret key", path.display()))?;
    if kp.address().to_string() != file.address {
        bail!(
            "{} is inconsistent: its address does not match its key",
            path.display()
        );
    }
    Ok(kp)
}

pub fn run(command: WalletCommand) -> Result<()> {
    match command {
        WalletCommand::New(args) => {
            let kp = Keypair::generate();
            let path = keystore_path(&args);
            write_keystore(&path, &kp, args.force)?;
            println!("{}", kp.address());
            eprintln!("new key stored in {} (mode 0600)", path.display());
        }
        WalletCommand::Import(args) => {
            let secret = match std::env::var("SOMA_SECRET_KEY") {
                Ok(s) => s,
                Err(_) => {
                    let mut s = String::new();
                    std::io::stdin()
                        .read_to_string(&mut s)
                        .context("reading the secret key from standard input")?;
                    s
                }
            };
            let kp = Keypair::from_secret_text(&secret)
                .context("not a valid secret key (64 hex characters or Base58 of 32 bytes)")?;
            let path = keystore_path(&args);
            write_keystore(&path, &kp, args.force)?;
            println!("{}", kp.address());
        }
        WalletCommand::Show(args) => {
            let kp = load_keypair(args.keystore.as_deref())?;
            println!("{}", kp.address());
        }
    }
    Ok(())
}
