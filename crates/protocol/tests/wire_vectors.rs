//! Every vector of §10 of `shared/reference/protocol-rpc.md` (computed with the official SDK),
//! byte for byte: addresses, transactions, digests, signatures, derived ids, objects, tensors.
//! Each transaction also decodes back to the same value and re-encodes to the same bytes.

use somatrain_protocol::crypto::embedding_commitment;
use somatrain_protocol::fixtures::{all_kinds, gas, signer};
use somatrain_protocol::transaction::{ClaimRewards, CreateModel, TransferCoin};
use somatrain_protocol::{
    Address, Keypair, Object, ObjectId, SignedTransaction, SomaTensor, TransactionData,
    TransactionKind, TxDigest,
};

fn hex_bytes(parts: &[&str]) -> Vec<u8> {
    hex::decode(parts.concat()).unwrap()
}

const SENDER: &str = "160179a1565ea7cff27ead23f54cc7f50893bf58155cd7285156e57afa31c3ac";
const PUBLIC_KEY: &str = "03a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8";

/// The gas object reference: 73 bytes.
fn gas_ref_hex() -> String {
    format!(
        "{}0700000000000000{}{}",
        "01".repeat(32),
        "20",
        "02".repeat(32)
    )
}

#[test]
fn addresses_and_encoded_keys_match_the_sdk() {
    let cases = [
        (
            [0u8; 32],
            "7a1378aafadef8ce743b72e8b248295c8f61c102c94040161146ea4d51a182b6",
            "somaprivkey1qqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqq93a50m",
        ),
        (
            std::array::from_fn(|i| i as u8),
            SENDER,
            "somaprivkey1qqqqzqsrqszsvpcgpy9qkrqdpc83qygjzv2p29shrqv35xcur50p7y6psq9",
        ),
        (
            [0xff; 32],
            "20a33b9a86e89aa22b4c6f7e4c53e8a37444c92a6f18a28bdbd7a37ba85e0646",
            "somaprivkey1qrllllllllllllllllllllllllllllllllllllllllllllllllll73mfrdc",
        ),
    ];
    for (seed, address, encoded) in cases {
        let keypair = Keypair::from_secret(seed);
        assert_eq!(keypair.address().to_string(), address);
        assert_eq!(keypair.to_encoded(), encoded);
        let back = Keypair::from_secret_text(encoded).unwrap();
        assert_eq!(back.address().to_string(), address);
    }
    assert_eq!(hex::encode(signer().public_key()), PUBLIC_KEY);
}

struct TxVector {
    kind: TransactionKind,
    data_hex: String,
    digest: &'static str,
    signature: &'static str,
}

fn transaction_vectors() -> Vec<TxVector> {
    // Sender, then the gas payment: a vector of one reference.
    let trailer = format!("{SENDER}01{}", gas_ref_hex());
    vec![
        TxVector {
            kind: TransactionKind::ClaimRewards(ClaimRewards {
                target_id: ObjectId([0xaa; 32]),
            }),
            data_hex: format!("0017{}{trailer}", "aa".repeat(32)),
            digest: "GuNd1gVc9ToE2KGRabQCYgjXoLSW7eo27AjjbS53wXzb",
            signature: "0075fad98a9b675ca0d62f0ae47bd82608a354ff11541df2a90203e8a9495b47568e6e83684d6aa817898484f01bb37764f5848815d6937956ec92495f71ee0c0803a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8",
        },
        TxVector {
            kind: TransactionKind::CreateModel(CreateModel {
                stake_amount: 1_000_000_000,
                commission_rate: 1000,
                architecture_version: 1,
            }),
            data_hex: format!("000e00ca9a3b00000000e8030000000000000100000000000000{trailer}"),
            digest: "FrRXtGLSPbbairB8bwqYcKXMcPdTveomKE9ddS5QDRS5",
            signature: "00cb11142cc654dbff8c0f4f017421d3f44f6310a01a9aa6eed1f7471769bf38c24f6c41d1f25afe4b017ec2e1b97d3c577dea84f606691856479545560083420c03a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8",
        },
        TxVector {
            kind: TransactionKind::TransferCoin(TransferCoin {
                coin: gas(),
                amount: Some(1000),
                recipient: Address([0x11; 32]),
            }),
            data_hex: format!(
                "0009{}01e803000000000000{}{trailer}",
                gas_ref_hex(),
                "11".repeat(32)
            ),
            digest: "CJ4SghNM1VkSay49ZqYsRiHUE5HMtP81qr4iLMPg22VH",
            signature: "0023c41521dfc42343085209ddfdc1c56f0974d41874ed03d5998484dbe1f521564f16986413a194c2407ffaafcb3b87634b44e5b691e4d2402d7e203b0c22db0303a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8",
        },
    ]
}

#[test]
fn the_three_transaction_vectors_encode_digest_and_sign_as_the_sdk() {
    for v in transaction_vectors() {
        let data = TransactionData::new(v.kind, signer().address(), vec![gas()]);
        let bytes = data.to_bcs();
        assert_eq!(hex::encode(&bytes), v.data_hex, "{}", data.kind.name());
        assert_eq!(TransactionData::from_bcs(&bytes).unwrap(), data);
        assert_eq!(data.digest().to_string(), v.digest);

        let signed = SignedTransaction::sign(&signer(), data.clone());
        signed.verify().unwrap();
        assert_eq!(hex::encode(signed.signatures[0].to_bytes()), v.signature);
        let envelope = signed.to_bcs();
        let expected = hex_bytes(&["01000001", &v.data_hex, "0161", v.signature]);
        assert_eq!(envelope, expected, "{}", data.kind.name());
        assert_eq!(SignedTransaction::from_bcs(&envelope).unwrap(), signed);
    }
}

#[test]
fn signing_hashes_and_derived_ids_match() {
    let claim = TransactionData::new(
        TransactionKind::ClaimRewards(ClaimRewards {
            target_id: ObjectId([0xaa; 32]),
        }),
        signer().address(),
        vec![gas()],
    );
    assert_eq!(
        hex::encode(claim.signing_message()),
        "7fc23f5d7bae6a55e521c799951e9deb476e6c79ff6630c285e1d8aaabd4a7f6"
    );
    assert_eq!(
        ObjectId::derive(&claim.digest(), 0).to_string(),
        "0x8eda4d5216db18e553f109f87d529c4a13e7ff9d55814c3a7bcbbbf721e74ba7"
    );

    let create = TransactionData::new(
        TransactionKind::CreateModel(CreateModel {
            stake_amount: 1_000_000_000,
            commission_rate: 1000,
            architecture_version: 1,
        }),
        signer().address(),
        vec![gas()],
    );
    assert_eq!(
        hex::encode(create.signing_message()),
        "361f86beb783b919f9ea840c5352c6ab78694012c15aefe3f128b6ba190c892e"
    );
    let digest = create.digest();
    assert_eq!(
        ObjectId::derive(&digest, 0).to_string(),
        "0xbb891c5d239126894c71513a3300a69514a94dfa3959e5da414ca4a9c84d48f0"
    );
    assert_eq!(
        ObjectId::derive(&digest, 1).to_string(),
        "0x42417e2576aeef070ee674361b660a64be88a51eeda5c6c47916213d1e2da935"
    );
}

#[test]
fn a_coin_object_encodes_and_digests_as_the_network() {
    let owner: Address = SENDER.parse().unwrap();
    let coin = Object::coin(
        ObjectId([1; 32]),
        1,
        2_000_000_000,
        owner,
        TxDigest([0; 32]),
    );
    let expected = hex_bytes(&[
        "01",
        "0100000000000000",
        "28",
        &"01".repeat(32),
        "0094357700000000",
        "00",
        SENDER,
        "20",
        &"00".repeat(32),
    ]);
    assert_eq!(coin.to_bcs(), expected);
    assert_eq!(
        coin.digest().to_string(),
        "HMnn9gAjQzQmJ5jQLaJEs8dxmnmoJRXeMdwYzZgp6UBv"
    );
    assert_eq!(bcs::from_bytes::<Object>(&expected).unwrap(), coin);
}

#[test]
fn the_tensor_vector_and_its_commitment_match() {
    let tensor = SomaTensor::vector(&[0.1, 0.1, 0.1]);
    assert_eq!(
        hex::encode(tensor.to_bcs()),
        "000ccdcccc3dcdcccc3dcdcccc3d010300000000000000"
    );
    assert_eq!(
        embedding_commitment(&[0.1, 0.1, 0.1]).to_base58(),
        "Cm3WYU2vdn93sXGf7Nf5W5Bgqk2sK71462tvTSw8Dhzo"
    );
}

#[test]
fn every_kind_has_the_sdk_length_and_digest_and_round_trips() {
    let table: [(usize, &str); 26] = [
        (109, "8NDkn7y1vDniVpQXVszv7TvYANDn6DQm2oFzrwNavwQt"),
        (199, "4yamNLyg3UKzw2UMqnXsBDimMxEtwkZJD8rRNdHKMJGE"),
        (143, "3VhssfhubnC4VETKTZ1Ga5GRmARs2gUSprENEwjtNsEo"),
        (138, "ASW8zMhDxpiUNgsL85eUbQuvn2HtoMfqbAS16pd33USD"),
        (111, "Dgz2ApNABxShRHh3eFhC1QJuFM5DSAwKQDiUmqAQjLeK"),
        (140, "7g3LkokNjfe6Doh855RvsAmwnvT74g3jYwD1bXgBTaXJ"),
        (140, "99RJP17GVUZqothK46xfYwaowiAePMNeZopmzHvQyY3C"),
        (118, "FGYvHi8P1jktDPKHeUVprtQWTmgmBafpVRidbHU3TT7q"),
        (116, "4oFVTk9apkfmZtpv9A56Xh2ftagavu2xphPTQSkZgzXq"),
        (222, "CxGpiLmjUKrmxrX6twG5rwkVXtbzADQC9mPL7htjtj2o"),
        (265, "A9h75FyfC5vPudUyFR7CG82FC26N1JELiPu3KWvF7nvx"),
        (214, "8ifoBaXT5tXcx8KRRdNrMTb7TDJPRPPN4hJXE5wTAJnV"),
        (214, "8eVL8pA6E2RUDN3eKCz3TpuvcazxNPEYSTLmbG6P4WPx"),
        (181, "C9fQitacF574wAuz1owMhbVs3tEdXHYmAofPdpuVuTMm"),
        (132, "FrRXtGLSPbbairB8bwqYcKXMcPdTveomKE9ddS5QDRS5"),
        (308, "J9jM5ZRNjy18kLu79CvHgWHhbNuwJT4LUSz8xQ34kN9"),
        (196, "AQxYJtRxixYh8VwnPk6RY6QxN8FEhUm3tWfGHn2j4hFU"),
        (222, "HZMKmZ5Gd1SvsNTrDQnWmivG6zoNUAY1yDHPdPiWqXYS"),
        (148, "7E9gnnfhyQQhVBMeaaByHerWRbFQYYVxsveNJTbF39We"),
        (140, "8JAfRg9HZUuWFcrLv2tLLe8ZFD4WenknqoreAE9e5zmN"),
        (140, "8r4CUM8rXyU4QiCpFaznSUYukZKVsSrhd33F97Wi1ryf"),
        (140, "J9MgS5mUHPoR2Nezsj5NZaqeiePS4yJupYzarSuqoumU"),
        (363, "BxxAt81vVKCasVuYGrfRdt7SSKNLQZTpR614YrWRDieF"),
        (140, "GuNd1gVc9ToE2KGRabQCYgjXoLSW7eo27AjjbS53wXzb"),
        (140, "D3zZUyCDLsYSRkLZrDg5bvRzcT5vwFmobHBJtzpMywJb"),
        (140, "5gWU5o2btoWc3QwhaLJj8ZUtvWRwuZf9JNNds7nnzpN3"),
    ];
    let kinds = all_kinds();
    assert_eq!(kinds.len(), table.len());
    for (index, (kind, (length, digest))) in kinds.into_iter().zip(table).enumerate() {
        assert_eq!(kind.tag() as usize, index, "{}", kind.name());
        let data = TransactionData::new(kind, signer().address(), vec![gas()]);
        let bytes = data.to_bcs();
        assert_eq!(bytes.len(), length, "{}", data.kind.name());
        assert_eq!(data.digest().to_string(), digest, "{}", data.kind.name());
        assert_eq!(TransactionData::from_bcs(&bytes).unwrap(), data);
        assert_eq!(TransactionData::from_bcs(&bytes).unwrap().to_bcs(), bytes);
    }
}

#[test]
fn decoding_refuses_unknown_tags_truncation_and_trailing_bytes() {
    let data = TransactionData::new(
        TransactionKind::ClaimRewards(ClaimRewards {
            target_id: ObjectId([0xaa; 32]),
        }),
        signer().address(),
        vec![gas()],
    );
    let bytes = data.to_bcs();
    let mut unknown_kind = bytes.clone();
    unknown_kind[1] = 26;
    assert!(TransactionData::from_bcs(&unknown_kind).is_err());
    let mut unknown_version = bytes.clone();
    unknown_version[0] = 1;
    assert!(TransactionData::from_bcs(&unknown_version).is_err());
    assert!(TransactionData::from_bcs(&bytes[..bytes.len() - 1]).is_err());
    let mut trailing = bytes;
    trailing.push(0);
    assert!(TransactionData::from_bcs(&trailing).is_err());
    // A huge declared vector length fails on the missing bytes, not on an allocation.
    let mut lying = hex::decode("000a").unwrap();
    lying.extend([0xff, 0xff, 0xff, 0xff, 0x0f]);
    assert!(TransactionData::from_bcs(&lying).is_err());
}
