//! Protobuf conversions: every kind survives protocol → protobuf bytes → protocol with the same
//! BCS (so the signature the sender made still verifies on the server), and malformed fields are
//! refused with their path.

use prost::Message;
use somatrain_protocol::effects::{
    ChangedObject, ExecutionErrorKind, ExecutionFailure, ExecutionStatus, IdOperation, ObjectState,
    TransactionEffects, TransactionFee,
};
use somatrain_protocol::fixtures::{all_kinds, gas, signer};
use somatrain_protocol::transaction::{ClaimRewards, CommitModel, CreateModel, PayCoins};
use somatrain_protocol::{
    Object, ObjectDigest, ObjectId, Owner, SignedTransaction, TransactionData, TransactionKind,
    TxDigest,
};
use somatrain_rpc::convert::*;
use somatrain_rpc::proto;

fn through_the_wire(data: &TransactionData) -> TransactionData {
    let bytes = transaction_to_proto(data).encode_to_vec();
    let decoded = proto::Transaction::decode(bytes.as_slice()).unwrap();
    transaction_from_proto(&decoded).unwrap()
}

#[test]
fn every_kind_rebuilds_to_the_signed_bytes() {
    for kind in all_kinds() {
        let data = TransactionData::new(kind, signer().address(), vec![gas()]);
        let rebuilt = through_the_wire(&data);
        assert_eq!(rebuilt.to_bcs(), data.to_bcs(), "{}", data.kind.name());
        let proto_tx = transaction_to_proto(&data);
        assert_eq!(proto_tx.digest.unwrap(), data.digest().to_string());

        let signed = SignedTransaction::sign(&signer(), data);
        let signature = signature_to_proto(&signed.signatures[0]);
        let signature = proto::UserSignature::decode(signature.encode_to_vec().as_slice()).unwrap();
        let on_server = SignedTransaction {
            data: rebuilt,
            signatures: vec![signature_from_proto(&signature, "signatures[0]").unwrap()],
        };
        on_server.verify().unwrap();
    }
}

#[test]
fn zero_values_are_still_present_on_the_wire() {
    let data = TransactionData::new(
        TransactionKind::CreateModel(CreateModel {
            stake_amount: 0,
            commission_rate: 0,
            architecture_version: 0,
        }),
        signer().address(),
        vec![],
    );
    assert_eq!(through_the_wire(&data), data);
    let signature = signature_to_proto(&SignedTransaction::sign(&signer(), data).signatures[0]);
    let bytes = signature.encode_to_vec();
    assert_eq!(
        &bytes[..2],
        &[0x08, 0x00],
        "scheme 0 is written, not omitted"
    );
}

#[test]
fn pay_coins_amounts_are_always_some() {
    let data = TransactionData::new(
        TransactionKind::PayCoins(PayCoins {
            coins: vec![gas()],
            amounts: None,
            recipients: vec![signer().address()],
        }),
        signer().address(),
        vec![gas()],
    );
    let TransactionKind::PayCoins(PayCoins { amounts, .. }) = through_the_wire(&data).kind else {
        panic!("kind changed");
    };
    assert_eq!(amounts, Some(vec![]));
}

#[test]
fn manifest_urls_are_normalized_and_bad_ones_refused() {
    let mut kind = all_kinds().remove(15);
    let TransactionKind::CommitModel(CommitModel { manifest, .. }) = &mut kind else {
        panic!("index 15 is CommitModel");
    };
    manifest.url = "HTTPS://Example.com".into();
    let data = TransactionData::new(kind, signer().address(), vec![]);
    let TransactionKind::CommitModel(CommitModel { manifest, .. }) = through_the_wire(&data).kind
    else {
        panic!("kind changed");
    };
    assert_eq!(manifest.url, "https://example.com/");

    let mut proto_tx = transaction_to_proto(&data);
    let Some(proto::transaction_kind::Kind::CommitModel(commit)) =
        proto_tx.kind.as_mut().and_then(|k| k.kind.as_mut())
    else {
        panic!("kind changed");
    };
    let Some(proto::manifest::Version::V1(v1)) =
        commit.manifest.as_mut().and_then(|m| m.version.as_mut())
    else {
        panic!("manifest changed");
    };
    v1.url = Some("no scheme".into());
    let err = transaction_from_proto(&proto_tx).unwrap_err();
    assert_eq!(err.field, "transaction.kind.commit_model.manifest.v1.url");
}

#[test]
fn malformed_fields_are_refused_by_path() {
    let data = TransactionData::new(
        TransactionKind::ClaimRewards(ClaimRewards {
            target_id: ObjectId([0xaa; 32]),
        }),
        signer().address(),
        vec![gas()],
    );
    let good = transaction_to_proto(&data);

    let mut no_sender = good.clone();
    no_sender.sender = None;
    assert_eq!(
        transaction_from_proto(&no_sender).unwrap_err().field,
        "transaction.sender"
    );

    let mut bad_digest = good.clone();
    bad_digest.gas_payment[0].digest = Some("abc".into());
    assert_eq!(
        transaction_from_proto(&bad_digest).unwrap_err().field,
        "transaction.gas_payment[0].digest"
    );

    let mut bad_target = good.clone();
    bad_target.kind = Some(proto::TransactionKind {
        kind: Some(proto::transaction_kind::Kind::ClaimRewards(
            proto::ClaimRewards {
                target_id: Some("0xzz".into()),
            },
        )),
    });
    assert_eq!(
        transaction_from_proto(&bad_target).unwrap_err().field,
        "transaction.kind.claim_rewards.target_id"
    );

    // An obsolete challenge kind (field 26) decodes to no kind at all and is refused.
    let mut obsolete = proto::TransactionKind { kind: None }.encode_to_vec();
    obsolete.extend([0xd2, 0x01, 0x00]);
    let decoded = proto::TransactionKind::decode(obsolete.as_slice()).unwrap();
    assert_eq!(
        kind_from_proto(&decoded, "transaction.kind")
            .unwrap_err()
            .field,
        "transaction.kind"
    );

    let short_key = proto::UserSignature {
        scheme: Some(0),
        signature: Some(proto::user_signature::Signature::Simple(
            proto::SimpleSignature {
                scheme: Some(0),
                signature: Some(vec![0; 64]),
                public_key: Some(vec![0; 31]),
            },
        )),
    };
    assert_eq!(
        signature_from_proto(&short_key, "signatures[0]")
            .unwrap_err()
            .field,
        "signatures[0].simple.public_key"
    );
    let mut absent_scheme = short_key.clone();
    absent_scheme.scheme = None;
    assert_eq!(
        signature_from_proto(&absent_scheme, "signatures[0]")
            .unwrap_err()
            .field,
        "signatures[0].scheme"
    );
}

#[test]
fn objects_round_trip_without_the_id_prefix_and_keep_their_digest() {
    let coin = Object::coin(
        ObjectId([1; 32]),
        4,
        2_000_000_000,
        signer().address(),
        TxDigest([9; 32]),
    );
    let wire = object_to_proto(&coin);
    assert_eq!(
        wire.contents.as_deref().unwrap(),
        2_000_000_000u64.to_le_bytes()
    );
    assert_eq!(wire.object_id.as_deref().unwrap(), "01".repeat(32));
    assert_eq!(wire.object_type.as_deref().unwrap(), "Coin");
    let back = object_from_proto(&wire, "object").unwrap();
    assert_eq!(back.digest(), coin.digest());
    assert_eq!(wire.digest.unwrap(), coin.digest().to_string());

    let mut unknown_owner = object_to_proto(&coin);
    unknown_owner.owner.as_mut().unwrap().kind = Some(0);
    assert_eq!(
        object_from_proto(&unknown_owner, "object")
            .unwrap_err()
            .field,
        "object.owner.kind"
    );
    let mut unknown_type = object_to_proto(&coin);
    unknown_type.object_type = Some("Package".into());
    assert_eq!(
        object_from_proto(&unknown_type, "object")
            .unwrap_err()
            .field,
        "object.object_type"
    );
}

#[test]
fn effects_round_trip_including_failures() {
    let state = |version| ObjectState {
        version,
        digest: ObjectDigest([version as u8; 32]),
        owner: Owner::AddressOwner(signer().address()),
    };
    let effects = TransactionEffects {
        status: ExecutionStatus::Failure(ExecutionFailure {
            kind: ExecutionErrorKind::ModelRevealEpochMismatch,
            description: "reveal in the commit epoch".into(),
            object_id: Some(ObjectId([7; 32])),
        }),
        executed_epoch: 3,
        fee: TransactionFee {
            base_fee: 1000,
            operation_fee: 300,
            value_fee: 0,
            total_fee: 1300,
        },
        transaction_digest: TxDigest([5; 32]),
        gas_object_index: Some(0),
        dependencies: vec![TxDigest([6; 32])],
        lamport_version: 9,
        changed_objects: vec![
            ChangedObject {
                id: ObjectId([1; 32]),
                input: Some(state(8)),
                output: Some(state(9)),
                id_operation: IdOperation::None,
            },
            ChangedObject {
                id: ObjectId([2; 32]),
                input: None,
                output: Some(state(9)),
                id_operation: IdOperation::Created,
            },
            ChangedObject {
                id: ObjectId([3; 32]),
                input: Some(state(4)),
                output: None,
                id_operation: IdOperation::Deleted,
            },
        ],
        unchanged_shared_objects: vec![],
    };
    let wire = effects_to_proto(&effects);
    let bytes = wire.encode_to_vec();
    let decoded = proto::TransactionEffects::decode(bytes.as_slice()).unwrap();
    assert_eq!(effects_from_proto(&decoded).unwrap(), effects);
    assert_eq!(decoded.status.unwrap().error.unwrap().kind, Some(27));
}
