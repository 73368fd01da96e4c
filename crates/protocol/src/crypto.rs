//! Weights encryption and commitments.
//!
//! The SDK encrypts weights with AES-256 in CTR mode, a 128-bit big-endian counter starting from
//! an all-zero IV. A zero IV is safe only because every commit uses a fresh random key; callers
//! must never encrypt two different files under one key.

use std::fmt;
use std::io::{self, Read, Write};

use aes::cipher::{KeyIvInit, StreamCipher};
use blake2::digest::consts::U32;
use blake2::{Blake2b, Digest};
use rand::TryRngCore;

type Aes256Ctr = ctr::Ctr128BE<aes::Aes256>;
type Blake2b256 = Blake2b<U32>;

/// Size of the buffers used when streaming files through the cipher and the hash.
const STREAM_CHUNK: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("key is not valid Base58")]
    KeyNotBase58,
    #[error("key must be 32 bytes, got {0}")]
    KeyLength(usize),
    #[error("commitment is not valid Base58 of 32 bytes")]
    BadCommitment,
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// A 32-byte AES-256 key. `Debug` hides the bytes so that a key can never leak into a log line.
#[derive(Clone, PartialEq, Eq)]
pub struct EncryptionKey([u8; 32]);

impl EncryptionKey {
    /// A fresh key from the operating system's CSPRNG.
    pub fn generate() -> Self {
        let mut key = [0u8; 32];
        rand::rngs::OsRng
            .try_fill_bytes(&mut key)
            .expect("operating system RNG failed");
        Self(key)
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// Parses the SDK's Base58 form. The error never echoes the input.
    pub fn from_base58(text: &str) -> Result<Self, CryptoError> {
        let bytes = bs58::decode(text.trim())
            .into_vec()
            .map_err(|_| CryptoError::KeyNotBase58)?;
        let array: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| CryptoError::KeyLength(bytes.len()))?;
        Ok(Self(array))
    }

    pub fn to_base58(&self) -> String {
        bs58::encode(self.0).into_string()
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The commitment the network stores for this key before it is revealed.
    pub fn commitment(&self) -> Commitment {
        Commitment::of_bytes(&self.0)
    }

    fn cipher(&self) -> Aes256Ctr {
        Aes256Ctr::new(&self.0.into(), &[0u8; 16].into())
    }
}

impl fmt::Debug for EncryptionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EncryptionKey(<redacted>)")
    }
}

/// Encrypts (or decrypts: CTR is symmetric) a buffer in place.
pub fn apply_keystream(key: &EncryptionKey, data: &mut [u8]) {
    key.cipher().apply_keystream(data);
}

/// What streaming a file through the cipher produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamSummary {
    /// Bytes read and written.
    pub bytes: u64,
    /// Commitment (Blake2b-256) of the bytes written: the encrypted file when encrypting.
    pub output_commitment: Commitment,
}

/// Encrypts `input` into `output` chunk by chunk and hashes the ciphertext on the way, so memory
/// stays flat whatever the size of the weights.
pub fn encrypt_stream(
    key: &EncryptionKey,
    input: impl Read,
    output: impl Write + Send,
) -> Result<StreamSummary, CryptoError> {
    transform_stream(key, input, output)
}

/// Decrypts `input` into `output`; the summary's commitment is of the plaintext written.
pub fn decrypt_stream(
    key: &EncryptionKey,
    input: impl Read,
    output: impl Write + Send,
) -> Result<StreamSummary, CryptoError> {
    transform_stream(key, input, output)
}

/// Reads and ciphers on the calling thread while a second thread hashes and writes, so the
/// two costs overlap; a few recycled buffers keep memory flat.
fn transform_stream(
    key: &EncryptionKey,
    mut input: impl Read,
    mut output: impl Write + Send,
) -> Result<StreamSummary, CryptoError> {
    const BUFFERS: usize = 4;
    let mut cipher = key.cipher();
    let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<(Vec<u8>, usize)>(BUFFERS);
    let (free_tx, free_rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(BUFFERS);
    for _ in 0..BUFFERS {
        free_tx
            .send(vec![0u8; STREAM_CHUNK])
            .expect("channel has room");
    }
    std::thread::scope(|scope| {
        let sink = scope.spawn(move || -> io::Result<(Commitment, u64)> {
            let mut hasher = Blake2b256::new();
            let mut total = 0u64;
            for (buffer, filled) in full_rx {
                hasher.update(&buffer[..filled]);
                output.write_all(&buffer[..filled])?;
                total += filled as u64;
                // The reader may have stopped early on an error; then nobody takes buffers back.
                let _ = free_tx.send(buffer);
            }
            output.flush()?;
            Ok((Commitment(hasher.finalize().into()), total))
        });
        let read_result = (|| -> Result<(), CryptoError> {
            loop {
                let Ok(mut buffer) = free_rx.recv() else {
                    // The writer stopped (a write failed): its error is reported below.
                    return Ok(());
                };
                let filled = read_full(&mut input, &mut buffer)?;
                if filled == 0 {
                    return Ok(());
                }
                cipher.apply_keystream(&mut buffer[..filled]);
                if full_tx.send((buffer, filled)).is_err() {
                    return Ok(());
                }
            }
        })();
        drop(full_tx);
        let written = sink.join().expect("hashing thread does not panic");
        read_result?;
        let (output_commitment, bytes) = written?;
        Ok(StreamSummary {
            bytes,
            output_commitment,
        })
    })
}

/// Fills `buffer` as far as the reader allows; CTR keeps its own position, so partial reads
/// would be correct too, but whole chunks keep the hot loop simple.
fn read_full(reader: &mut impl Read, buffer: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match reader.read(&mut buffer[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// A Blake2b-256 digest, shown and exchanged in Base58 as the SDK does.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Commitment(pub [u8; 32]);

impl Commitment {
    pub fn of_bytes(bytes: &[u8]) -> Self {
        Self(Blake2b256::digest(bytes).into())
    }

    /// Hashes everything a reader yields, in bounded memory.
    pub fn of_reader(mut reader: impl Read) -> Result<(Self, u64), CryptoError> {
        let mut hasher = Blake2b256::new();
        let mut buffer = vec![0u8; STREAM_CHUNK];
        let mut total = 0u64;
        loop {
            let filled = read_full(&mut reader, &mut buffer)?;
            if filled == 0 {
                break;
            }
            hasher.update(&buffer[..filled]);
            total += filled as u64;
        }
        Ok((Self(hasher.finalize().into()), total))
    }

    pub fn to_base58(&self) -> String {
        bs58::encode(self.0).into_string()
    }

    pub fn from_base58(text: &str) -> Result<Self, CryptoError> {
        let bytes = bs58::decode(text.trim())
            .into_vec()
            .map_err(|_| CryptoError::BadCommitment)?;
        let array: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| CryptoError::BadCommitment)?;
        Ok(Self(array))
    }
}

impl fmt::Display for Commitment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base58())
    }
}

impl fmt::Debug for Commitment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Commitment({})", self.to_base58())
    }
}

/// Blake2b-256 over data that arrives in pieces.
#[derive(Default, Clone)]
pub struct CommitmentHasher(Blake2b256);

impl CommitmentHasher {
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    pub fn finish(self) -> Commitment {
        Commitment(self.0.finalize().into())
    }
}

/// The bytes the network hashes for an embedding: a tensor in the SDK's binary encoding.
/// Layout: `0x00` (f32 tag), ULEB128 byte length `4n`, the values little-endian, ULEB128 rank
/// (`1`), then `n` as a little-endian u64.
pub fn embedding_bytes(embedding: &[f32]) -> Vec<u8> {
    crate::tensor::SomaTensor::vector(embedding).to_bcs()
}

pub fn embedding_commitment(embedding: &[f32]) -> Commitment {
    Commitment::of_bytes(&embedding_bytes(embedding))
}

impl std::str::FromStr for Commitment {
    type Err = CryptoError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Commitment::from_base58(s)
    }
}

crate::ids::byte_string_serde!(Commitment);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_key_bytes() {
        let key = EncryptionKey::from_bytes([7u8; 32]);
        let shown = format!("{key:?}");
        assert!(!shown.contains(&key.to_base58()));
        assert!(!shown.contains('7'));
    }

    #[test]
    fn a_v1_embedding_has_a_two_byte_length() {
        let bytes = embedding_bytes(&[0.0; 2048]);
        assert_eq!(&bytes[..3], &[0x00, 0x80, 0x40]);
        assert_eq!(bytes.len(), 1 + 2 + 8192 + 1 + 8);
    }

    #[test]
    fn stream_roundtrip_across_chunk_boundary() {
        let key = EncryptionKey::generate();
        let plain: Vec<u8> = (0..(STREAM_CHUNK * 2 + 17))
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let mut cipher = Vec::new();
        let enc = encrypt_stream(&key, plain.as_slice(), &mut cipher).unwrap();
        let mut whole = plain.clone();
        apply_keystream(&key, &mut whole);
        assert_eq!(
            cipher, whole,
            "streamed encryption must equal one-shot encryption"
        );
        assert_eq!(enc.output_commitment, Commitment::of_bytes(&cipher));
        let mut back = Vec::new();
        decrypt_stream(&key, cipher.as_slice(), &mut back).unwrap();
        assert_eq!(back, plain);
    }

    struct FailingWriter {
        accepted: usize,
    }

    impl Write for FailingWriter {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.accepted > STREAM_CHUNK {
                return Err(io::Error::new(io::ErrorKind::StorageFull, "disk full"));
            }
            self.accepted += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    struct FailingReader {
        served: usize,
    }

    impl Read for FailingReader {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.served > 3 * STREAM_CHUNK {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    "source vanished",
                ));
            }
            let n = buf.len().min(4096);
            self.served += n;
            Ok(n)
        }
    }

    #[test]
    fn write_and_read_failures_surface_as_errors() {
        let key = EncryptionKey::generate();
        let big = vec![1u8; STREAM_CHUNK * 8];
        let err = encrypt_stream(&key, big.as_slice(), FailingWriter { accepted: 0 }).unwrap_err();
        assert!(err.to_string().contains("disk full"), "{err}");
        let err = encrypt_stream(&key, FailingReader { served: 0 }, io::sink()).unwrap_err();
        assert!(err.to_string().contains("source vanished"), "{err}");
    }

    #[test]
    fn bad_keys_are_refused_without_echo() {
        let err = EncryptionKey::from_base58("0OIl").unwrap_err().to_string();
        assert!(!err.contains("0OIl"));
        assert!(matches!(
            EncryptionKey::from_base58("abc"),
            Err(CryptoError::KeyLength(_))
        ));
    }
}
