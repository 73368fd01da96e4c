//! Every hash the protocol defines, in one place: the salts, the intent prefix and Blake2b-256.
//!
//! - transaction digest = Blake2b-256(`"TransactionData::"` ‖ BCS(TransactionData))
//! - object digest = Blake2b-256(`"Object::"` ‖ BCS(object))
//! - signing message = Blake2b-256(intent `00 00 01` ‖ BCS(TransactionData))
//! - derived object id = Blake2b-256(transaction digest ‖ n as u64 LE)
//! - address = Blake2b-256(scheme flag `00` ‖ Ed25519 public key)

use blake2::digest::consts::U32;
use blake2::{Blake2b, Digest};

pub const TRANSACTION_DATA_SALT: &[u8] = b"TransactionData::";
pub const OBJECT_SALT: &[u8] = b"Object::";
/// Intent of a user transaction: scope TransactionData (0), version V0 (0), app Soma (1).
pub const TRANSACTION_INTENT: [u8; 3] = [0, 0, 1];

/// Unkeyed Blake2b with a 32-byte output over the concatenation of `parts`.
pub fn blake2b256(parts: &[&[u8]]) -> [u8; 32] {
    let mut hasher = Blake2b::<U32>::new();
    for part in parts {
        hasher.update(part);
    }
    hasher.finalize().into()
}
