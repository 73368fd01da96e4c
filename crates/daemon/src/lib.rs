//! Publishing weights and the unattended loop that keeps a model competitive.
//!
//! Owns the run directory's journal ([`journal`]), the journaled create/commit/reveal steps
//! ([`publisher`]), the rounds of the train -> commit -> reveal loop as one state machine
//! ([`rounds`]), what the model earned ([`earnings`]), its `/metrics` ([`metrics`]) and status
//! page ([`status`]), and the whole
//! localnet flow of `somatrain localnet-cycle` once a localnet is up ([`cycle`]). It drives the
//! trainer, the storage, the submitter and the node's client; it does not implement any of
//! them, and it never logs a secret (keys live only in the 0600 journal).

#![forbid(unsafe_code)]

pub mod cycle;
pub mod earnings;
pub mod journal;
pub mod metrics;
pub mod publisher;
pub mod rounds;
pub mod status;

pub use journal::{Journal, Phase, write_private_file};
pub use metrics::Metrics;
pub use publisher::{Adopt, NewModel, Publisher, RevealWindow, Served, serve_once};
pub use rounds::{EngineFactory, EpochAdvance, LoopConfig, RoundState};

/// Milliseconds since the Unix epoch, by this machine's clock.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("journal: {0}")]
    Journal(String),
    /// Refused, unreachable or timed out: see [`somatrain_client::chain::ChainError`].
    #[error(transparent)]
    Network(#[from] somatrain_client::chain::ChainError),
    /// The transaction executed and failed: its fee was paid, nothing else changed.
    #[error("the {what} transaction {digest} executed and failed ({kind}): {description}")]
    Failed {
        what: &'static str,
        digest: String,
        kind: String,
        description: String,
    },
    #[error(transparent)]
    Storage(#[from] somatrain_storage::StorageError),
    /// Scoring, submitting or claiming as a data submitter (the localnet cycle).
    #[error(transparent)]
    Submit(#[from] somatrain_submit::SubmitError),
    #[error("training: {0}")]
    Train(#[from] somatrain_train::TrainError),
    #[error("{0}")]
    Io(String),
    #[error("unexpected chain state: {0}")]
    Chain(String),
    #[error("{0}")]
    Usage(String),
}
