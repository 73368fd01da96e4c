//! Account keys and addresses: Ed25519, address = Blake2b-256(0x00 || public key), as on SOMA.

use std::fmt;
use std::str::FromStr;

use blake2::digest::consts::U32;
use blake2::{Blake2b, Digest};
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use rand::TryRngCore;

/// Signature-scheme flag of Ed25519 in SOMA addresses and signatures.
pub const ED25519_FLAG: u8 = 0x00;
const ENCODED_KEY_HRP: &str = "somaprivkey";
const ENCODED_KEY_PREFIX: &str = "somaprivkey1";

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("secret key must be 32 bytes (64 hex characters, optionally 0x-prefixed, or Base58)")]
    BadSecret,
    #[error("public key is not a valid Ed25519 point")]
    BadPublicKey,
    #[error("an address is 1 to 64 hex digits, optionally 0x-prefixed")]
    BadAddress,
    #[error("signature does not verify")]
    BadSignature,
}

/// A 32-byte SOMA address, shown as lower-case hex without a prefix (as the SDK prints it).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Address(pub [u8; 32]);

impl Address {
    pub fn of_public_key(public: &[u8; 32]) -> Self {
        let mut hasher = Blake2b::<U32>::new();
        hasher.update([ED25519_FLAG]);
        hasher.update(public);
        Address(hasher.finalize().into())
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Address({self})")
    }
}

impl FromStr for Address {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        crate::ids::parse_hex32(s)
            .map(Address)
            .map_err(|_| KeyError::BadAddress)
    }
}

crate::ids::raw_id_serde!(Address);

/// An Ed25519 key pair. `Debug` never shows the secret.
#[derive(Clone)]
pub struct Keypair(SigningKey);

impl Keypair {
    pub fn generate() -> Self {
        let mut secret = [0u8; 32];
        rand::rngs::OsRng
            .try_fill_bytes(&mut secret)
            .expect("operating system RNG failed");
        Keypair(SigningKey::from_bytes(&secret))
    }

    pub fn from_secret(secret: [u8; 32]) -> Self {
        Keypair(SigningKey::from_bytes(&secret))
    }

    /// Parses the SDK's forms: Bech32 `somaprivkey1…`, 64 hex characters (optionally
    /// `0x`-prefixed) or Base58 of 32 bytes. The error never echoes the input.
    pub fn from_secret_text(text: &str) -> Result<Self, KeyError> {
        let t = text.trim();
        if t.starts_with(ENCODED_KEY_PREFIX) {
            let (hrp, data) = bech32::decode(t).map_err(|_| KeyError::BadSecret)?;
            return match data.split_first() {
                Some((&ED25519_FLAG, secret)) if hrp.as_str() == ENCODED_KEY_HRP => {
                    let secret: [u8; 32] = secret.try_into().map_err(|_| KeyError::BadSecret)?;
                    Ok(Self::from_secret(secret))
                }
                _ => Err(KeyError::BadSecret),
            };
        }
        let hex_part = t.strip_prefix("0x").unwrap_or(t);
        let bytes = if hex_part.len() == 64 {
            hex::decode(hex_part).map_err(|_| KeyError::BadSecret)?
        } else {
            bs58::decode(t)
                .into_vec()
                .map_err(|_| KeyError::BadSecret)?
        };
        let secret: [u8; 32] = bytes.try_into().map_err(|_| KeyError::BadSecret)?;
        Ok(Self::from_secret(secret))
    }

    /// The SDK's `to_encoded()` form: Bech32 of the scheme flag and the secret, `somaprivkey1…`.
    pub fn to_encoded(&self) -> String {
        let mut data = vec![ED25519_FLAG];
        data.extend_from_slice(&self.0.to_bytes());
        let hrp = bech32::Hrp::parse(ENCODED_KEY_HRP).expect("valid prefix");
        bech32::encode::<bech32::Bech32>(hrp, &data).expect("33 bytes fit Bech32")
    }

    /// The secret as 64 hex characters (the SDK's `to_secret_key()` form).
    pub fn secret_hex(&self) -> String {
        hex::encode(self.0.to_bytes())
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.0.verifying_key().to_bytes()
    }

    pub fn address(&self) -> Address {
        Address::of_public_key(&self.public_key())
    }

    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.0.sign(message).to_bytes()
    }
}

impl fmt::Debug for Keypair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Keypair({}, secret <redacted>)", self.address())
    }
}

/// Verifies an Ed25519 signature (strict: rejects malleable and small-order forms).
pub fn verify(public: &[u8; 32], message: &[u8], signature: &[u8; 64]) -> Result<(), KeyError> {
    let key = VerifyingKey::from_bytes(public).map_err(|_| KeyError::BadPublicKey)?;
    let sig = ed25519_dalek::Signature::from_bytes(signature);
    key.verify_strict(message, &sig)
        .map_err(|_| KeyError::BadSignature)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The SDK's own check: seed 00..1f gives this public key and address.
    #[test]
    fn address_matches_the_sdk() {
        let seed: [u8; 32] = std::array::from_fn(|i| i as u8);
        let kp = Keypair::from_secret(seed);
        assert_eq!(
            hex::encode(kp.public_key()),
            "03a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8"
        );
        assert_eq!(
            kp.address().to_string(),
            "160179a1565ea7cff27ead23f54cc7f50893bf58155cd7285156e57afa31c3ac"
        );
        let again = Keypair::from_secret_text(&format!("0x{}", kp.secret_hex())).unwrap();
        assert_eq!(again.address(), kp.address());
    }

    #[test]
    fn signatures_verify_and_tampering_fails() {
        let kp = Keypair::generate();
        let sig = kp.sign(b"message");
        assert!(verify(&kp.public_key(), b"message", &sig).is_ok());
        assert_eq!(
            verify(&kp.public_key(), b"messagf", &sig),
            Err(KeyError::BadSignature)
        );
        assert!(!format!("{kp:?}").contains(&kp.secret_hex()));
    }
}
