//! The loop's gauges and counters, served in Prometheus text format on `/metrics`.

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::routing::get;

use crate::journal::{Journal, Phase};

#[derive(Debug, Default, Clone)]
struct Values {
    phase: Phase,
    rounds_revealed: u64,
    missed_reveals: u64,
    commits: u64,
    reveals: u64,
    train_step: u64,
    train_loss: f64,
    train_tokens_per_s: f64,
    heldout_loss: Option<f64>,
    reveal_deadline_ms: Option<u64>,
    balance: Option<u64>,
    /// The round whose committed weights are missing at their URL, while they are.
    unserved_round: Option<u64>,
    earnings: Option<crate::earnings::EarningsSummary>,
}

/// The loop's gauges at one moment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gauges {
    pub balance: Option<u64>,
    pub train_step: u64,
    pub train_loss: f64,
    pub train_tokens_per_s: f64,
}

/// Shared between the loop (which writes) and the HTTP server (which reads).
#[derive(Debug, Default)]
pub struct Metrics(Mutex<Values>);

impl Metrics {
    fn with(&self, f: impl FnOnce(&mut Values)) {
        f(&mut self.0.lock().expect("metrics lock"));
    }

    pub fn observe_journal(&self, journal: &Journal) {
        self.with(|v| {
            v.phase = journal.phase;
            v.rounds_revealed = journal.rounds_revealed;
            v.missed_reveals = journal.missed_reveals;
            v.reveal_deadline_ms = journal.reveal_deadline_ms;
            if let Some(h) = journal
                .last_revealed
                .as_ref()
                .and_then(|r| r.heldout.as_ref())
            {
                v.heldout_loss = Some(h.loss as f64);
            }
        });
    }

    pub fn observe_step(&self, step: u64, loss: f32, tokens_per_s: f64) {
        self.with(|v| {
            v.train_step = step;
            v.train_loss = loss as f64;
            v.train_tokens_per_s = tokens_per_s;
        });
    }

    pub fn count_commit(&self) {
        self.with(|v| v.commits += 1);
    }

    pub fn count_reveal(&self) {
        self.with(|v| v.reveals += 1);
    }

    /// `Some(round)` while that round's weights are missing at their URL; None once served.
    pub fn observe_unserved(&self, round: Option<u64>) {
        self.with(|v| v.unserved_round = round);
    }

    pub fn unserved_round(&self) -> Option<u64> {
        self.0.lock().expect("metrics lock").unserved_round
    }

    /// The gauges the status page shows.
    pub fn snapshot(&self) -> Gauges {
        let v = self.0.lock().expect("metrics lock");
        Gauges {
            balance: v.balance,
            train_step: v.train_step,
            train_loss: v.train_loss,
            train_tokens_per_s: v.train_tokens_per_s,
        }
    }

    pub fn observe_balance(&self, shannons: u64) {
        self.with(|v| v.balance = Some(shannons));
    }

    pub fn observe_earnings(&self, summary: crate::earnings::EarningsSummary) {
        self.with(|v| v.earnings = Some(summary));
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let v = self.0.lock().expect("metrics lock").clone();
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
            let _ = writeln!(
                out,
                "# HELP somatrain_{name} {help}\n# TYPE somatrain_{name} {kind}"
            );
            for (labels, value) in samples {
                let _ = writeln!(out, "somatrain_{name}{labels} {value}");
            }
        };
        let phases: Vec<(String, f64)> = Phase::ALL
            .iter()
            .map(|p| {
                (
                    format!("{{phase=\"{}\"}}", p.name()),
                    f64::from(u8::from(*p == v.phase)),
                )
            })
            .collect();
        metric("phase", "gauge", "1 for the phase the loop is in.", &phases);
        let one = |x: f64| vec![(String::new(), x)];
        metric(
            "rounds_revealed",
            "gauge",
            "Rounds whose reveal landed.",
            &one(v.rounds_revealed as f64),
        );
        metric(
            "missed_reveals",
            "gauge",
            "Commits whose reveal window closed first.",
            &one(v.missed_reveals as f64),
        );
        metric(
            "commits_total",
            "counter",
            "Commits sent by this process.",
            &one(v.commits as f64),
        );
        metric(
            "reveals_total",
            "counter",
            "Reveals sent by this process.",
            &one(v.reveals as f64),
        );
        metric(
            "train_step",
            "gauge",
            "Optimizer steps done.",
            &one(v.train_step as f64),
        );
        metric(
            "train_loss",
            "gauge",
            "Training loss at the last logged step.",
            &one(v.train_loss),
        );
        metric(
            "train_tokens_per_second",
            "gauge",
            "Training throughput.",
            &one(v.train_tokens_per_s),
        );
        if let Some(loss) = v.heldout_loss {
            metric(
                "heldout_loss",
                "gauge",
                "Network loss of the last revealed round on held-out data.",
                &one(loss),
            );
        }
        if let Some(ms) = v.reveal_deadline_ms {
            metric(
                "reveal_deadline_seconds",
                "gauge",
                "Unix time by which the pending reveal must land.",
                &one(ms as f64 / 1000.0),
            );
        }
        metric(
            "weights_unserved",
            "gauge",
            "1 while committed weights are missing at their URL (validators fetching them would \
             report the model); the round is in the label.",
            &match v.unserved_round {
                Some(round) => vec![(format!("{{round=\"{round}\"}}"), 1.0)],
                None => one(0.0),
            },
        );
        if let Some(b) = v.balance {
            metric(
                "balance_shannons",
                "gauge",
                "Wallet balance.",
                &one(b as f64),
            );
        }
        if let Some(e) = v.earnings {
            metric(
                "targets_won",
                "gauge",
                "Targets the model has won (filled with it), as earnings.json recorded them.",
                &one(e.targets_won as f64),
            );
            metric(
                "earned_shannons",
                "gauge",
                "The owner's share of won targets: claimed (paid) and pending (awaiting a claim).",
                &[
                    ("{state=\"claimed\"}".to_string(), e.claimed_shannons as f64),
                    ("{state=\"pending\"}".to_string(), e.pending_shannons as f64),
                ],
            );
        }
        out
    }
}

pub fn router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|State(m): State<Arc<Metrics>>| async move {
                ([("content-type", "text/plain; version=0.0.4")], m.render())
            }),
        )
        .with_state(metrics)
}
