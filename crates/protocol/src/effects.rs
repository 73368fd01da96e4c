//! What executing a transaction did: status, fee, and every object it read, wrote or deleted.
//!
//! Clients see effects only as protobuf (`TransactionEffects`), so these are plain domain types;
//! the error kinds carry the network's wire numbers.

use serde::{Deserialize, Serialize};

use crate::ids::{ObjectDigest, ObjectId, TxDigest};
use crate::object::Owner;

macro_rules! error_kinds {
    ($($(#[$doc:meta])* $name:ident = $value:literal),* $(,)?) => {
        /// `ExecutionErrorKind`, with the network's wire values.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[repr(i32)]
        pub enum ExecutionErrorKind {
            $($(#[$doc])* $name = $value),*
        }

        impl ExecutionErrorKind {
            pub const ALL: &'static [ExecutionErrorKind] = &[$(ExecutionErrorKind::$name),*];

            /// The kind of a wire value; values this build does not know are `Unknown`.
            pub fn from_wire(value: i32) -> Self {
                match value {
                    $($value => ExecutionErrorKind::$name,)*
                    _ => ExecutionErrorKind::Unknown,
                }
            }

            /// The network's `CamelCase` name, as the SDK prints it (`Failure { error: <Kind> }`).
            pub fn name(self) -> &'static str {
                match self {
                    $(ExecutionErrorKind::$name => stringify!($name)),*
                }
            }
        }
    };
}

error_kinds! {
    Unknown = 0,
    InsufficientGas = 1,
    InvalidOwnership = 2,
    ObjectNotFound = 3,
    InvalidObjectType = 4,
    InvalidTransactionType = 5,
    InvalidArguments = 6,
    DuplicateValidator = 7,
    NotAValidator = 8,
    ValidatorAlreadyRemoved = 9,
    AdvancedToWrongEpoch = 10,
    ModelNotFound = 11,
    NotModelOwner = 12,
    ModelNotActive = 13,
    InsufficientCoinBalance = 14,
    CoinBalanceOverflow = 15,
    ValidatorNotFound = 16,
    StakingPoolNotFound = 18,
    CannotReportOneself = 19,
    ReportRecordNotFound = 20,
    InputObjectDeleted = 21,
    CertificateDenied = 22,
    SharedObjectCongestion = 23,
    OtherError = 24,
    ModelNotPending = 25,
    ModelAlreadyInactive = 26,
    ModelRevealEpochMismatch = 27,
    ModelEmbeddingCommitmentMismatch = 28,
    ModelNoPendingUpdate = 29,
    ModelArchitectureVersionMismatch = 30,
    ModelCommissionRateTooHigh = 31,
    ModelMinStakeNotMet = 32,
    NoActiveModels = 33,
    TargetNotFound = 34,
    TargetNotOpen = 35,
    TargetExpired = 36,
    TargetNotFilled = 37,
    /// Used for "audit window still open".
    ChallengeWindowOpen = 38,
    TargetAlreadyClaimed = 39,
    ModelNotInTarget = 40,
    EmbeddingDimensionMismatch = 41,
    DistanceExceedsThreshold = 42,
    InsufficientBond = 43,
    InsufficientEmissionBalance = 44,
    /// Used for "audit window closed".
    ChallengeWindowClosed = 45,
    DataExceedsMaxSize = 52,
    ChallengeAlreadyExists = 53,
    DuplicateValidatorMetadata = 54,
    MissingProofOfPossession = 55,
    InvalidProofOfPossession = 56,
    ModelDecryptionKeyCommitmentMismatch = 57,
}

impl ExecutionErrorKind {
    pub fn wire(self) -> i32 {
        self as i32
    }
}

/// Why an executed transaction failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecutionFailure {
    pub kind: ExecutionErrorKind,
    pub description: String,
    /// The object the failure is about, where there is one.
    pub object_id: Option<ObjectId>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExecutionStatus {
    Success,
    Failure(ExecutionFailure),
}

impl ExecutionStatus {
    pub fn is_success(&self) -> bool {
        matches!(self, ExecutionStatus::Success)
    }
}

/// The fee charged, in shannons; `total_fee` is the sum of the other three.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TransactionFee {
    pub base_fee: u64,
    pub operation_fee: u64,
    pub value_fee: u64,
    pub total_fee: u64,
}

/// An object's state before or after a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectState {
    pub version: u64,
    pub digest: ObjectDigest,
    pub owner: Owner,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum IdOperation {
    None,
    Created,
    Deleted,
}

/// One object the transaction wrote, created or deleted. `None` input means it did not exist;
/// `None` output means it no longer exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangedObject {
    pub id: ObjectId,
    pub input: Option<ObjectState>,
    pub output: Option<ObjectState>,
    pub id_operation: IdOperation,
}

/// A shared object read but not written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnchangedSharedObject {
    pub id: ObjectId,
    pub version: u64,
    pub digest: ObjectDigest,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransactionEffects {
    pub status: ExecutionStatus,
    pub executed_epoch: u64,
    pub fee: TransactionFee,
    pub transaction_digest: TxDigest,
    /// Index of the gas coin in `changed_objects`.
    pub gas_object_index: Option<u32>,
    pub dependencies: Vec<TxDigest>,
    /// The version every written object now has.
    pub lamport_version: u64,
    pub changed_objects: Vec<ChangedObject>,
    pub unchanged_shared_objects: Vec<UnchangedSharedObject>,
}

/// A signed amount by which an address's balance moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalanceChange {
    pub address: crate::keys::Address,
    pub amount: i128,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_kinds_keep_their_wire_numbers() {
        assert_eq!(
            ExecutionErrorKind::from_wire(57).name(),
            "ModelDecryptionKeyCommitmentMismatch"
        );
        assert_eq!(ExecutionErrorKind::ChallengeWindowOpen.wire(), 38);
        assert_eq!(
            ExecutionErrorKind::from_wire(17),
            ExecutionErrorKind::Unknown
        );
        assert_eq!(
            ExecutionErrorKind::from_wire(1000),
            ExecutionErrorKind::Unknown
        );
        for kind in ExecutionErrorKind::ALL {
            assert_eq!(ExecutionErrorKind::from_wire(kind.wire()), *kind);
        }
    }
}
