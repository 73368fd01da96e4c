//! The SOMA network's gRPC surface, shared by our client and our localnet.
//!
//! Owns: the protobuf messages and service stubs of package `soma.rpc` (written here in
//! `proto/` from the reference tables and compiled with protox, so no system `protoc` is needed),
//! the BCS side services (faucet, admin, scoring) and their codec, and the conversions between
//! protobuf and the protocol types. Must not touch: sockets, storage, or chain rules; servers and
//! clients live in `somatrain-node` and `somatrain-client`.
//!
//! - [`proto`]: generated messages, `*_client` and `*_server` modules per service.
//! - [`side`]: the BCS request and response types, [`side::BcsCodec`], and the generated
//!   `faucet`, `admin` and `scoring` stubs.
//! - [`convert`]: protobuf ↔ protocol, naming the offending field on failure.
//! - [`view`]: chain state (epoch, validators, models, targets, executed transactions) as
//!   plain Rust, to and from its messages: the node writes them, the client reads them.
//! - [`codec::ProtoCodec`]: prost, with malformed messages refused as INVALID_ARGUMENT.

#![forbid(unsafe_code)]

pub mod codec;
pub mod convert;
pub mod side;
pub mod view;

/// Messages and services of package `soma.rpc`.
#[allow(clippy::all, missing_docs)]
pub mod proto {
    tonic::include_proto!("soma.rpc");
}

/// `/faucet.Faucet/RequestGas`, BCS bodies.
#[allow(clippy::all, missing_docs)]
pub mod faucet {
    include!(concat!(env!("OUT_DIR"), "/faucet.Faucet.rs"));
}

/// `/admin.Admin/AdvanceEpoch`, BCS bodies.
#[allow(clippy::all, missing_docs)]
pub mod admin {
    include!(concat!(env!("OUT_DIR"), "/admin.Admin.rs"));
}

/// `/scoring.Scoring/Score` and `/Health`, BCS bodies.
#[allow(clippy::all, missing_docs)]
pub mod scoring {
    include!(concat!(env!("OUT_DIR"), "/scoring.Scoring.rs"));
}

/// The largest message a server or client of ours decodes: tonic's default, which is also what
/// the SDK accepts.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
