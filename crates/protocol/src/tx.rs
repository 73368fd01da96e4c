//! Signed transactions of the localnet and the objects they create.
//!
//! A transaction is a JSON body signed as SOMA signs: the Ed25519 signature covers
//! Blake2b-256(intent `[0, 0, 1]` || body bytes). The signed envelope carries the body as the
//! exact text that was signed, so no re-serialisation (of floats, say) can break a signature.
//! The digest is Blake2b-256(`"TransactionData::"` || body bytes) and object ids are
//! Blake2b-256(digest || n as u64 LE), shown `0x`-prefixed, as on the network.

use blake2::digest::consts::U32;
use blake2::{Blake2b, Digest};
use serde::{Deserialize, Serialize};

use crate::crypto::Commitment;
pub use crate::ids::{ObjectId, TxDigest};
use crate::keys::{Address, KeyError, Keypair, verify};

pub const SHANNONS_PER_SOMA: u64 = 1_000_000_000;
/// Intent of a user transaction: scope TransactionData, version V0, app Soma.
pub const INTENT: [u8; 3] = [0, 0, 1];
/// Largest accepted body, in bytes (a V1 embedding in JSON is about 25 KB).
pub const MAX_BODY_BYTES: usize = 256 * 1024;

impl TxDigest {
    /// The digest of a JSON body (the localnet's legacy transactions).
    pub fn of_body(body: &[u8]) -> Self {
        TxDigest::of_transaction_bytes(body)
    }
}

/// Where published weights (or submitted data) live, and what they must hash to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub url: String,
    /// Blake2b-256 of the file (the encrypted file, for weights).
    pub checksum: Commitment,
    pub size: u64,
}

/// What a transaction asks for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum TxKind {
    Transfer {
        to: Address,
        amount: u64,
    },
    CreateModel {
        stake: u64,
        commission_bps: u64,
        architecture_version: u64,
    },
    CommitModel {
        model_id: ObjectId,
        manifest: Manifest,
        weights_commitment: Commitment,
        embedding_commitment: Commitment,
        decryption_key_commitment: Commitment,
    },
    RevealModel {
        model_id: ObjectId,
        /// The AES-256 key, Base58.
        decryption_key: String,
        embedding: Vec<f32>,
    },
    DeactivateModel {
        model_id: ObjectId,
    },
    SetCommission {
        model_id: ObjectId,
        commission_bps: u64,
    },
    AddStake {
        model_id: ObjectId,
        amount: u64,
    },
    WithdrawStake {
        model_id: ObjectId,
        amount: u64,
    },
    /// Claims a target: data (by manifest) that the chosen model embeds within the threshold.
    /// The bond (size x bond per byte) is held until the claim.
    SubmitData {
        target_id: ObjectId,
        manifest: Manifest,
        model_id: ObjectId,
        embedding: Vec<f32>,
        distance: f32,
        loss: f32,
    },
    /// Settles a filled target after its audit window, or an expired open one.
    ClaimRewards {
        target_id: ObjectId,
    },
}

/// The signed part of a transaction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TxBody {
    pub sender: Address,
    /// Must equal the sender's transaction count: each body can run once.
    pub sequence: u64,
    pub kind: TxKind,
}

/// A transaction as sent: the exact body text, the signer's public key and the signature.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedTx {
    pub body: String,
    /// Hex of the 32-byte Ed25519 public key.
    pub public_key: String,
    /// Hex of the 64-byte signature.
    pub signature: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvelopeError {
    #[error("transaction body is {0} bytes; the limit is {MAX_BODY_BYTES}")]
    TooLarge(usize),
    #[error("malformed public key or signature encoding")]
    Encoding,
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("malformed transaction body: {0}")]
    Body(String),
    #[error("sender {sender} is not the address of the signing key ({signer})")]
    WrongSender { sender: Address, signer: Address },
}

fn signing_message(body: &[u8]) -> [u8; 32] {
    let mut h = Blake2b::<U32>::new();
    h.update(INTENT);
    h.update(body);
    h.finalize().into()
}

impl SignedTx {
    pub fn sign(keypair: &Keypair, body: &TxBody) -> Self {
        let text = serde_json::to_string(body).expect("bodies serialise");
        let signature = keypair.sign(&signing_message(text.as_bytes()));
        SignedTx {
            body: text,
            public_key: hex::encode(keypair.public_key()),
            signature: hex::encode(signature),
        }
    }

    pub fn digest(&self) -> TxDigest {
        TxDigest::of_body(self.body.as_bytes())
    }

    /// Checks size, signature and sender, and returns the parsed body.
    pub fn verify(&self) -> Result<TxBody, EnvelopeError> {
        if self.body.len() > MAX_BODY_BYTES {
            return Err(EnvelopeError::TooLarge(self.body.len()));
        }
        let public: [u8; 32] = hex::decode(&self.public_key)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or(EnvelopeError::Encoding)?;
        let signature: [u8; 64] = hex::decode(&self.signature)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or(EnvelopeError::Encoding)?;
        verify(&public, &signing_message(self.body.as_bytes()), &signature)?;
        let body: TxBody =
            serde_json::from_str(&self.body).map_err(|e| EnvelopeError::Body(e.to_string()))?;
        let signer = Address::of_public_key(&public);
        if body.sender != signer {
            return Err(EnvelopeError::WrongSender {
                sender: body.sender,
                signer,
            });
        }
        Ok(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(kp: &Keypair) -> TxBody {
        TxBody {
            sender: kp.address(),
            sequence: 0,
            kind: TxKind::Transfer {
                to: Address([1; 32]),
                amount: 5,
            },
        }
    }

    #[test]
    fn signed_transactions_verify_and_tampering_is_caught() {
        let kp = Keypair::generate();
        let tx = SignedTx::sign(&kp, &body(&kp));
        assert_eq!(tx.verify().unwrap(), body(&kp));
        let mut tampered = tx.clone();
        tampered.body = tampered.body.replace("\"amount\":5", "\"amount\":6");
        assert_eq!(
            tampered.verify(),
            Err(EnvelopeError::Key(KeyError::BadSignature))
        );
        let other = Keypair::generate();
        let forged = SignedTx::sign(&other, &body(&kp));
        assert!(matches!(
            forged.verify(),
            Err(EnvelopeError::WrongSender { .. })
        ));
        let mut big = tx.clone();
        big.body = " ".repeat(MAX_BODY_BYTES + 1);
        assert!(matches!(big.verify(), Err(EnvelopeError::TooLarge(_))));
    }

    #[test]
    fn ids_round_trip_as_text() {
        let d = TxDigest::of_body(b"x");
        assert_eq!(d.to_string().parse::<TxDigest>().unwrap(), d);
        let id = ObjectId::derive(&d, 0);
        assert!(id.to_string().starts_with("0x"));
        assert_eq!(id.to_string().parse::<ObjectId>().unwrap(), id);
        assert_ne!(ObjectId::derive(&d, 1), id);
    }
}
