//! SOMA protocol types and crypto, byte-compatible with the network and the official SDK.
//!
//! Owns: the network's wire types and their BCS encoding (ids, digests, `TransactionData` with
//! all 26 kinds, the signed envelope, objects, effects, `SomaTensor`), every hash the protocol
//! defines, account keys and signing, and the weights encryption and commitments. Everything
//! here is computation over bytes: it opens no file or socket and reads no clock (streams come
//! in as the caller's `Read`/`Write`, fresh keys from the OS random generator), and holds no
//! model code. The
//! protobuf forms live in `somatrain-rpc`; storage schemas live with the store.
//!
//! - [`ids`]: [`ObjectId`], [`TxDigest`], [`ObjectDigest`] and their text forms.
//! - [`hash`]: the salts, the intent prefix and Blake2b-256.
//! - [`transaction`]: [`TransactionData`], [`TransactionKind`], [`SignedTransaction`].
//! - [`object`]: [`Object`], coins, `StakedSoma`, `Target`, owners and object digests.
//! - [`effects`]: execution status, the network's error kinds, fees and changed objects.
//! - [`tensor`]: [`SomaTensor`], how embeddings and scores travel.
//! - [`keys`]: Ed25519 key pairs and addresses.
//! - [`crypto`]: AES-256-CTR weights encryption and Blake2b-256 [`Commitment`]s.
//! - [`assignment`]: the chain's rule for which models a new target goes to.

#![forbid(unsafe_code)]

pub mod assignment;
pub mod crypto;
pub mod effects;
#[cfg(feature = "fixtures")]
pub mod fixtures;
pub mod hash;
pub mod ids;
pub mod keys;
pub mod object;
pub mod tensor;
pub mod transaction;

pub use crypto::{Commitment, CryptoError, EncryptionKey};
pub use ids::{Digest, IdError, ObjectDigest, ObjectId, TxDigest};
pub use keys::{Address, Keypair};
pub use object::{ModelState, Object, ObjectType, Owner};
pub use tensor::SomaTensor;
pub use transaction::{
    Manifest, ObjectRef, SignedTransaction, TransactionData, TransactionKind, UserSignature,
};

/// 1 SOMA = 10^9 shannons, the unit every amount on chain is counted in.
pub const SHANNONS_PER_SOMA: u64 = 1_000_000_000;

/// Shannons as decimal SOMA, exact to the shannon (`1.500000000`).
pub fn format_soma(shannons: u64) -> String {
    format!(
        "{}.{:09}",
        shannons / SHANNONS_PER_SOMA,
        shannons % SHANNONS_PER_SOMA
    )
}
