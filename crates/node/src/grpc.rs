//! The localnet's gRPC surface: the fullnode services of package `soma.rpc` and the BCS side
//! services (faucet, admin, scoring), each on its own loopback port as the SDK's localnet
//! preset expects.
//!
//! Requests are decoded, converted and signature-checked before the state lock is taken; a
//! malformed or mis-signed request is INVALID_ARGUMENT and changes nothing. A stale or locked
//! coin is FAILED_PRECONDITION with the network's wording, so the SDK retries with another coin.

use somatrain_protocol::transaction::SubmitData;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use somatrain_protocol::object::TargetStatus;
use somatrain_protocol::{
    Address, Object, ObjectId, ObjectType, SignedTransaction, TransactionKind, TxDigest,
};
use somatrain_rpc::convert::{self, FieldError};
use somatrain_rpc::proto::{
    self, ledger_service_server::LedgerService, state_service_server::StateService,
    subscription_service_server::SubscriptionService,
    transaction_execution_service_server::TransactionExecutionService,
};
use somatrain_rpc::side::{
    AdvanceEpochRequest, AdvanceEpochResponse, FaucetCoin, FaucetRequest, FaucetResponse,
    HealthRequest, HealthResponse, ScoreManifest, ScoreRequest, ScoreResponse, from_bits, to_bits,
};
use somatrain_rpc::{MAX_MESSAGE_BYTES, admin, faucet, scoring};
use tonic::{Request, Response, Status};

use crate::ledger::execute::Refusal;
use crate::ledger::system::PROTOCOL_VERSION;
use crate::localnet::{Localnet, LocalnetError};

/// What `GetServiceInfo` reports as the server; the SDK compares the text after the last `/`
/// with its own version, so it names the API version this localnet speaks.
pub const SERVER_NAME: &str = "somatrain-localnet/0.1.15";
/// Default and largest page of `ListOwnedObjects`.
const OWNED_PAGE: (u32, u32) = (50, 1000);
/// Default and largest page of `ListTargets`, and the byte budget of one page.
const TARGET_PAGE: (u32, u32) = (100, 1000);
const TARGET_PAGE_BYTES: usize = 512 * 1024;
/// Replies smaller than this go uncompressed even to a client that accepts zstd: setting up
/// zstd for each small message cost more CPU than its bytes (`bench localnet`: 3,500 → 4,700
/// tx/s with small replies plain), and loopback or LAN bandwidth is not what limits them.
pub const COMPRESS_FROM_BYTES: usize = 16 * 1024;
/// The longest any unary request may run.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Scores data against models for the scoring service; implemented outside the node (the node
/// never loads models).
#[tonic::async_trait]
pub trait ScoringBackend: Send + Sync + 'static {
    async fn score(&self, request: ScoreRequest) -> Result<ScoreResponse, Status>;
}

/// The state behind every service.
#[derive(Clone)]
pub struct Services {
    pub node: Arc<Localnet>,
    pub scorer: Option<Arc<dyn ScoringBackend>>,
    /// Re-score every `SubmitData` with the scorer before it executes, and refuse one whose
    /// claimed model, loss, embedding or distance disagree (`--verify-submissions`). The public
    /// network does not do this; it is for testing submitters.
    pub verify_submissions: bool,
    /// The validators' weight checks run before each epoch closes (`None`: off).
    pub weight_checks: Option<Arc<crate::weight_checks::WeightChecks>>,
    /// One epoch change at a time (the admin service and the clock both close epochs).
    pub closing: Arc<tokio::sync::Mutex<()>>,
    /// Open connections per peer and in all, across the four services.
    pub connection_limits: Arc<crate::limits::ConnectionLimits>,
    /// Transactions executing at once, at most.
    pub execution_slots: crate::limits::ExecutionSlots,
}

impl Services {
    /// Closes the epoch: the validators check this epoch's reveals and the data of the
    /// submissions in their audit window (and report failures), then the epoch changes. With
    /// `only_if_due`, nothing happens before the epoch's time is up.
    pub async fn close_epoch(&self, only_if_due: bool) -> Result<Option<u64>, Status> {
        let _closing = self.closing.lock().await;
        if only_if_due && now_ms() < self.node.read(|l| l.system.next_epoch_ms()) {
            return Ok(None);
        }
        if let Some(checks) = &self.weight_checks {
            checks.check_revealed(&self.node).await;
            checks.check_submissions(&self.node).await;
        }
        let epoch = self
            .blocking(|n| n.advance_epoch(now_ms()))
            .await?
            .map_err(localnet_status)?;
        Ok(Some(epoch))
    }

    /// Runs `f` on a blocking thread so that disk writes never stall the async workers.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Localnet) -> T + Send + 'static,
    ) -> Result<T, Status> {
        let node = self.node.clone();
        tokio::task::spawn_blocking(move || f(&node))
            .await
            .map_err(|e| Status::internal(format!("request task failed: {e}")))
    }
}

fn localnet_status(e: LocalnetError) -> Status {
    match e {
        LocalnetError::Refused(refusal @ Refusal::Panicked(_)) => {
            Status::internal(refusal.to_string())
        }
        LocalnetError::Refused(refusal) if refusal.is_precondition() => {
            Status::failed_precondition(refusal.to_string())
        }
        LocalnetError::Refused(refusal) => Status::invalid_argument(refusal.to_string()),
        LocalnetError::FaucetEmpty => Status::resource_exhausted(e.to_string()),
        LocalnetError::Store(store) => {
            tracing::error!("store failure: {store}");
            Status::unavailable(format!("the node could not write to disk: {store}"))
        }
        LocalnetError::Supply { .. } | LocalnetError::ValidatorKeys(_) => {
            Status::internal(e.to_string())
        }
    }
}

fn parse_owner(text: Option<&str>, field: &str) -> Result<Address, Status> {
    let text = text.ok_or_else(|| Status::from(FieldError::missing(field)))?;
    Ok(convert::parse_address(text, field)?)
}

/// A unary reply, compressed only when it is at least [`COMPRESS_FROM_BYTES`] long.
fn reply<T: prost::Message>(message: T) -> Response<T> {
    let small = message.encoded_len() < COMPRESS_FROM_BYTES;
    let mut response = Response::new(message);
    if small {
        response
            .extensions_mut()
            .insert(tonic::codec::SingleMessageCompressionOverride::Disable);
    }
    response
}

// ---- Protobuf views of chain state -----------------------------------------------------------

/// The network's `GetEpoch` fields when the request has no read mask.
const EPOCH_DEFAULT_MASK: [&str; 7] = [
    "epoch",
    "committee",
    "first_checkpoint",
    "last_checkpoint",
    "start",
    "end",
    "protocol_config.protocol_version",
];

fn protocol_config(s: &crate::ledger::SystemState) -> proto::ProtocolConfig {
    let p = &s.params;
    let attributes = [
        ("model_architecture_version", p.model_architecture_version),
        ("model_min_stake", p.model_min_stake),
        ("epoch_duration_ms", p.epoch_duration_ms),
        ("base_fee", p.base_fee),
        ("write_object_fee", p.write_object_fee),
        ("target_embedding_dim", p.embedding_dim),
        ("submission_bond_per_byte", p.submission_bond_per_byte),
        ("max_submission_data_size", p.max_submission_bytes),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    proto::ProtocolConfig {
        protocol_version: Some(PROTOCOL_VERSION),
        feature_flags: Default::default(),
        attributes,
    }
}

fn target_matches(t: &somatrain_protocol::object::Target, filter: &str, epoch: u64) -> bool {
    let status = crate::views::target_status(t, epoch);
    match filter {
        "claimable" => {
            status == "expired"
                || matches!(t.status, TargetStatus::Filled { fill_epoch } if epoch > fill_epoch + 1)
        }
        other => status == other,
    }
}

fn page_token_id(token: Option<&[u8]>) -> Result<Option<ObjectId>, Status> {
    token
        .map(|t| {
            <[u8; 32]>::try_from(t)
                .map(ObjectId)
                .map_err(|_| Status::invalid_argument("page_token: not a token this node issued"))
        })
        .transpose()
}

/// How far a submission's claims may be from the scorer's own numbers.
const VERIFY_RELATIVE_LOSS: f32 = 1e-4;
const VERIFY_DISTANCE: f32 = 1e-4;

fn verification_failed(why: String) -> Status {
    Status::invalid_argument(format!("verification failed: {why}"))
}

impl Services {
    /// Scores a `SubmitData`'s data with the target's revealed models and checks what it claims:
    /// the claimed model has the lowest loss, and the loss, embedding and distance are the
    /// scorer's. Other kinds, and submissions the chain will refuse anyway (no such target, no
    /// revealed model), pass through to execution.
    async fn verify_submission(&self, kind: &TransactionKind) -> Result<(), Status> {
        let TransactionKind::SubmitData(SubmitData {
            target_id,
            data_manifest,
            model_id,
            embedding,
            distance_score,
            loss_score,
            ..
        }) = kind
        else {
            return Ok(());
        };
        let scorer = self.scorer.clone().ok_or_else(|| {
            Status::unavailable("this node verifies submissions but has no scorer")
        })?;
        let found = self.node.read(|l| {
            let target = l.object(target_id)?.target().ok()?;
            let models: Vec<(ObjectId, ScoreManifest)> = target
                .model_ids
                .iter()
                .filter_map(|id| {
                    let m = l.system.models.get(id)?;
                    let (manifest, key) = (m.manifest.as_ref()?, m.decryption_key?);
                    Some((
                        *id,
                        ScoreManifest {
                            url: manifest.url.clone(),
                            checksum: manifest.checksum.to_base58(),
                            size: manifest.size,
                            decryption_key: Some(
                                somatrain_protocol::EncryptionKey::from_bytes(key.0).to_base58(),
                            ),
                        },
                    ))
                })
                .collect();
            Some((target.embedding.values().ok()?, models))
        });
        let Some((target_embedding, models)) = found.filter(|(_, m)| !m.is_empty()) else {
            return Ok(());
        };
        let request = ScoreRequest {
            data_url: data_manifest.url.clone(),
            data_checksum: data_manifest.checksum.to_base58(),
            data_size: data_manifest.size,
            model_manifests: models.iter().map(|(_, m)| m.clone()).collect(),
            target_embedding: to_bits(&target_embedding),
            seed: 0,
        };
        let scored = scorer.score(request).await.map_err(|e| {
            verification_failed(format!("the data could not be scored: {}", e.message()))
        })?;
        let winner = models
            .get(scored.winner as usize)
            .map(|(id, _)| *id)
            .ok_or_else(|| Status::internal("the scorer named no model"))?;
        if winner != *model_id {
            return Err(verification_failed(format!(
                "model {winner} has the lowest loss on this data, not {model_id}"
            )));
        }
        // The scorer is another process: every index into its answer is checked.
        let at = |values: Vec<f32>, what: &str| {
            values.get(scored.winner as usize).copied().ok_or_else(|| {
                Status::internal(format!(
                    "the scorer's {what} has {} values and no entry for its winner {}",
                    values.len(),
                    scored.winner
                ))
            })
        };
        let true_loss = at(from_bits(&scored.loss_score), "loss_score")?;
        let claimed_loss = loss_score.values().ok().and_then(|v| v.first().copied());
        if !claimed_loss.is_some_and(|l| {
            (l - true_loss).abs() <= VERIFY_RELATIVE_LOSS * true_loss.abs().max(1.0)
        }) {
            return Err(verification_failed(format!(
                "the claimed loss {claimed_loss:?} is not the model's {true_loss}"
            )));
        }
        let true_embedding = from_bits(&scored.embedding);
        let claimed = embedding.values().unwrap_or_default();
        let apart = if claimed.len() == true_embedding.len() {
            somatrain_protocol::assignment::cosine_distance(&claimed, &true_embedding) as f32
        } else {
            f32::INFINITY
        };
        if apart.is_nan() || apart > VERIFY_DISTANCE {
            return Err(verification_failed(format!(
                "the claimed embedding is not the model's (cosine distance {apart})"
            )));
        }
        let true_distance = at(from_bits(&scored.distance), "distance")?;
        let claimed_distance = distance_score
            .values()
            .ok()
            .and_then(|v| v.first().copied());
        if !claimed_distance.is_some_and(|d| (d - true_distance).abs() <= VERIFY_DISTANCE) {
            return Err(verification_failed(format!(
                "the claimed distance {claimed_distance:?} is not the model's {true_distance}"
            )));
        }
        Ok(())
    }
}

// ---- Fullnode services ------------------------------------------------------------------------

#[tonic::async_trait]
impl LedgerService for Services {
    async fn get_service_info(
        &self,
        _: Request<proto::GetServiceInfoRequest>,
    ) -> Result<Response<proto::GetServiceInfoResponse>, Status> {
        let (epoch, height) = self
            .node
            .read(|l| (l.system.epoch, l.system.checkpoint_height));
        Ok(reply(proto::GetServiceInfoResponse {
            chain_id: Some(self.node.chain_id().to_string()),
            chain: Some("localnet".into()),
            epoch: Some(epoch),
            // Checkpoints sealed so far, genesis included (the official SDK breaks on the
            // latest sequence number here).
            checkpoint_height: Some(height),
            timestamp: Some(convert::timestamp_from_ms(now_ms())),
            lowest_available_checkpoint: Some(0),
            lowest_available_checkpoint_objects: Some(0),
            server: Some(SERVER_NAME.into()),
        }))
    }

    async fn get_object(
        &self,
        request: Request<proto::GetObjectRequest>,
    ) -> Result<Response<proto::GetObjectResponse>, Status> {
        let request = request.into_inner();
        let text = request
            .object_id
            .as_deref()
            .ok_or_else(|| Status::from(FieldError::missing("object_id")))?;
        let id = convert::parse_object_id(text, "object_id")?;
        let object = self
            .node
            .read(|l| l.object(&id).cloned())
            .filter(|o| request.version.is_none_or(|v| v == o.version()))
            .ok_or_else(|| Status::not_found(format!("Object {id} not found")))?;
        Ok(reply(proto::GetObjectResponse {
            object: Some(convert::object_to_proto(&object)),
        }))
    }

    async fn get_transaction(
        &self,
        request: Request<proto::GetTransactionRequest>,
    ) -> Result<Response<proto::GetTransactionResponse>, Status> {
        let text = request
            .into_inner()
            .digest
            .ok_or_else(|| Status::from(FieldError::missing("digest")))?;
        let digest: TxDigest = text
            .parse()
            .map_err(|e| Status::invalid_argument(format!("digest: {e}")))?;
        let record = self
            .blocking(move |n| n.transaction(&digest))
            .await?
            .map_err(localnet_status)?
            .ok_or_else(|| Status::not_found(format!("Transaction {digest} not found")))?;
        Ok(reply(proto::GetTransactionResponse {
            transaction: Some(crate::views::executed(&record, true).to_proto()),
        }))
    }

    async fn get_checkpoint(
        &self,
        request: Request<proto::GetCheckpointRequest>,
    ) -> Result<Response<proto::GetCheckpointResponse>, Status> {
        use proto::get_checkpoint_request::CheckpointId;
        let height = self.node.read(|l| l.system.checkpoint_height);
        let sequence = match request.into_inner().checkpoint_id {
            Some(CheckpointId::SequenceNumber(n)) => n,
            Some(CheckpointId::Digest(_)) => {
                return Err(Status::unimplemented(
                    "checkpoints are looked up by sequence number on this localnet",
                ));
            }
            // Genesis made checkpoint 0; a height of 0 is never served.
            None => height.saturating_sub(1),
        };
        let checkpoint = self
            .blocking(move |n| n.checkpoint(sequence))
            .await?
            .map_err(localnet_status)?
            .ok_or_else(|| Status::not_found(format!("Checkpoint {sequence} not found")))?;
        Ok(reply(proto::GetCheckpointResponse {
            checkpoint: Some(checkpoint_to_proto(&checkpoint)),
        }))
    }

    async fn get_epoch(
        &self,
        request: Request<proto::GetEpochRequest>,
    ) -> Result<Response<proto::GetEpochResponse>, Status> {
        let request = request.into_inner();
        // As the network: a field is sent when the mask names it (or a path under it), and no
        // mask means the network's default, which leaves the system state out.
        let paths: Vec<String> = match request.read_mask {
            Some(mask) => mask.paths,
            None => EPOCH_DEFAULT_MASK.iter().map(|p| p.to_string()).collect(),
        };
        let wants = |field: &str| {
            paths
                .iter()
                .any(|p| p == field || p.strip_prefix(field).is_some_and(|r| r.starts_with('.')))
        };
        let system = self.node.read(|l| l.system.clone());
        if request.epoch.is_some_and(|e| e != system.epoch) {
            return Err(Status::not_found(
                "this localnet serves the current epoch only",
            ));
        }
        Ok(reply(proto::GetEpochResponse {
            epoch: Some(proto::Epoch {
                epoch: wants("epoch").then_some(system.epoch),
                system_state: wants("system_state")
                    .then(|| crate::views::epoch(&system).system_state_to_proto()),
                first_checkpoint: wants("first_checkpoint").then_some(0),
                last_checkpoint: None,
                start: wants("start").then(|| convert::timestamp_from_ms(system.epoch_start_ms)),
                end: None,
                protocol_config: wants("protocol_config").then(|| protocol_config(&system)),
            }),
        }))
    }
}

fn checkpoint_to_proto(c: &crate::localnet::Checkpoint) -> proto::Checkpoint {
    proto::Checkpoint {
        sequence_number: Some(c.sequence),
        digest: Some(c.digest.to_string()),
        transactions: c
            .transactions
            .iter()
            .map(|d| proto::ExecutedTransaction {
                digest: Some(d.to_string()),
                ..Default::default()
            })
            .collect(),
        objects: None,
    }
}

#[tonic::async_trait]
impl StateService for Services {
    async fn list_owned_objects(
        &self,
        request: Request<proto::ListOwnedObjectsRequest>,
    ) -> Result<Response<proto::ListOwnedObjectsResponse>, Status> {
        let request = request.into_inner();
        let owner = parse_owner(request.owner.as_deref(), "owner")?;
        let object_type = request
            .object_type
            .as_deref()
            .map(|name| {
                ObjectType::from_name(name).ok_or_else(|| {
                    Status::invalid_argument(format!("object_type: unknown type {name}"))
                })
            })
            .transpose()?;
        let limit = request
            .page_size
            .unwrap_or(OWNED_PAGE.0)
            .clamp(1, OWNED_PAGE.1) as usize;
        let after = page_token_id(request.page_token.as_deref())?;
        let (objects, more) = self.node.owned_page(&owner, object_type, after, limit);
        let next_page_token = more
            .then(|| {
                objects
                    .last()
                    .and_then(|o| o.id().ok())
                    .map(|id| id.0.to_vec())
            })
            .flatten();
        Ok(reply(proto::ListOwnedObjectsResponse {
            objects: objects.iter().map(convert::object_to_proto).collect(),
            next_page_token,
        }))
    }

    async fn get_balance(
        &self,
        request: Request<proto::GetBalanceRequest>,
    ) -> Result<Response<proto::GetBalanceResponse>, Status> {
        let owner = parse_owner(request.into_inner().owner.as_deref(), "owner")?;
        let balance = self.node.read(|l| l.balance(&owner));
        Ok(reply(proto::GetBalanceResponse {
            balance: Some(balance),
        }))
    }

    async fn list_targets(
        &self,
        request: Request<proto::ListTargetsRequest>,
    ) -> Result<Response<proto::ListTargetsResponse>, Status> {
        let request = request.into_inner();
        let filter = request.status_filter.as_deref().unwrap_or("open");
        if !["open", "filled", "claimed", "expired", "claimable"].contains(&filter) {
            return Err(Status::invalid_argument(format!(
                "status_filter: {filter} is not open, filled, claimed, expired or claimable"
            )));
        }
        let submitter = request
            .submitter_filter
            .as_deref()
            .map(|s| convert::parse_address(s, "submitter_filter"))
            .transpose()?;
        let limit = request
            .page_size
            .unwrap_or(TARGET_PAGE.0)
            .clamp(1, TARGET_PAGE.1) as usize;
        let after = page_token_id(request.page_token.as_deref())?;
        let (targets, more) = self.node.read(|l| {
            let epoch = l.system.epoch;
            let mut page = Vec::new();
            let mut bytes = 0usize;
            let mut more = false;
            let candidates = l
                .targets_from(after.map_or(ObjectId([0; 32]), |a| a))
                .filter(|(id, _)| after.is_none_or(|a| **id > a));
            for (id, object) in candidates {
                let Ok(target) = object.target() else {
                    continue;
                };
                if !target_matches(&target, filter, epoch)
                    || request
                        .epoch_filter
                        .is_some_and(|e| e != target.generation_epoch)
                    || submitter.is_some_and(|s| target.submitter != Some(s))
                {
                    continue;
                }
                // A target of width 2048 is about 8.5 KB: about 60 fit the byte budget.
                let size = object.data.contents.len() + 256;
                if page.len() == limit || (!page.is_empty() && bytes + size > TARGET_PAGE_BYTES) {
                    more = true;
                    break;
                }
                bytes += size;
                page.push(crate::views::target(*id, &target, epoch).to_proto());
            }
            (page, more)
        });
        let next_page_token = more
            .then(|| {
                targets
                    .last()
                    .and_then(|t| t.id.as_deref())
                    .and_then(|id| id.parse::<ObjectId>().ok())
                    .map(|id| id.0.to_vec())
            })
            .flatten();
        Ok(reply(proto::ListTargetsResponse {
            targets,
            next_page_token,
        }))
    }
}

/// Decodes and checks a protobuf transaction with its signatures: the server's rebuild of the
/// signed bytes. Any mismatch is INVALID_ARGUMENT.
fn signed_from_proto(
    transaction: Option<&proto::Transaction>,
    signatures: &[proto::UserSignature],
) -> Result<SignedTransaction, Status> {
    let transaction =
        transaction.ok_or_else(|| Status::from(FieldError::missing("transaction")))?;
    let data = convert::transaction_from_proto(transaction)?;
    let signatures = signatures
        .iter()
        .enumerate()
        .map(|(i, s)| convert::signature_from_proto(s, &format!("signatures[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    let signed = SignedTransaction { data, signatures };
    signed
        .verify()
        .map_err(|e| Status::invalid_argument(format!("signature: {e}")))?;
    Ok(signed)
}

#[tonic::async_trait]
impl TransactionExecutionService for Services {
    async fn execute_transaction(
        &self,
        request: Request<proto::ExecuteTransactionRequest>,
    ) -> Result<Response<proto::ExecuteTransactionResponse>, Status> {
        let _slot = self.execution_slots.take().await;
        let request = request.into_inner();
        // The transaction and its signatures only when the mask asks (the sender has them; the
        // network's default mask is `effects`).
        let with_transaction = request.read_mask.as_ref().is_some_and(|mask| {
            mask.paths.iter().any(|p| {
                p.split('.')
                    .next()
                    .is_some_and(|f| f == "transaction" || f == "signatures")
            })
        });
        let signed = signed_from_proto(request.transaction.as_ref(), &request.signatures)?;
        if self.verify_submissions {
            self.verify_submission(&signed.data.kind).await?;
        }
        let record = self
            .node
            .submit_queued(signed)
            .await
            .map_err(localnet_status)?;
        Ok(reply(proto::ExecuteTransactionResponse {
            transaction: Some(crate::views::executed(&record, with_transaction).to_proto()),
        }))
    }

    async fn simulate_transaction(
        &self,
        request: Request<proto::SimulateTransactionRequest>,
    ) -> Result<Response<proto::SimulateTransactionResponse>, Status> {
        let request = request.into_inner();
        let transaction = request
            .transaction
            .ok_or_else(|| Status::from(FieldError::missing("transaction")))?;
        let data = convert::transaction_from_proto(&transaction)?;
        let signed = SignedTransaction {
            data,
            signatures: vec![],
        };
        let executed = self
            .blocking(move |n| n.simulate(&signed))
            .await?
            .map_err(|r| localnet_status(LocalnetError::Refused(r)))?;
        Ok(reply(proto::SimulateTransactionResponse {
            transaction: Some(proto::ExecutedTransaction {
                digest: Some(executed.effects.transaction_digest.to_string()),
                effects: Some(convert::effects_to_proto(&executed.effects)),
                balance_changes: executed
                    .balance_changes
                    .iter()
                    .map(convert::balance_change_to_proto)
                    .collect(),
                objects: Some(proto::ObjectSet {
                    objects: executed
                        .changes
                        .written
                        .values()
                        .map(convert::object_to_proto)
                        .collect(),
                }),
                ..Default::default()
            }),
        }))
    }
}

type CheckpointStream =
    Pin<Box<dyn Stream<Item = Result<proto::SubscribeCheckpointsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl SubscriptionService for Services {
    type SubscribeCheckpointsStream = CheckpointStream;

    async fn subscribe_checkpoints(
        &self,
        _: Request<proto::SubscribeCheckpointsRequest>,
    ) -> Result<Response<CheckpointStream>, Status> {
        let mut receiver = self.node.subscribe();
        let stream = async_stream::stream! {
            loop {
                match receiver.recv().await {
                    Ok(checkpoint) => {
                        yield Ok(proto::SubscribeCheckpointsResponse {
                            cursor: Some(checkpoint.sequence),
                            checkpoint: Some(checkpoint_to_proto(&checkpoint)),
                        });
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!("a checkpoint subscriber fell {n} checkpoints behind");
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                }
            }
        };
        Ok(Response::new(Box::pin(stream)))
    }
}

// ---- Side services ----------------------------------------------------------------------------

#[tonic::async_trait]
impl faucet::faucet_server::Faucet for Services {
    async fn request_gas(
        &self,
        request: Request<FaucetRequest>,
    ) -> Result<Response<FaucetResponse>, Status> {
        let recipient = convert::parse_address(&request.into_inner().recipient, "recipient")?;
        let record = self
            .blocking(move |n| n.faucet(recipient, now_ms()))
            .await?
            .map_err(localnet_status)?;
        let coins_sent = record
            .objects
            .iter()
            .filter_map(|o: &Object| {
                Some(FaucetCoin {
                    amount: o.coin_balance().ok()?,
                    id: convert::prefixed_id(&o.id().ok()?),
                    transfer_tx_digest: record.digest.to_string(),
                })
            })
            .collect();
        Ok(Response::new(FaucetResponse {
            status: "Success".into(),
            coins_sent,
        }))
    }
}

#[tonic::async_trait]
impl admin::admin_server::Admin for Services {
    async fn advance_epoch(
        &self,
        _: Request<AdvanceEpochRequest>,
    ) -> Result<Response<AdvanceEpochResponse>, Status> {
        // On its own task: the validators' weight checks can outlast the caller's deadline
        // (large weights), and a caller that gives up must not leave the epoch half closed.
        let services = self.clone();
        let epoch = tokio::spawn(async move { services.close_epoch(false).await })
            .await
            .map_err(|e| Status::internal(format!("the epoch change task failed: {e}")))??
            .expect("an unconditional close");
        Ok(Response::new(AdvanceEpochResponse { epoch }))
    }
}

#[tonic::async_trait]
impl scoring::scoring_server::Scoring for Services {
    async fn score(
        &self,
        request: Request<ScoreRequest>,
    ) -> Result<Response<ScoreResponse>, Status> {
        let scorer = self
            .scorer
            .as_ref()
            .ok_or_else(|| Status::unimplemented("this localnet was started without a scorer"))?;
        Ok(Response::new(scorer.score(request.into_inner()).await?))
    }

    async fn health(&self, _: Request<HealthRequest>) -> Result<Response<HealthResponse>, Status> {
        Ok(Response::new(HealthResponse {
            ok: self.scorer.is_some(),
        }))
    }
}

// ---- Serving ----------------------------------------------------------------------------------

/// Where each service listens.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    pub rpc: SocketAddr,
    pub faucet: SocketAddr,
    pub scoring: SocketAddr,
    pub admin: SocketAddr,
}

fn server() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .timeout(REQUEST_TIMEOUT)
        .concurrency_limit_per_connection(256)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .tcp_keepalive(Some(Duration::from_secs(60)))
        .max_concurrent_streams(Some(1024))
}

/// The services as routers, one per listener, each with the message size limit.
pub fn routers(services: Services) -> [tonic::service::Routes; 4] {
    use proto::ledger_service_server::LedgerServiceServer;
    use proto::state_service_server::StateServiceServer;
    use proto::subscription_service_server::SubscriptionServiceServer;
    use proto::transaction_execution_service_server::TransactionExecutionServiceServer;
    let zstd = tonic::codec::CompressionEncoding::Zstd;
    let rpc = tonic::service::Routes::new(
        LedgerServiceServer::new(services.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .send_compressed(zstd)
            .accept_compressed(zstd),
    )
    .add_service(
        StateServiceServer::new(services.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .send_compressed(zstd)
            .accept_compressed(zstd),
    )
    .add_service(
        TransactionExecutionServiceServer::new(services.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .send_compressed(zstd)
            .accept_compressed(zstd),
    )
    .add_service(
        SubscriptionServiceServer::new(services.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .send_compressed(zstd)
            .accept_compressed(zstd),
    );
    let faucet = tonic::service::Routes::new(
        faucet::faucet_server::FaucetServer::new(services.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES),
    );
    let scoring = tonic::service::Routes::new(
        scoring::scoring_server::ScoringServer::new(services.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES),
    );
    let admin = tonic::service::Routes::new(
        admin::admin_server::AdminServer::new(services)
            .max_decoding_message_size(MAX_MESSAGE_BYTES),
    );
    [rpc, faucet, scoring, admin]
}

/// Serves every service on its listener (within the connection limits, each connection closed
/// after a while without traffic) and runs the epoch clock, until `shutdown` resolves.
pub async fn serve(
    services: Services,
    listeners: [tokio::net::TcpListener; 4],
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let clock_services = services.clone();
    let clock = tokio::spawn(async move {
        let mut interval = tokio::time::interval(Duration::from_millis(200));
        loop {
            interval.tick().await;
            if let Err(e) = clock_services.close_epoch(true).await {
                tracing::error!("epoch change failed: {}", e.message());
            }
        }
    });
    let mut tasks = Vec::new();
    let limits = services.connection_limits.clone();
    for (routes, listener) in routers(services).into_iter().zip(listeners) {
        let mut stop = stop_rx.clone();
        let incoming = crate::limits::limited_connections(
            listener,
            limits.clone(),
            crate::idle::CONNECTION_IDLE_TIMEOUT,
        );
        tasks.push(tokio::spawn(
            server()
                .add_routes(routes)
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = stop.wait_for(|s| *s).await;
                }),
        ));
    }
    shutdown.await;
    let _ = stop_tx.send(true);
    clock.abort();
    for task in tasks {
        if let Ok(Err(e)) = task.await {
            return Err(e);
        }
    }
    Ok(())
}
