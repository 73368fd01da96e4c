//! Property tests of every protobuf mapping: random values go value → protobuf → bytes →
//! protobuf → value and come back equal. Transaction kinds come back with the same BCS (what
//! the sender signed), except where the network's conversion is lossy by rule, and there the
//! result is exactly the rule's normal form. The values are drawn from a fixed seed, so a
//! failure names the case that reproduces it.

use std::collections::BTreeMap;

use prost::Message;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use somatrain_protocol::effects::{
    BalanceChange, ChangedObject, ExecutionErrorKind, ExecutionFailure, ExecutionStatus,
    IdOperation, ObjectState, TransactionEffects, TransactionFee, UnchangedSharedObject,
};
use somatrain_protocol::fixtures::{all_kinds, signer};
use somatrain_protocol::transaction::{
    CommitModel, Genesis, PayCoins, RevealModel, SubmitData, ValidatorMetadataUpdate, normalize_url,
};
use somatrain_protocol::{
    Address, Commitment, Digest, Manifest, ModelState, Object, ObjectDigest, ObjectId, ObjectRef,
    ObjectType, Owner, SignedTransaction, SomaTensor, TransactionData, TransactionKind, TxDigest,
};
use somatrain_rpc::convert::*;
use somatrain_rpc::proto;
use somatrain_rpc::view::{
    ChainParams, CommitView, Commitments, EpochView, Executed, ModelView, TargetView,
    ValidatorKeysView, ValidatorView,
};

const CASES: u64 = 300;

fn through_bytes<M: Message + Default>(message: M) -> M {
    M::decode(message.encode_to_vec().as_slice()).expect("our own encoding decodes")
}

fn bytes32(rng: &mut StdRng) -> [u8; 32] {
    rng.random()
}

fn address(rng: &mut StdRng) -> Address {
    Address(bytes32(rng))
}

fn object_id(rng: &mut StdRng) -> ObjectId {
    ObjectId(bytes32(rng))
}

fn maybe<T>(rng: &mut StdRng, value: impl FnOnce(&mut StdRng) -> T) -> Option<T> {
    rng.random_bool(0.5).then(|| value(rng))
}

fn list<T>(rng: &mut StdRng, most: usize, mut item: impl FnMut(&mut StdRng) -> T) -> Vec<T> {
    let n = rng.random_range(0..=most);
    (0..n).map(|_| item(rng)).collect()
}

fn floats(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-4.0f32..4.0)).collect()
}

fn manifest(rng: &mut StdRng) -> Manifest {
    Manifest {
        url: format!(
            "https://bucket-{}.example.com/w/{}",
            rng.random::<u16>(),
            rng.random::<u32>()
        ),
        checksum: Commitment(bytes32(rng)),
        size: rng.random(),
    }
}

fn commitments(rng: &mut StdRng) -> Commitments {
    Commitments {
        weights: Commitment(bytes32(rng)),
        embedding: Commitment(bytes32(rng)),
        decryption_key: Commitment(bytes32(rng)),
    }
}

fn commit(rng: &mut StdRng) -> CommitView {
    CommitView {
        manifest: manifest(rng),
        commitments: commitments(rng),
        commit_epoch: rng.random(),
    }
}

fn owner(rng: &mut StdRng) -> Owner {
    match rng.random_range(0..3) {
        0 => Owner::AddressOwner(address(rng)),
        1 => Owner::Shared {
            initial_shared_version: rng.random(),
        },
        _ => Owner::Immutable,
    }
}

fn object(rng: &mut StdRng) -> Object {
    let object_type = *[
        ObjectType::SystemState,
        ObjectType::Coin,
        ObjectType::StakedSoma,
        ObjectType::Target,
    ]
    .get(rng.random_range(0..4))
    .expect("in range");
    let payload = list(rng, 64, |r| r.random::<u8>());
    Object::from_payload(
        object_type,
        object_id(rng),
        rng.random(),
        &payload,
        owner(rng),
        TxDigest(bytes32(rng)),
    )
}

fn object_state(rng: &mut StdRng) -> ObjectState {
    ObjectState {
        version: rng.random(),
        digest: ObjectDigest(bytes32(rng)),
        owner: owner(rng),
    }
}

fn effects(rng: &mut StdRng) -> TransactionEffects {
    let status = if rng.random_bool(0.5) {
        ExecutionStatus::Success
    } else {
        let kinds = ExecutionErrorKind::ALL;
        ExecutionStatus::Failure(ExecutionFailure {
            kind: kinds[rng.random_range(0..kinds.len())],
            description: format!("failure {}", rng.random::<u32>()),
            object_id: maybe(rng, object_id),
        })
    };
    // Every object written gets the transaction's lamport version: the wire carries it once.
    let lamport_version = rng.random();
    let changed_objects = list(rng, 5, |r| {
        let id_operation = [
            IdOperation::None,
            IdOperation::Created,
            IdOperation::Deleted,
        ][r.random_range(0..3)];
        ChangedObject {
            id: object_id(r),
            input: (id_operation != IdOperation::Created).then(|| object_state(r)),
            output: (id_operation != IdOperation::Deleted).then(|| ObjectState {
                version: lamport_version,
                ..object_state(r)
            }),
            id_operation,
        }
    });
    let fee = TransactionFee {
        base_fee: rng.random_range(0..1 << 40),
        operation_fee: rng.random_range(0..1 << 40),
        value_fee: rng.random_range(0..1 << 40),
        total_fee: rng.random_range(0..1 << 42),
    };
    TransactionEffects {
        status,
        executed_epoch: rng.random(),
        fee,
        transaction_digest: TxDigest(bytes32(rng)),
        gas_object_index: (!changed_objects.is_empty())
            .then(|| rng.random_range(0..changed_objects.len() as u32)),
        dependencies: list(rng, 3, |r| TxDigest(bytes32(r))),
        lamport_version,
        changed_objects,
        unchanged_shared_objects: list(rng, 2, |r| UnchangedSharedObject {
            id: object_id(r),
            version: r.random(),
            digest: ObjectDigest(bytes32(r)),
        }),
    }
}

fn model(rng: &mut StdRng) -> ModelView {
    let state = ModelState::ALL[rng.random_range(0..ModelState::ALL.len())];
    // Revealed weights come with their key and commitments, all or none; a pending model
    // always has its first commit.
    let revealed =
        matches!(state, ModelState::Active | ModelState::Inactive) && rng.random_bool(0.8);
    let pending = match state {
        ModelState::Pending => Some(commit(rng)),
        ModelState::Created => None,
        _ => maybe(rng, commit),
    };
    ModelView {
        id: object_id(rng),
        owner: address(rng),
        state,
        architecture_version: rng.random_range(1..4),
        create_epoch: rng.random(),
        stake: rng.random(),
        pool_token_balance: rng.random(),
        pool_id: maybe(rng, object_id),
        activation_epoch: maybe(rng, |r| r.random()),
        deactivation_epoch: maybe(rng, |r| r.random()),
        commission_bps: rng.random_range(0..10_000),
        next_commission_bps: rng.random_range(0..10_000),
        manifest: revealed.then(|| manifest(rng)),
        revealed_commitments: revealed.then(|| commitments(rng)),
        decryption_key: revealed.then(|| Digest(bytes32(rng))),
        embedding: maybe(rng, |r| {
            let n = r.random_range(1..8);
            floats(r, n)
        }),
        pending,
    }
}

fn validator(rng: &mut StdRng) -> ValidatorView {
    let mut epochs: Vec<u64> = list(rng, 6, |r| r.random_range(0..100));
    epochs.sort_unstable();
    epochs.dedup();
    let bytes = |r: &mut StdRng, n: usize| (0..n).map(|_| r.random::<u8>()).collect::<Vec<_>>();
    ValidatorView {
        address: address(rng),
        voting_power: rng.random_range(0..=10_000),
        commission_bps: rng.random_range(0..10_000),
        next_commission_bps: rng.random_range(0..10_000),
        pool_id: object_id(rng),
        stake: rng.random(),
        pending_stake: rng.random(),
        next_epoch_stake: rng.random(),
        exchange_rates: epochs
            .into_iter()
            .map(|e| (e, rng.random(), rng.random()))
            .collect(),
        rewards_pool: rng.random(),
        pool_token_balance: rng.random(),
        pending_total_soma_withdraw: rng.random(),
        pending_pool_token_withdraw: rng.random(),
        activation_epoch: maybe(rng, |r| r.random()),
        deactivation_epoch: maybe(rng, |r| r.random()),
        keys: ValidatorKeysView {
            protocol_pubkey: bytes(rng, 96),
            network_pubkey: bytes(rng, 32),
            worker_pubkey: bytes(rng, 32),
            proof_of_possession: bytes(rng, 48),
            net_address: format!("/ip4/127.0.0.1/tcp/{}/http", rng.random::<u16>()),
            p2p_address: format!("/ip4/127.0.0.1/udp/{}", rng.random::<u16>()),
            primary_address: format!("/ip4/127.0.0.1/udp/{}", rng.random::<u16>()),
            proxy_address: format!("/ip4/127.0.0.1/tcp/{}/http", rng.random::<u16>()),
        },
    }
}

fn target(rng: &mut StdRng) -> TargetView {
    let filled = rng.random_bool(0.5);
    TargetView {
        id: object_id(rng),
        embedding: {
            let n = rng.random_range(0..8);
            floats(rng, n)
        },
        model_ids: list(rng, 3, object_id),
        distance_threshold: rng.random_range(0.0f32..2.0),
        reward_pool: rng.random(),
        generation_epoch: rng.random(),
        status: ["open", "filled", "claimed", "expired"][rng.random_range(0..4)].to_string(),
        fill_epoch: filled.then(|| rng.random()),
        submitter: filled.then(|| address(rng)),
        winning_model_id: filled.then(|| object_id(rng)),
        winning_model_owner: filled.then(|| address(rng)),
        bond_amount: rng.random(),
        data_url: filled.then(|| manifest(rng).url),
    }
}

fn params(rng: &mut StdRng) -> ChainParams {
    let o = |r: &mut StdRng| maybe(r, |r| r.random_range(0..1u64 << 50));
    ChainParams {
        epoch_duration_ms: rng.random(),
        model_min_stake: rng.random(),
        model_architecture_version: rng.random_range(1..3),
        embedding_dim: rng.random_range(1..4096),
        base_fee: rng.random(),
        write_object_fee: rng.random(),
        value_fee_bps: rng.random_range(0..10_000),
        submission_bond_per_byte: rng.random(),
        max_submission_data_size: rng.random(),
        model_reward_share_bps: o(rng),
        models_per_target: rng.random_range(1..8),
        initial_targets_per_epoch: o(rng),
        target_hits_per_epoch: o(rng),
        emission_per_epoch: o(rng),
        validator_reward_allocation_bps: o(rng),
        model_reveal_slash_rate_bps: o(rng),
        model_tally_slash_rate_bps: o(rng),
        target_epoch_fee_collection: o(rng),
        min_value_fee_bps: o(rng),
        max_value_fee_bps: o(rng),
        fee_adjustment_rate_bps: o(rng),
        initial_distance_threshold: maybe(rng, |r| r.random_range(0.0f32..2.0)),
        target_reward_allocation_bps: o(rng),
        hits_ema_decay_bps: o(rng),
        difficulty_adjustment_rate_bps: o(rng),
        max_distance_threshold: maybe(rng, |r| r.random_range(0.0f32..2.0)),
        min_distance_threshold: maybe(rng, |r| r.random_range(0.0f32..2.0)),
        submitter_reward_share_bps: o(rng),
        claimer_incentive_bps: o(rng),
        challenger_bond_per_byte: o(rng),
    }
}

fn epoch(rng: &mut StdRng) -> EpochView {
    let mut models = list(rng, 4, model);
    models.sort_by_key(|m| m.id);
    EpochView {
        epoch: rng.random(),
        start_ms: rng.random(),
        protocol_version: maybe(rng, |r| r.random()),
        params: params(rng),
        distance_threshold: rng.random_range(0.0f32..2.0),
        reward_per_target: rng.random(),
        hits_ema: rng.random(),
        hits_this_epoch: rng.random(),
        targets_generated_this_epoch: rng.random(),
        emission_pool: rng.random(),
        total_model_stake: rng.random(),
        models,
        validators: list(rng, 4, validator),
        validator_reports: list(rng, 3, |r| (address(r), list(r, 3, address)))
            .into_iter()
            .collect(),
        model_reports: list(rng, 3, |r| (object_id(r), list(r, 3, address)))
            .into_iter()
            .collect::<BTreeMap<_, _>>(),
    }
}

fn executed(rng: &mut StdRng) -> Executed {
    let kinds = all_kinds();
    let data = TransactionData::new(
        kinds[rng.random_range(9..kinds.len())].clone(),
        signer().address(),
        list(rng, 2, |r| ObjectRef {
            id: object_id(r),
            version: r.random(),
            digest: ObjectDigest(bytes32(r)),
        }),
    );
    let signed = SignedTransaction::sign(&signer(), data);
    let effects = effects(rng);
    Executed {
        digest: effects.transaction_digest,
        transaction: rng.random_bool(0.7).then(|| signed.data.clone()),
        signatures: if rng.random_bool(0.7) {
            signed.signatures
        } else {
            vec![]
        },
        effects,
        balance_changes: list(rng, 4, |r| BalanceChange {
            address: address(r),
            amount: r.random_range(-(1i128 << 100)..(1i128 << 100)),
        }),
        objects: list(rng, 3, object),
        checkpoint: maybe(rng, |r| r.random()),
        timestamp_ms: maybe(rng, |r| r.random_range(0..1u64 << 50)),
    }
}

#[test]
fn views_survive_the_wire() {
    let mut rng = StdRng::seed_from_u64(0x5eed_0001);
    for case in 0..CASES {
        let view = epoch(&mut rng);
        let message = through_bytes(proto::Epoch {
            system_state: Some(view.system_state_to_proto()),
            ..Default::default()
        });
        assert_eq!(
            EpochView::from_proto(&message).unwrap(),
            view,
            "epoch, case {case}"
        );

        let view = target(&mut rng);
        let back = TargetView::from_proto(&through_bytes(view.to_proto()), "target").unwrap();
        assert_eq!(back, view, "target, case {case}");

        let view = executed(&mut rng);
        let back = Executed::from_proto(&through_bytes(view.to_proto())).unwrap();
        assert_eq!(back, view, "executed, case {case}");
    }
}

#[test]
fn objects_effects_and_balance_changes_survive_the_wire() {
    let mut rng = StdRng::seed_from_u64(0x5eed_0002);
    for case in 0..CASES {
        let value = object(&mut rng);
        let back = object_from_proto(&through_bytes(object_to_proto(&value)), "object").unwrap();
        assert_eq!(back, value, "object, case {case}");

        let value = effects(&mut rng);
        let back = effects_from_proto(&through_bytes(effects_to_proto(&value))).unwrap();
        assert_eq!(back, value, "effects, case {case}");

        let value = BalanceChange {
            address: address(&mut rng),
            amount: rng.random(),
        };
        let back = balance_change_from_proto(&through_bytes(balance_change_to_proto(&value)), "b")
            .unwrap();
        assert_eq!(back, value, "balance change, case {case}");
    }
}

/// What the network's conversion makes of a kind (§6 of `protocol-rpc.md`): URLs in their
/// parsed form, `PayCoins` amounts always present, embeddings and losses as 1-D tensors of their
/// values (none where the tensor's bytes do not match its shape), the distance as shape `[1]`.
/// `Err` names the field the conversion refuses instead.
fn normal_form(kind: &TransactionKind) -> Result<TransactionKind, &'static str> {
    let vector = |t: &SomaTensor| SomaTensor::vector(&t.values().unwrap_or_default());
    let mut kind = kind.clone();
    match &mut kind {
        TransactionKind::CommitModel(CommitModel { manifest, .. }) => {
            manifest.url = normalize_url(&manifest.url).map_err(|_| ".url")?;
        }
        TransactionKind::RevealModel(RevealModel { embedding, .. }) => {
            *embedding = vector(embedding)
        }
        TransactionKind::SubmitData(SubmitData {
            data_manifest,
            embedding,
            distance_score,
            loss_score,
            ..
        }) => {
            data_manifest.url = normalize_url(&data_manifest.url).map_err(|_| ".url")?;
            *embedding = vector(embedding);
            *loss_score = vector(loss_score);
            let first = distance_score.values().unwrap_or_default().first().copied();
            *distance_score = SomaTensor::scalar(first.ok_or(".distance_score")?);
        }
        TransactionKind::PayCoins(PayCoins { amounts, .. }) => {
            amounts.get_or_insert_with(Vec::new);
        }
        _ => {}
    }
    Ok(kind)
}

/// Kinds drawn by changing random bytes of each kind's BCS (ids, amounts, flags, lengths,
/// string bytes): whatever still decodes is a kind a sender could sign.
#[test]
fn every_kind_survives_the_wire_or_meets_its_rule() {
    let mut rng = StdRng::seed_from_u64(0x5eed_0003);
    let mut kinds = all_kinds();
    // The fixture's genesis has no objects, and a mutated empty list never decodes.
    kinds[0] = TransactionKind::Genesis(Genesis {
        objects: vec![object(&mut rng), object(&mut rng)],
    });
    // Nor does a flag of an absent field, which is all but one of the fixture's.
    let some = |text: &str| Some(text.as_bytes().to_vec());
    kinds[7] = TransactionKind::UpdateValidatorMetadata(ValidatorMetadataUpdate {
        next_epoch_network_address: some("/ip4/127.0.0.1/tcp/1"),
        next_epoch_p2p_address: some("/ip4/127.0.0.1/udp/2"),
        next_epoch_primary_address: some("/ip4/127.0.0.1/udp/3"),
        next_epoch_proxy_address: some("/ip4/127.0.0.1/tcp/4"),
        next_epoch_protocol_pubkey: some("protocol"),
        next_epoch_worker_pubkey: some("worker"),
        next_epoch_network_pubkey: some("network"),
        next_epoch_proof_of_possession: some("pop"),
    });
    let mut decoded = vec![0u32; kinds.len()];
    let mut refused = 0;
    for case in 0..40 * CASES {
        let tag = rng.random_range(0..kinds.len());
        let mut bytes = bcs::to_bytes(&kinds[tag]).unwrap();
        for _ in 0..rng.random_range(1..=4) {
            // Keep the tag: each kind is mutated within itself.
            let at = rng.random_range(1..bytes.len().max(2));
            if at < bytes.len() {
                bytes[at] = rng.random();
            }
        }
        let Ok(kind) = bcs::from_bytes::<TransactionKind>(&bytes) else {
            continue;
        };
        decoded[tag] += 1;
        let data = TransactionData::new(kind, signer().address(), vec![]);
        let wire = through_bytes(transaction_to_proto(&data));
        match (transaction_from_proto(&wire), normal_form(&data.kind)) {
            (Ok(back), Ok(normal)) => assert_eq!(
                bcs::to_bytes(&back.kind).unwrap(),
                bcs::to_bytes(&normal).unwrap(),
                "{} (case {case}) came back as another kind",
                data.kind.name()
            ),
            (Err(e), Err(field)) => {
                assert!(
                    e.field.ends_with(field),
                    "case {case}: {e}, expected {field}"
                );
                refused += 1;
            }
            (Ok(_), Err(field)) => panic!("case {case}: accepted, expected a refusal of {field}"),
            (Err(e), Ok(_)) => panic!("{} (case {case}) refused: {e}", data.kind.name()),
        }
    }
    // Every kind was drawn many times, so the property was checked on each.
    for (tag, n) in decoded.iter().enumerate() {
        assert!(*n >= 50, "kind {tag} decoded only {n} times");
    }
    eprintln!("decoded per kind {decoded:?}, refused by rule {refused}");
}
