//! What the model has earned: the targets it won and its owner's share of each.
//!
//! A model earns only when a data submitter fills one of its targets with it: at the claim,
//! `target_model_reward_share_bps` (49.75% on the network) of the target's reward pool goes to
//! the model's owner as a new coin, not through the model's staking pool, so the model's
//! commission pays nothing (`protocol-targets.md` §4.1). The chain deletes a target once it is
//! claimed, so nothing on chain says later what was won: whoever watches must write it down
//! while the target is filled. The loop does (every [`OBSERVE_EVERY`]), and so does `status
//! --run-dir`; a filled target stays on chain for at least its whole audit epoch, so a running
//! loop misses none.
//!
//! `earnings.json` in the run directory keeps each won target with its share, and when it was
//! last seen filled and seen gone after its audit window (claimed: paid, unless a fraud quorum
//! voided it, which the chain no longer shows then).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use somatrain_client::view::TargetView;
use somatrain_protocol::ObjectId;

use crate::DaemonError;

pub const EARNINGS_FILE: &str = "earnings.json";

/// How often the loop lists the filled targets.
pub const OBSERVE_EVERY: Duration = Duration::from_secs(60);

/// The network's model share when a node does not say (`protocol-targets.md` §4.1).
pub const NETWORK_MODEL_SHARE_BPS: u64 = 4975;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Earnings {
    pub model_id: Option<ObjectId>,
    /// Target id to what the model won there.
    pub targets: BTreeMap<String, WonTarget>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WonTarget {
    pub reward_pool: u64,
    /// The owner's share at the claim, in shannons.
    pub model_share: u64,
    pub fill_epoch: u64,
    /// The epoch in which the target was first seen gone after its audit window.
    pub claimed_seen_epoch: Option<u64>,
}

/// Totals for the page, `status` and `rounds.jsonl`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EarningsSummary {
    pub targets_won: u64,
    /// Shares of won targets that have been claimed, in shannons.
    pub claimed_shannons: u64,
    /// Shares of won targets still waiting for a claim.
    pub pending_shannons: u64,
}

impl Earnings {
    pub fn load(run_dir: &Path) -> Result<Earnings, DaemonError> {
        let path = run_dir.join(EARNINGS_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| DaemonError::Io(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Earnings::default()),
            Err(e) => Err(DaemonError::Io(format!("reading {}: {e}", path.display()))),
        }
    }

    pub fn save(&self, run_dir: &Path) -> Result<(), DaemonError> {
        let path = run_dir.join(EARNINGS_FILE);
        let bytes = serde_json::to_vec_pretty(self).expect("earnings serialise");
        crate::write_private_file(&path, &bytes)
            .map_err(|e| DaemonError::Io(format!("writing {}: {e}", path.display())))
    }

    /// Takes in the chain's filled targets in `epoch`: the ones `model_id` won are kept; a kept
    /// one no longer filled after its audit window has been claimed. Another model's id (a
    /// `--new-model` run) starts the record afresh. Whether anything changed.
    pub fn observe(
        &mut self,
        model_id: ObjectId,
        filled: &[TargetView],
        epoch: u64,
        share_bps: Option<u64>,
    ) -> bool {
        let before = self.clone();
        if self.model_id != Some(model_id) {
            *self = Earnings {
                model_id: Some(model_id),
                targets: BTreeMap::new(),
            };
        }
        let share_bps = share_bps.unwrap_or(NETWORK_MODEL_SHARE_BPS);
        for target in filled {
            if target.winning_model_id != Some(model_id) {
                continue;
            }
            self.targets
                .entry(target.id.to_string())
                .or_insert_with(|| WonTarget {
                    reward_pool: target.reward_pool,
                    model_share: (target.reward_pool as u128 * share_bps as u128 / 10_000) as u64,
                    fill_epoch: target.fill_epoch.unwrap_or(epoch),
                    claimed_seen_epoch: None,
                });
        }
        for (id, won) in &mut self.targets {
            let still_filled = filled.iter().any(|t| t.id.to_string() == *id);
            if won.claimed_seen_epoch.is_none() && !still_filled && epoch > won.fill_epoch + 1 {
                won.claimed_seen_epoch = Some(epoch);
            }
        }
        *self != before
    }

    pub fn summary(&self) -> EarningsSummary {
        let mut summary = EarningsSummary::default();
        for won in self.targets.values() {
            summary.targets_won += 1;
            match won.claimed_seen_epoch {
                Some(_) => summary.claimed_shannons += won.model_share,
                None => summary.pending_shannons += won.model_share,
            }
        }
        summary
    }
}

/// Lists the filled targets and records what `model_id` won in `run_dir`'s `earnings.json`.
pub async fn observe(
    chain: &somatrain_client::chain::ChainClient,
    run_dir: &Path,
    model_id: ObjectId,
) -> Result<EarningsSummary, DaemonError> {
    let epoch = chain.epoch_view().await?;
    let filled = chain.target_views("filled").await?;
    let mut earnings = Earnings::load(run_dir)?;
    if earnings.observe(
        model_id,
        &filled,
        epoch.epoch,
        epoch.params.model_reward_share_bps,
    ) {
        earnings.save(run_dir)?;
    }
    Ok(earnings.summary())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filled(id: u8, model: ObjectId, reward: u64, fill_epoch: u64) -> TargetView {
        TargetView {
            id: ObjectId([id; 32]),
            embedding: vec![],
            model_ids: vec![model],
            distance_threshold: 0.5,
            reward_pool: reward,
            generation_epoch: fill_epoch,
            status: "filled".into(),
            fill_epoch: Some(fill_epoch),
            submitter: None,
            winning_model_id: Some(model),
            winning_model_owner: None,
            bond_amount: 0,
            data_url: None,
        }
    }

    #[test]
    fn won_targets_are_pending_until_gone_after_their_audit_window() {
        let ours = ObjectId([1; 32]);
        let theirs = ObjectId([2; 32]);
        let mut earnings = Earnings::default();
        let seen = [
            filled(10, ours, 1_000_000, 3),
            filled(11, theirs, 1_000_000, 3),
        ];
        assert!(earnings.observe(ours, &seen, 3, Some(4975)));
        let s = earnings.summary();
        assert_eq!(
            (s.targets_won, s.pending_shannons, s.claimed_shannons),
            (1, 497_500, 0)
        );
        // Gone during the audit epoch is impossible on chain; it is not counted as claimed.
        assert!(!earnings.observe(ours, &[], 4, Some(4975)));
        assert_eq!(earnings.summary().claimed_shannons, 0);
        assert!(earnings.observe(ours, &[], 5, Some(4975)));
        let s = earnings.summary();
        assert_eq!(
            (s.targets_won, s.pending_shannons, s.claimed_shannons),
            (1, 0, 497_500)
        );
        assert!(!earnings.observe(ours, &[], 6, Some(4975)), "nothing new");
        // A new model starts afresh.
        assert!(earnings.observe(theirs, &seen[1..], 6, None));
        assert_eq!(earnings.summary().pending_shannons, 497_500);
    }
}
