//! The side services: gRPC framing with BCS bodies (content type still `application/grpc`).
//!
//! - `/faucet.Faucet/RequestGas`: [`FaucetRequest`] → [`FaucetResponse`]
//! - `/admin.Admin/AdvanceEpoch`: [`AdvanceEpochRequest`] (zero bytes) → [`AdvanceEpochResponse`]
//! - `/scoring.Scoring/Score`: [`ScoreRequest`] → [`ScoreResponse`]
//! - `/scoring.Scoring/Health`: [`HealthRequest`] → [`HealthResponse`]
//!
//! Floats travel as their `u32` bit patterns; checksums and keys as Base58 strings.

use std::marker::PhantomData;

use bytes::{Buf, BufMut};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaucetRequest {
    /// The address as the caller wrote it (the SDK sends 64 hex digits without `0x`).
    pub recipient: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaucetCoin {
    pub amount: u64,
    pub id: String,
    pub transfer_tx_digest: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaucetResponse {
    /// `Success`, or the reason the faucet refused.
    pub status: String,
    pub coins_sent: Vec<FaucetCoin>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdvanceEpochRequest {}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdvanceEpochResponse {
    /// The new epoch.
    pub epoch: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScoreManifest {
    pub url: String,
    /// Base58 Blake2b-256 of the (encrypted) weights file.
    pub checksum: String,
    pub size: u64,
    /// Base58 AES-256 key, for encrypted weights.
    pub decryption_key: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScoreRequest {
    pub data_url: String,
    /// Base58 Blake2b-256 of the data.
    pub data_checksum: String,
    pub data_size: u64,
    pub model_manifests: Vec<ScoreManifest>,
    /// f32 bit patterns.
    pub target_embedding: Vec<u32>,
    pub seed: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScoreResponse {
    /// Index of the winning model in `model_manifests`.
    pub winner: u64,
    /// f32 bit patterns, one per model.
    pub loss_score: Vec<u32>,
    /// The winner's embedding of the data, f32 bit patterns.
    pub embedding: Vec<u32>,
    /// Cosine distances to the target embedding, f32 bit patterns.
    pub distance: Vec<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthRequest {}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthResponse {
    pub ok: bool,
}

/// f32 values as the bit patterns the side services carry.
pub fn to_bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}

pub fn from_bits(bits: &[u32]) -> Vec<f32> {
    bits.iter().map(|b| f32::from_bits(*b)).collect()
}

/// A tonic codec whose bodies are BCS. Decoding refuses trailing bytes and malformed input with
/// INVALID_ARGUMENT; sizes are bounded by the service's message limit before this runs.
pub struct BcsCodec<T, U>(PhantomData<fn() -> (T, U)>);

impl<T, U> Default for BcsCodec<T, U> {
    fn default() -> Self {
        BcsCodec(PhantomData)
    }
}

impl<T, U> Codec for BcsCodec<T, U>
where
    T: Serialize + Send + 'static,
    U: DeserializeOwned + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = BcsEncoder<T>;
    type Decoder = BcsDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        BcsEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        BcsDecoder(PhantomData)
    }
}

pub struct BcsEncoder<T>(PhantomData<fn(T)>);

impl<T: Serialize> Encoder for BcsEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        let bytes = bcs::to_bytes(&item)
            .map_err(|e| Status::internal(format!("BCS encoding failed: {e}")))?;
        dst.put_slice(&bytes);
        Ok(())
    }
}

pub struct BcsDecoder<U>(PhantomData<fn() -> U>);

impl<U: DeserializeOwned> Decoder for BcsDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        let bytes = src.copy_to_bytes(src.remaining());
        bcs::from_bytes(&bytes)
            .map(Some)
            .map_err(|e| Status::invalid_argument(format!("malformed BCS message body: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn side_messages_have_the_documented_bcs_layout() {
        assert!(bcs::to_bytes(&AdvanceEpochRequest {}).unwrap().is_empty());
        assert_eq!(
            bcs::to_bytes(&AdvanceEpochResponse { epoch: 3 }).unwrap(),
            3u64.to_le_bytes()
        );
        let request = FaucetRequest {
            recipient: "ab".into(),
        };
        assert_eq!(bcs::to_bytes(&request).unwrap(), b"\x02ab");
        let response = ScoreResponse {
            winner: 0,
            loss_score: to_bits(&[1.5]),
            embedding: to_bits(&[0.25, -1.0]),
            distance: to_bits(&[0.5]),
        };
        let bytes = bcs::to_bytes(&response).unwrap();
        assert_eq!(&bytes[..8], &[0; 8]);
        assert_eq!(&bytes[8..13], &[1, 0, 0, 0xc0, 0x3f]);
        assert_eq!(bcs::from_bytes::<ScoreResponse>(&bytes).unwrap(), response);
        assert_eq!(from_bits(&response.embedding), vec![0.25, -1.0]);
        assert!(bcs::from_bytes::<HealthResponse>(&[2]).is_err());
    }
}
