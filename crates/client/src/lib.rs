//! Clients of a SOMA network.
//!
//! - [`chain::ChainClient`]: the network's own protocol (gRPC and the BCS side services), for
//!   the public testnet and `somatrain localnet` alike.
//! - [`view`]: what commands read (the epoch and its clock, models, targets) as plain values.
//! - [`http_client`]: the HTTP client (rustls) used for weights and data downloads, from
//!   `somatrain-http` (re-exported here).
//!
//! Owns request building, coin selection, waiting for checkpoints and the mapping of answers to
//! refused / unavailable / executed-but-failed. It never touches the disk.

#![forbid(unsafe_code)]

pub mod chain;
pub mod view;

pub use somatrain_http::{http_client, init_tls};
