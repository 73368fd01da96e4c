//! `TransactionData`, its 26 kinds, and the signed envelope, encoded as the network encodes them.
//!
//! BCS of `TransactionData` (§3.2 of `protocol-rpc.md`):
//!
//! ```text
//! transaction-data = %x00 kind sender gas-payment     ; the V1 tag is the only variant
//! kind             = uleb128-tag payload              ; tags 0..=25, in the order of TransactionKind
//! sender           = 32OCTET
//! gas-payment      = uleb128-len *object-ref
//! object-ref       = 32OCTET u64 (%x20 32OCTET)       ; id, version, digest: 73 bytes
//! ```
//!
//! There is no gas budget, gas price or expiration. Enum variants are declared in tag order:
//! serde's variant index *is* the BCS tag, so reordering them changes the wire.

use serde::{Deserialize, Serialize};

use crate::crypto::Commitment;
use crate::hash::{TRANSACTION_INTENT, blake2b256};
use crate::ids::{Digest, ObjectDigest, ObjectId, TxDigest};
use crate::keys::{Address, ED25519_FLAG, KeyError, Keypair, verify};
use crate::object::Object;
use crate::tensor::SomaTensor;

/// `(id, version, digest)` of an object a transaction reads or consumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ObjectRef {
    pub id: ObjectId,
    pub version: u64,
    pub digest: ObjectDigest,
}

/// Where published weights or submitted data live and what they hash to.
///
/// BCS: `Manifest::V1 { url: String, metadata: Metadata::V1 { checksum, size } }`, both tags 0.
/// The URL must already be in the form [`normalize_url`] gives, because the network rebuilds the
/// signed bytes from the parsed URL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "ManifestWire", from = "ManifestWire")]
pub struct Manifest {
    pub url: String,
    /// Blake2b-256 of the file (the encrypted file, for weights).
    pub checksum: Commitment,
    pub size: u64,
}

#[derive(Serialize, Deserialize)]
enum ManifestWire {
    V1 { url: String, metadata: MetadataWire },
}

#[derive(Serialize, Deserialize)]
enum MetadataWire {
    V1 { checksum: Commitment, size: u64 },
}

impl From<Manifest> for ManifestWire {
    fn from(m: Manifest) -> Self {
        ManifestWire::V1 {
            url: m.url,
            metadata: MetadataWire::V1 {
                checksum: m.checksum,
                size: m.size,
            },
        }
    }
}

impl From<ManifestWire> for Manifest {
    fn from(w: ManifestWire) -> Self {
        let ManifestWire::V1 {
            url,
            metadata: MetadataWire::V1 { checksum, size },
        } = w;
        Manifest {
            url,
            checksum,
            size,
        }
    }
}

/// The text the network stores for a URL: what `Url::parse` prints (a bare host gains a `/`,
/// the scheme and host are lower-cased, default ports dropped).
pub fn normalize_url(text: &str) -> Result<String, url::ParseError> {
    Ok(url::Url::parse(text)?.to_string())
}

/// Every transaction kind, in BCS tag order (0..=25).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TransactionKind {
    // System transactions (0-2): users never send these.
    Genesis(Genesis),
    ConsensusCommitPrologueV1(ConsensusCommitPrologueV1),
    ChangeEpoch(ChangeEpoch),
    // Validator management (3-8). The BCS order of AddValidator differs from its proto numbers.
    AddValidator(ValidatorInfo),
    RemoveValidator(RemoveValidator),
    ReportValidator(ReportValidator),
    UndoReportValidator(UndoReportValidator),
    UpdateValidatorMetadata(ValidatorMetadataUpdate),
    SetCommissionRate(SetCommissionRate),
    // Coins and objects (9-13).
    TransferCoin(TransferCoin),
    PayCoins(PayCoins),
    TransferObjects(TransferObjects),
    AddStake(AddStake),
    WithdrawStake(WithdrawStake),
    // Models (14-21). There is no UpdateModel: CommitModel on an active model stages an update.
    CreateModel(CreateModel),
    CommitModel(CommitModel),
    RevealModel(RevealModel),
    AddStakeToModel(AddStakeToModel),
    SetModelCommissionRate(SetModelCommissionRate),
    DeactivateModel(DeactivateModel),
    ReportModel(ReportModel),
    UndoReportModel(UndoReportModel),
    // Targets (22-25).
    SubmitData(SubmitData),
    ClaimRewards(ClaimRewards),
    ReportSubmission(ReportSubmission),
    UndoReportSubmission(UndoReportSubmission),
}

// One struct per kind, as sui-sdk-types does: a kind's fields can be named, passed and matched
// without the enum.

/// The objects the chain starts with (tag 0).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Genesis {
    pub objects: Vec<Object>,
}

/// Opens each consensus commit: its round and time (tag 1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConsensusCommitPrologueV1 {
    pub epoch: u64,
    pub round: u64,
    pub sub_dag_index: Option<u64>,
    pub commit_timestamp_ms: u64,
    pub consensus_commit_digest: Digest,
    pub additional_state_digest: Digest,
}

/// Closes an epoch and opens the next, with the fees it collected (tag 2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChangeEpoch {
    pub epoch: u64,
    pub epoch_start_timestamp_ms: u64,
    pub protocol_version: u64,
    pub fees: u64,
    #[serde(with = "serde_bytes")]
    pub epoch_randomness: Vec<u8>,
}

/// Takes a validator out of the next epoch's set (tag 4).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RemoveValidator {
    #[serde(with = "serde_bytes")]
    pub pubkey_bytes: Vec<u8>,
}

/// A validator reports another; a quorum halves the reportee's reward share (tag 5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReportValidator {
    pub reportee: Address,
}

/// Withdraws a `ReportValidator` (tag 6).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UndoReportValidator {
    pub reportee: Address,
}

/// A validator's commission from the next epoch, in basis points (tag 8).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SetCommissionRate {
    pub new_rate: u64,
}

/// Sends a coin, or `amount` split from it, to one recipient (tag 9).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransferCoin {
    pub coin: ObjectRef,
    pub amount: Option<u64>,
    pub recipient: Address,
}

/// Merges `coins` and pays each recipient its amount (tag 10).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PayCoins {
    pub coins: Vec<ObjectRef>,
    /// Always `Some` when signed: the network rebuilds an absent list as `Some([])`.
    pub amounts: Option<Vec<u64>>,
    pub recipients: Vec<Address>,
}

/// Hands owned objects to a recipient (tag 11).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransferObjects {
    pub objects: Vec<ObjectRef>,
    pub recipient: Address,
}

/// Stakes a coin, or `amount` of it, with a validator; earns from the next epoch (tag 12).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AddStake {
    pub validator: Address,
    pub coin_ref: ObjectRef,
    pub amount: Option<u64>,
}

/// Returns a `StakedSoma`'s principal and rewards (tag 13).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WithdrawStake {
    pub staked_soma: ObjectRef,
}

/// Registers a model with its stake and commission (tag 14).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CreateModel {
    pub stake_amount: u64,
    /// Basis points.
    pub commission_rate: u64,
    pub architecture_version: u64,
}

/// Commits to encrypted weights, the embedding and the key; on an active model, stages an update (tag 15).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommitModel {
    pub model_id: ObjectId,
    pub manifest: Manifest,
    pub weights_commitment: Commitment,
    pub embedding_commitment: Commitment,
    pub decryption_key_commitment: Commitment,
}

/// Publishes the key and the embedding committed the epoch before (tag 16).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RevealModel {
    pub model_id: ObjectId,
    /// The 32-byte AES-256 key, public from this transaction on.
    pub decryption_key: Digest,
    pub embedding: SomaTensor,
}

/// Stakes a coin, or `amount` of it, with a model (tag 17).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AddStakeToModel {
    pub model_id: ObjectId,
    pub coin_ref: ObjectRef,
    pub amount: Option<u64>,
}

/// A model's commission from the next epoch, in basis points (tag 18).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SetModelCommissionRate {
    pub model_id: ObjectId,
    pub new_rate: u64,
}

/// The owner retires a model (tag 19).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeactivateModel {
    pub model_id: ObjectId,
}

/// A validator reports a model whose weights fail the check; a quorum slashes it (tag 20).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReportModel {
    pub model_id: ObjectId,
}

/// Withdraws a `ReportModel` (tag 21).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UndoReportModel {
    pub model_id: ObjectId,
}

/// Submits data that a model scored against a target, with a bond (tag 22).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubmitData {
    pub target_id: ObjectId,
    /// `SubmissionManifest`, which is exactly one manifest.
    pub data_manifest: Manifest,
    pub model_id: ObjectId,
    pub embedding: SomaTensor,
    /// Shape `[1]`.
    pub distance_score: SomaTensor,
    pub loss_score: SomaTensor,
    pub bond_coin: ObjectRef,
}

/// Settles a filled or expired target's rewards (tag 23).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClaimRewards {
    pub target_id: ObjectId,
}

/// A validator reports a target's winning submission (tag 24).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReportSubmission {
    pub target_id: ObjectId,
}

/// Withdraws a `ReportSubmission` (tag 25).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UndoReportSubmission {
    pub target_id: ObjectId,
}

/// The payload of `AddValidator`, in BCS order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValidatorInfo {
    #[serde(with = "serde_bytes")]
    pub pubkey_bytes: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub network_pubkey_bytes: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub worker_pubkey_bytes: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub proof_of_possession: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub net_address: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub p2p_address: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub primary_address: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub proxy_address: Vec<u8>,
}

/// The payload of `UpdateValidatorMetadata`: each field optional, in BCS order.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ValidatorMetadataUpdate {
    pub next_epoch_network_address: Option<Vec<u8>>,
    pub next_epoch_p2p_address: Option<Vec<u8>>,
    pub next_epoch_primary_address: Option<Vec<u8>>,
    pub next_epoch_proxy_address: Option<Vec<u8>>,
    pub next_epoch_protocol_pubkey: Option<Vec<u8>>,
    pub next_epoch_worker_pubkey: Option<Vec<u8>>,
    pub next_epoch_network_pubkey: Option<Vec<u8>>,
    pub next_epoch_proof_of_possession: Option<Vec<u8>>,
}

impl TransactionKind {
    /// The BCS tag, which is also the index in the network's kind list.
    pub fn tag(&self) -> u8 {
        bcs::to_bytes(self).expect("kinds encode")[0]
    }

    /// The network's name of the kind, as error messages and the SDK show it.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Genesis(_) => "Genesis",
            Self::ConsensusCommitPrologueV1(_) => "ConsensusCommitPrologueV1",
            Self::ChangeEpoch(_) => "ChangeEpoch",
            Self::AddValidator(_) => "AddValidator",
            Self::RemoveValidator(_) => "RemoveValidator",
            Self::ReportValidator(_) => "ReportValidator",
            Self::UndoReportValidator(_) => "UndoReportValidator",
            Self::UpdateValidatorMetadata(_) => "UpdateValidatorMetadata",
            Self::SetCommissionRate(_) => "SetCommissionRate",
            Self::TransferCoin(_) => "TransferCoin",
            Self::PayCoins(_) => "PayCoins",
            Self::TransferObjects(_) => "TransferObjects",
            Self::AddStake(_) => "AddStake",
            Self::WithdrawStake(_) => "WithdrawStake",
            Self::CreateModel(_) => "CreateModel",
            Self::CommitModel(_) => "CommitModel",
            Self::RevealModel(_) => "RevealModel",
            Self::AddStakeToModel(_) => "AddStakeToModel",
            Self::SetModelCommissionRate(_) => "SetModelCommissionRate",
            Self::DeactivateModel(_) => "DeactivateModel",
            Self::ReportModel(_) => "ReportModel",
            Self::UndoReportModel(_) => "UndoReportModel",
            Self::SubmitData(_) => "SubmitData",
            Self::ClaimRewards(_) => "ClaimRewards",
            Self::ReportSubmission(_) => "ReportSubmission",
            Self::UndoReportSubmission(_) => "UndoReportSubmission",
        }
    }

    /// Genesis, consensus prologues and epoch changes come only from the system.
    pub fn is_system(&self) -> bool {
        matches!(
            self,
            Self::Genesis(_) | Self::ConsensusCommitPrologueV1(_) | Self::ChangeEpoch(_)
        )
    }
}

/// What a sender signs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(into = "TransactionDataWire", from = "TransactionDataWire")]
pub struct TransactionData {
    pub kind: TransactionKind,
    pub sender: Address,
    /// Gas coins; the first pays and the others are merged into it.
    pub gas_payment: Vec<ObjectRef>,
}

#[derive(Serialize, Deserialize)]
enum TransactionDataWire {
    V1 {
        kind: TransactionKind,
        sender: Address,
        gas_payment: Vec<ObjectRef>,
    },
}

impl From<TransactionData> for TransactionDataWire {
    fn from(t: TransactionData) -> Self {
        TransactionDataWire::V1 {
            kind: t.kind,
            sender: t.sender,
            gas_payment: t.gas_payment,
        }
    }
}

impl From<TransactionDataWire> for TransactionData {
    fn from(w: TransactionDataWire) -> Self {
        let TransactionDataWire::V1 {
            kind,
            sender,
            gas_payment,
        } = w;
        TransactionData {
            kind,
            sender,
            gas_payment,
        }
    }
}

impl TransactionData {
    pub fn new(kind: TransactionKind, sender: Address, gas_payment: Vec<ObjectRef>) -> Self {
        TransactionData {
            kind,
            sender,
            gas_payment,
        }
    }

    pub fn to_bcs(&self) -> Vec<u8> {
        bcs::to_bytes(self).expect("transaction data encodes")
    }

    /// Decodes BCS, refusing trailing bytes.
    pub fn from_bcs(bytes: &[u8]) -> Result<Self, bcs::Error> {
        bcs::from_bytes(bytes)
    }

    pub fn digest(&self) -> TxDigest {
        TxDigest::of_transaction_bytes(&self.to_bcs())
    }

    /// The 32 bytes an Ed25519 key signs: Blake2b-256(intent ‖ BCS).
    pub fn signing_message(&self) -> [u8; 32] {
        blake2b256(&[&TRANSACTION_INTENT, &self.to_bcs()])
    }
}

/// A user signature. Only Ed25519 is used by the SDK and by us.
///
/// Serialized (97 bytes): flag `00` ‖ signature (64) ‖ public key (32).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct UserSignature {
    pub signature: [u8; 64],
    pub public_key: [u8; 32],
}

pub const USER_SIGNATURE_BYTES: usize = 97;

impl std::fmt::Debug for UserSignature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "UserSignature(ed25519, signer {})",
            Address::of_public_key(&self.public_key)
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("a user signature is {USER_SIGNATURE_BYTES} bytes, got {0}")]
    Length(usize),
    #[error("signature scheme flag {0:#04x} is not Ed25519 (0x00)")]
    Scheme(u8),
    #[error("expected exactly one signature, got {0}")]
    Count(usize),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("sender {sender} is not the address of the signing key ({signer})")]
    WrongSender { sender: Address, signer: Address },
}

impl UserSignature {
    pub fn to_bytes(&self) -> [u8; USER_SIGNATURE_BYTES] {
        let mut out = [0u8; USER_SIGNATURE_BYTES];
        out[0] = ED25519_FLAG;
        out[1..65].copy_from_slice(&self.signature);
        out[65..].copy_from_slice(&self.public_key);
        out
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, SignatureError> {
        if bytes.len() != USER_SIGNATURE_BYTES {
            return Err(SignatureError::Length(bytes.len()));
        }
        if bytes[0] != ED25519_FLAG {
            return Err(SignatureError::Scheme(bytes[0]));
        }
        Ok(UserSignature {
            signature: bytes[1..65].try_into().expect("64 bytes"),
            public_key: bytes[65..].try_into().expect("32 bytes"),
        })
    }

    pub fn signer(&self) -> Address {
        Address::of_public_key(&self.public_key)
    }
}

/// A transaction with its sender's signature: what `Keypair.sign` returns in the SDK.
#[derive(Debug, Clone, PartialEq)]
pub struct SignedTransaction {
    pub data: TransactionData,
    pub signatures: Vec<UserSignature>,
}

/// The envelope: `SenderSignedData`, a one-element vector of (intent, data, signatures), with an
/// empty authority-signature part that has no bytes.
#[derive(Serialize, Deserialize)]
struct EnvelopeWire(Vec<EnvelopeItem>);

#[derive(Serialize, Deserialize)]
struct EnvelopeItem {
    intent: [u8; 3],
    data: TransactionData,
    signatures: Vec<serde_bytes::ByteBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("malformed signed transaction: {0}")]
    Bcs(#[from] bcs::Error),
    #[error("a signed transaction holds exactly one transaction, got {0}")]
    Count(usize),
    #[error("intent {0:02x?} is not a user transaction's (00 00 01)")]
    Intent([u8; 3]),
    #[error(transparent)]
    Signature(#[from] SignatureError),
}

impl SignedTransaction {
    /// Signs as the SDK signs: Ed25519 over [`TransactionData::signing_message`].
    pub fn sign(keypair: &Keypair, data: TransactionData) -> Self {
        let signature = keypair.sign(&data.signing_message());
        SignedTransaction {
            signatures: vec![UserSignature {
                signature,
                public_key: keypair.public_key(),
            }],
            data,
        }
    }

    pub fn digest(&self) -> TxDigest {
        self.data.digest()
    }

    /// Checks that there is one signature, that it verifies, and that its key is the sender's.
    pub fn verify(&self) -> Result<(), SignatureError> {
        let [signature] = self.signatures.as_slice() else {
            return Err(SignatureError::Count(self.signatures.len()));
        };
        verify(
            &signature.public_key,
            &self.data.signing_message(),
            &signature.signature,
        )?;
        let signer = signature.signer();
        if signer != self.data.sender {
            return Err(SignatureError::WrongSender {
                sender: self.data.sender,
                signer,
            });
        }
        Ok(())
    }

    pub fn to_bcs(&self) -> Vec<u8> {
        let envelope = EnvelopeWire(vec![EnvelopeItem {
            intent: TRANSACTION_INTENT,
            data: self.data.clone(),
            signatures: self
                .signatures
                .iter()
                .map(|s| serde_bytes::ByteBuf::from(s.to_bytes().to_vec()))
                .collect(),
        }]);
        bcs::to_bytes(&envelope).expect("signed transactions encode")
    }

    pub fn from_bcs(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        let EnvelopeWire(mut items) = bcs::from_bytes(bytes)?;
        if items.len() != 1 {
            return Err(EnvelopeError::Count(items.len()));
        }
        let item = items.pop().expect("one item");
        if item.intent != TRANSACTION_INTENT {
            return Err(EnvelopeError::Intent(item.intent));
        }
        let signatures = item
            .signatures
            .iter()
            .map(|s| UserSignature::from_bytes(s))
            .collect::<Result<_, _>>()?;
        Ok(SignedTransaction {
            data: item.data,
            signatures,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_normalized_as_the_network_parses_them() {
        assert_eq!(
            normalize_url("https://Example.com").unwrap(),
            "https://example.com/"
        );
        assert_eq!(
            normalize_url("http://127.0.0.1:80/a b").unwrap(),
            "http://127.0.0.1/a%20b"
        );
        assert!(normalize_url("not a url").is_err());
    }

    #[test]
    fn tampered_or_foreign_signatures_are_refused() {
        let owner = Keypair::from_secret([1; 32]);
        let data = TransactionData::new(
            TransactionKind::ClaimRewards(ClaimRewards {
                target_id: ObjectId([9; 32]),
            }),
            owner.address(),
            vec![],
        );
        let signed = SignedTransaction::sign(&owner, data.clone());
        signed.verify().unwrap();

        let mut changed = signed.clone();
        changed.data.kind = TransactionKind::ClaimRewards(ClaimRewards {
            target_id: ObjectId([8; 32]),
        });
        assert_eq!(
            changed.verify(),
            Err(SignatureError::Key(KeyError::BadSignature))
        );

        let stranger = SignedTransaction::sign(&Keypair::from_secret([2; 32]), data);
        assert!(matches!(
            stranger.verify(),
            Err(SignatureError::WrongSender { .. })
        ));

        let mut none = signed.clone();
        none.signatures.clear();
        assert_eq!(none.verify(), Err(SignatureError::Count(0)));

        let mut bytes = signed.signatures[0].to_bytes();
        bytes[0] = 1;
        assert_eq!(
            UserSignature::from_bytes(&bytes),
            Err(SignatureError::Scheme(1))
        );
        assert_eq!(
            UserSignature::from_bytes(&bytes[..96]),
            Err(SignatureError::Length(96))
        );
    }

    #[test]
    fn the_envelope_round_trips_and_refuses_a_foreign_intent() {
        let owner = Keypair::from_secret([3; 32]);
        let signed = SignedTransaction::sign(
            &owner,
            TransactionData::new(
                TransactionKind::DeactivateModel(DeactivateModel {
                    model_id: ObjectId([4; 32]),
                }),
                owner.address(),
                vec![],
            ),
        );
        let bytes = signed.to_bcs();
        assert_eq!(SignedTransaction::from_bcs(&bytes).unwrap(), signed);
        let mut foreign = bytes.clone();
        foreign[3] = 2;
        assert!(matches!(
            SignedTransaction::from_bcs(&foreign),
            Err(EnvelopeError::Intent(_))
        ));
        let mut trailing = bytes;
        trailing.push(0);
        assert!(matches!(
            SignedTransaction::from_bcs(&trailing),
            Err(EnvelopeError::Bcs(_))
        ));
    }
}
