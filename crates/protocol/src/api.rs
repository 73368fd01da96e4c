//! Request and response bodies of the localnet's HTTP API (`/v1`), shared by node and client.

use serde::{Deserialize, Serialize};

use crate::chain::Params;
use crate::crypto::Commitment;

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
/// `GET /v1/status`.
pub struct Status {
    pub epoch: u64,
    pub epoch_start_ms: u64,
    pub next_epoch_ms: u64,
    pub now_ms: u64,
    pub params: Params,
    pub total_supply: u64,
    pub accounted_supply: u64,
    pub faucet_reserve: u64,
    pub emission_pool: u64,
    pub target_state: crate::chain::TargetState,
    pub fees_collected: u64,
    pub burned: u64,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct FaucetRequest {
    pub address: String,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct EpochResponse {
    pub epoch: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct BlobInfo {
    pub name: String,
    pub size: u64,
    pub checksum: Commitment,
}

/// An error answer: a stable code and a readable message.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ErrorBody {
    pub error: String,
    pub message: String,
}
