//! The submitter's counters and gauges in Prometheus text format on `/metrics`.

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::routing::get;

use crate::journal::Totals;

#[derive(Debug, Default, Clone)]
struct Values {
    totals: Totals,
    bond_outstanding: u64,
    queued: u64,
    epoch: u64,
    open_targets: u64,
    scoring_tokens_per_second: f64,
    weights_downloads: u64,
    other_time_fraction: f64,
}

/// Shared between the service (which writes) and the HTTP server (which reads).
#[derive(Debug, Default)]
pub struct Metrics(Mutex<Values>);

/// The gauges the loop observes now and then.
#[derive(Debug, Clone, Copy, Default)]
pub struct Gauges {
    pub epoch: u64,
    pub open_targets: u64,
    pub scoring_tokens_per_second: f64,
    pub weights_downloads: u64,
    /// Of the loop's time, the part spent on anything but scoring.
    pub other_time_fraction: f64,
}

impl Metrics {
    fn with(&self, f: impl FnOnce(&mut Values)) {
        f(&mut self.0.lock().expect("metrics lock"));
    }

    pub fn observe_journal(&self, journal: &crate::journal::Journal) {
        self.with(|v| {
            v.totals = journal.totals.clone();
            v.bond_outstanding = journal.bond_outstanding();
            v.queued = journal
                .hits
                .values()
                .filter(|h| h.state == crate::journal::State::Queued)
                .count() as u64;
        });
    }

    pub fn observe(&self, gauges: Gauges) {
        self.with(|v| {
            v.epoch = gauges.epoch;
            v.open_targets = gauges.open_targets;
            v.scoring_tokens_per_second = gauges.scoring_tokens_per_second;
            v.weights_downloads = gauges.weights_downloads;
            v.other_time_fraction = gauges.other_time_fraction;
        });
    }

    pub fn render(&self) -> String {
        let v = self.0.lock().expect("metrics lock").clone();
        let t = &v.totals;
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: String| {
            let _ = writeln!(out, "# HELP somatrain_submitter_{name} {help}");
            let _ = writeln!(out, "# TYPE somatrain_submitter_{name} {kind}");
            let _ = writeln!(out, "somatrain_submitter_{name} {value}");
        };
        metric(
            "pieces_scored_total",
            "counter",
            "Corpus pieces scored against the open targets' models.",
            t.pieces_scored.to_string(),
        );
        metric(
            "tokens_scored_total",
            "counter",
            "Tokens scored, over every model.",
            t.tokens_scored.to_string(),
        );
        metric(
            "hits_total",
            "counter",
            "Piece and target pairs within the target's threshold.",
            t.hits.to_string(),
        );
        metric(
            "submissions_total",
            "counter",
            "SubmitData transactions that filled a target.",
            t.submissions.to_string(),
        );
        metric(
            "refused_total",
            "counter",
            "Hits refused: filled by someone else first, expired, or refused by the chain.",
            t.refused.to_string(),
        );
        metric(
            "dropped_total",
            "counter",
            "Hits never sent: upload failures and limits.",
            t.dropped.to_string(),
        );
        metric(
            "upload_failures_total",
            "counter",
            "Uploads of hit data that failed (the hits stay queued).",
            t.upload_failures.to_string(),
        );
        metric(
            "claims_total",
            "counter",
            "ClaimRewards transactions sent for our targets.",
            t.claims.to_string(),
        );
        metric(
            "claimed_shannons_total",
            "counter",
            "What claims moved into the wallet: bonds back, rewards and incentives, less fees.",
            t.claimed_shannons.to_string(),
        );
        metric(
            "fees_shannons_total",
            "counter",
            "Fees paid by the submitter's transactions.",
            t.fees.to_string(),
        );
        metric(
            "bond_outstanding_shannons",
            "gauge",
            "Bonds held by the chain for our unclaimed submissions.",
            v.bond_outstanding.to_string(),
        );
        metric(
            "queued_hits",
            "gauge",
            "Hits waiting to be submitted.",
            v.queued.to_string(),
        );
        metric("epoch", "gauge", "The chain's epoch.", v.epoch.to_string());
        metric(
            "open_targets",
            "gauge",
            "Open targets at the last refresh.",
            v.open_targets.to_string(),
        );
        metric(
            "scoring_tokens_per_second",
            "gauge",
            "Scoring throughput over the last interval.",
            format!("{:.1}", v.scoring_tokens_per_second),
        );
        metric(
            "weights_downloads_total",
            "counter",
            "Weights downloaded (not found, or found corrupted, in the cache).",
            v.weights_downloads.to_string(),
        );
        metric(
            "other_time_fraction",
            "gauge",
            "Of the loop's time, the part not spent scoring.",
            format!("{:.4}", v.other_time_fraction),
        );
        out
    }
}

async fn render(State(metrics): State<Arc<Metrics>>) -> String {
    metrics.render()
}

pub fn router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(render))
        .with_state(metrics)
}
