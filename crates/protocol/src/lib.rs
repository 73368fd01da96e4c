//! SOMA protocol types and crypto, byte-compatible with the official SDK.
//!
//! Owns: the weights encryption (AES-256-CTR with a zero IV and a fresh 32-byte key per commit),
//! Blake2b-256 commitments rendered in Base58, the byte encoding of embeddings that the
//! network hashes, account keys and addresses, and the localnet's signed transactions. Everything here is pure computation over bytes and readers: no model code,
//! no networking, no files opened by path.
//!
//! - [`crypto::EncryptionKey`]: a 32-byte key, Base58 in and out, never printed by `Debug`.
//! - [`crypto::encrypt_stream`] / [`crypto::decrypt_stream`]: stream a file through the cipher.
//! - [`crypto::Commitment`]: Blake2b-256 digest, Base58 on the wire.
//! - [`crypto::embedding_commitment`]: the commitment of an `f32` embedding.
//! - [`keys`]: Ed25519 key pairs and SOMA addresses.
//! - [`tx`]: signed transactions, digests and object ids of the localnet.

pub mod api;
pub mod chain;
pub mod crypto;
pub mod keys;
pub mod tx;

pub use crypto::{Commitment, CryptoError, EncryptionKey};
pub use keys::{Address, Keypair};
pub use tx::{ObjectId, SignedTx, TxBody, TxDigest, TxKind};
