//! A client of the SOMA network's own protocol: the fullnode's gRPC services and the BCS side
//! services, for the public testnet and for our localnet alike.
//!
//! Every call has a deadline and a reply size limit; replies may be zstd-compressed; `https://`
//! endpoints use rustls with the public roots. Three outcomes stay apart:
//! - [`ChainError::Refused`]: the node refused the request (bad input, stale coin...). Retrying
//!   the same request cannot help, except a stale or locked coin, which [`ChainClient::sign_and_execute`]
//!   handles by re-reading coins.
//! - [`ChainError::Unavailable`]: the node could not be reached, timed out or was overloaded;
//!   the outcome of a write is unknown until it is looked up by digest.
//! - An executed transaction whose effects say failure is `Ok`: it ran, paid its fee, and
//!   [`Executed::status`] says why it failed.

use somatrain_protocol::transaction::TransferCoin;
use std::time::Duration;

use somatrain_protocol::{
    Address, Keypair, Object, ObjectId, ObjectRef, ObjectType, SignedTransaction, TransactionData,
    TransactionKind, TxDigest,
};
use somatrain_rpc::admin::admin_client::AdminClient;
use somatrain_rpc::convert;
use somatrain_rpc::faucet::faucet_client::FaucetClient;
use somatrain_rpc::proto::{
    self, ledger_service_client::LedgerServiceClient, state_service_client::StateServiceClient,
    subscription_service_client::SubscriptionServiceClient,
    transaction_execution_service_client::TransactionExecutionServiceClient,
};
use somatrain_rpc::side::{AdvanceEpochRequest, FaucetRequest, FaucetResponse};
use tonic::Code;

/// What an executed transaction did (the shared view, here where every call returns it).
pub use crate::view::Executed;
use crate::view::{EpochView, ModelView, TargetView};
use tonic::codec::CompressionEncoding;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

/// How long to wait for a transaction's checkpoint, as the SDK does.
pub const CHECKPOINT_WAIT: Duration = Duration::from_secs(30);
/// The deadline of every unary call.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The deadline of a localnet admin service's calls. An epoch change answers only once the
/// localnet's validators have fetched, checked and loaded every model revealed in the closing
/// epoch, each within the network's fetch limit (30 s + 50 ns per byte: 272 s for V1's 4.84 GB),
/// so with V1 weights it takes the better part of a minute or more, where [`CALL_TIMEOUT`] would
/// give up on a close that is still working (and the close goes on without the caller).
pub const ADMIN_CALL_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// The largest reply accepted from any call but a system-state read. The network's largest
/// legitimate replies of this kind: a page of 100 targets (each with its embedding, its models and
/// a submitter's data URL, which the chain bounds only by the 256 KiB transaction size: about
/// 27 MB at most), a transaction or its effects (under 1 MiB), a page of 1,000 owned objects
/// (under 1 MiB). The SDK keeps tonic's 4 MiB, which a page of targets with long URLs exceeds.
pub const MAX_REPLY_BYTES: usize = 64 * 1024 * 1024;
/// The largest `GetEpoch` reply with the system state: it holds every model of the registry, and
/// each model's manifest URL is bounded only by the transaction size (256 KiB on the network), so
/// any user who stakes the minimum can grow it. 256 MiB holds about 28,000 models as they are
/// published (a URL and a 2,048-value embedding, about 9 KiB each) or about 1,000 with the longest
/// URLs the network accepts. Nothing the reveal needs is read this way (see
/// [`ChainClient::epoch_clock`]).
pub const MAX_STATE_REPLY_BYTES: usize = 256 * 1024 * 1024;
/// Targets asked for per `ListTargets` page (see [`MAX_REPLY_BYTES`]).
const TARGET_PAGE: u32 = 100;
/// Attempts of [`ChainClient::sign_and_execute`] when a coin turns out stale or locked.
const COIN_RETRIES: usize = 4;

/// Where a network's services are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints {
    pub rpc: String,
    pub faucet: Option<String>,
    pub admin: Option<String>,
    pub scoring: Option<String>,
}

impl Endpoints {
    /// The SDK's localnet preset.
    pub fn localnet() -> Self {
        Endpoints {
            rpc: "http://127.0.0.1:9000".into(),
            faucet: Some("http://127.0.0.1:9123".into()),
            scoring: Some("http://127.0.0.1:9124".into()),
            admin: Some("http://127.0.0.1:9125".into()),
        }
    }

    /// The public testnet's fullnode and faucet.
    pub fn testnet() -> Self {
        Endpoints {
            rpc: "https://fullnode.testnet.soma.org".into(),
            faucet: Some("https://faucet.testnet.soma.org".into()),
            scoring: None,
            admin: None,
        }
    }

    /// `localnet`, `testnet`, or a fullnode URL (no faucet, admin or scoring then).
    pub fn parse(network: &str) -> Result<Self, ChainError> {
        match network.trim() {
            "localnet" => Ok(Self::localnet()),
            "testnet" => Ok(Self::testnet()),
            url if url.starts_with("http://") || url.starts_with("https://") => Ok(Endpoints {
                rpc: url.trim_end_matches('/').to_string(),
                faucet: None,
                admin: None,
                scoring: None,
            }),
            other => Err(ChainError::Config(format!(
                "--network {other:?}: expected localnet, testnet or an http(s):// URL"
            ))),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("the node refused the request ({code:?}): {message}")]
    Refused { code: Code, message: String },
    #[error("the node at {endpoint} is unavailable: {message}")]
    Unavailable { endpoint: String, message: String },
    #[error(
        "transaction {digest} was sent but its checkpoint did not arrive within {seconds} s; look it up by digest before sending anything that depends on it"
    )]
    WaitTimedOut { digest: TxDigest, seconds: u64 },
    #[error("the node's {call} reply is larger than this client accepts ({limit} bytes): {detail}")]
    ReplyTooLarge {
        call: &'static str,
        limit: usize,
        detail: String,
    },
    #[error("unexpected reply: {0}")]
    Protocol(String),
    #[error("{0}")]
    Config(String),
}

impl ChainError {
    /// Worth retrying later: the node was unreachable or overloaded, or a wait ran out.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            ChainError::Unavailable { .. } | ChainError::WaitTimedOut { .. }
        )
    }

    /// Refused as malformed or badly signed: sending the same bytes again cannot help.
    pub fn is_malformed(&self) -> bool {
        matches!(self, ChainError::Refused { code, .. } if *code == Code::InvalidArgument)
    }

    /// A coin that was stale or locked: pick or re-read coins and try again.
    pub fn is_coin_conflict(&self) -> bool {
        matches!(self, ChainError::Refused { message, .. }
            if message.contains("not available for consumption")
                || message.contains("already locked")
                || message.contains("ObjectLockConflict"))
    }
}

/// A status's message followed by the transport errors under it ("tcp connect error" alone does
/// not say that the connection was refused, or that the node never answered).
fn with_causes(status: &tonic::Status) -> String {
    let mut text = status.message().to_string();
    let mut cause = std::error::Error::source(status);
    while let Some(error) = cause {
        let words = error.to_string();
        if !text.contains(&words) && words != "transport error" {
            text = format!("{text}: {words}");
        }
        cause = error.source();
    }
    text
}

/// Tonic's words when a reply is over the decoding limit, compressed or not.
fn is_size_limit(status: &tonic::Status) -> bool {
    let message = status.message();
    matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted)
        && (message.contains("message length too large")
            || message.contains("Error decompressing: size limit"))
}

fn call_error(
    endpoint: &str,
    call: &'static str,
    limit: usize,
    status: tonic::Status,
) -> ChainError {
    if is_size_limit(&status) {
        return ChainError::ReplyTooLarge {
            call,
            limit,
            detail: status.message().to_string(),
        };
    }
    status_error(endpoint, status)
}

fn status_error(endpoint: &str, status: tonic::Status) -> ChainError {
    match status.code() {
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::ResourceExhausted
        | Code::Aborted
        | Code::Cancelled
        | Code::Unknown => ChainError::Unavailable {
            endpoint: endpoint.to_string(),
            message: with_causes(&status),
        },
        code => ChainError::Refused {
            code,
            message: status.message().to_string(),
        },
    }
}

/// The epoch's number and clock: all the reveal needs, read without the system state, so that
/// no other user can make the reply large.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpochClock {
    pub epoch: u64,
    pub start_ms: u64,
    pub epoch_duration_ms: u64,
}

impl EpochClock {
    /// From a `GetEpoch` reply with `epoch`, `start` and `protocol_config`.
    pub fn from_proto(epoch: &proto::Epoch) -> Result<Self, ChainError> {
        let missing = |field: &str| ChainError::Protocol(format!("GetEpoch: {field} missing"));
        let start = epoch.start.as_ref().ok_or_else(|| missing("epoch.start"))?;
        let duration = epoch
            .protocol_config
            .as_ref()
            .and_then(|c| c.attributes.get("epoch_duration_ms"))
            .ok_or_else(|| missing("protocol_config.attributes.epoch_duration_ms"))?;
        Ok(EpochClock {
            epoch: epoch.epoch.ok_or_else(|| missing("epoch.epoch"))?,
            start_ms: convert::timestamp_to_ms(start, "epoch.start")
                .map_err(|e| ChainError::Protocol(e.to_string()))?,
            epoch_duration_ms: duration.parse().map_err(|_| {
                ChainError::Protocol(format!(
                    "GetEpoch: protocol_config.attributes.epoch_duration_ms is {duration:?}"
                ))
            })?,
        })
    }

    /// When the next epoch is due by the chain's clock (a localnet may advance sooner).
    pub fn next_epoch_ms(&self) -> u64 {
        self.start_ms.saturating_add(self.epoch_duration_ms)
    }
}

#[derive(Clone)]
pub struct ChainClient {
    endpoints: Endpoints,
    ledger: LedgerServiceClient<Channel>,
    /// The ledger with [`MAX_STATE_REPLY_BYTES`], for the one call that returns the registry.
    ledger_state: LedgerServiceClient<Channel>,
    state: StateServiceClient<Channel>,
    execution: TransactionExecutionServiceClient<Channel>,
    subscription: SubscriptionServiceClient<Channel>,
    faucet: Option<FaucetClient<Channel>>,
    admin: Option<AdminClient<Channel>>,
}

fn channel(url: &str, call_timeout: Duration) -> Result<Channel, ChainError> {
    let mut endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|e| ChainError::Config(format!("{url}: {e}")))?
        .connect_timeout(CONNECT_TIMEOUT.min(call_timeout))
        .timeout(call_timeout)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_while_idle(true)
        .tcp_keepalive(Some(Duration::from_secs(30)));
    if url.starts_with("https://") {
        endpoint = endpoint
            .tls_config(ClientTlsConfig::new().with_webpki_roots())
            .map_err(|e| ChainError::Config(format!("TLS for {url}: {e}")))?;
    }
    Ok(endpoint.connect_lazy())
}

macro_rules! limits {
    ($client:expr) => {
        limits!($client, MAX_REPLY_BYTES)
    };
    ($client:expr, $limit:expr) => {
        $client
            .max_decoding_message_size($limit)
            .accept_compressed(CompressionEncoding::Zstd)
    };
}

impl ChainClient {
    /// Connects lazily: nothing is dialled until the first call.
    pub fn new(endpoints: Endpoints) -> Result<Self, ChainError> {
        Self::with_call_timeout(endpoints, CALL_TIMEOUT)
    }

    /// As [`ChainClient::new`], with another deadline for every unary call.
    pub fn with_call_timeout(endpoints: Endpoints, timeout: Duration) -> Result<Self, ChainError> {
        let rpc = channel(&endpoints.rpc, timeout)?;
        let side = |url: &Option<String>| url.as_deref().map(|u| channel(u, timeout)).transpose();
        let faucet = side(&endpoints.faucet)?;
        let admin = endpoints
            .admin
            .as_deref()
            .map(|u| channel(u, timeout.max(ADMIN_CALL_TIMEOUT)))
            .transpose()?;
        Ok(ChainClient {
            ledger: limits!(LedgerServiceClient::new(rpc.clone())),
            ledger_state: limits!(LedgerServiceClient::new(rpc.clone()), MAX_STATE_REPLY_BYTES),
            state: limits!(StateServiceClient::new(rpc.clone())),
            execution: limits!(TransactionExecutionServiceClient::new(rpc.clone())),
            subscription: limits!(SubscriptionServiceClient::new(rpc)),
            faucet: faucet.map(|c| FaucetClient::new(c).max_decoding_message_size(MAX_REPLY_BYTES)),
            admin: admin.map(|c| AdminClient::new(c).max_decoding_message_size(MAX_REPLY_BYTES)),
            endpoints,
        })
    }

    pub fn endpoints(&self) -> &Endpoints {
        &self.endpoints
    }

    /// The error of a fullnode call (`call` names it when its reply was over the limit).
    fn err(&self, call: &'static str, status: tonic::Status) -> ChainError {
        call_error(&self.endpoints.rpc, call, MAX_REPLY_BYTES, status)
    }

    /// `(chain name, chain id, epoch)`.
    pub async fn service_info(&self) -> Result<proto::GetServiceInfoResponse, ChainError> {
        Ok(self
            .ledger
            .clone()
            .get_service_info(proto::GetServiceInfoRequest {})
            .await
            .map_err(|e| self.err("GetServiceInfo", e))?
            .into_inner())
    }

    pub async fn balance(&self, owner: &Address) -> Result<u64, ChainError> {
        self.state
            .clone()
            .get_balance(proto::GetBalanceRequest {
                owner: Some(owner.to_string()),
            })
            .await
            .map_err(|e| self.err("GetBalance", e))?
            .into_inner()
            .balance
            .ok_or_else(|| ChainError::Protocol("GetBalance without a balance".into()))
    }

    /// Every object of `owner` (optionally of one type), following the pages.
    pub async fn owned_objects(
        &self,
        owner: &Address,
        object_type: Option<ObjectType>,
    ) -> Result<Vec<Object>, ChainError> {
        let mut objects = Vec::new();
        let mut token = None;
        // A bound on pages, so that a node that keeps answering with a token cannot loop us.
        for _ in 0..10_000 {
            let page = self
                .state
                .clone()
                .list_owned_objects(proto::ListOwnedObjectsRequest {
                    owner: Some(owner.to_string()),
                    page_size: Some(1000),
                    page_token: token.take(),
                    read_mask: None,
                    object_type: object_type.map(|t| t.name().to_string()),
                })
                .await
                .map_err(|e| self.err("ListOwnedObjects", e))?
                .into_inner();
            for (i, o) in page.objects.iter().enumerate() {
                objects.push(
                    convert::object_from_proto(o, &format!("objects[{i}]"))
                        .map_err(|e| ChainError::Protocol(e.to_string()))?,
                );
            }
            match page.next_page_token {
                Some(t) => token = Some(t),
                None => return Ok(objects),
            }
        }
        Err(ChainError::Protocol("ListOwnedObjects never ended".into()))
    }

    pub async fn object(&self, id: &ObjectId) -> Result<Option<Object>, ChainError> {
        match self
            .ledger
            .clone()
            .get_object(proto::GetObjectRequest {
                object_id: Some(id.to_string()),
                version: None,
                read_mask: None,
            })
            .await
        {
            Ok(reply) => {
                let object = reply
                    .into_inner()
                    .object
                    .ok_or_else(|| ChainError::Protocol("GetObject without an object".into()))?;
                convert::object_from_proto(&object, "object")
                    .map(Some)
                    .map_err(|e| ChainError::Protocol(e.to_string()))
            }
            Err(status) if status.code() == Code::NotFound => Ok(None),
            Err(status) => Err(self.err("GetObject", status)),
        }
    }

    /// The current epoch with its system state and protocol configuration. Its size grows with
    /// the model registry (see [`MAX_STATE_REPLY_BYTES`]).
    pub async fn epoch(&self) -> Result<proto::Epoch, ChainError> {
        self.ledger_state
            .clone()
            .get_epoch(proto::GetEpochRequest {
                epoch: None,
                read_mask: Some(prost_types::FieldMask {
                    paths: vec![
                        "epoch".into(),
                        "system_state".into(),
                        "protocol_config".into(),
                        "start".into(),
                    ],
                }),
            })
            .await
            .map_err(|e| {
                call_error(
                    &self.endpoints.rpc,
                    "GetEpoch (system state)",
                    MAX_STATE_REPLY_BYTES,
                    e,
                )
            })?
            .into_inner()
            .epoch
            .ok_or_else(|| ChainError::Protocol("GetEpoch without an epoch".into()))
    }

    /// The epoch's number, start and duration, from a `GetEpoch` that asks for no system state
    /// (the duration from the protocol configuration's `epoch_duration_ms`): a reply of a few
    /// hundred bytes that no other user can inflate.
    pub async fn epoch_clock(&self) -> Result<EpochClock, ChainError> {
        let epoch = self
            .ledger
            .clone()
            .get_epoch(proto::GetEpochRequest {
                epoch: None,
                read_mask: Some(prost_types::FieldMask {
                    paths: vec!["epoch".into(), "start".into(), "protocol_config".into()],
                }),
            })
            .await
            .map_err(|e| self.err("GetEpoch (clock)", e))?
            .into_inner()
            .epoch
            .ok_or_else(|| ChainError::Protocol("GetEpoch without an epoch".into()))?;
        EpochClock::from_proto(&epoch)
    }

    /// The current epoch, its clock, parameters and the model registry.
    pub async fn epoch_view(&self) -> Result<EpochView, ChainError> {
        Ok(EpochView::from_proto(&self.epoch().await?)?)
    }

    /// One model of the registry, if it exists.
    pub async fn model(&self, id: &ObjectId) -> Result<Option<ModelView>, ChainError> {
        Ok(self.epoch_view().await?.model(id).cloned())
    }

    /// Targets with `status`, as plain values.
    pub async fn target_views(&self, status: &str) -> Result<Vec<TargetView>, ChainError> {
        self.targets(status)
            .await?
            .iter()
            .enumerate()
            .map(|(i, t)| Ok(TargetView::from_proto(t, &format!("targets[{i}]"))?))
            .collect()
    }

    /// Whether `coin` is still the current version of that coin (so a transaction paying gas
    /// with it may still execute).
    pub async fn is_current(&self, coin: &ObjectRef) -> Result<bool, ChainError> {
        Ok(match self.object(&coin.id).await? {
            Some(object) => object.version() == coin.version,
            None => false,
        })
    }

    /// Targets with `status` (open, filled, claimed, expired, claimable), following the pages.
    pub async fn targets(&self, status: &str) -> Result<Vec<proto::Target>, ChainError> {
        let mut targets = Vec::new();
        let mut token = None;
        for _ in 0..10_000 {
            let page = self
                .state
                .clone()
                .list_targets(proto::ListTargetsRequest {
                    status_filter: Some(status.to_string()),
                    page_size: Some(TARGET_PAGE),
                    page_token: token.take(),
                    ..Default::default()
                })
                .await
                .map_err(|e| self.err("ListTargets", e))?
                .into_inner();
            targets.extend(page.targets);
            match page.next_page_token {
                Some(t) => token = Some(t),
                None => return Ok(targets),
            }
        }
        Err(ChainError::Protocol("ListTargets never ended".into()))
    }

    /// The transaction named `digest`, if the node executed it.
    pub async fn transaction(&self, digest: &TxDigest) -> Result<Option<Executed>, ChainError> {
        match self
            .ledger
            .clone()
            .get_transaction(proto::GetTransactionRequest {
                digest: Some(digest.to_string()),
                read_mask: Some(prost_types::FieldMask {
                    paths: vec![
                        "digest".into(),
                        "transaction".into(),
                        "effects".into(),
                        "checkpoint".into(),
                        "balance_changes".into(),
                    ],
                }),
            })
            .await
        {
            Ok(reply) => {
                let executed = reply.into_inner().transaction.ok_or_else(|| {
                    ChainError::Protocol("GetTransaction without a transaction".into())
                })?;
                Ok(Some(Executed::from_proto(&executed)?))
            }
            Err(status) if status.code() == Code::NotFound => Ok(None),
            Err(status) => Err(self.err("GetTransaction", status)),
        }
    }

    /// The digests of the transactions in checkpoint `sequence`, or None if it does not exist.
    pub async fn checkpoint_transactions(
        &self,
        sequence: u64,
    ) -> Result<Option<Vec<TxDigest>>, ChainError> {
        let request = proto::GetCheckpointRequest {
            checkpoint_id: Some(proto::get_checkpoint_request::CheckpointId::SequenceNumber(
                sequence,
            )),
            read_mask: None,
        };
        match self.ledger.clone().get_checkpoint(request).await {
            Ok(reply) => {
                let checkpoint = reply.into_inner().checkpoint.unwrap_or_default();
                checkpoint
                    .transactions
                    .iter()
                    .map(|t| {
                        t.digest
                            .as_deref()
                            .ok_or_else(|| {
                                ChainError::Protocol(
                                    "a checkpoint transaction without a digest".into(),
                                )
                            })?
                            .parse::<TxDigest>()
                            .map_err(|e| ChainError::Protocol(format!("checkpoint digest: {e}")))
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map(Some)
            }
            Err(status) if status.code() == Code::NotFound => Ok(None),
            Err(status) => Err(self.err("GetCheckpoint", status)),
        }
    }

    pub async fn faucet(&self, recipient: &Address) -> Result<FaucetResponse, ChainError> {
        let faucet = self
            .faucet
            .clone()
            .ok_or_else(|| ChainError::Config("this network has no faucet endpoint".into()))?;
        let endpoint = self.endpoints.faucet.clone().unwrap_or_default();
        let reply = faucet
            .clone()
            .request_gas(FaucetRequest {
                recipient: recipient.to_string(),
            })
            .await
            .map_err(|e| status_error(&endpoint, e))?
            .into_inner();
        if reply.status != "Success" {
            return Err(ChainError::Refused {
                code: Code::FailedPrecondition,
                message: format!("the faucet said: {}", reply.status),
            });
        }
        Ok(reply)
    }

    /// Localnet only: closes the current epoch; returns the new one.
    pub async fn advance_epoch(&self) -> Result<u64, ChainError> {
        let admin = self
            .admin
            .clone()
            .ok_or_else(|| ChainError::Config("this network has no admin endpoint".into()))?;
        let endpoint = self.endpoints.admin.clone().unwrap_or_default();
        Ok(admin
            .clone()
            .advance_epoch(AdvanceEpochRequest {})
            .await
            .map_err(|e| status_error(&endpoint, e))?
            .into_inner()
            .epoch)
    }

    /// Sends a signed transaction and waits for the checkpoint that includes it: at once when the
    /// reply names its checkpoint (our localnet seals before answering), else on the checkpoint
    /// stream raced against lookups by digest, until [`CHECKPOINT_WAIT`].
    pub async fn execute(&self, tx: &SignedTransaction) -> Result<Executed, ChainError> {
        let digest = tx.digest();
        let request = proto::ExecuteTransactionRequest {
            transaction: Some(convert::transaction_to_proto(&tx.data)),
            signatures: tx
                .signatures
                .iter()
                .map(convert::signature_to_proto)
                .collect(),
            read_mask: Some(prost_types::FieldMask {
                paths: vec!["effects".into(), "balance_changes".into(), "objects".into()],
            }),
        };
        let reply = self
            .execution
            .clone()
            .execute_transaction(request)
            .await
            .map_err(|e| self.err("ExecuteTransaction", e))?
            .into_inner()
            .transaction
            .ok_or_else(|| {
                ChainError::Protocol("ExecuteTransaction without a transaction".into())
            })?;
        let mut executed = Executed::from_proto(&reply)?;
        if executed.effects.transaction_digest != digest {
            return Err(ChainError::Protocol(format!(
                "the node executed {} for our {digest}",
                executed.effects.transaction_digest
            )));
        }
        // A node that seals the checkpoint before answering says so in the reply.
        if executed.checkpoint.is_some() {
            return Ok(executed);
        }
        // Otherwise: the checkpoint stream, with lookups by digest covering a checkpoint sealed
        // before the subscription started.
        let subscription = self
            .subscription
            .clone()
            .subscribe_checkpoints(proto::SubscribeCheckpointsRequest { read_mask: None })
            .await
            .ok()
            .map(|r| r.into_inner());
        let wanted = digest.to_string();
        let waited = tokio::time::timeout(CHECKPOINT_WAIT, async {
            let mut stream = subscription;
            let mut poll = tokio::time::interval(Duration::from_secs(1));
            loop {
                // The stream, raced against a lookup every second: a subscriber that fell behind
                // (or a stream that broke) still learns of the checkpoint.
                let next = async {
                    match stream.as_mut() {
                        Some(s) => s.message().await.ok().flatten(),
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    message = next => match message {
                        Some(message) => {
                            let checkpoint = message.checkpoint.unwrap_or_default();
                            if checkpoint
                                .transactions
                                .iter()
                                .any(|t| t.digest.as_deref() == Some(wanted.as_str()))
                            {
                                return checkpoint.sequence_number;
                            }
                        }
                        None => stream = None,
                    },
                    _ = poll.tick() => {
                        if let Ok(Some(found)) = self.transaction(&digest).await
                            && found.checkpoint.is_some()
                        {
                            return found.checkpoint;
                        }
                    }
                }
            }
        })
        .await;
        match waited {
            Ok(checkpoint) => {
                executed.checkpoint = checkpoint.or(executed.checkpoint);
                Ok(executed)
            }
            Err(_) => Err(ChainError::WaitTimedOut {
                digest,
                seconds: CHECKPOINT_WAIT.as_secs(),
            }),
        }
    }

    /// Builds `kind` for `keypair`'s address with its richest coin as gas, signs and executes
    /// it. A stale or locked coin re-reads the coins and tries again.
    pub async fn sign_and_execute(
        &self,
        keypair: &Keypair,
        kind: impl Fn(&[ObjectRef]) -> TransactionKind,
    ) -> Result<Executed, ChainError> {
        let mut last = None;
        for attempt in 0..COIN_RETRIES {
            let gas = self.richest_coin(&keypair.address()).await?;
            let data = TransactionData::new(kind(&[gas]), keypair.address(), vec![gas]);
            let signed = SignedTransaction::sign(keypair, data);
            match self.execute(&signed).await {
                Err(e) if e.is_coin_conflict() => {
                    tracing::debug!("coin conflict (attempt {}): {e}", attempt + 1);
                    last = Some(e);
                    tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                }
                other => return other,
            }
        }
        Err(last.expect("at least one attempt"))
    }

    /// The SDK's `merge_coins`: the smallest coin is sent to the owner and every other coin
    /// (up to 255, richest first) pays gas, merged into the first. `None` when the owner holds
    /// at most `keep` coins (nothing to do).
    pub async fn merge_coins(
        &self,
        keypair: &Keypair,
        keep: usize,
    ) -> Result<Option<Executed>, ChainError> {
        let me = keypair.address();
        let mut coins: Vec<(u64, ObjectRef)> = self
            .owned_objects(&me, Some(ObjectType::Coin))
            .await?
            .iter()
            .filter_map(|o| Some((o.coin_balance().ok()?, o.reference().ok()?)))
            .collect();
        if coins.len() <= keep.max(1) {
            return Ok(None);
        }
        coins.sort_by_key(|c| std::cmp::Reverse(c.0));
        let (_, smallest) = coins.pop().expect("more than one coin");
        // The network takes at most 256 gas coins in one transaction.
        let gas: Vec<ObjectRef> = coins.into_iter().take(255).map(|(_, r)| r).collect();
        let data = TransactionData::new(
            TransactionKind::TransferCoin(TransferCoin {
                coin: smallest,
                amount: None,
                recipient: me,
            }),
            me,
            gas,
        );
        self.execute(&SignedTransaction::sign(keypair, data))
            .await
            .map(Some)
    }

    /// The reference of the owner's richest coin.
    pub async fn richest_coin(&self, owner: &Address) -> Result<ObjectRef, ChainError> {
        let coins = self.owned_objects(owner, Some(ObjectType::Coin)).await?;
        let richest = coins
            .iter()
            .max_by_key(|c| c.coin_balance().unwrap_or(0))
            .ok_or_else(|| ChainError::Refused {
                code: Code::FailedPrecondition,
                message: format!("{owner} owns no coin to pay gas with"),
            })?;
        richest
            .reference()
            .map_err(|e| ChainError::Protocol(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_over_the_limit_names_the_call_and_is_not_unavailable() {
        // Tonic's two words for it: a compressed reply that grows past the limit, and a plain
        // one whose length header is over it.
        let decompressed = tonic::Status::resource_exhausted(
            "Error decompressing: size limit, of 4194304 bytes, exceeded while decompressing \
             message",
        );
        let error = call_error(
            "http://node",
            "GetEpoch (system state)",
            4 << 20,
            decompressed,
        );
        assert!(matches!(error, ChainError::ReplyTooLarge { .. }), "{error}");
        assert!(!error.is_transient());
        let text = error.to_string();
        assert!(
            text.contains("GetEpoch (system state)") && text.contains("4194304"),
            "{text}"
        );
        let plain = tonic::Status::out_of_range(
            "Error, decoded message length too large: found 5242880 bytes, the limit is: 4194304 \
             bytes",
        );
        let text = call_error("http://node", "ListTargets", 4 << 20, plain).to_string();
        assert!(
            text.contains("ListTargets") && text.contains("found 5242880 bytes"),
            "{text}"
        );
        // An overloaded node stays what it was: worth retrying.
        let busy = tonic::Status::resource_exhausted("too many requests");
        assert!(call_error("http://node", "GetEpoch", 4 << 20, busy).is_transient());
    }
}
