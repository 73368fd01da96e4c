//! Clients of a SOMA network.
//!
//! - [`chain::ChainClient`]: the network's own protocol (gRPC and the BCS side services), for
//!   the public testnet and `somatrain localnet` alike.
//! - [`Client`]: the former localnet's HTTP+JSON API, kept while the daemon and the submitter
//!   move to [`chain::ChainClient`].
//!
//! Owns request building, signing of transactions with the sender's next sequence number, and
//! the mapping of error answers to [`ClientError::Rejected`] with the node's stable code. It
//! holds no state beyond the base URL.

pub mod chain;

use serde::de::DeserializeOwned;
use somatrain_protocol::api::{BlobInfo, EpochResponse, ErrorBody, FaucetRequest, Status};
use somatrain_protocol::chain::{Account, Model, Target, TxRecord};
use somatrain_protocol::tx::{SignedTx, TxBody, TxDigest, TxKind};
use somatrain_protocol::{Address, Keypair, ObjectId};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The node answered with an error (the code is stable, e.g. `sequence_mismatch`).
    #[error("{code}: {message}")]
    Rejected {
        status: u16,
        code: String,
        message: String,
    },
    /// The node could not be reached or the connection broke: the outcome of a write is unknown.
    #[error("cannot reach the node at {url}: {reason}")]
    Network { url: String, reason: String },
    #[error("unexpected answer from {url}: {reason}")]
    Protocol { url: String, reason: String },
}

impl ClientError {
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Rejected { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// Installs the TLS crypto provider (ring) once per process. Every HTTP client in the project
/// is built after this call, so `https://` nodes and buckets work without a C crypto library.
pub fn init_tls() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // An error only means another provider was installed first, which serves as well.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// An HTTP client with the project's TLS set-up and a connect timeout.
pub fn http_client() -> reqwest::Client {
    init_tls();
    reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(10))
        .build()
        .expect("the HTTP client's configuration is static")
}

#[derive(Clone)]
pub struct Client {
    base: String,
    http: reqwest::Client,
    admin_token: Option<String>,
}

impl Client {
    /// A client of the node at `base_url` (for example `http://127.0.0.1:9000`).
    pub fn new(base_url: &str) -> Self {
        Client {
            base: base_url.trim_end_matches('/').to_string(),
            http: http_client(),
            admin_token: None,
        }
    }

    pub fn with_admin_token(mut self, token: impl Into<String>) -> Self {
        self.admin_token = Some(token.into());
        self
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    async fn answer<T: DeserializeOwned>(
        &self,
        url: String,
        response: Result<reqwest::Response, reqwest::Error>,
    ) -> Result<T, ClientError> {
        let response = response.map_err(|e| ClientError::Network {
            url: url.clone(),
            reason: e.to_string(),
        })?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(|e| ClientError::Network {
            url: url.clone(),
            reason: e.to_string(),
        })?;
        if status.is_success() {
            return serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol {
                url,
                reason: e.to_string(),
            });
        }
        match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(body) => Err(ClientError::Rejected {
                status: status.as_u16(),
                code: body.error,
                message: body.message,
            }),
            Err(_) => Err(ClientError::Rejected {
                status: status.as_u16(),
                code: "http_error".into(),
                message: String::from_utf8_lossy(&bytes).chars().take(200).collect(),
            }),
        }
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let url = format!("{}{path}", self.base);
        let response = self.http.get(&url).send().await;
        self.answer(url, response).await
    }

    pub async fn status(&self) -> Result<Status, ClientError> {
        self.get("/v1/status").await
    }

    pub async fn account(&self, address: &Address) -> Result<Account, ClientError> {
        self.get(&format!("/v1/accounts/{address}")).await
    }

    pub async fn models(&self) -> Result<Vec<Model>, ClientError> {
        self.get("/v1/models").await
    }

    pub async fn model(&self, id: &ObjectId) -> Result<Model, ClientError> {
        self.get(&format!("/v1/models/{id}")).await
    }

    /// Targets by status: `open`, `filled`, `expired`, `claimable` or `all`.
    pub async fn targets(&self, status: &str) -> Result<Vec<Target>, ClientError> {
        self.get(&format!("/v1/targets?status={status}")).await
    }

    pub async fn target(&self, id: &ObjectId) -> Result<Target, ClientError> {
        self.get(&format!("/v1/targets/{id}")).await
    }

    /// The record of a transaction, or `None` if the node never executed it.
    pub async fn transaction(&self, digest: &TxDigest) -> Result<Option<TxRecord>, ClientError> {
        match self.get(&format!("/v1/transactions/{digest}")).await {
            Ok(r) => Ok(Some(r)),
            Err(ClientError::Rejected { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub async fn faucet(&self, address: &Address) -> Result<Account, ClientError> {
        let url = format!("{}/v1/faucet", self.base);
        let response = self
            .http
            .post(&url)
            .json(&FaucetRequest {
                address: address.to_string(),
            })
            .send()
            .await;
        self.answer(url, response).await
    }

    pub async fn submit(&self, tx: &SignedTx) -> Result<TxRecord, ClientError> {
        let url = format!("{}/v1/transactions", self.base);
        let response = self.http.post(&url).json(tx).send().await;
        self.answer(url, response).await
    }

    /// Signs `kind` with the sender's next sequence number and submits it.
    pub async fn send(&self, keypair: &Keypair, kind: TxKind) -> Result<TxRecord, ClientError> {
        let account = self.account(&keypair.address()).await?;
        let body = TxBody {
            sender: keypair.address(),
            sequence: account.sequence,
            kind,
        };
        self.submit(&SignedTx::sign(keypair, &body)).await
    }

    pub async fn advance_epoch(&self) -> Result<u64, ClientError> {
        let url = format!("{}/v1/admin/advance-epoch", self.base);
        let mut request = self.http.post(&url);
        if let Some(token) = &self.admin_token {
            request = request.bearer_auth(token);
        }
        let answer: EpochResponse = self.answer(url, request.send().await).await?;
        Ok(answer.epoch)
    }

    /// Uploads a blob to the node's hosting and returns its public URL with size and checksum.
    pub async fn put_blob(
        &self,
        name: &str,
        bytes: Vec<u8>,
    ) -> Result<(String, BlobInfo), ClientError> {
        let url = format!("{}/v1/blobs/{name}", self.base);
        let response = self.http.put(&url).body(bytes).send().await;
        let info: BlobInfo = self.answer(url.clone(), response).await?;
        Ok((url, info))
    }

    /// Downloads any URL (a blob on the node or elsewhere).
    pub async fn download(&self, url: &str) -> Result<Vec<u8>, ClientError> {
        let response = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| ClientError::Network {
                url: url.to_string(),
                reason: e.to_string(),
            })?;
        if !response.status().is_success() {
            return Err(ClientError::Rejected {
                status: response.status().as_u16(),
                code: "download_failed".into(),
                message: format!("GET {url} answered {}", response.status()),
            });
        }
        let bytes = response.bytes().await.map_err(|e| ClientError::Network {
            url: url.to_string(),
            reason: e.to_string(),
        })?;
        Ok(bytes.to_vec())
    }
}
