//! SOMA protocol types and crypto, byte-compatible with the official SDK.
//!
//! Owns: the weights encryption (AES-256-CTR with a zero IV and a fresh 32-byte key per commit),
//! Blake2b-256 commitments rendered in Base58, and the byte encoding of embeddings that the
//! network hashes. Everything here is pure computation over bytes and readers: no model code,
//! no networking, no files opened by path.
//!
//! - [`crypto::EncryptionKey`]: a 32-byte key, Base58 in and out, never printed by `Debug`.
//! - [`crypto::encrypt_stream`] / [`crypto::decrypt_stream`]: stream a file through the cipher.
//! - [`crypto::Commitment`]: Blake2b-256 digest, Base58 on the wire.
//! - [`crypto::embedding_commitment`]: the commitment of an `f32` embedding.

pub mod crypto;

pub use crypto::{Commitment, CryptoError, EncryptionKey};
