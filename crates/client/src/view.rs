//! What commands read from a chain, in plain Rust: the epoch and its clock, validators, models
//! as the registry holds them, targets and executed transactions. The types and both directions
//! of their protobuf mapping live in [`somatrain_rpc::view`], shared with the node that writes
//! them; a malformed reply reaches callers as [`ChainError::Protocol`] naming the field.

pub use somatrain_protocol::ModelState;
pub use somatrain_rpc::view::{
    ChainParams, CommitView, Commitments, EpochView, Executed, ModelView, TargetView,
    ValidatorKeysView, ValidatorView,
};

use crate::chain::ChainError;

impl From<somatrain_rpc::convert::FieldError> for ChainError {
    fn from(e: somatrain_rpc::convert::FieldError) -> Self {
        ChainError::Protocol(e.to_string())
    }
}
