//! The localnet: a single-node network that follows SOMA's rules and speaks the network's own
//! protocol.
//!
//! - [`ledger`]: the object chain (coins, `StakedSoma`, shared targets, the model registry),
//!   execution with the network's gas and fees, epoch changes. Pure: no IO, no clock.
//! - [`localnet::Localnet`]: the ledger made durable in redb, group commit, checkpoints.
//! - [`grpc`]: the `soma.rpc` services and the BCS side services (faucet, admin, scoring through
//!   the [`grpc::ScoringBackend`] trait the binary implements with its scorer).
//! - [`views`]: the ledger as the network shows it, in the views the client reads back
//!   (`somatrain_rpc::view`).
//! - [`blobs`]: the HTTP blob host.
//! - [`idle`]: connections closed after a while without traffic.
//! - [`limits`]: connections per peer and in all; the accept loop never spins.
//! - [`validator_keys`]: the localnet's validators' keys, made at genesis.
//! - [`weight_checks`]: the validators fetch and check each revealed model's weights before the
//!   epoch closes and report failures (loading is the binary's [`weight_checks::WeightChecker`]).
//!
//! Of this workspace it depends only on the protocol types, the rpc crate and the store (and
//! outside it on crates for the server, BLS keys and persistent maps): it never trains or scores
//! a model itself, and it never depends on the client.

#![forbid(unsafe_code)]

pub mod blobs;
pub mod grpc;
pub mod idle;
pub mod ledger;
pub mod limits;
pub mod localnet;
pub mod validator_keys;
pub mod views;
pub mod weight_checks;
