//! The options every command that talks to a chain shares: which network (`--network`), where
//! its side services are, the wallet, and where encrypted weights and data are uploaded.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use somatrain_client::chain::{ChainClient, Endpoints};
use somatrain_storage::{Backend, S3Config, Storage};

/// Which chain, and where its services are.
#[derive(Args, Clone, Debug)]
pub struct ChainOptions {
    /// `localnet` (the SDK's localnet ports on 127.0.0.1), `testnet` (the public fullnode and
    /// faucet), or a fullnode URL such as `http://127.0.0.1:9000`.
    #[arg(long, env = "SOMATRAIN_NETWORK", default_value = "localnet")]
    pub network: String,
    /// The faucet's URL, overriding the network's.
    #[arg(long, env = "SOMATRAIN_FAUCET_URL")]
    pub faucet_url: Option<String>,
    /// The admin service's URL (localnet only), overriding the network's.
    #[arg(long, env = "SOMATRAIN_ADMIN_URL")]
    pub admin_url: Option<String>,
}

impl ChainOptions {
    pub fn endpoints(&self) -> Result<Endpoints> {
        let mut endpoints = Endpoints::parse(&self.network)?;
        if let Some(url) = &self.faucet_url {
            endpoints.faucet = Some(url.trim_end_matches('/').to_string());
        }
        if let Some(url) = &self.admin_url {
            endpoints.admin = Some(url.trim_end_matches('/').to_string());
        }
        Ok(endpoints)
    }

    pub fn client(&self) -> Result<ChainClient> {
        Ok(ChainClient::new(self.endpoints()?)?)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum StorageKind {
    /// S3 when S3_BUCKET is set, else the blob host named by --blob-url.
    Auto,
    /// The localnet's blob host (`somatrain localnet --blob-port P`), at --blob-url.
    BlobHost,
    /// A local directory served at --public-url.
    Dir,
    /// The bucket named by S3_BUCKET, S3_ACCESS_KEY_ID, S3_SECRET_ACCESS_KEY, S3_ENDPOINT_URL, S3_PUBLIC_URL.
    S3,
}

/// Where encrypted weights (or submitted data) are uploaded.
#[derive(Args, Clone, Debug)]
pub struct StorageOptions {
    #[arg(long, value_enum, default_value = "auto")]
    pub storage: StorageKind,
    /// The localnet's blob host, as its `blobs` line prints it (`http://127.0.0.1:P/v1/blobs`).
    #[arg(long, env = "SOMATRAIN_BLOB_URL")]
    pub blob_url: Option<String>,
    /// With --storage dir: the directory to write into.
    #[arg(long)]
    pub storage_dir: Option<PathBuf>,
    /// With --storage dir: the URL at which that directory is served.
    #[arg(long)]
    pub public_url: Option<String>,
}

impl StorageOptions {
    pub fn backend(&self) -> Result<Backend> {
        let s3 = S3Config::from_env()?;
        Ok(match (self.storage, s3) {
            (StorageKind::Auto | StorageKind::S3, Some(s3)) => Backend::S3(s3),
            (StorageKind::S3, None) => {
                bail!("--storage s3 needs S3_BUCKET and its keys in the environment")
            }
            (StorageKind::Auto | StorageKind::BlobHost, _) => Backend::BlobHost {
                base: self.blob_url.clone().context(
                    "no storage for the weights: set S3_BUCKET and its keys, or give --blob-url \
                     (a localnet started with --blob-port prints it)",
                )?,
            },
            (StorageKind::Dir, _) => Backend::Dir {
                dir: self
                    .storage_dir
                    .clone()
                    .context("--storage dir needs --storage-dir")?,
                public_base: self
                    .public_url
                    .clone()
                    .context("--storage dir needs --public-url")?,
            },
        })
    }

    pub fn open(&self) -> Result<Storage> {
        Ok(Storage::open(&self.backend()?)?)
    }
}

/// Shannons as SOMA with all nine decimals.
pub use somatrain_protocol::format_soma as soma;
