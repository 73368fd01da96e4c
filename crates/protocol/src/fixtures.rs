//! Test fixtures (feature `fixtures`): the inputs of the reference's §10 vectors, one value of
//! each of the 26 transaction kinds, shared by the vector, SDK and conversion tests.

use crate::transaction::{
    AddStake, AddStakeToModel, ChangeEpoch, ClaimRewards, CommitModel, ConsensusCommitPrologueV1,
    CreateModel, DeactivateModel, Genesis, PayCoins, RemoveValidator, ReportModel,
    ReportSubmission, ReportValidator, RevealModel, SetCommissionRate, SetModelCommissionRate,
    SubmitData, TransferCoin, TransferObjects, UndoReportModel, UndoReportSubmission,
    UndoReportValidator, WithdrawStake,
};
use crate::transaction::{ValidatorInfo, ValidatorMetadataUpdate};
use crate::{
    Address, Commitment, Digest, Keypair, Manifest, ObjectDigest, ObjectId, ObjectRef, SomaTensor,
    TransactionKind,
};

/// The signer of every vector: the secret 00 01 02 … 1f.
pub fn signer() -> Keypair {
    Keypair::from_secret(std::array::from_fn(|i| i as u8))
}

/// The gas coin of every vector: (01×32, version 7, digest 02×32).
pub fn gas() -> ObjectRef {
    ObjectRef {
        id: ObjectId([1; 32]),
        version: 7,
        digest: ObjectDigest([2; 32]),
    }
}

/// One of each of the 26 kinds, in tag order, with the payloads of the "digests for every kind"
/// table.
pub fn all_kinds() -> Vec<TransactionKind> {
    let reference = ObjectRef {
        id: ObjectId([0xaa; 32]),
        version: 3,
        digest: ObjectDigest([0xdd; 32]),
    };
    let a1 = Address([0x11; 32]);
    let a2 = Address([0x22; 32]);
    let oid = ObjectId([0xaa; 32]);
    let dig = Commitment([0xdd; 32]);
    let digest = Digest([0xdd; 32]);
    let manifest = |size| Manifest {
        url: "https://example.com/w.bin".into(),
        checksum: dig,
        size,
    };
    let bytes = |s: &str| s.as_bytes().to_vec();
    vec![
        TransactionKind::Genesis(Genesis { objects: vec![] }),
        TransactionKind::ConsensusCommitPrologueV1(ConsensusCommitPrologueV1 {
            epoch: 1,
            round: 2,
            sub_dag_index: None,
            commit_timestamp_ms: 3,
            consensus_commit_digest: digest,
            additional_state_digest: digest,
        }),
        TransactionKind::ChangeEpoch(ChangeEpoch {
            epoch: 1,
            epoch_start_timestamp_ms: 1_700_000_000_000,
            protocol_version: 5,
            fees: 0,
            epoch_randomness: vec![1, 2],
        }),
        TransactionKind::AddValidator(ValidatorInfo {
            pubkey_bytes: bytes("pk"),
            network_pubkey_bytes: bytes("npk"),
            worker_pubkey_bytes: bytes("wpk"),
            proof_of_possession: bytes("pop"),
            net_address: bytes("na"),
            p2p_address: bytes("p2p"),
            primary_address: bytes("pri"),
            proxy_address: bytes("prx"),
        }),
        TransactionKind::RemoveValidator(RemoveValidator {
            pubkey_bytes: bytes("pk"),
        }),
        TransactionKind::ReportValidator(ReportValidator { reportee: a1 }),
        TransactionKind::UndoReportValidator(UndoReportValidator { reportee: a1 }),
        TransactionKind::UpdateValidatorMetadata(ValidatorMetadataUpdate {
            next_epoch_network_address: Some(bytes("x")),
            ..Default::default()
        }),
        TransactionKind::SetCommissionRate(SetCommissionRate { new_rate: 200 }),
        TransactionKind::TransferCoin(TransferCoin {
            coin: reference,
            amount: Some(1000),
            recipient: a1,
        }),
        TransactionKind::PayCoins(PayCoins {
            coins: vec![reference],
            amounts: Some(vec![5, 6]),
            recipients: vec![a1, a2],
        }),
        TransactionKind::TransferObjects(TransferObjects {
            objects: vec![reference],
            recipient: a2,
        }),
        TransactionKind::AddStake(AddStake {
            validator: a1,
            coin_ref: reference,
            amount: None,
        }),
        TransactionKind::WithdrawStake(WithdrawStake {
            staked_soma: reference,
        }),
        TransactionKind::CreateModel(CreateModel {
            stake_amount: 1_000_000_000,
            commission_rate: 1000,
            architecture_version: 1,
        }),
        TransactionKind::CommitModel(CommitModel {
            model_id: oid,
            manifest: manifest(1234),
            weights_commitment: dig,
            embedding_commitment: dig,
            decryption_key_commitment: dig,
        }),
        TransactionKind::RevealModel(RevealModel {
            model_id: oid,
            decryption_key: digest,
            embedding: SomaTensor::vector(&[0.1, 0.2, 0.3]),
        }),
        TransactionKind::AddStakeToModel(AddStakeToModel {
            model_id: oid,
            coin_ref: reference,
            amount: Some(5),
        }),
        TransactionKind::SetModelCommissionRate(SetModelCommissionRate {
            model_id: oid,
            new_rate: 500,
        }),
        TransactionKind::DeactivateModel(DeactivateModel { model_id: oid }),
        TransactionKind::ReportModel(ReportModel { model_id: oid }),
        TransactionKind::UndoReportModel(UndoReportModel { model_id: oid }),
        TransactionKind::SubmitData(SubmitData {
            target_id: oid,
            data_manifest: manifest(1024),
            model_id: ObjectId(a1.0),
            embedding: SomaTensor::vector(&[0.5, 0.25]),
            distance_score: SomaTensor::scalar(0.9),
            loss_score: SomaTensor::vector(&[1.5]),
            bond_coin: reference,
        }),
        TransactionKind::ClaimRewards(ClaimRewards { target_id: oid }),
        TransactionKind::ReportSubmission(ReportSubmission { target_id: oid }),
        TransactionKind::UndoReportSubmission(UndoReportSubmission { target_id: oid }),
    ]
}
