//! The one place protobuf meets the protocol types.
//!
//! Domain → proto is infallible. Proto → domain is `TryFrom`-like and names the field that is
//! missing or malformed ([`FieldError`]), which servers send back as INVALID_ARGUMENT. The lossy
//! rules of the network's conversion (§1.1 and §6 of `protocol-rpc.md`) are named functions:
//! [`hex_id`] and [`prefixed_id`] for the two id spellings, [`pay_amounts`] for `PayCoins`,
//! [`normalize_manifest_url`] for URLs, and every `UNKNOWN` enum value is an error.

use prost_types::Timestamp;
use somatrain_protocol::effects::{
    BalanceChange, ChangedObject, ExecutionErrorKind, ExecutionFailure, ExecutionStatus,
    IdOperation, ObjectState, TransactionEffects, TransactionFee, UnchangedSharedObject,
};
use somatrain_protocol::transaction::{
    AddStake, AddStakeToModel, ChangeEpoch, ClaimRewards, CommitModel, ConsensusCommitPrologueV1,
    CreateModel, DeactivateModel, Genesis, PayCoins, RemoveValidator, ReportModel,
    ReportSubmission, ReportValidator, RevealModel, SetCommissionRate, SetModelCommissionRate,
    SubmitData, TransferCoin, TransferObjects, UndoReportModel, UndoReportSubmission,
    UndoReportValidator, WithdrawStake,
};
use somatrain_protocol::transaction::{ValidatorInfo, ValidatorMetadataUpdate, normalize_url};
use somatrain_protocol::{
    Address, Commitment, Digest, Manifest, Object, ObjectDigest, ObjectId, ObjectRef, ObjectType,
    Owner, SomaTensor, TransactionData, TransactionKind, TxDigest, UserSignature,
};

use crate::proto;
use crate::proto::transaction_kind::Kind;

/// A field of a request that is missing or malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct FieldError {
    pub field: String,
    pub reason: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            reason: reason.into(),
        }
    }

    pub fn missing(field: impl Into<String>) -> Self {
        Self::new(field, "missing")
    }

    /// Prefixes the field path with the enclosing message's field.
    pub fn within(self, parent: &str) -> Self {
        FieldError {
            field: format!("{parent}.{}", self.field),
            reason: self.reason,
        }
    }
}

impl From<FieldError> for tonic::Status {
    fn from(e: FieldError) -> Self {
        tonic::Status::invalid_argument(e.to_string())
    }
}

type Result<T> = std::result::Result<T, FieldError>;

fn required<T>(value: Option<T>, field: &str) -> Result<T> {
    value.ok_or_else(|| FieldError::missing(field))
}

// ---- Text forms -------------------------------------------------------------------------------

/// 64 hex digits without `0x`: addresses, and object ids in `Object` and `ObjectReference`.
pub fn hex_id(bytes: &[u8; 32]) -> String {
    hex::encode(bytes)
}

/// `0x` + 64 hex digits: `model_id`, `target_id` and the ids of `ListTargets`. Full width even
/// where the real node strips leading zeros, because the quickstart compares these strings.
pub fn prefixed_id(id: &ObjectId) -> String {
    id.to_string()
}

pub fn parse_address(text: &str, field: &str) -> Result<Address> {
    text.parse()
        .map_err(|e: somatrain_protocol::keys::KeyError| FieldError::new(field, e.to_string()))
}

pub fn parse_object_id(text: &str, field: &str) -> Result<ObjectId> {
    text.parse()
        .map_err(|e: somatrain_protocol::IdError| FieldError::new(field, e.to_string()))
}

fn parse_digest<T: std::str::FromStr<Err = somatrain_protocol::IdError>>(
    text: &str,
    field: &str,
) -> Result<T> {
    text.parse()
        .map_err(|e: somatrain_protocol::IdError| FieldError::new(field, e.to_string()))
}

fn bytes32(bytes: &[u8], field: &str) -> Result<[u8; 32]> {
    bytes
        .try_into()
        .map_err(|_| FieldError::new(field, format!("must be 32 bytes, got {}", bytes.len())))
}

fn required_address(value: &Option<String>, field: &str) -> Result<Address> {
    parse_address(required(value.as_deref(), field)?, field)
}

fn required_object_id(value: &Option<String>, field: &str) -> Result<ObjectId> {
    parse_object_id(required(value.as_deref(), field)?, field)
}

fn required_bytes32(value: &Option<Vec<u8>>, field: &str) -> Result<[u8; 32]> {
    bytes32(required(value.as_deref(), field)?, field)
}

/// The amounts of `PayCoins` as the network rebuilds them: always `Some`, even when empty.
pub fn pay_amounts(amounts: &[u64]) -> Option<Vec<u64>> {
    Some(amounts.to_vec())
}

/// A manifest URL in the form the network stores and signs.
pub fn normalize_manifest_url(text: &str, field: &str) -> Result<String> {
    normalize_url(text).map_err(|e| FieldError::new(field, format!("not a URL: {e}")))
}

pub fn timestamp_from_ms(ms: u64) -> Timestamp {
    Timestamp {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

pub fn timestamp_to_ms(t: &Timestamp, field: &str) -> Result<u64> {
    if t.seconds < 0 || !(0..1_000_000_000).contains(&t.nanos) {
        return Err(FieldError::new(field, "not a time after 1970"));
    }
    (t.seconds as u64)
        .checked_mul(1000)
        .and_then(|ms| ms.checked_add(t.nanos as u64 / 1_000_000))
        .ok_or_else(|| FieldError::new(field, "out of range"))
}

// ---- Objects ----------------------------------------------------------------------------------

pub fn object_ref_to_proto(r: &ObjectRef) -> proto::ObjectReference {
    proto::ObjectReference {
        object_id: Some(hex_id(&r.id.0)),
        version: Some(r.version),
        digest: Some(r.digest.to_string()),
    }
}

pub fn object_ref_from_proto(r: &proto::ObjectReference, field: &str) -> Result<ObjectRef> {
    Ok(ObjectRef {
        id: required_object_id(&r.object_id, &format!("{field}.object_id"))?,
        version: required(r.version, &format!("{field}.version"))?,
        digest: parse_digest(
            required(r.digest.as_deref(), &format!("{field}.digest"))?,
            &format!("{field}.digest"),
        )?,
    })
}

fn object_ref_field(r: &Option<proto::ObjectReference>, field: &str) -> Result<ObjectRef> {
    object_ref_from_proto(required(r.as_ref(), field)?, field)
}

fn object_refs(refs: &[proto::ObjectReference], field: &str) -> Result<Vec<ObjectRef>> {
    refs.iter()
        .enumerate()
        .map(|(i, r)| object_ref_from_proto(r, &format!("{field}[{i}]")))
        .collect()
}

pub fn owner_to_proto(owner: &Owner) -> proto::Owner {
    use proto::owner::OwnerKind;
    match owner {
        Owner::AddressOwner(a) => proto::Owner {
            kind: Some(OwnerKind::Address as i32),
            address: Some(hex_id(&a.0)),
            version: None,
        },
        Owner::Shared {
            initial_shared_version,
        } => proto::Owner {
            kind: Some(OwnerKind::Shared as i32),
            address: None,
            version: Some(*initial_shared_version),
        },
        Owner::Immutable => proto::Owner {
            kind: Some(OwnerKind::Immutable as i32),
            address: None,
            version: None,
        },
    }
}

pub fn owner_from_proto(owner: &proto::Owner, field: &str) -> Result<Owner> {
    use proto::owner::OwnerKind;
    let kind = required(owner.kind, &format!("{field}.kind"))?;
    match OwnerKind::try_from(kind) {
        Ok(OwnerKind::Address) => Ok(Owner::AddressOwner(required_address(
            &owner.address,
            &format!("{field}.address"),
        )?)),
        Ok(OwnerKind::Shared) => Ok(Owner::Shared {
            initial_shared_version: required(owner.version, &format!("{field}.version"))?,
        }),
        Ok(OwnerKind::Immutable) => Ok(Owner::Immutable),
        _ => Err(FieldError::new(
            format!("{field}.kind"),
            format!("unknown owner kind {kind}"),
        )),
    }
}

pub fn object_to_proto(object: &Object) -> proto::Object {
    proto::Object {
        object_id: Some(hex_id(&object.id().map(|id| id.0).unwrap_or_default())),
        version: Some(object.version()),
        digest: Some(object.digest().to_string()),
        owner: Some(owner_to_proto(&object.owner)),
        object_type: Some(object.object_type().name().to_string()),
        contents: Some(object.payload().to_vec()),
        previous_transaction: Some(object.previous_transaction.to_string()),
    }
}

pub fn object_from_proto(object: &proto::Object, field: &str) -> Result<Object> {
    let type_field = format!("{field}.object_type");
    let type_name = required(object.object_type.as_deref(), &type_field)?;
    let object_type = ObjectType::from_name(type_name)
        .ok_or_else(|| FieldError::new(&type_field, format!("unknown object type {type_name}")))?;
    Ok(Object::from_payload(
        object_type,
        required_object_id(&object.object_id, &format!("{field}.object_id"))?,
        required(object.version, &format!("{field}.version"))?,
        required(object.contents.as_deref(), &format!("{field}.contents"))?,
        owner_from_proto(
            required(object.owner.as_ref(), &format!("{field}.owner"))?,
            &format!("{field}.owner"),
        )?,
        parse_digest(
            required(
                object.previous_transaction.as_deref(),
                &format!("{field}.previous_transaction"),
            )?,
            &format!("{field}.previous_transaction"),
        )?,
    ))
}

// ---- Manifests --------------------------------------------------------------------------------

pub fn manifest_to_proto(m: &Manifest) -> proto::Manifest {
    proto::Manifest {
        version: Some(proto::manifest::Version::V1(proto::ManifestV1 {
            url: Some(m.url.clone()),
            metadata: Some(proto::Metadata {
                version: Some(proto::metadata::Version::V1(proto::MetadataV1 {
                    checksum: Some(m.checksum.0.to_vec()),
                    size: Some(m.size),
                })),
            }),
        })),
    }
}

pub fn manifest_from_proto(m: &proto::Manifest, field: &str) -> Result<Manifest> {
    let Some(proto::manifest::Version::V1(v1)) = &m.version else {
        return Err(FieldError::missing(format!("{field}.v1")));
    };
    let url_field = format!("{field}.v1.url");
    let url = normalize_manifest_url(required(v1.url.as_deref(), &url_field)?, &url_field)?;
    let metadata_field = format!("{field}.v1.metadata.v1");
    let Some(proto::Metadata {
        version: Some(proto::metadata::Version::V1(metadata)),
    }) = &v1.metadata
    else {
        return Err(FieldError::missing(metadata_field));
    };
    Ok(Manifest {
        url,
        checksum: Commitment(required_bytes32(
            &metadata.checksum,
            &format!("{metadata_field}.checksum"),
        )?),
        size: required(metadata.size, &format!("{metadata_field}.size"))?,
    })
}

fn manifest_field(m: &Option<proto::Manifest>, field: &str) -> Result<Manifest> {
    manifest_from_proto(required(m.as_ref(), field)?, field)
}

// ---- Transactions -----------------------------------------------------------------------------

/// The protobuf form of a kind. Tensors are sent as their values (1-D, or a scalar for the
/// distance), which is how the network rebuilds them.
pub fn kind_to_proto(kind: &TransactionKind) -> proto::TransactionKind {
    let model = |id: &ObjectId| Some(prefixed_id(id));
    let values = |t: &SomaTensor| t.values().unwrap_or_default();
    let kind = match kind {
        TransactionKind::Genesis(Genesis { objects }) => Kind::Genesis(proto::GenesisTransaction {
            objects: objects.iter().map(object_to_proto).collect(),
        }),
        TransactionKind::ConsensusCommitPrologueV1(ConsensusCommitPrologueV1 {
            epoch,
            round,
            sub_dag_index,
            commit_timestamp_ms,
            consensus_commit_digest,
            additional_state_digest,
        }) => Kind::ConsensusCommitPrologue(proto::ConsensusCommitPrologue {
            epoch: Some(*epoch),
            round: Some(*round),
            sub_dag_index: *sub_dag_index,
            commit_timestamp: Some(timestamp_from_ms(*commit_timestamp_ms)),
            consensus_commit_digest: Some(consensus_commit_digest.to_string()),
            additional_state_digest: Some(additional_state_digest.to_string()),
        }),
        TransactionKind::ChangeEpoch(ChangeEpoch {
            epoch,
            epoch_start_timestamp_ms,
            protocol_version,
            fees,
            epoch_randomness,
        }) => Kind::ChangeEpoch(proto::ChangeEpoch {
            epoch: Some(*epoch),
            epoch_start_timestamp: Some(timestamp_from_ms(*epoch_start_timestamp_ms)),
            protocol_version: Some(*protocol_version),
            fees: Some(*fees),
            epoch_randomness: Some(epoch_randomness.clone()),
        }),
        TransactionKind::AddValidator(v) => Kind::AddValidator(proto::AddValidator {
            pubkey_bytes: Some(v.pubkey_bytes.clone()),
            network_pubkey_bytes: Some(v.network_pubkey_bytes.clone()),
            worker_pubkey_bytes: Some(v.worker_pubkey_bytes.clone()),
            net_address: Some(v.net_address.clone()),
            p2p_address: Some(v.p2p_address.clone()),
            primary_address: Some(v.primary_address.clone()),
            proxy_address: Some(v.proxy_address.clone()),
            proof_of_possession: Some(v.proof_of_possession.clone()),
        }),
        TransactionKind::RemoveValidator(RemoveValidator { pubkey_bytes }) => {
            Kind::RemoveValidator(proto::RemoveValidator {
                pubkey_bytes: Some(pubkey_bytes.clone()),
            })
        }
        TransactionKind::ReportValidator(ReportValidator { reportee }) => {
            Kind::ReportValidator(proto::ReportValidator {
                reportee: Some(hex_id(&reportee.0)),
            })
        }
        TransactionKind::UndoReportValidator(UndoReportValidator { reportee }) => {
            Kind::UndoReportValidator(proto::UndoReportValidator {
                reportee: Some(hex_id(&reportee.0)),
            })
        }
        TransactionKind::UpdateValidatorMetadata(u) => {
            Kind::UpdateValidatorMetadata(proto::UpdateValidatorMetadata {
                next_epoch_network_address: u.next_epoch_network_address.clone(),
                next_epoch_p2p_address: u.next_epoch_p2p_address.clone(),
                next_epoch_primary_address: u.next_epoch_primary_address.clone(),
                next_epoch_proxy_address: u.next_epoch_proxy_address.clone(),
                next_epoch_protocol_pubkey: u.next_epoch_protocol_pubkey.clone(),
                next_epoch_worker_pubkey: u.next_epoch_worker_pubkey.clone(),
                next_epoch_network_pubkey: u.next_epoch_network_pubkey.clone(),
                next_epoch_proof_of_possession: u.next_epoch_proof_of_possession.clone(),
            })
        }
        TransactionKind::SetCommissionRate(SetCommissionRate { new_rate }) => {
            Kind::SetCommissionRate(proto::SetCommissionRate {
                new_rate: Some(*new_rate),
            })
        }
        TransactionKind::TransferCoin(TransferCoin {
            coin,
            amount,
            recipient,
        }) => Kind::TransferCoin(proto::TransferCoin {
            coin: Some(object_ref_to_proto(coin)),
            amount: *amount,
            recipient: Some(hex_id(&recipient.0)),
        }),
        TransactionKind::PayCoins(PayCoins {
            coins,
            amounts,
            recipients,
        }) => Kind::PayCoins(proto::PayCoins {
            coins: coins.iter().map(object_ref_to_proto).collect(),
            amounts: amounts.clone().unwrap_or_default(),
            recipients: recipients.iter().map(|a| hex_id(&a.0)).collect(),
        }),
        TransactionKind::TransferObjects(TransferObjects { objects, recipient }) => {
            Kind::TransferObjects(proto::TransferObjects {
                objects: objects.iter().map(object_ref_to_proto).collect(),
                recipient: Some(hex_id(&recipient.0)),
            })
        }
        TransactionKind::AddStake(AddStake {
            validator,
            coin_ref,
            amount,
        }) => Kind::AddStake(proto::AddStake {
            address: Some(hex_id(&validator.0)),
            coin_ref: Some(object_ref_to_proto(coin_ref)),
            amount: *amount,
        }),
        TransactionKind::WithdrawStake(WithdrawStake { staked_soma }) => {
            Kind::WithdrawStake(proto::WithdrawStake {
                staked_soma: Some(object_ref_to_proto(staked_soma)),
            })
        }
        TransactionKind::CreateModel(CreateModel {
            stake_amount,
            commission_rate,
            architecture_version,
        }) => Kind::CreateModel(proto::CreateModel {
            stake_amount: Some(*stake_amount),
            commission_rate: Some(*commission_rate),
            architecture_version: Some(*architecture_version),
        }),
        TransactionKind::CommitModel(CommitModel {
            model_id,
            manifest,
            weights_commitment,
            embedding_commitment,
            decryption_key_commitment,
        }) => Kind::CommitModel(proto::CommitModel {
            model_id: model(model_id),
            manifest: Some(manifest_to_proto(manifest)),
            weights_commitment: Some(weights_commitment.0.to_vec()),
            embedding_commitment: Some(embedding_commitment.0.to_vec()),
            decryption_key_commitment: Some(decryption_key_commitment.0.to_vec()),
        }),
        TransactionKind::RevealModel(RevealModel {
            model_id,
            decryption_key,
            embedding,
        }) => Kind::RevealModel(proto::RevealModel {
            model_id: model(model_id),
            decryption_key: Some(decryption_key.0.to_vec()),
            embedding: values(embedding),
        }),
        TransactionKind::AddStakeToModel(AddStakeToModel {
            model_id,
            coin_ref,
            amount,
        }) => Kind::AddStakeToModel(proto::AddStakeToModel {
            model_id: model(model_id),
            coin_ref: Some(object_ref_to_proto(coin_ref)),
            amount: *amount,
        }),
        TransactionKind::SetModelCommissionRate(SetModelCommissionRate { model_id, new_rate }) => {
            Kind::SetModelCommissionRate(proto::SetModelCommissionRate {
                model_id: model(model_id),
                new_rate: Some(*new_rate),
            })
        }
        TransactionKind::DeactivateModel(DeactivateModel { model_id }) => {
            Kind::DeactivateModel(proto::DeactivateModel {
                model_id: model(model_id),
            })
        }
        TransactionKind::ReportModel(ReportModel { model_id }) => {
            Kind::ReportModel(proto::ReportModel {
                model_id: model(model_id),
            })
        }
        TransactionKind::UndoReportModel(UndoReportModel { model_id }) => {
            Kind::UndoReportModel(proto::UndoReportModel {
                model_id: model(model_id),
            })
        }
        TransactionKind::SubmitData(SubmitData {
            target_id,
            data_manifest,
            model_id,
            embedding,
            distance_score,
            loss_score,
            bond_coin,
        }) => Kind::SubmitData(proto::SubmitData {
            target_id: model(target_id),
            data_manifest: Some(proto::SubmissionManifest {
                manifest: Some(manifest_to_proto(data_manifest)),
            }),
            model_id: model(model_id),
            embedding: values(embedding),
            distance_score: values(distance_score).first().copied(),
            bond_coin: Some(object_ref_to_proto(bond_coin)),
            loss_score: values(loss_score),
        }),
        TransactionKind::ClaimRewards(ClaimRewards { target_id }) => {
            Kind::ClaimRewards(proto::ClaimRewards {
                target_id: model(target_id),
            })
        }
        TransactionKind::ReportSubmission(ReportSubmission { target_id }) => {
            Kind::ReportSubmission(proto::ReportSubmission {
                target_id: model(target_id),
                challenger: None,
            })
        }
        TransactionKind::UndoReportSubmission(UndoReportSubmission { target_id }) => {
            Kind::UndoReportSubmission(proto::UndoReportSubmission {
                target_id: model(target_id),
            })
        }
    };
    proto::TransactionKind { kind: Some(kind) }
}

/// Rebuilds the kind the sender signed, as the network does.
pub fn kind_from_proto(kind: &proto::TransactionKind, field: &str) -> Result<TransactionKind> {
    let f = |name: &str| format!("{field}.{name}");
    let Some(kind) = &kind.kind else {
        return Err(FieldError::new(
            field,
            "missing, or a kind this network no longer accepts",
        ));
    };
    Ok(match kind {
        Kind::Genesis(g) => TransactionKind::Genesis(Genesis {
            objects: g
                .objects
                .iter()
                .enumerate()
                .map(|(i, o)| object_from_proto(o, &f(&format!("genesis.objects[{i}]"))))
                .collect::<Result<_>>()?,
        }),
        Kind::ConsensusCommitPrologue(c) => {
            let p = |n: &str| f(&format!("consensus_commit_prologue.{n}"));
            TransactionKind::ConsensusCommitPrologueV1(ConsensusCommitPrologueV1 {
                epoch: required(c.epoch, &p("epoch"))?,
                round: required(c.round, &p("round"))?,
                sub_dag_index: c.sub_dag_index,
                commit_timestamp_ms: timestamp_to_ms(
                    required(c.commit_timestamp.as_ref(), &p("commit_timestamp"))?,
                    &p("commit_timestamp"),
                )?,
                consensus_commit_digest: parse_digest::<Digest>(
                    required(
                        c.consensus_commit_digest.as_deref(),
                        &p("consensus_commit_digest"),
                    )?,
                    &p("consensus_commit_digest"),
                )?,
                additional_state_digest: parse_digest::<Digest>(
                    required(
                        c.additional_state_digest.as_deref(),
                        &p("additional_state_digest"),
                    )?,
                    &p("additional_state_digest"),
                )?,
            })
        }
        Kind::ChangeEpoch(c) => {
            let p = |n: &str| f(&format!("change_epoch.{n}"));
            TransactionKind::ChangeEpoch(ChangeEpoch {
                epoch: required(c.epoch, &p("epoch"))?,
                epoch_start_timestamp_ms: timestamp_to_ms(
                    required(
                        c.epoch_start_timestamp.as_ref(),
                        &p("epoch_start_timestamp"),
                    )?,
                    &p("epoch_start_timestamp"),
                )?,
                protocol_version: required(c.protocol_version, &p("protocol_version"))?,
                fees: required(c.fees, &p("fees"))?,
                epoch_randomness: c.epoch_randomness.clone().unwrap_or_default(),
            })
        }
        Kind::AddValidator(v) => {
            let p = |n: &str| f(&format!("add_validator.{n}"));
            let b = |value: &Option<Vec<u8>>, n: &str| required(value.clone(), &p(n));
            TransactionKind::AddValidator(ValidatorInfo {
                pubkey_bytes: b(&v.pubkey_bytes, "pubkey_bytes")?,
                network_pubkey_bytes: b(&v.network_pubkey_bytes, "network_pubkey_bytes")?,
                worker_pubkey_bytes: b(&v.worker_pubkey_bytes, "worker_pubkey_bytes")?,
                proof_of_possession: b(&v.proof_of_possession, "proof_of_possession")?,
                net_address: b(&v.net_address, "net_address")?,
                p2p_address: b(&v.p2p_address, "p2p_address")?,
                primary_address: b(&v.primary_address, "primary_address")?,
                proxy_address: b(&v.proxy_address, "proxy_address")?,
            })
        }
        Kind::RemoveValidator(r) => TransactionKind::RemoveValidator(RemoveValidator {
            pubkey_bytes: required(r.pubkey_bytes.clone(), &f("remove_validator.pubkey_bytes"))?,
        }),
        Kind::ReportValidator(r) => TransactionKind::ReportValidator(ReportValidator {
            reportee: required_address(&r.reportee, &f("report_validator.reportee"))?,
        }),
        Kind::UndoReportValidator(r) => TransactionKind::UndoReportValidator(UndoReportValidator {
            reportee: required_address(&r.reportee, &f("undo_report_validator.reportee"))?,
        }),
        Kind::UpdateValidatorMetadata(u) => {
            TransactionKind::UpdateValidatorMetadata(ValidatorMetadataUpdate {
                next_epoch_network_address: u.next_epoch_network_address.clone(),
                next_epoch_p2p_address: u.next_epoch_p2p_address.clone(),
                next_epoch_primary_address: u.next_epoch_primary_address.clone(),
                next_epoch_proxy_address: u.next_epoch_proxy_address.clone(),
                next_epoch_protocol_pubkey: u.next_epoch_protocol_pubkey.clone(),
                next_epoch_worker_pubkey: u.next_epoch_worker_pubkey.clone(),
                next_epoch_network_pubkey: u.next_epoch_network_pubkey.clone(),
                next_epoch_proof_of_possession: u.next_epoch_proof_of_possession.clone(),
            })
        }
        Kind::SetCommissionRate(s) => TransactionKind::SetCommissionRate(SetCommissionRate {
            new_rate: required(s.new_rate, &f("set_commission_rate.new_rate"))?,
        }),
        Kind::TransferCoin(t) => TransactionKind::TransferCoin(TransferCoin {
            coin: object_ref_field(&t.coin, &f("transfer_coin.coin"))?,
            amount: t.amount,
            recipient: required_address(&t.recipient, &f("transfer_coin.recipient"))?,
        }),
        Kind::PayCoins(p) => TransactionKind::PayCoins(PayCoins {
            coins: object_refs(&p.coins, &f("pay_coins.coins"))?,
            amounts: pay_amounts(&p.amounts),
            recipients: p
                .recipients
                .iter()
                .enumerate()
                .map(|(i, r)| parse_address(r, &f(&format!("pay_coins.recipients[{i}]"))))
                .collect::<Result<_>>()?,
        }),
        Kind::TransferObjects(t) => TransactionKind::TransferObjects(TransferObjects {
            objects: object_refs(&t.objects, &f("transfer_objects.objects"))?,
            recipient: required_address(&t.recipient, &f("transfer_objects.recipient"))?,
        }),
        Kind::AddStake(a) => TransactionKind::AddStake(AddStake {
            validator: required_address(&a.address, &f("add_stake.address"))?,
            coin_ref: object_ref_field(&a.coin_ref, &f("add_stake.coin_ref"))?,
            amount: a.amount,
        }),
        Kind::WithdrawStake(w) => TransactionKind::WithdrawStake(WithdrawStake {
            staked_soma: object_ref_field(&w.staked_soma, &f("withdraw_stake.staked_soma"))?,
        }),
        Kind::CreateModel(c) => TransactionKind::CreateModel(CreateModel {
            stake_amount: required(c.stake_amount, &f("create_model.stake_amount"))?,
            commission_rate: required(c.commission_rate, &f("create_model.commission_rate"))?,
            architecture_version: required(
                c.architecture_version,
                &f("create_model.architecture_version"),
            )?,
        }),
        Kind::CommitModel(c) => {
            let p = |n: &str| f(&format!("commit_model.{n}"));
            TransactionKind::CommitModel(CommitModel {
                model_id: required_object_id(&c.model_id, &p("model_id"))?,
                manifest: manifest_field(&c.manifest, &p("manifest"))?,
                weights_commitment: Commitment(required_bytes32(
                    &c.weights_commitment,
                    &p("weights_commitment"),
                )?),
                embedding_commitment: Commitment(required_bytes32(
                    &c.embedding_commitment,
                    &p("embedding_commitment"),
                )?),
                decryption_key_commitment: Commitment(required_bytes32(
                    &c.decryption_key_commitment,
                    &p("decryption_key_commitment"),
                )?),
            })
        }
        Kind::RevealModel(r) => TransactionKind::RevealModel(RevealModel {
            model_id: required_object_id(&r.model_id, &f("reveal_model.model_id"))?,
            decryption_key: Digest(required_bytes32(
                &r.decryption_key,
                &f("reveal_model.decryption_key"),
            )?),
            embedding: SomaTensor::vector(&r.embedding),
        }),
        Kind::AddStakeToModel(a) => TransactionKind::AddStakeToModel(AddStakeToModel {
            model_id: required_object_id(&a.model_id, &f("add_stake_to_model.model_id"))?,
            coin_ref: object_ref_field(&a.coin_ref, &f("add_stake_to_model.coin_ref"))?,
            amount: a.amount,
        }),
        Kind::SetModelCommissionRate(s) => {
            TransactionKind::SetModelCommissionRate(SetModelCommissionRate {
                model_id: required_object_id(
                    &s.model_id,
                    &f("set_model_commission_rate.model_id"),
                )?,
                new_rate: required(s.new_rate, &f("set_model_commission_rate.new_rate"))?,
            })
        }
        Kind::DeactivateModel(d) => TransactionKind::DeactivateModel(DeactivateModel {
            model_id: required_object_id(&d.model_id, &f("deactivate_model.model_id"))?,
        }),
        Kind::ReportModel(r) => TransactionKind::ReportModel(ReportModel {
            model_id: required_object_id(&r.model_id, &f("report_model.model_id"))?,
        }),
        Kind::UndoReportModel(r) => TransactionKind::UndoReportModel(UndoReportModel {
            model_id: required_object_id(&r.model_id, &f("undo_report_model.model_id"))?,
        }),
        Kind::SubmitData(s) => {
            let p = |n: &str| f(&format!("submit_data.{n}"));
            let manifest = required(s.data_manifest.as_ref(), &p("data_manifest"))?;
            TransactionKind::SubmitData(SubmitData {
                target_id: required_object_id(&s.target_id, &p("target_id"))?,
                data_manifest: manifest_field(&manifest.manifest, &p("data_manifest.manifest"))?,
                model_id: required_object_id(&s.model_id, &p("model_id"))?,
                embedding: SomaTensor::vector(&s.embedding),
                distance_score: SomaTensor::scalar(required(
                    s.distance_score,
                    &p("distance_score"),
                )?),
                loss_score: SomaTensor::vector(&s.loss_score),
                bond_coin: object_ref_field(&s.bond_coin, &p("bond_coin"))?,
            })
        }
        Kind::ClaimRewards(c) => TransactionKind::ClaimRewards(ClaimRewards {
            target_id: required_object_id(&c.target_id, &f("claim_rewards.target_id"))?,
        }),
        Kind::ReportSubmission(r) => TransactionKind::ReportSubmission(ReportSubmission {
            target_id: required_object_id(&r.target_id, &f("report_submission.target_id"))?,
        }),
        Kind::UndoReportSubmission(r) => {
            TransactionKind::UndoReportSubmission(UndoReportSubmission {
                target_id: required_object_id(
                    &r.target_id,
                    &f("undo_report_submission.target_id"),
                )?,
            })
        }
    })
}

/// The protobuf transaction, with the digest the client computed.
pub fn transaction_to_proto(data: &TransactionData) -> proto::Transaction {
    proto::Transaction {
        digest: Some(data.digest().to_string()),
        kind: Some(kind_to_proto(&data.kind)),
        sender: Some(hex_id(&data.sender.0)),
        gas_payment: data.gas_payment.iter().map(object_ref_to_proto).collect(),
    }
}

/// Rebuilds `TransactionData` from protobuf; the `digest` field is ignored (servers recompute).
pub fn transaction_from_proto(tx: &proto::Transaction) -> Result<TransactionData> {
    Ok(TransactionData {
        kind: kind_from_proto(
            required(tx.kind.as_ref(), "transaction.kind")?,
            "transaction.kind",
        )?,
        sender: required_address(&tx.sender, "transaction.sender")?,
        gas_payment: object_refs(&tx.gas_payment, "transaction.gas_payment")?,
    })
}

pub fn signature_to_proto(s: &UserSignature) -> proto::UserSignature {
    let ed25519 = proto::SignatureScheme::Ed25519 as i32;
    proto::UserSignature {
        scheme: Some(ed25519),
        signature: Some(proto::user_signature::Signature::Simple(
            proto::SimpleSignature {
                scheme: Some(ed25519),
                signature: Some(s.signature.to_vec()),
                public_key: Some(s.public_key.to_vec()),
            },
        )),
    }
}

pub fn signature_from_proto(s: &proto::UserSignature, field: &str) -> Result<UserSignature> {
    let ed25519 = proto::SignatureScheme::Ed25519 as i32;
    if s.scheme != Some(ed25519) {
        return Err(FieldError::new(
            format!("{field}.scheme"),
            "only Ed25519 (0) signatures are accepted, and the scheme must be present",
        ));
    }
    let Some(proto::user_signature::Signature::Simple(simple)) = &s.signature else {
        return Err(FieldError::missing(format!("{field}.simple")));
    };
    let signature = required(
        simple.signature.as_deref(),
        &format!("{field}.simple.signature"),
    )?;
    let public_key = required_bytes32(&simple.public_key, &format!("{field}.simple.public_key"))?;
    Ok(UserSignature {
        signature: signature.try_into().map_err(|_| {
            FieldError::new(
                format!("{field}.simple.signature"),
                format!("must be 64 bytes, got {}", signature.len()),
            )
        })?,
        public_key,
    })
}

// ---- Effects ----------------------------------------------------------------------------------

pub fn status_to_proto(status: &ExecutionStatus) -> proto::ExecutionStatus {
    match status {
        ExecutionStatus::Success => proto::ExecutionStatus {
            success: Some(true),
            error: None,
        },
        ExecutionStatus::Failure(f) => proto::ExecutionStatus {
            success: Some(false),
            error: Some(proto::ExecutionError {
                description: Some(f.description.clone()),
                kind: Some(f.kind.wire()),
                error_details: f
                    .object_id
                    .map(|id| proto::execution_error::ErrorDetails::ObjectId(prefixed_id(&id))),
            }),
        },
    }
}

pub fn status_from_proto(status: &proto::ExecutionStatus, field: &str) -> Result<ExecutionStatus> {
    if required(status.success, &format!("{field}.success"))? {
        return Ok(ExecutionStatus::Success);
    }
    let error = required(status.error.as_ref(), &format!("{field}.error"))?;
    let object_id = match &error.error_details {
        Some(proto::execution_error::ErrorDetails::ObjectId(id)) => {
            Some(parse_object_id(id, &format!("{field}.error.object_id"))?)
        }
        _ => None,
    };
    let other = match &error.error_details {
        Some(proto::execution_error::ErrorDetails::OtherError(text)) => Some(text.clone()),
        _ => None,
    };
    Ok(ExecutionStatus::Failure(ExecutionFailure {
        kind: ExecutionErrorKind::from_wire(error.kind.unwrap_or(0)),
        description: error.description.clone().or(other).unwrap_or_default(),
        object_id,
    }))
}

fn object_state_to_proto(
    state: &Option<ObjectState>,
) -> (Option<u64>, Option<String>, Option<proto::Owner>) {
    match state {
        Some(s) => (
            Some(s.version),
            Some(s.digest.to_string()),
            Some(owner_to_proto(&s.owner)),
        ),
        None => (None, None, None),
    }
}

pub fn changed_object_to_proto(c: &ChangedObject, lamport_version: u64) -> proto::ChangedObject {
    use proto::changed_object::{IdOperation as P, InputObjectState, OutputObjectState};
    let (input_version, input_digest, input_owner) = object_state_to_proto(&c.input);
    let (_, output_digest, output_owner) = object_state_to_proto(&c.output);
    proto::ChangedObject {
        object_id: Some(hex_id(&c.id.0)),
        input_state: Some(if c.input.is_some() {
            InputObjectState::Exists as i32
        } else {
            InputObjectState::DoesNotExist as i32
        }),
        input_version,
        input_digest,
        input_owner,
        output_state: Some(if c.output.is_some() {
            OutputObjectState::ObjectWrite as i32
        } else {
            OutputObjectState::DoesNotExist as i32
        }),
        output_version: c.output.map(|_| lamport_version),
        output_digest,
        output_owner,
        id_operation: Some(match c.id_operation {
            IdOperation::None => P::None as i32,
            IdOperation::Created => P::Created as i32,
            IdOperation::Deleted => P::Deleted as i32,
        }),
        object_type: None,
    }
}

fn object_state_from_proto(
    version: Option<u64>,
    digest: &Option<String>,
    owner: &Option<proto::Owner>,
    field: &str,
) -> Result<ObjectState> {
    Ok(ObjectState {
        version: required(version, &format!("{field}_version"))?,
        digest: parse_digest::<ObjectDigest>(
            required(digest.as_deref(), &format!("{field}_digest"))?,
            &format!("{field}_digest"),
        )?,
        owner: owner_from_proto(
            required(owner.as_ref(), &format!("{field}_owner"))?,
            &format!("{field}_owner"),
        )?,
    })
}

pub fn changed_object_from_proto(c: &proto::ChangedObject, field: &str) -> Result<ChangedObject> {
    use proto::changed_object::{IdOperation as P, InputObjectState, OutputObjectState};
    let p = |n: &str| format!("{field}.{n}");
    let input = match InputObjectState::try_from(required(c.input_state, &p("input_state"))?) {
        Ok(InputObjectState::Exists) => Some(object_state_from_proto(
            c.input_version,
            &c.input_digest,
            &c.input_owner,
            &p("input"),
        )?),
        Ok(InputObjectState::DoesNotExist) => None,
        _ => return Err(FieldError::new(p("input_state"), "unknown")),
    };
    let output = match OutputObjectState::try_from(required(c.output_state, &p("output_state"))?) {
        // The output version is not read by clients; the network sets it to the lamport version.
        Ok(OutputObjectState::ObjectWrite) => Some(object_state_from_proto(
            Some(c.output_version.unwrap_or(0)),
            &c.output_digest,
            &c.output_owner,
            &p("output"),
        )?),
        Ok(OutputObjectState::DoesNotExist) => None,
        _ => return Err(FieldError::new(p("output_state"), "unknown")),
    };
    let id_operation = match P::try_from(required(c.id_operation, &p("id_operation"))?) {
        Ok(P::None) => IdOperation::None,
        Ok(P::Created) => IdOperation::Created,
        Ok(P::Deleted) => IdOperation::Deleted,
        _ => return Err(FieldError::new(p("id_operation"), "unknown")),
    };
    Ok(ChangedObject {
        id: required_object_id(&c.object_id, &p("object_id"))?,
        input,
        output,
        id_operation,
    })
}

pub fn effects_to_proto(e: &TransactionEffects) -> proto::TransactionEffects {
    use proto::unchanged_shared_object::UnchangedSharedObjectKind;
    proto::TransactionEffects {
        status: Some(status_to_proto(&e.status)),
        epoch: Some(e.executed_epoch),
        fee: Some(proto::TransactionFee {
            base_fee: Some(e.fee.base_fee),
            operation_fee: Some(e.fee.operation_fee),
            value_fee: Some(e.fee.value_fee),
            total_fee: Some(e.fee.total_fee),
        }),
        transaction_digest: Some(e.transaction_digest.to_string()),
        gas_object_index: e.gas_object_index,
        dependencies: e.dependencies.iter().map(|d| d.to_string()).collect(),
        lamport_version: Some(e.lamport_version),
        changed_objects: e
            .changed_objects
            .iter()
            .map(|c| changed_object_to_proto(c, e.lamport_version))
            .collect(),
        unchanged_shared_objects: e
            .unchanged_shared_objects
            .iter()
            .map(|u| proto::UnchangedSharedObject {
                kind: Some(UnchangedSharedObjectKind::ReadOnlyRoot as i32),
                object_id: Some(hex_id(&u.id.0)),
                version: Some(u.version),
                digest: Some(u.digest.to_string()),
                object_type: None,
            })
            .collect(),
    }
}

pub fn effects_from_proto(e: &proto::TransactionEffects) -> Result<TransactionEffects> {
    let fee = required(e.fee.as_ref(), "effects.fee")?;
    let fee_field =
        |value: Option<u64>, name: &str| required(value, &format!("effects.fee.{name}"));
    Ok(TransactionEffects {
        status: status_from_proto(
            required(e.status.as_ref(), "effects.status")?,
            "effects.status",
        )?,
        executed_epoch: required(e.epoch, "effects.epoch")?,
        fee: TransactionFee {
            base_fee: fee_field(fee.base_fee, "base_fee")?,
            operation_fee: fee_field(fee.operation_fee, "operation_fee")?,
            value_fee: fee_field(fee.value_fee, "value_fee")?,
            total_fee: fee_field(fee.total_fee, "total_fee")?,
        },
        transaction_digest: parse_digest::<TxDigest>(
            required(
                e.transaction_digest.as_deref(),
                "effects.transaction_digest",
            )?,
            "effects.transaction_digest",
        )?,
        gas_object_index: e.gas_object_index,
        dependencies: e
            .dependencies
            .iter()
            .enumerate()
            .map(|(i, d)| parse_digest::<TxDigest>(d, &format!("effects.dependencies[{i}]")))
            .collect::<Result<_>>()?,
        lamport_version: required(e.lamport_version, "effects.lamport_version")?,
        changed_objects: e
            .changed_objects
            .iter()
            .enumerate()
            .map(|(i, c)| changed_object_from_proto(c, &format!("effects.changed_objects[{i}]")))
            .collect::<Result<_>>()?,
        unchanged_shared_objects: e
            .unchanged_shared_objects
            .iter()
            .enumerate()
            .map(|(i, u)| {
                let p = format!("effects.unchanged_shared_objects[{i}]");
                Ok(UnchangedSharedObject {
                    id: required_object_id(&u.object_id, &format!("{p}.object_id"))?,
                    version: required(u.version, &format!("{p}.version"))?,
                    digest: u
                        .digest
                        .as_deref()
                        .map(|d| parse_digest::<ObjectDigest>(d, &format!("{p}.digest")))
                        .transpose()?
                        .unwrap_or_default(),
                })
            })
            .collect::<Result<_>>()?,
    })
}

pub fn balance_change_to_proto(b: &BalanceChange) -> proto::BalanceChange {
    proto::BalanceChange {
        address: Some(hex_id(&b.address.0)),
        amount: Some(b.amount.to_string()),
    }
}

pub fn balance_change_from_proto(b: &proto::BalanceChange, field: &str) -> Result<BalanceChange> {
    let amount_field = format!("{field}.amount");
    Ok(BalanceChange {
        address: required_address(&b.address, &format!("{field}.address"))?,
        amount: required(b.amount.as_deref(), &amount_field)?
            .parse()
            .map_err(|_| FieldError::new(amount_field, "not a decimal integer"))?,
    })
}
