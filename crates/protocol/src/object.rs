//! Objects as the network stores and hashes them: coins, staked SOMA, targets, the system state.
//!
//! BCS of an object (the digest input, §3.4 of `protocol-rpc.md`):
//!
//! ```text
//! object      = object-data owner previous-transaction
//! object-data = object-type u64-version uleb128-len contents   ; contents = 32-byte id ‖ payload
//! object-type = %x00 SystemState / %x01 Coin / %x02 StakedSoma / %x03 Target
//! owner       = %x00 address / %x01 u64-initial-shared-version / %x02   ; immutable
//! ```
//!
//! Protobuf's `Object.contents` carries the payload alone; BCS contents start with the id.

use serde::{Deserialize, Serialize};

use crate::hash::{OBJECT_SALT, blake2b256};
use crate::ids::{ObjectDigest, ObjectId, TxDigest};
use crate::keys::Address;
use crate::tensor::SomaTensor;
use crate::transaction::{Manifest, ObjectRef};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ObjectType {
    SystemState,
    Coin,
    StakedSoma,
    Target,
}

impl ObjectType {
    /// The name the network uses in `Object.object_type` and the `object_type` filter.
    pub fn name(self) -> &'static str {
        match self {
            ObjectType::SystemState => "SystemState",
            ObjectType::Coin => "Coin",
            ObjectType::StakedSoma => "StakedSoma",
            ObjectType::Target => "Target",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        [
            ObjectType::SystemState,
            ObjectType::Coin,
            ObjectType::StakedSoma,
            ObjectType::Target,
        ]
        .into_iter()
        .find(|t| t.name() == name)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Owner {
    AddressOwner(Address),
    Shared { initial_shared_version: u64 },
    Immutable,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectData {
    pub object_type: ObjectType,
    pub version: u64,
    /// The 32-byte id followed by the BCS payload.
    #[serde(with = "serde_bytes")]
    pub contents: Vec<u8>,
}

/// An object (the network's `ObjectInner`): data, owner and the last transaction that wrote it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Object {
    pub data: ObjectData,
    pub owner: Owner,
    pub previous_transaction: TxDigest,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ObjectError {
    #[error("object contents are {0} bytes, shorter than a 32-byte id")]
    NoId(usize),
    #[error("object is a {found}, not a {expected}")]
    Type {
        expected: &'static str,
        found: &'static str,
    },
    #[error("malformed {0} payload: {1}")]
    Payload(&'static str, String),
}

impl Object {
    /// Builds an object from its id and a typed payload.
    pub fn new<P: Serialize>(
        object_type: ObjectType,
        id: ObjectId,
        version: u64,
        payload: &P,
        owner: Owner,
        previous_transaction: TxDigest,
    ) -> Self {
        let mut contents = id.0.to_vec();
        contents.extend(bcs::to_bytes(payload).expect("payloads encode"));
        Object {
            data: ObjectData {
                object_type,
                version,
                contents,
            },
            owner,
            previous_transaction,
        }
    }

    /// An address-owned coin.
    pub fn coin(
        id: ObjectId,
        version: u64,
        balance: u64,
        owner: Address,
        previous_transaction: TxDigest,
    ) -> Self {
        Self::new(
            ObjectType::Coin,
            id,
            version,
            &balance,
            Owner::AddressOwner(owner),
            previous_transaction,
        )
    }

    /// Rebuilds an object from the protobuf form, whose contents omit the id.
    pub fn from_payload(
        object_type: ObjectType,
        id: ObjectId,
        version: u64,
        payload: &[u8],
        owner: Owner,
        previous_transaction: TxDigest,
    ) -> Self {
        let mut contents = Vec::with_capacity(32 + payload.len());
        contents.extend_from_slice(&id.0);
        contents.extend_from_slice(payload);
        Object {
            data: ObjectData {
                object_type,
                version,
                contents,
            },
            owner,
            previous_transaction,
        }
    }

    pub fn id(&self) -> Result<ObjectId, ObjectError> {
        let contents = &self.data.contents;
        let id: [u8; 32] = contents
            .get(..32)
            .ok_or(ObjectError::NoId(contents.len()))?
            .try_into()
            .expect("32 bytes");
        Ok(ObjectId(id))
    }

    /// The payload without the id prefix (what protobuf's `Object.contents` carries).
    pub fn payload(&self) -> &[u8] {
        self.data.contents.get(32..).unwrap_or(&[])
    }

    pub fn version(&self) -> u64 {
        self.data.version
    }

    pub fn object_type(&self) -> ObjectType {
        self.data.object_type
    }

    pub fn to_bcs(&self) -> Vec<u8> {
        bcs::to_bytes(self).expect("objects encode")
    }

    /// Blake2b-256(`"Object::"` ‖ BCS(object)).
    pub fn digest(&self) -> ObjectDigest {
        ObjectDigest(blake2b256(&[OBJECT_SALT, &self.to_bcs()]))
    }

    pub fn reference(&self) -> Result<ObjectRef, ObjectError> {
        Ok(ObjectRef {
            id: self.id()?,
            version: self.data.version,
            digest: self.digest(),
        })
    }

    fn typed_payload<P: for<'de> Deserialize<'de>>(
        &self,
        expected: ObjectType,
    ) -> Result<P, ObjectError> {
        if self.data.object_type != expected {
            return Err(ObjectError::Type {
                expected: expected.name(),
                found: self.data.object_type.name(),
            });
        }
        self.id()?;
        bcs::from_bytes(self.payload())
            .map_err(|e| ObjectError::Payload(expected.name(), e.to_string()))
    }

    /// The balance of a coin, in shannons.
    pub fn coin_balance(&self) -> Result<u64, ObjectError> {
        self.typed_payload(ObjectType::Coin)
    }

    pub fn staked_soma(&self) -> Result<StakedSoma, ObjectError> {
        self.typed_payload(ObjectType::StakedSoma)
    }

    pub fn target(&self) -> Result<Target, ObjectError> {
        self.typed_payload(ObjectType::Target)
    }
}

/// A staking receipt (`StakedSomaV1`), created by CreateModel, AddStake and AddStakeToModel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StakedSoma {
    pub pool_id: ObjectId,
    pub stake_activation_epoch: u64,
    pub principal: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TargetStatus {
    Open,
    Filled { fill_epoch: u64 },
    Claimed,
}

/// A target (`TargetV1`), a shared object with `initial_shared_version = 1`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Target {
    pub embedding: SomaTensor,
    pub model_ids: Vec<ObjectId>,
    /// Shape `[1]`.
    pub distance_threshold: SomaTensor,
    pub reward_pool: u64,
    pub generation_epoch: u64,
    pub status: TargetStatus,
    pub submitter: Option<Address>,
    pub winning_model_id: Option<ObjectId>,
    pub winning_model_owner: Option<Address>,
    pub bond_amount: u64,
    pub winning_data_manifest: Option<Manifest>,
    pub winning_embedding: Option<SomaTensor>,
    pub winning_distance_score: Option<SomaTensor>,
    pub winning_loss_score: Option<SomaTensor>,
    /// A sorted set.
    pub submission_reports: Vec<Address>,
}

#[cfg(test)]
mod tests {
    /// The protobuf's names, which the node's stored state also uses: each parses back.
    #[test]
    fn model_states_have_the_networks_names() {
        let names: Vec<&str> = ModelState::ALL.iter().map(|s| s.name()).collect();
        assert_eq!(names, ["created", "pending", "active", "inactive"]);
        for state in ModelState::ALL {
            assert_eq!(ModelState::parse(state.name()), Some(state));
            let json = serde_json::to_string(&state).unwrap();
            assert_eq!(json, format!("\"{}\"", state.name()));
        }
        assert_eq!(ModelState::parse("Active"), None);
    }

    use super::*;

    #[test]
    fn typed_payloads_check_the_type_and_the_bytes() {
        let coin = Object::coin(
            ObjectId([1; 32]),
            3,
            42,
            Address([2; 32]),
            TxDigest([0; 32]),
        );
        assert_eq!(coin.coin_balance().unwrap(), 42);
        assert_eq!(coin.id().unwrap(), ObjectId([1; 32]));
        assert!(matches!(
            coin.staked_soma(),
            Err(ObjectError::Type {
                expected: "StakedSoma",
                ..
            })
        ));
        let rebuilt = Object::from_payload(
            ObjectType::Coin,
            ObjectId([1; 32]),
            3,
            coin.payload(),
            coin.owner,
            coin.previous_transaction,
        );
        assert_eq!(rebuilt.digest(), coin.digest());
        let mut truncated = coin.clone();
        truncated.data.contents.truncate(36);
        assert!(matches!(
            truncated.coin_balance(),
            Err(ObjectError::Payload("Coin", _))
        ));
        truncated.data.contents.truncate(10);
        assert_eq!(truncated.id(), Err(ObjectError::NoId(10)));
        assert_eq!(ObjectType::from_name("Target"), Some(ObjectType::Target));
        assert_eq!(ObjectType::from_name("target"), None);
    }
}

/// A model's place in its lifecycle, as the network names it (`Model.state` in the protobuf:
/// `created`, `pending`, `active`, `inactive`). The one definition the node and the client share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelState {
    Created,
    Pending,
    Active,
    Inactive,
}

impl ModelState {
    pub const ALL: [ModelState; 4] = [
        ModelState::Created,
        ModelState::Pending,
        ModelState::Active,
        ModelState::Inactive,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ModelState::Created => "created",
            ModelState::Pending => "pending",
            ModelState::Active => "active",
            ModelState::Inactive => "inactive",
        }
    }

    /// The state named `name`, as the protobuf spells it.
    pub fn parse(name: &str) -> Option<ModelState> {
        ModelState::ALL.into_iter().find(|s| s.name() == name)
    }
}
