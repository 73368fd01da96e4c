//! Every vector the official Python SDK produced must match exactly.

use std::path::PathBuf;

use somatrain_protocol::crypto::{
    Commitment, EncryptionKey, apply_keystream, embedding_bytes, embedding_commitment,
};

fn vectors() -> serde_json::Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/conformance/crypto/vectors.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("conformance file {} is required: {e}", path.display()));
    serde_json::from_str(&text).expect("vectors.json parses")
}

#[test]
fn encryption_vectors() {
    let v = vectors();
    let cases = v["encryption"].as_array().unwrap();
    assert!(!cases.is_empty());
    for case in cases {
        let key_bytes: [u8; 32] = hex::decode(case["key_hex"].as_str().unwrap())
            .unwrap()
            .try_into()
            .unwrap();
        let key = EncryptionKey::from_base58(case["key_base58"].as_str().unwrap()).unwrap();
        assert_eq!(key.as_bytes(), &key_bytes);
        assert_eq!(key.to_base58(), case["key_base58"].as_str().unwrap());
        let mut data = hex::decode(case["plaintext_hex"].as_str().unwrap()).unwrap();
        apply_keystream(&key, &mut data);
        assert_eq!(hex::encode(&data), case["ciphertext_hex"].as_str().unwrap());
        assert_eq!(
            Commitment::of_bytes(&data).to_base58(),
            case["ciphertext_commitment"].as_str().unwrap()
        );
        assert_eq!(
            key.commitment().to_base58(),
            case["key_commitment"].as_str().unwrap()
        );
    }
}

#[test]
fn commitment_vectors() {
    let v = vectors();
    let cases = v["commitments"].as_array().unwrap();
    assert!(!cases.is_empty());
    for case in cases {
        let input = hex::decode(case["input_hex"].as_str().unwrap()).unwrap();
        let expected = case["commitment"].as_str().unwrap();
        assert_eq!(Commitment::of_bytes(&input).to_base58(), expected);
        let (streamed, len) = Commitment::of_reader(input.as_slice()).unwrap();
        assert_eq!(streamed.to_base58(), expected);
        assert_eq!(len, input.len() as u64);
        assert_eq!(Commitment::from_base58(expected).unwrap(), streamed);
    }
}

#[test]
fn embedding_commitment_vectors() {
    let v = vectors();
    let cases = v["embedding_commitments"].as_array().unwrap();
    assert!(!cases.is_empty());
    for case in cases {
        let embedding: Vec<f32> = case["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        // Large cases carry only the commitment; the encoding is then checked through it.
        if let Some(bytes_hex) = case["bcs_hex"].as_str() {
            assert_eq!(hex::encode(embedding_bytes(&embedding)), bytes_hex);
        }
        assert_eq!(
            embedding_commitment(&embedding).to_base58(),
            case["commitment"].as_str().unwrap()
        );
    }
}
