//! Resumable training of V1-architecture weights on a local corpus.
//!
//! Owns the training loop and what it leaves behind: the corpus stream ([`corpus`]), AdamW and
//! its schedule ([`optim`]), crash-safe checkpoints ([`checkpoint`]), the step history that
//! survives a kill ([`history`]) and the round artifacts
//! (publishable weights, held-out score, registry embedding) written by [`trainer`], which
//! refuses a CPU micro-batch larger than the machine's memory ([`host_memory`]) before it writes
//! anything.
//! The math of a step lives in `somatrain-model` (`cpu::train`); this crate never touches the
//! network or the chain.

#![forbid(unsafe_code)]

pub mod checkpoint;
pub mod corpus;
pub mod history;
pub mod host_memory;
pub mod optim;
pub mod trainer;

pub use trainer::{
    GradientEngine, RunSummary, StopRequest, TrainError, TrainSettings, Until, run, run_with,
};
