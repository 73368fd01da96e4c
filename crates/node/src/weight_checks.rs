//! The localnet's validators checking published weights, as the network's validators do: each
//! model revealed in an epoch is fetched from its committed URL (within the network's time
//! limit, 30 s + 50 ns per byte), its size and checksum checked, decrypted with the revealed key
//! and loaded as V1 of the chain's width. A model that fails is reported (`ReportModel`) by every
//! validator; the epoch change then slashes it by the network's tally rule.
//!
//! The check runs when the reveal's epoch closes, just before the change that counts the
//! reports: a publisher must keep its weights fetchable at least until then. How weights are
//! loaded is the binary's business ([`WeightChecker`]); the node never loads a model.
//!
//! The same validators check submitted data, as the network's proxy does: when a filled
//! target's audit window (the epoch after the fill) closes, its data is fetched from the
//! submitted URL and its size and checksum checked; data that fails is reported
//! (`ReportSubmission`) by every validator, and a quorum's claim then hands the submitter's
//! bond to them. A submitter must keep its data fetchable through the audit window.

use somatrain_protocol::object::TargetStatus;
use somatrain_protocol::transaction::{ReportModel, ReportSubmission};
use std::sync::Arc;
use std::time::Duration;

use somatrain_protocol::effects::ExecutionStatus;
use somatrain_protocol::{
    Digest, Manifest, ObjectId, ObjectType, SignedTransaction, TransactionData, TransactionKind,
};

use crate::ledger::ModelState;
use crate::localnet::Localnet;
use crate::validator_keys::ValidatorKeys;

/// What a validator fetches and checks for one reveal.
#[derive(Debug, Clone)]
pub struct RevealedWeights {
    pub model_id: ObjectId,
    pub manifest: Manifest,
    pub decryption_key: Digest,
    /// The chain's embedding width, which the weights must have.
    pub embedding_dim: u64,
}

/// Fetches, verifies, decrypts and loads revealed weights; implemented by the binary.
#[tonic::async_trait]
pub trait WeightChecker: Send + Sync + 'static {
    /// `Ok` when the weights arrive within `deadline`, match the committed size and checksum,
    /// decrypt with the revealed key and load as V1 of `embedding_dim`; else why not.
    async fn check(&self, weights: &RevealedWeights, deadline: Duration) -> Result<(), String>;

    /// `Ok` when the data submitted to `target_id` arrives within `deadline` and matches its
    /// manifest's size and checksum; else why not. Checks of several targets run at once, and
    /// the same data may have filled several.
    async fn check_data(
        &self,
        target_id: ObjectId,
        data: &Manifest,
        deadline: Duration,
    ) -> Result<(), String>;
}

/// The network's time limit for fetching `size` bytes of weights: 30 s plus 50 ns per byte.
pub fn fetch_deadline(size: u64) -> Duration {
    Duration::from_secs(30) + Duration::from_nanos(size.saturating_mul(50))
}

/// The validators' duty of checking weights: their keys and the checker.
pub struct WeightChecks {
    keys: Vec<ValidatorKeys>,
    checker: Arc<dyn WeightChecker>,
}

impl WeightChecks {
    pub fn new(keys: Vec<ValidatorKeys>, checker: Arc<dyn WeightChecker>) -> Self {
        WeightChecks { keys, checker }
    }

    /// Checks every model revealed this epoch that is still active; each that fails is
    /// reported by every validator that holds a key here. Returns the models reported.
    pub async fn check_revealed(&self, node: &Arc<Localnet>) -> Vec<ObjectId> {
        let revealed: Vec<RevealedWeights> = node.read(|l| {
            let system = &l.system;
            system
                .revealed_this_epoch
                .iter()
                .filter_map(|id| system.models.get(id))
                .filter(|m| m.state == ModelState::Active)
                .filter_map(|m| {
                    Some(RevealedWeights {
                        model_id: m.id,
                        manifest: m.manifest.clone()?,
                        decryption_key: m.decryption_key?,
                        embedding_dim: system.params.embedding_dim,
                    })
                })
                .collect()
        });
        let checks = revealed.iter().map(|weights| async move {
            let deadline = fetch_deadline(weights.manifest.size);
            let outcome = tokio::time::timeout(deadline, self.checker.check(weights, deadline))
                .await
                .unwrap_or_else(|_| Err(format!("not fetched within {deadline:?}")));
            (weights, outcome)
        });
        let mut reported = Vec::new();
        for (weights, outcome) in futures_util::future::join_all(checks).await {
            match outcome {
                Ok(()) => tracing::info!(
                    "validators checked model {}: its weights are fetchable and load",
                    weights.model_id
                ),
                Err(reason) => {
                    tracing::warn!(
                        "validators report model {}: its weights failed the check ({reason})",
                        weights.model_id
                    );
                    for key in &self.keys {
                        let kind = TransactionKind::ReportModel(ReportModel {
                            model_id: weights.model_id,
                        });
                        if let Err(e) = report(node, key, kind).await {
                            tracing::error!(
                                "validator {} could not report model {}: {e}",
                                key.address(),
                                weights.model_id
                            );
                        }
                    }
                    reported.push(weights.model_id);
                }
            }
        }
        reported
    }

    /// Checks the data of every target whose audit window is this epoch (filled in the one
    /// before); each whose data fails is reported by every validator that holds a key here.
    /// Returns the targets reported.
    pub async fn check_submissions(&self, node: &Arc<Localnet>) -> Vec<ObjectId> {
        let in_audit: Vec<(ObjectId, Manifest)> = node.read(|l| {
            let epoch = l.system.epoch;
            l.targets_from(ObjectId([0; 32]))
                .filter_map(|(id, o)| {
                    let target = o.target().ok()?;
                    match target.status {
                        TargetStatus::Filled { fill_epoch } if fill_epoch + 1 == epoch => {
                            Some((*id, target.winning_data_manifest?))
                        }
                        _ => None,
                    }
                })
                .collect()
        });
        let checks = in_audit.iter().map(|(target_id, manifest)| async move {
            let deadline = fetch_deadline(manifest.size);
            let outcome = tokio::time::timeout(
                deadline,
                self.checker.check_data(*target_id, manifest, deadline),
            )
            .await
            .unwrap_or_else(|_| Err(format!("not fetched within {deadline:?}")));
            (*target_id, outcome)
        });
        let mut reported = Vec::new();
        for (target_id, outcome) in futures_util::future::join_all(checks).await {
            match outcome {
                Ok(()) => tracing::info!(
                    "validators checked the data of target {target_id}: fetchable and as submitted"
                ),
                Err(reason) => {
                    tracing::warn!(
                        "validators report the submission to target {target_id}: its data failed \
                         the check ({reason})"
                    );
                    for key in &self.keys {
                        let kind =
                            TransactionKind::ReportSubmission(ReportSubmission { target_id });
                        if let Err(e) = report(node, key, kind).await {
                            tracing::error!(
                                "validator {} could not report target {target_id}: {e}",
                                key.address()
                            );
                        }
                    }
                    reported.push(target_id);
                }
            }
        }
        reported
    }
}

/// Sends `kind` (a report) from validator `key`'s account, paying from its richest coin.
async fn report(
    node: &Arc<Localnet>,
    key: &ValidatorKeys,
    kind: TransactionKind,
) -> Result<(), String> {
    let address = key.address();
    if node.read(|l| l.system.validator(&address).is_none()) {
        return Err("not a validator of this chain".into());
    }
    let (coins, _) = node.owned_page(&address, Some(ObjectType::Coin), None, 1000);
    let gas = coins
        .iter()
        .max_by_key(|c| c.coin_balance().unwrap_or(0))
        .ok_or("the validator has no coin to pay the fee")?
        .reference()
        .map_err(|e| e.to_string())?;
    let data = TransactionData::new(kind, address, vec![gas]);
    let record = node
        .submit_queued(SignedTransaction::sign(&key.account(), data))
        .await
        .map_err(|e| e.to_string())?;
    match record.effects.status {
        ExecutionStatus::Success => Ok(()),
        ExecutionStatus::Failure(f) => Err(format!("{}: {}", f.kind.name(), f.description)),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_fetch_deadline_is_the_networks() {
        assert_eq!(super::fetch_deadline(0).as_secs(), 30);
        // 2.4 GB of V1 weights: 30 s + 120 s.
        assert_eq!(super::fetch_deadline(2_400_000_000).as_secs(), 150);
    }
}
