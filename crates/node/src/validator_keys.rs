//! The localnet's validators' keys: made at genesis, kept in `<data dir>/validators/` (one file
//! per validator, mode 0600, written atomically), read back by the node's own validator duties
//! (the weight checks that send `ReportModel` from a validator's account).
//!
//! Each validator has the network's four keys: an Ed25519 account key (its address), a
//! BLS12-381 protocol key (min-sig: 96-byte public keys, 48-byte signatures) with its proof of
//! possession, and Ed25519 network and worker keys.

use std::io::Write;
use std::path::{Path, PathBuf};

use rand::TryRngCore;
use serde::{Deserialize, Serialize};
use somatrain_protocol::hash::blake2b256;
use somatrain_protocol::{Address, Keypair, ObjectId};

use crate::ledger::validators::{GENESIS_VALIDATOR_STAKE, Validator, ValidatorPool};

/// The domain separation tag of the network's BLS signatures (min-sig, hash to G1).
pub const BLS_DST: &[u8] = b"BLS_SIG_BLS12381G1_XMD:SHA-256_SSWU_RO_NUL_";
/// `IntentScope::ProofOfPossession`, version 0, app 0 (SOMA).
const POP_INTENT: [u8; 3] = [8, 0, 0];
/// Default commission of a localnet validator, in basis points.
pub const GENESIS_COMMISSION_BPS: u64 = 200;

#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("validator key file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("validator key file {path} is malformed: {reason}")]
    Malformed { path: PathBuf, reason: String },
}

/// The secrets of one validator. `Debug` shows only its address.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValidatorKeys {
    pub name: String,
    #[serde(with = "hex32")]
    account: [u8; 32],
    #[serde(with = "hex32")]
    protocol: [u8; 32],
    #[serde(with = "hex32")]
    network: [u8; 32],
    #[serde(with = "hex32")]
    worker: [u8; 32],
}

mod hex32 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let bytes = hex::decode(String::deserialize(d)?).map_err(serde::de::Error::custom)?;
        bytes
            .try_into()
            .map_err(|_| serde::de::Error::custom("a key is 32 bytes"))
    }
}

impl std::fmt::Debug for ValidatorKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ValidatorKeys({}, secrets <redacted>)", self.address())
    }
}

fn random_secret() -> [u8; 32] {
    let mut secret = [0u8; 32];
    rand::rngs::OsRng
        .try_fill_bytes(&mut secret)
        .expect("operating system RNG failed");
    secret
}

impl ValidatorKeys {
    pub fn generate(name: String) -> Self {
        ValidatorKeys {
            name,
            account: random_secret(),
            protocol: random_secret(),
            network: random_secret(),
            worker: random_secret(),
        }
    }

    pub fn account(&self) -> Keypair {
        Keypair::from_secret(self.account)
    }

    pub fn address(&self) -> Address {
        self.account().address()
    }

    fn protocol_secret(&self) -> blst::min_sig::SecretKey {
        blst::min_sig::SecretKey::key_gen(&self.protocol, b"somatrain-localnet-validator")
            .expect("32 bytes of key material are enough")
    }

    /// The BLS12-381 protocol public key, compressed (96 bytes).
    pub fn protocol_public_key(&self) -> Vec<u8> {
        self.protocol_secret().sk_to_pk().compress().to_vec()
    }

    /// The message a proof of possession signs: BCS of the intent message over
    /// `protocol public key ‖ address`, then the epoch (0) as a little-endian u64.
    pub fn proof_of_possession_message(protocol_public_key: &[u8], address: &Address) -> Vec<u8> {
        let mut value = protocol_public_key.to_vec();
        value.extend_from_slice(&address.0);
        let mut message = POP_INTENT.to_vec();
        message.extend(bcs::to_bytes(&value).expect("bytes encode"));
        message.extend_from_slice(&0u64.to_le_bytes());
        message
    }

    /// A BLS signature (48 bytes) proving this validator holds its protocol key.
    pub fn proof_of_possession(&self) -> Vec<u8> {
        let message =
            Self::proof_of_possession_message(&self.protocol_public_key(), &self.address());
        self.protocol_secret()
            .sign(&message, BLS_DST, &[])
            .compress()
            .to_vec()
    }

    /// The validator as genesis registers it, with `stake` in a pool active from epoch 0.
    pub fn genesis_validator(&self, index: usize, stake: u64) -> Validator {
        let address = self.address();
        let pool_id = ObjectId(blake2b256(&[
            b"soma-genesis-validator-staking-pool",
            &address.0,
        ]));
        // Nominal addresses: the localnet's validators run inside the node and listen on none.
        let port = 9_100 + 10 * index;
        let multiaddr = |offset: usize| format!("/ip4/127.0.0.1/tcp/{}/http", port + offset);
        Validator {
            address,
            name: self.name.clone(),
            protocol_pubkey: self.protocol_public_key(),
            network_pubkey: Keypair::from_secret(self.network).public_key().to_vec(),
            worker_pubkey: Keypair::from_secret(self.worker).public_key().to_vec(),
            proof_of_possession: self.proof_of_possession(),
            net_address: multiaddr(0),
            p2p_address: multiaddr(1),
            primary_address: multiaddr(2),
            proxy_address: multiaddr(3),
            voting_power: 0,
            commission_rate: GENESIS_COMMISSION_BPS,
            next_epoch_commission_rate: GENESIS_COMMISSION_BPS,
            next_epoch_stake: stake,
            pool: ValidatorPool::genesis(pool_id, stake),
        }
    }
}

/// Verifies a proof of possession (for tests and for validators registered from outside).
pub fn verify_proof_of_possession(
    protocol_public_key: &[u8],
    address: &Address,
    proof: &[u8],
) -> bool {
    let (Ok(public), Ok(signature)) = (
        blst::min_sig::PublicKey::key_validate(protocol_public_key),
        blst::min_sig::Signature::from_bytes(proof),
    ) else {
        return false;
    };
    let message = ValidatorKeys::proof_of_possession_message(protocol_public_key, address);
    signature.verify(true, &message, BLS_DST, &[], &public, true) == blst::BLST_ERROR::BLST_SUCCESS
}

pub fn keys_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("validators")
}

fn key_path(data_dir: &Path, index: usize) -> PathBuf {
    keys_dir(data_dir).join(format!("validator-{index}.json"))
}

/// Makes `count` validators' keys, writes them (0600, atomically) and returns them with their
/// genesis entries.
pub fn create(
    data_dir: &Path,
    count: usize,
) -> Result<(Vec<ValidatorKeys>, Vec<Validator>), KeyFileError> {
    let dir = keys_dir(data_dir);
    std::fs::create_dir_all(&dir).map_err(|source| KeyFileError::Io {
        path: dir.clone(),
        source,
    })?;
    let mut keys = Vec::with_capacity(count);
    let mut validators = Vec::with_capacity(count);
    for index in 0..count {
        let k = ValidatorKeys::generate(format!("validator-{index}"));
        write_private(
            &key_path(data_dir, index),
            &serde_json::to_vec_pretty(&k).expect("keys encode"),
        )?;
        validators.push(k.genesis_validator(index, GENESIS_VALIDATOR_STAKE));
        keys.push(k);
    }
    Ok((keys, validators))
}

/// The keys of every validator in `data_dir`, in index order (none for a chain made before
/// validators existed).
pub fn load(data_dir: &Path) -> Result<Vec<ValidatorKeys>, KeyFileError> {
    let mut keys = Vec::new();
    for index in 0.. {
        let path = key_path(data_dir, index);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
            Err(source) => return Err(KeyFileError::Io { path, source }),
        };
        if bytes.len() > 64 * 1024 {
            return Err(KeyFileError::Malformed {
                path,
                reason: format!("{} bytes is too large for a key file", bytes.len()),
            });
        }
        let parsed = serde_json::from_slice(&bytes).map_err(|e| KeyFileError::Malformed {
            path: path.clone(),
            // serde_json's message names the position, never the content.
            reason: e.to_string(),
        })?;
        keys.push(parsed);
    }
    Ok(keys)
}

/// Writes `bytes` readable by the owner only: a temporary file, fsync, rename, directory fsync.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), KeyFileError> {
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| KeyFileError::Io {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("json.tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(io)?;
    if let Some(parent) = path.parent() {
        std::fs::File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_privately_and_prove_possession() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (keys, validators) = create(dir.path(), 2).unwrap();
        let loaded = load(dir.path()).unwrap();
        assert_eq!(loaded.len(), 2);
        for (i, k) in loaded.iter().enumerate() {
            assert_eq!(k.address(), keys[i].address());
            let mode = std::fs::metadata(key_path(dir.path(), i))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
            let v = &validators[i];
            assert_eq!(v.protocol_pubkey.len(), 96);
            assert_eq!(v.proof_of_possession.len(), 48);
            assert!(verify_proof_of_possession(
                &v.protocol_pubkey,
                &v.address,
                &v.proof_of_possession
            ));
            // Bound to the address: the same proof for another address fails.
            assert!(!verify_proof_of_possession(
                &v.protocol_pubkey,
                &Address([7; 32]),
                &v.proof_of_possession
            ));
            assert!(!format!("{k:?}").contains(&hex::encode(k.account)));
        }
        assert_ne!(keys[0].address(), keys[1].address());
    }

    #[test]
    fn a_malformed_key_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(keys_dir(dir.path())).unwrap();
        std::fs::write(key_path(dir.path(), 0), b"{\"name\": 3}").unwrap();
        let err = load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("malformed"), "{err}");
    }
}
