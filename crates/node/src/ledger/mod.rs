//! The object chain: SOMA's rules over objects, as the network runs them.
//!
//! Owns the chain state ([`Ledger`]: live objects, an owner index and the [`SystemState`]),
//! transaction execution ([`execute`]: gas, fees, versions, every kind's rules) and the epoch
//! change ([`epoch`]). Pure: no IO, no clock, no locks. Execution never mutates the state it reads;
//! it returns [`Changes`], which the node makes durable before applying them.
//!
//! Supply is conserved: every shannon is in a coin, a staking pool, a target (reward pool or
//! bond), or one of the system's pools ([`Ledger::accounted_supply`]).

pub mod epoch;
pub mod execute;
pub mod system;
pub mod targets;
pub mod validators;

use std::collections::{BTreeMap, BTreeSet};

use somatrain_protocol::{Address, Object, ObjectId, ObjectType, Owner};

pub use system::{Model, ModelState, Params, SystemState};

/// What a batch of changes overwrote, for [`Ledger::roll_back`].
#[derive(Debug, Default)]
pub struct UndoLog {
    system: Option<SystemState>,
    objects: Vec<(ObjectId, Option<Object>)>,
}

/// Everything the chain holds. The object maps are persistent (`imbl`): a clone shares
/// everything unchanged, so the node publishes a snapshot after every commit for readers at
/// the cost of the system state alone.
#[derive(Debug, Clone)]
pub struct Ledger {
    pub system: SystemState,
    pub objects: imbl::OrdMap<ObjectId, Object>,
    /// Address-owned objects by owner.
    pub owned: imbl::OrdMap<Address, imbl::OrdSet<ObjectId>>,
    /// The ids of the target objects, so that listing targets never walks every coin.
    pub targets: imbl::OrdSet<ObjectId>,
}

impl Ledger {
    pub fn new(system: SystemState, objects: impl IntoIterator<Item = Object>) -> Self {
        let mut ledger = Ledger {
            system,
            objects: imbl::OrdMap::new(),
            owned: imbl::OrdMap::new(),
            targets: imbl::OrdSet::new(),
        };
        for object in objects {
            ledger.put(object);
        }
        ledger
    }

    fn put(&mut self, object: Object) {
        let id = object.id().expect("stored objects have ids");
        if let Some(old) = self.objects.get(&id) {
            self.unindex(id, old.owner);
        }
        if let Owner::AddressOwner(owner) = object.owner {
            self.owned.entry(owner).or_default().insert(id);
        }
        if object.object_type() == ObjectType::Target {
            self.targets.insert(id);
        } else {
            self.targets.remove(&id);
        }
        self.objects.insert(id, object);
    }

    fn unindex(&mut self, id: ObjectId, owner: Owner) {
        if let Owner::AddressOwner(owner) = owner
            && let Some(set) = self.owned.get_mut(&owner)
        {
            set.remove(&id);
            if set.is_empty() {
                self.owned.remove(&owner);
            }
        }
    }

    fn remove(&mut self, id: &ObjectId) {
        if let Some(old) = self.objects.remove(id) {
            self.unindex(*id, old.owner);
            self.targets.remove(id);
        }
    }

    /// The target objects, by id, from `from` on.
    pub fn targets_from(&self, from: ObjectId) -> impl Iterator<Item = (&ObjectId, &Object)> {
        self.targets
            .range(from..)
            .filter_map(|id| self.objects.get_key_value(id))
    }

    pub fn apply(&mut self, changes: Changes) {
        if let Some(system) = changes.system {
            self.system = system;
        }
        for id in &changes.deleted {
            self.remove(id);
        }
        for object in changes.written.into_values() {
            self.put(object);
        }
    }

    /// As [`Ledger::apply`], recording in `log` what each touched object was before, so that
    /// [`Ledger::roll_back`] can undo a batch whose disk write failed (cheaper than a copy of
    /// the whole ledger before every write).
    pub fn apply_logged(&mut self, changes: Changes, log: &mut UndoLog) {
        if let Some(system) = changes.system {
            let before = std::mem::replace(&mut self.system, system);
            log.system.get_or_insert(before);
        }
        for id in changes.deleted.iter().chain(changes.written.keys()) {
            log.objects.push((*id, self.objects.get(id).cloned()));
        }
        for id in &changes.deleted {
            self.remove(id);
        }
        for object in changes.written.into_values() {
            self.put(object);
        }
    }

    /// Puts back everything `log` recorded, newest first, and the system state as it was
    /// before the first logged change (or `system`, when given: the state before the batch).
    pub fn roll_back(&mut self, log: UndoLog, system: SystemState) {
        for (id, before) in log.objects.into_iter().rev() {
            match before {
                Some(object) => self.put(object),
                None => self.remove(&id),
            }
        }
        self.system = system;
    }

    pub fn object(&self, id: &ObjectId) -> Option<&Object> {
        self.objects.get(id)
    }

    /// The owner's objects in id order, optionally of one type.
    pub fn owned_objects(
        &self,
        owner: &Address,
        object_type: Option<ObjectType>,
    ) -> impl Iterator<Item = &Object> {
        self.owned
            .get(owner)
            .into_iter()
            .flatten()
            .filter_map(|id| self.objects.get(id))
            .filter(move |o| object_type.is_none_or(|t| o.object_type() == t))
    }

    /// The sum of the owner's coins.
    pub fn balance(&self, owner: &Address) -> u64 {
        self.owned_objects(owner, Some(ObjectType::Coin))
            .filter_map(|o| o.coin_balance().ok())
            .sum()
    }

    /// Shannons held anywhere; always equals `system.total_supply`.
    pub fn accounted_supply(&self) -> u128 {
        let in_objects: u128 = self
            .objects
            .values()
            .map(|o| match o.object_type() {
                ObjectType::Coin => o.coin_balance().unwrap_or(0) as u128,
                ObjectType::Target => o
                    .target()
                    .map(|t| t.reward_pool as u128 + t.bond_amount as u128)
                    .unwrap_or(0),
                // Receipts: their value is counted in the staking pools.
                ObjectType::StakedSoma | ObjectType::SystemState => 0,
            })
            .sum();
        in_objects + self.system.pooled_supply()
    }
}

/// The writes of one transaction, faucet payment or epoch change.
#[derive(Debug, Clone, Default)]
pub struct Changes {
    pub system: Option<SystemState>,
    /// Objects created or modified, in their final form (version and previous transaction set).
    pub written: BTreeMap<ObjectId, Object>,
    pub deleted: BTreeSet<ObjectId>,
}

/// A read view of the ledger with pending writes on top.
pub struct Overlay<'a> {
    base: &'a Ledger,
    pub changes: Changes,
}

impl<'a> Overlay<'a> {
    pub fn new(base: &'a Ledger) -> Self {
        Overlay {
            base,
            changes: Changes::default(),
        }
    }

    pub fn base(&self) -> &Ledger {
        self.base
    }

    pub fn system(&self) -> &SystemState {
        self.changes.system.as_ref().unwrap_or(&self.base.system)
    }

    pub fn system_mut(&mut self) -> &mut SystemState {
        self.changes
            .system
            .get_or_insert_with(|| self.base.system.clone())
    }

    pub fn object(&self, id: &ObjectId) -> Option<Object> {
        if self.changes.deleted.contains(id) {
            return None;
        }
        self.changes
            .written
            .get(id)
            .or_else(|| self.base.objects.get(id))
            .cloned()
    }

    pub fn write(&mut self, object: Object) {
        let id = object.id().expect("written objects have ids");
        self.changes.deleted.remove(&id);
        self.changes.written.insert(id, object);
    }

    pub fn delete(&mut self, id: ObjectId) {
        self.changes.written.remove(&id);
        if self.base.objects.contains_key(&id) {
            self.changes.deleted.insert(id);
        }
    }

    pub fn model(&self, id: &ObjectId) -> Option<&Model> {
        self.system().models.get(id)
    }

    pub fn put_model(&mut self, model: Model) {
        self.system_mut().models.insert(model.id, model);
    }
}
