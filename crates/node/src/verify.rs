//! `--verify-submissions`: before a data submission executes, the node downloads the data and
//! the weights of the target's models and re-scores it with the project's scorer. A submission
//! is refused unless its model is the lowest-loss assigned model and its loss, embedding and
//! distance are what that model computes. The public network only checks what the chain can
//! check; this is the stricter localnet mode for testing submitters.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use somatrain_model::score::cosine_distance;
use somatrain_protocol::chain::ModelStatus;
use somatrain_protocol::tx::{TxBody, TxKind};
use somatrain_storage::download_verified;
use somatrain_submit::{ModelCache, evaluate, score};

use crate::Node;

/// Largest relative loss difference accepted (the same scorer on another machine or device
/// differs in the last bits).
const LOSS_TOLERANCE: f32 = 1e-4;
/// Largest cosine distance accepted between the claimed and the recomputed embedding.
const EMBEDDING_TOLERANCE: f32 = 1e-4;

pub struct Verifier {
    cache: tokio::sync::Mutex<ModelCache>,
    data_dir: PathBuf,
    http: reqwest::Client,
}

impl Verifier {
    pub fn new(work_dir: &Path) -> Self {
        Verifier {
            cache: tokio::sync::Mutex::new(ModelCache::new(&work_dir.join("weights"))),
            data_dir: work_dir.join("data"),
            http: somatrain_client::http_client(),
        }
    }

    /// Ok for anything but a data submission that re-scoring contradicts. Submissions the chain
    /// refuses anyway (unknown target, too large...) pass through to get the chain's own error.
    pub async fn check(&self, node: &Node, body: &TxBody) -> Result<(), String> {
        let TxKind::SubmitData {
            target_id,
            manifest,
            model_id,
            embedding,
            distance,
            loss,
        } = &body.kind
        else {
            return Ok(());
        };
        let Some(target) = node.target(target_id) else {
            return Ok(());
        };
        if manifest.size > node.system().params.max_submission_bytes
            || !target.model_ids.contains(model_id)
        {
            return Ok(());
        }
        let path = self.data_dir.join(format!("{}.bin", manifest.checksum));
        download_verified(&self.http, manifest, &path)
            .await
            .map_err(|e| format!("the submitted data cannot be fetched: {e}"))?;
        let data = std::fs::read(&path).map_err(|e| format!("reading the downloaded data: {e}"))?;
        let _ = std::fs::remove_file(&path);
        let mut cache = self.cache.lock().await;
        let mut scores = HashMap::new();
        for id in &target.model_ids {
            let Some(model) = node.model(id).filter(|m| m.status == ModelStatus::Active) else {
                continue;
            };
            let scorer = cache
                .model(&model)
                .await
                .map_err(|e| format!("the weights of model {id} cannot be checked: {e}"))?;
            let scored =
                tokio::task::block_in_place(|| score(scorer, &data)).map_err(|e| e.to_string())?;
            scores.insert(*id, scored);
        }
        let best = evaluate(&target, &scores).ok_or("no assigned model is active")?;
        let claimed = scores
            .get(model_id)
            .ok_or("the claimed model is not active")?;
        if best.model_id != *model_id && claimed.loss > best.loss {
            return Err(format!(
                "model {} explains the data better (loss {}) than the claimed model {model_id} (loss {})",
                best.model_id, best.loss, claimed.loss
            ));
        }
        if (claimed.loss - loss).abs() > LOSS_TOLERANCE * claimed.loss.abs().max(1.0) {
            return Err(format!("claimed loss {loss}, re-scored {}", claimed.loss));
        }
        let drift = cosine_distance(&claimed.embedding, embedding);
        if drift.is_nan() || drift > EMBEDDING_TOLERANCE {
            return Err(format!(
                "the claimed embedding differs from the re-scored one (cosine distance {drift})"
            ));
        }
        let recomputed = cosine_distance(&claimed.embedding, &target.embedding);
        if (recomputed - distance).abs() > EMBEDDING_TOLERANCE {
            return Err(format!(
                "claimed distance {distance}, re-scored {recomputed}"
            ));
        }
        Ok(())
    }
}
