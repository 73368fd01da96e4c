//! Publishing weights and the unattended loop that keeps a model competitive.
//!
//! Owns the run directory's journal ([`journal`]), the journaled create/commit/reveal steps
//! ([`publisher`]), the train -> commit -> reveal loop ([`run_loop`]) and its `/metrics`
//! ([`metrics`]). It drives the trainer, the storage and the node's client; it does not
//! implement any of them, and it never logs a secret (keys live only in the 0600 journal).

pub mod journal;
pub mod metrics;
pub mod publisher;
pub mod run_loop;

pub use journal::{Journal, Phase, write_private_file};
pub use metrics::Metrics;
pub use publisher::{Publisher, RevealWindow};
pub use run_loop::{EngineFactory, EpochAdvance, LoopConfig};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("journal: {0}")]
    Journal(String),
    #[error(transparent)]
    Client(#[from] somatrain_client::ClientError),
    #[error(transparent)]
    Storage(#[from] somatrain_storage::StorageError),
    #[error("training: {0}")]
    Train(#[from] somatrain_train::TrainError),
    #[error("{0}")]
    Io(String),
    #[error("unexpected chain state: {0}")]
    Chain(String),
    #[error("{0}")]
    Usage(String),
}
