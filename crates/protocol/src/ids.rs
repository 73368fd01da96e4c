//! Fixed-size identifiers: object ids and the 32-byte digests, with the network's text forms.
//!
//! BCS: an [`ObjectId`] (like an [`Address`](crate::Address)) is 32 raw bytes; every digest is a
//! byte string, `0x20` then 32 bytes. In human-readable formats (JSON) ids are hex and digests
//! Base58, so the same types serve the wire and our JSON files.

use std::fmt;
use std::str::FromStr;

use crate::hash::blake2b256;

/// Parses up to 64 hex digits, with or without `0x`, left-padded with zeros: how the network
/// reads addresses and object ids (`0x5` is the system state's id).
pub fn parse_hex32(text: &str) -> Result<[u8; 32], IdError> {
    let text = text.trim();
    let digits = text
        .strip_prefix("0x")
        .or_else(|| text.strip_prefix("0X"))
        .unwrap_or(text);
    if digits.is_empty() || digits.len() > 64 {
        return Err(IdError::Hex(digits.len()));
    }
    let padded = format!("{digits:0>64}");
    let mut out = [0u8; 32];
    hex::decode_to_slice(&padded, &mut out).map_err(|_| IdError::NotHex)?;
    Ok(out)
}

/// Decodes Base58 that must hold exactly 32 bytes (digests, chain ids).
pub fn parse_base58_32(text: &str) -> Result<[u8; 32], IdError> {
    let text = text.trim();
    // 32 bytes take at most 44 Base58 characters; refuse longer input before decoding it.
    if text.len() > 44 {
        return Err(IdError::Base58Length(text.len()));
    }
    let bytes = bs58::decode(text)
        .into_vec()
        .map_err(|_| IdError::NotBase58)?;
    let len = bytes.len();
    bytes.try_into().map_err(|_| IdError::DigestBytes(len))
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("expected 1 to 64 hex digits (optionally 0x-prefixed), got {0}")]
    Hex(usize),
    #[error("not hexadecimal")]
    NotHex,
    #[error("not Base58")]
    NotBase58,
    #[error("a Base58 digest has at most 44 characters, got {0}")]
    Base58Length(usize),
    #[error("a digest must decode to 32 bytes, got {0}")]
    DigestBytes(usize),
}

/// A 32-byte object id (coins, models, targets, staking pools).
///
/// `Display` is `0x` + 64 hex, as the network prints `model_id` and `target_id`; [`ObjectId::hex`]
/// is the bare form it uses in `Object.object_id` and object references.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ObjectId(pub [u8; 32]);

impl ObjectId {
    /// The system state object, `0x…05`.
    pub const SYSTEM_STATE: ObjectId = {
        let mut bytes = [0u8; 32];
        bytes[31] = 5;
        ObjectId(bytes)
    };

    /// `ObjectID::derive_id`: the id of the `n`-th object a transaction creates,
    /// Blake2b-256(digest ‖ n as u64 LE).
    pub fn derive(digest: &TxDigest, n: u64) -> Self {
        ObjectId(blake2b256(&[&digest.0, &n.to_le_bytes()]))
    }

    /// 64 lowercase hex digits without `0x`.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "0x{}", hex::encode(self.0))
    }
}

impl fmt::Debug for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ObjectId({self})")
    }
}

impl FromStr for ObjectId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_hex32(s).map(ObjectId)
    }
}

macro_rules! digest_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(pub [u8; 32]);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&bs58::encode(self.0).into_string())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({})"), self)
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                parse_base58_32(s).map($name)
            }
        }

        crate::ids::byte_string_serde!($name);
    };
}

/// Serde for a 32-byte digest: Base58 text when human-readable, a byte string (`0x20` + 32
/// bytes in BCS) otherwise.
macro_rules! byte_string_serde {
    ($name:ty) => {
        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                if s.is_human_readable() {
                    s.serialize_str(&self.to_string())
                } else {
                    s.serialize_bytes(&self.0)
                }
            }
        }
        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                use serde::de::Error;
                if d.is_human_readable() {
                    let text = <String as serde::Deserialize>::deserialize(d)?;
                    text.parse().map_err(D::Error::custom)
                } else {
                    let bytes = <serde_bytes::ByteBuf as serde::Deserialize>::deserialize(d)?;
                    let len = bytes.len();
                    let array: [u8; 32] = bytes.into_vec().try_into().map_err(|_| {
                        D::Error::custom(format!("a digest must be 32 bytes, got {len}"))
                    })?;
                    Ok(Self(array))
                }
            }
        }
    };
}
pub(crate) use byte_string_serde;

/// Serde for a 32-byte id: hex text when human-readable, 32 raw bytes (no length) otherwise.
macro_rules! raw_id_serde {
    ($name:ty) => {
        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                if s.is_human_readable() {
                    s.serialize_str(&self.to_string())
                } else {
                    <[u8; 32] as serde::Serialize>::serialize(&self.0, s)
                }
            }
        }
        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                use serde::de::Error;
                if d.is_human_readable() {
                    let text = <String as serde::Deserialize>::deserialize(d)?;
                    text.parse().map_err(D::Error::custom)
                } else {
                    <[u8; 32] as serde::Deserialize>::deserialize(d).map(Self)
                }
            }
        }
    };
}
pub(crate) use raw_id_serde;

raw_id_serde!(ObjectId);

digest_type!(
    /// Blake2b-256(`"TransactionData::"` ‖ BCS(TransactionData)), shown as Base58.
    TxDigest
);
digest_type!(
    /// Blake2b-256(`"Object::"` ‖ BCS(object)), shown as Base58.
    ObjectDigest
);
digest_type!(
    /// A 32-byte value carried as a digest: checkpoint digests, the chain id, consensus digests.
    Digest
);

impl TxDigest {
    /// The digest of BCS-encoded `TransactionData`.
    pub fn of_transaction_bytes(bcs: &[u8]) -> Self {
        TxDigest(blake2b256(&[crate::hash::TRANSACTION_DATA_SALT, bcs]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_ids_parse_with_or_without_prefix_and_leading_zeros() {
        let five = ObjectId::SYSTEM_STATE;
        for text in ["0x5", "5", "0x05", &five.hex(), &five.to_string(), " 0X5 "] {
            assert_eq!(text.parse::<ObjectId>().unwrap(), five, "{text}");
        }
        assert_eq!(five.hex().len(), 64);
        assert!(five.to_string().starts_with("0x000"));
        for bad in ["", "0x", "0xg1", &"1".repeat(65)] {
            assert!(bad.parse::<ObjectId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn digests_are_base58_of_exactly_32_bytes() {
        let d = TxDigest([7; 32]);
        assert_eq!(d.to_string().parse::<TxDigest>().unwrap(), d);
        let short = bs58::encode([1u8; 31]).into_string();
        assert_eq!(short.parse::<TxDigest>(), Err(IdError::DigestBytes(31)));
        assert_eq!("0OIl".parse::<TxDigest>(), Err(IdError::NotBase58));
        assert!(matches!(
            "1".repeat(100).parse::<TxDigest>(),
            Err(IdError::Base58Length(100))
        ));
    }

    #[test]
    fn bcs_forms_are_raw_ids_and_length_prefixed_digests() {
        let id = ObjectId([0xaa; 32]);
        assert_eq!(bcs::to_bytes(&id).unwrap(), vec![0xaa; 32]);
        let digest = ObjectDigest([0xdd; 32]);
        let bytes = bcs::to_bytes(&digest).unwrap();
        assert_eq!(bytes[0], 0x20);
        assert_eq!(&bytes[1..], &[0xdd; 32]);
        assert_eq!(bcs::from_bytes::<ObjectDigest>(&bytes).unwrap(), digest);
        let mut short = bytes.clone();
        short[0] = 31;
        short.pop();
        assert!(bcs::from_bytes::<ObjectDigest>(&short).is_err());
        assert_eq!(
            serde_json::to_string(&id).unwrap(),
            format!("\"{id}\""),
            "JSON keeps the text form"
        );
    }
}
