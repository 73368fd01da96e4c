//! HTTP+JSON API, versioned under `/v1` (documented in `docs/openapi.json`).
//!
//! Errors are `{"error": code, "message": text}` with a 4xx status for bad requests and a bare
//! 500 for internal failures (logged here, never detailed to the client).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use somatrain_protocol::api::{BlobInfo, EpochResponse, FaucetRequest, Status};
use somatrain_protocol::chain::{Account, Model, Target, TargetStatus, TxRecord};
use somatrain_protocol::tx::{SignedTx, TxDigest};
use somatrain_protocol::{Address, ObjectId};

use crate::{Node, NodeError, now_ms};

/// Largest transaction request body accepted.
const MAX_TX_REQUEST: usize = 512 * 1024;

pub struct ApiError {
    status: StatusCode,
    code: String,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code: code.to_string(),
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.code, "message": self.message });
        (self.status, Json(body)).into_response()
    }
}

impl From<NodeError> for ApiError {
    fn from(e: NodeError) -> Self {
        match &e {
            NodeError::Envelope(env) => {
                ApiError::new(StatusCode::BAD_REQUEST, envelope_code(env), e.to_string())
            }
            NodeError::Tx(tx) => {
                let code = serde_json::to_value(tx)
                    .ok()
                    .and_then(|v| {
                        v.get("code")
                            .and_then(|c| c.as_str())
                            .map(|s| s.to_string())
                    })
                    .unwrap_or_else(|| "tx_failed".into());
                ApiError {
                    status: StatusCode::UNPROCESSABLE_ENTITY,
                    code,
                    message: tx.to_string(),
                }
            }
            NodeError::FaucetEmpty => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "faucet_empty",
                e.to_string(),
            ),
            NodeError::Store(_) => {
                tracing::error!("internal error: {e}");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "internal error",
                )
            }
        }
    }
}

fn envelope_code(e: &somatrain_protocol::tx::EnvelopeError) -> &'static str {
    use somatrain_protocol::tx::EnvelopeError as E;
    match e {
        E::TooLarge(_) => "body_too_large",
        E::Encoding => "bad_encoding",
        E::Key(_) => "bad_signature",
        E::Body(_) => "malformed_body",
        E::WrongSender { .. } => "wrong_sender",
    }
}

fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, code, message)
}

/// Runs blocking node work (it may fsync) off the async workers.
async fn blocking<T: Send + 'static>(
    node: &Arc<Node>,
    f: impl FnOnce(&Node) -> Result<T, NodeError> + Send + 'static,
) -> Result<T, ApiError> {
    let node = node.clone();
    tokio::task::spawn_blocking(move || f(&node))
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "internal error",
            )
        })?
        .map_err(ApiError::from)
}

pub fn router(node: Arc<Node>) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/accounts/{address}", get(account))
        .route("/v1/faucet", post(faucet))
        .route(
            "/v1/transactions",
            post(submit).layer(DefaultBodyLimit::max(MAX_TX_REQUEST)),
        )
        .route("/v1/transactions/{digest}", get(transaction))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model))
        .route("/v1/targets", get(targets))
        .route("/v1/targets/{id}", get(target))
        .route("/v1/admin/advance-epoch", post(advance_epoch))
        .route(
            "/v1/blobs/{name}",
            put(put_blob)
                .layer(DefaultBodyLimit::disable())
                .get(get_blob),
        )
        .with_state(node)
}

async fn status(State(node): State<Arc<Node>>) -> Json<Status> {
    let s = node.system();
    Json(Status {
        epoch: s.epoch,
        epoch_start_ms: s.epoch_start_ms,
        next_epoch_ms: s.epoch_start_ms + s.params.epoch_duration_ms,
        now_ms: now_ms(),
        params: s.params.clone(),
        total_supply: s.total_supply,
        accounted_supply: node.accounted_supply(),
        faucet_reserve: s.faucet_reserve,
        emission_pool: s.emission_pool,
        target_state: s.target_state.clone(),
        fees_collected: s.fees_collected,
        burned: s.burned,
    })
}

fn parse_address(text: &str) -> Result<Address, ApiError> {
    text.parse()
        .map_err(|_| bad_request("bad_address", "an address is 64 hex characters"))
}

async fn account(
    State(node): State<Arc<Node>>,
    Path(address): Path<String>,
) -> Result<Json<Account>, ApiError> {
    Ok(Json(node.account(&parse_address(&address)?)))
}

async fn faucet(
    State(node): State<Arc<Node>>,
    Json(req): Json<FaucetRequest>,
) -> Result<Json<Account>, ApiError> {
    let address = parse_address(&req.address)?;
    Ok(Json(blocking(&node, move |n| n.faucet(address)).await?))
}

async fn submit(
    State(node): State<Arc<Node>>,
    body: axum::body::Bytes,
) -> Result<Json<TxRecord>, ApiError> {
    let tx: SignedTx = serde_json::from_slice(&body).map_err(|e| {
        bad_request(
            "malformed_request",
            format!("not a signed transaction: {e}"),
        )
    })?;
    if let Some(verifier) = node.verifier()
        && let Ok(body) = tx.verify()
    {
        verifier.check(&node, &body).await.map_err(|m| {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "verification_failed", m)
        })?;
    }
    Ok(Json(blocking(&node, move |n| n.submit(&tx)).await?))
}

async fn transaction(
    State(node): State<Arc<Node>>,
    Path(digest): Path<String>,
) -> Result<Json<TxRecord>, ApiError> {
    let digest: TxDigest = digest
        .parse()
        .map_err(|e: somatrain_protocol::IdError| bad_request("bad_digest", e.to_string()))?;
    match blocking(&node, move |n| n.transaction(&digest)).await? {
        Some(record) => Ok(Json(record)),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such transaction",
        )),
    }
}

async fn models(State(node): State<Arc<Node>>) -> Json<Vec<Model>> {
    Json(node.models())
}

async fn model(
    State(node): State<Arc<Node>>,
    Path(id): Path<String>,
) -> Result<Json<Model>, ApiError> {
    let id: ObjectId = id
        .parse()
        .map_err(|e: somatrain_protocol::IdError| bad_request("bad_id", e.to_string()))?;
    node.model(&id)
        .map(Json)
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such model"))
}

#[derive(serde::Deserialize, Debug)]
struct TargetQuery {
    /// `open` (the default: open and not expired), `filled`, `expired`, `claimable` or `all`.
    status: Option<String>,
}

async fn targets(
    State(node): State<Arc<Node>>,
    axum::extract::Query(query): axum::extract::Query<TargetQuery>,
) -> Result<Json<Vec<Target>>, ApiError> {
    let epoch = node.system().epoch;
    let filter = query.status.as_deref().unwrap_or("open");
    let keep = |t: &Target| -> Result<bool, ApiError> {
        let expired = t.status == TargetStatus::Open && t.generation_epoch < epoch;
        Ok(match filter {
            "open" => t.status == TargetStatus::Open && !expired,
            "filled" => matches!(t.status, TargetStatus::Filled { .. }),
            "expired" => expired,
            "claimable" => {
                expired
                    || matches!(t.status, TargetStatus::Filled { fill_epoch } if epoch > fill_epoch + 1)
            }
            "all" => true,
            _ => {
                return Err(bad_request(
                    "bad_status",
                    "status is one of open, filled, expired, claimable, all",
                ));
            }
        })
    };
    let mut out = Vec::new();
    for t in node.targets() {
        if keep(&t)? {
            out.push(t);
        }
    }
    Ok(Json(out))
}

async fn target(
    State(node): State<Arc<Node>>,
    Path(id): Path<String>,
) -> Result<Json<Target>, ApiError> {
    let id: ObjectId = id
        .parse()
        .map_err(|e: somatrain_protocol::IdError| bad_request("bad_id", e.to_string()))?;
    node.target(&id)
        .map(Json)
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such target"))
}

fn check_admin(node: &Node, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(expected) = &node.admin_token else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "admin_disabled",
            "admin endpoints are disabled",
        ));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // Compare without an early exit on the first differing byte.
    let ok = given.is_some_and(|g| {
        g.len() == expected.len()
            && g.bytes()
                .zip(expected.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    });
    if ok {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong admin token",
        ))
    }
}

async fn advance_epoch(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
) -> Result<Json<EpochResponse>, ApiError> {
    check_admin(&node, &headers)?;
    let epoch = blocking(&node, |n| n.advance_epoch()).await?;
    Ok(Json(EpochResponse { epoch }))
}

fn blob_name(name: &str) -> Result<&str, ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(name)
    } else {
        Err(bad_request(
            "bad_blob_name",
            "blob names use letters, digits, '.', '_' and '-'",
        ))
    }
}

/// Stores a blob: streamed to a temporary file, fsynced, renamed into place.
async fn put_blob(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
    request: Request,
) -> Result<Json<BlobInfo>, ApiError> {
    use futures_util::StreamExt;
    use somatrain_protocol::crypto::CommitmentHasher;
    use tokio::io::AsyncWriteExt;
    let name = blob_name(&name)?.to_string();
    let path = node.data_dir_blob(&name);
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let internal = |e: std::io::Error| {
        tracing::error!("blob write failed: {e}");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error",
        )
    };
    let mut file = tokio::fs::File::create(&tmp).await.map_err(internal)?;
    let mut stream = request.into_body().into_data_stream();
    let mut hasher = CommitmentHasher::default();
    let mut size = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| bad_request("upload_interrupted", e.to_string()))?;
        hasher.update(&chunk);
        size += chunk.len() as u64;
        file.write_all(&chunk).await.map_err(internal)?;
    }
    file.sync_all().await.map_err(internal)?;
    drop(file);
    tokio::fs::rename(&tmp, &path).await.map_err(internal)?;
    Ok(Json(BlobInfo {
        name,
        size,
        checksum: hasher.finish(),
    }))
}

async fn get_blob(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let path = node.data_dir_blob(blob_name(&name)?);
    let file = tokio::fs::File::open(&path)
        .await
        .map_err(|_| ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such blob"))?;
    let len = file.metadata().await.map(|m| m.len()).unwrap_or(0);
    let stream = tokio_util::io::ReaderStream::new(file);
    Ok((
        [(header::CONTENT_LENGTH, len.to_string())],
        Body::from_stream(stream),
    )
        .into_response())
}
