//! The object-chain node: the [`Ledger`] made durable in redb, with checkpoints.
//!
//! One writer holds the ledger it executes against; readers see a snapshot of the ledger as of
//! the last commit, swapped in after each commit, and read the store beside the writer's
//! commits, so a read never waits for execution or a disk sync.
//!
//! Every executed transaction (success or failure) is in the store before its answer, and is
//! sealed into a checkpoint that subscribers receive. Group commit: submitters queue their
//! transactions and one writer executes everything queued, commits it in one
//! durable batch (one fsync) and seals one checkpoint. A failed disk write reloads the state
//! from disk, fails that batch, and the node goes on (it recovers once space is back).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use serde::{Deserialize, Serialize};
use somatrain_protocol::effects::{BalanceChange, TransactionEffects};
use somatrain_protocol::hash::blake2b256;
use somatrain_protocol::object::StakedSoma;
use somatrain_protocol::{
    Address, Digest, Object, ObjectId, ObjectType, Owner, SignedTransaction, TxDigest,
};
use somatrain_store::{Batch, Store, StoreError, Table};
use tokio::sync::broadcast;

use crate::ledger::execute::{Executed, Refusal};
use crate::ledger::{Changes, Ledger, Params, SystemState, UndoLog, epoch, execute};

#[derive(Debug, Clone)]
pub struct LocalnetConfig {
    pub data_dir: PathBuf,
    /// Parameters for a new chain; an existing data directory keeps its own.
    pub genesis: Params,
    /// Validators of a new chain, each staking [`GENESIS_VALIDATOR_STAKE`] from the faucet's
    /// reserve; an existing data directory keeps its own.
    ///
    /// [`GENESIS_VALIDATOR_STAKE`]: crate::ledger::validators::GENESIS_VALIDATOR_STAKE
    pub validators: usize,
}

impl LocalnetConfig {
    /// A config with the network's default of one validator.
    pub fn new(data_dir: PathBuf, genesis: Params) -> Self {
        LocalnetConfig {
            data_dir,
            genesis,
            validators: 1,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LocalnetError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("transaction refused: {0}")]
    Refused(#[from] Refusal),
    #[error("the faucet reserve is empty")]
    FaucetEmpty,
    #[error(transparent)]
    ValidatorKeys(#[from] crate::validator_keys::KeyFileError),
    #[error("stored state does not conserve supply ({accounted} accounted, {total} total)")]
    Supply { accounted: u128, total: u64 },
}

/// An executed transaction as stored and served.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransactionRecord {
    pub digest: TxDigest,
    /// The signed envelope in BCS; absent for system transactions (faucet payments).
    #[serde(with = "serde_bytes_option")]
    pub signed: Option<Vec<u8>>,
    pub effects: TransactionEffects,
    pub balance_changes: Vec<BalanceChange>,
    /// Objects the transaction wrote, in their new form.
    pub objects: Vec<Object>,
    pub checkpoint: u64,
    pub timestamp_ms: u64,
}

mod serde_bytes_option {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(bytes) => s.serialize_some(&hex::encode(bytes)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|text| hex::decode(text).map_err(serde::de::Error::custom))
            .transpose()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub sequence: u64,
    pub digest: Digest,
    pub timestamp_ms: u64,
    pub transactions: Vec<TxDigest>,
}

impl Checkpoint {
    fn new(sequence: u64, timestamp_ms: u64, transactions: Vec<TxDigest>) -> Self {
        let mut parts: Vec<&[u8]> = vec![b"Checkpoint::"];
        let sequence_bytes = sequence.to_le_bytes();
        parts.push(&sequence_bytes);
        for d in &transactions {
            parts.push(&d.0);
        }
        Checkpoint {
            sequence,
            digest: Digest(blake2b256(&parts)),
            timestamp_ms,
            transactions,
        }
    }
}

/// Checkpoint 0: genesis, with no transactions, at the chain's start.
fn genesis_checkpoint(genesis_ms: u64) -> Checkpoint {
    Checkpoint::new(0, genesis_ms, Vec::new())
}

fn checkpoint_key(sequence: u64) -> String {
    format!("{sequence:020}")
}

/// Each genesis validator's gas coin, from the faucet's reserve: 1,000 SOMA.
pub const VALIDATOR_GAS: u64 = 1_000 * somatrain_protocol::SHANNONS_PER_SOMA;

const CHAIN_ID_KEY: &str = "chain_id";
const SYSTEM_KEY: &str = "object_chain";

struct Inner {
    ledger: Ledger,
    store: SharedStore,
    /// A disk write failed and the store has not been reopened since (memory holds exactly
    /// what is durable: a failed batch is rolled back).
    needs_reopen: bool,
    /// Reopened after a failed write, and no write has reached the disk since.
    recovering: bool,
}

impl Inner {
    fn reopen(&mut self) -> Result<(), StoreError> {
        self.store.write().expect("store lock").reopen()?;
        self.needs_reopen = false;
        // Reopening needs no space; only a write that lands says the disk has room again.
        self.recovering = true;
        tracing::debug!("the store was reopened after a failed write");
        Ok(())
    }

    fn commit(&mut self, batch: Batch) -> Result<(), StoreError> {
        // A shared lock: readers of the store go on while the batch is written and synced.
        self.store.read().expect("store lock").commit(batch)?;
        if self.recovering {
            self.recovering = false;
            tracing::info!("the store is writable again: a write reached the disk");
        }
        Ok(())
    }

    /// Before a write: a store that failed is reopened first, so a disk that fills up and then
    /// frees space is recovered from without a restart.
    fn ready(&mut self) -> Result<(), LocalnetError> {
        if self.needs_reopen {
            self.reopen().map_err(|e| {
                LocalnetError::Store(StoreError::Db(format!(
                    "the store is not writable yet: {e}"
                )))
            })?;
        }
        Ok(())
    }
}

type Reply = tokio::sync::oneshot::Sender<Result<TransactionRecord, LocalnetError>>;

struct Queued {
    tx: SignedTransaction,
    digest: TxDigest,
    reply: Reply,
}

/// The store, shared by the writer (commits take the shared side too: redb lets reads run
/// beside a write) and readers; only a reopen after a failed write takes it exclusively.
type SharedStore = Arc<RwLock<Store>>;

pub struct Localnet {
    /// The writer's state: the ledger it executes against. Readers never take this lock.
    inner: Mutex<Inner>,
    /// The ledger as of the last commit, for readers: replaced (never mutated) after each
    /// commit, so a read never waits for execution or a disk sync.
    snapshot: RwLock<Arc<Ledger>>,
    store: SharedStore,
    queue: Mutex<Vec<Queued>>,
    /// Wakes the writer thread when transactions are queued.
    queued: std::sync::Condvar,
    checkpoints: broadcast::Sender<Arc<Checkpoint>>,
    chain_id: Digest,
    faucet_counter: std::sync::atomic::AtomicU64,
    writer_started: std::sync::atomic::AtomicBool,
}

impl Localnet {
    /// Opens the data directory, creating genesis on first use.
    pub fn open(config: &LocalnetConfig, now_ms: u64) -> Result<Arc<Localnet>, LocalnetError> {
        Self::open_with(config, now_ms, somatrain_store::file_backend())
    }

    /// As [`Localnet::open`], with the database on the storage `backend` makes (tests use one
    /// that fails like a full disk).
    pub fn open_with(
        config: &LocalnetConfig,
        now_ms: u64,
        backend: somatrain_store::BackendFactory,
    ) -> Result<Arc<Localnet>, LocalnetError> {
        let store = Store::open_with(&config.data_dir, backend)?;
        let chain_id = match store.get::<Digest>(Table::System, CHAIN_ID_KEY)? {
            Some(id) => id,
            None => {
                let (_, validators) =
                    crate::validator_keys::create(&config.data_dir, config.validators)?;
                let chain_id = Digest(blake2b256(&[b"somatrain-localnet", &now_ms.to_le_bytes()]));
                let mut batch = Batch::default();
                // Each validator's own stake, as the StakedSoma genesis gives it.
                for v in &validators {
                    let receipt = StakedSoma {
                        pool_id: v.pool.id,
                        stake_activation_epoch: 0,
                        principal: v.pool.soma_balance,
                    };
                    let id = ObjectId(blake2b256(&[b"soma-genesis-validator-stake", &v.address.0]));
                    let object = Object::new(
                        ObjectType::StakedSoma,
                        id,
                        1,
                        &receipt,
                        Owner::AddressOwner(v.address),
                        TxDigest(chain_id.0),
                    );
                    batch.put(Table::Objects, id.hex(), &object);
                }
                // And a gas coin, to pay for its reports.
                for v in &validators {
                    let id = ObjectId(blake2b256(&[b"soma-genesis-validator-gas", &v.address.0]));
                    let coin = Object::coin(id, 1, VALIDATOR_GAS, v.address, TxDigest(chain_id.0));
                    batch.put(Table::Objects, id.hex(), &coin);
                }
                let gas = VALIDATOR_GAS * validators.len() as u64;
                let mut system = SystemState::genesis(config.genesis.clone(), now_ms, validators);
                system.faucet_reserve -= gas;
                batch.put(Table::System, SYSTEM_KEY, &system);
                batch.put(Table::System, CHAIN_ID_KEY, &chain_id);
                store.commit(batch)?;
                tracing::info!("created a new localnet in {}", config.data_dir.display());
                chain_id
            }
        };
        let (mut ledger, models_inline) = load_ledger(&store)?;
        let mut batch = Batch::default();
        if models_inline {
            // An earlier build kept the models inside the system value: store them apart.
            stage_system(&mut batch, None, &ledger.system);
        }
        if ledger.system.checkpoint_height == 0 {
            // The network always has its genesis checkpoint: a reader's first "latest
            // checkpoint" finds it (a chain created before this existed gets it now).
            let genesis = genesis_checkpoint(ledger.system.epoch_start_ms);
            ledger.system.checkpoint_height = 1;
            batch.put(Table::Checkpoints, checkpoint_key(0), &genesis);
            batch.put(Table::System, SYSTEM_KEY, &ledger.system);
        }
        if !batch.is_empty() {
            store.commit(batch)?;
        }
        let accounted = ledger.accounted_supply();
        if accounted != ledger.system.total_supply as u128 {
            return Err(LocalnetError::Supply {
                accounted,
                total: ledger.system.total_supply,
            });
        }
        let (checkpoints, _) = broadcast::channel(1024);
        let store: SharedStore = Arc::new(RwLock::new(store));
        Ok(Arc::new(Localnet {
            snapshot: RwLock::new(Arc::new(ledger.clone())),
            store: store.clone(),
            inner: Mutex::new(Inner {
                ledger,
                store,
                needs_reopen: false,
                recovering: false,
            }),
            queue: Mutex::new(Vec::new()),
            queued: std::sync::Condvar::new(),
            checkpoints,
            chain_id,
            faucet_counter: std::sync::atomic::AtomicU64::new(0),
            writer_started: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    pub fn chain_id(&self) -> Digest {
        self.chain_id
    }

    /// Checkpoints as they are sealed.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Checkpoint>> {
        self.checkpoints.subscribe()
    }

    /// Executes a signature-checked transaction and commits it durably, on the caller's thread.
    /// The same transaction sent again answers with its first outcome.
    pub fn submit(
        &self,
        tx: SignedTransaction,
        now_ms: u64,
    ) -> Result<TransactionRecord, LocalnetError> {
        let (reply, mut answer) = tokio::sync::oneshot::channel();
        let digest = tx.digest();
        self.queue
            .lock()
            .expect("queue lock")
            .push(Queued { tx, digest, reply });
        let mut inner = self.inner.lock().expect("node lock");
        if let Ok(result) = answer.try_recv() {
            return result;
        }
        let queued = std::mem::take(&mut *self.queue.lock().expect("queue lock"));
        self.execute_batch(&mut inner, queued, now_ms);
        drop(inner);
        answer
            .try_recv()
            .expect("the batch that held our transaction answered it")
    }

    /// As [`Localnet::submit`], for async callers: the transaction is queued for the writer
    /// thread, which executes everything queued in one batch (one fsync, one checkpoint), so
    /// many concurrent senders never pile up threads on the state lock.
    pub async fn submit_queued(
        self: &Arc<Self>,
        tx: SignedTransaction,
    ) -> Result<TransactionRecord, LocalnetError> {
        self.start_writer();
        let (reply, answer) = tokio::sync::oneshot::channel();
        let digest = tx.digest();
        self.queue
            .lock()
            .expect("queue lock")
            .push(Queued { tx, digest, reply });
        self.queued.notify_one();
        answer.await.unwrap_or_else(|_| {
            Err(LocalnetError::Store(StoreError::Db(
                "the writer thread stopped".into(),
            )))
        })
    }

    fn start_writer(self: &Arc<Self>) {
        if self
            .writer_started
            .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            return;
        }
        let node = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("localnet-writer".into())
            .spawn(move || {
                loop {
                    let Some(node) = node.upgrade() else { return };
                    let queued = {
                        let queue = node.queue.lock().expect("queue lock");
                        let (mut queue, _) = node
                            .queued
                            .wait_timeout_while(queue, std::time::Duration::from_secs(1), |q| {
                                q.is_empty()
                            })
                            .expect("queue lock");
                        std::mem::take(&mut *queue)
                    };
                    if queued.is_empty() {
                        continue;
                    }
                    let now_ms = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as u64);
                    let mut inner = node.inner.lock().expect("node lock");
                    node.execute_batch(&mut inner, queued, now_ms);
                }
            })
            .expect("spawn the writer thread");
    }

    fn execute_batch(&self, inner: &mut Inner, queued: Vec<Queued>, now_ms: u64) {
        if let Err(e) = inner.ready() {
            let message = e.to_string();
            for q in queued {
                let _ = q
                    .reply
                    .send(Err(LocalnetError::Store(StoreError::Db(message.clone()))));
            }
            return;
        }
        let sequence = inner.ledger.system.checkpoint_height;
        let system_before = inner.ledger.system.clone();
        let mut undo = UndoLog::default();
        let mut batch = Batch::default();
        let mut records: Vec<TransactionRecord> = Vec::new();
        let mut results: Vec<Result<TransactionRecord, LocalnetError>> = Vec::new();
        let mut seen: HashMap<TxDigest, TransactionRecord> = HashMap::new();
        for q in &queued {
            let previous = match seen.get(&q.digest) {
                Some(r) => Ok(Some(r.clone())),
                None => inner
                    .store
                    .read()
                    .expect("store lock")
                    .get::<TransactionRecord>(Table::Transactions, &q.digest.to_string()),
            };
            let result = match previous {
                Ok(Some(record)) => Ok(record),
                Err(e) => Err(LocalnetError::Store(e)),
                Ok(None) => match execute::execute_guarded(&inner.ledger, &q.tx) {
                    Ok(executed) => {
                        let record = record_of(
                            executed_parts(&executed),
                            Some(q.tx.to_bcs()),
                            sequence,
                            now_ms,
                        );
                        stage(&mut batch, &executed.changes, &record);
                        inner.ledger.apply_logged(executed.changes, &mut undo);
                        seen.insert(q.digest, record.clone());
                        records.push(record.clone());
                        Ok(record)
                    }
                    Err(refusal) => Err(LocalnetError::Refused(refusal)),
                },
            };
            results.push(result);
        }
        let checkpoint = if records.is_empty() {
            None
        } else {
            Some(self.seal(
                inner,
                &mut batch,
                &records,
                &system_before,
                (sequence, now_ms),
            ))
        };
        if !batch.is_empty()
            && let Err(e) = inner.commit(batch)
        {
            inner.ledger.roll_back(undo, system_before);
            after_failed_commit(inner, &e);
            let message = e.to_string();
            results = queued
                .iter()
                .map(|_| Err(LocalnetError::Store(StoreError::Db(message.clone()))))
                .collect();
        } else if let Some(checkpoint) = checkpoint {
            // Readers see the new state before anyone hears of it.
            self.publish(&inner.ledger);
            let _ = self.checkpoints.send(Arc::new(checkpoint));
        }
        debug_assert_eq!(
            inner.ledger.accounted_supply(),
            inner.ledger.system.total_supply as u128
        );
        for (q, result) in queued.into_iter().zip(results) {
            // A sender that stopped waiting (a dropped request) no longer needs its answer.
            let _ = q.reply.send(result);
        }
    }

    /// Seals the batch's transactions into checkpoint `sequence` (staged in `batch`, with the
    /// system value and the models that changed since `system_before`).
    fn seal(
        &self,
        inner: &mut Inner,
        batch: &mut Batch,
        records: &[TransactionRecord],
        system_before: &SystemState,
        (sequence, now_ms): (u64, u64),
    ) -> Checkpoint {
        let digests: Vec<TxDigest> = records.iter().map(|r| r.digest).collect();
        let checkpoint = Checkpoint::new(sequence, now_ms, digests);
        inner.ledger.system.checkpoint_height = sequence + 1;
        batch.put(Table::Checkpoints, checkpoint_key(sequence), &checkpoint);
        stage_system(batch, Some(system_before), &inner.ledger.system);
        checkpoint
    }

    /// Pays the faucet amount to `recipient` as one new coin, in its own checkpoint.
    pub fn faucet(
        &self,
        recipient: Address,
        now_ms: u64,
    ) -> Result<TransactionRecord, LocalnetError> {
        let mut inner = self.inner.lock().expect("node lock");
        inner.ready()?;
        let n = self
            .faucet_counter
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let digest = TxDigest(blake2b256(&[
            b"Faucet::",
            &self.chain_id.0,
            &recipient.0,
            &now_ms.to_le_bytes(),
            &n.to_le_bytes(),
            &inner.ledger.system.checkpoint_height.to_le_bytes(),
        ]));
        let executed =
            execute::faucet(&inner.ledger, recipient, digest).ok_or(LocalnetError::FaucetEmpty)?;
        let sequence = inner.ledger.system.checkpoint_height;
        let record = record_of(executed_parts(&executed), None, sequence, now_ms);
        let mut batch = Batch::default();
        stage(&mut batch, &executed.changes, &record);
        let system_before = inner.ledger.system.clone();
        let mut undo = UndoLog::default();
        inner.ledger.apply_logged(executed.changes, &mut undo);
        let checkpoint = self.seal(
            &mut inner,
            &mut batch,
            std::slice::from_ref(&record),
            &system_before,
            (sequence, now_ms),
        );
        if let Err(e) = inner.commit(batch) {
            inner.ledger.roll_back(undo, system_before);
            after_failed_commit(&mut inner, &e);
            return Err(e.into());
        }
        self.publish(&inner.ledger);
        let _ = self.checkpoints.send(Arc::new(checkpoint));
        Ok(record)
    }

    /// Closes the current epoch now; returns the new epoch.
    pub fn advance_epoch(&self, now_ms: u64) -> Result<u64, LocalnetError> {
        let mut inner = self.inner.lock().expect("node lock");
        inner.ready()?;
        let changes = epoch::advance_epoch(&inner.ledger, now_ms);
        let mut batch = Batch::default();
        stage_changes(&mut batch, &changes);
        let system_before = inner.ledger.system.clone();
        let mut undo = UndoLog::default();
        inner.ledger.apply_logged(changes, &mut undo);
        stage_system(&mut batch, Some(&system_before), &inner.ledger.system);
        if let Err(e) = inner.commit(batch) {
            inner.ledger.roll_back(undo, system_before);
            after_failed_commit(&mut inner, &e);
            return Err(e.into());
        }
        self.publish(&inner.ledger);
        tracing::info!("epoch {} started", inner.ledger.system.epoch);
        Ok(inner.ledger.system.epoch)
    }

    /// Runs `f` on the state as of the last commit. It takes no lock the writer holds while
    /// executing or syncing: the snapshot is an `Arc` taken in a moment.
    pub fn read<T>(&self, f: impl FnOnce(&Ledger) -> T) -> T {
        let snapshot = self.snapshot.read().expect("snapshot lock").clone();
        f(&snapshot)
    }

    /// Makes `ledger` (just committed) what readers see. Cheap: the object maps are shared.
    fn publish(&self, ledger: &Ledger) {
        let snapshot = Arc::new(ledger.clone());
        *self.snapshot.write().expect("snapshot lock") = snapshot;
    }

    pub fn transaction(
        &self,
        digest: &TxDigest,
    ) -> Result<Option<TransactionRecord>, LocalnetError> {
        let store = self.store.read().expect("store lock");
        Ok(store.get(Table::Transactions, &digest.to_string())?)
    }

    pub fn checkpoint(&self, sequence: u64) -> Result<Option<Checkpoint>, LocalnetError> {
        let store = self.store.read().expect("store lock");
        Ok(store.get(Table::Checkpoints, &checkpoint_key(sequence))?)
    }

    /// Runs a transaction against the current state without committing it. Execution only
    /// reads the ledger (its writes go to an overlay), so nothing is copied, and the inputs
    /// (gas and owned objects) are checked before any other work.
    pub fn simulate(&self, tx: &SignedTransaction) -> Result<Executed, Refusal> {
        self.read(|l| execute::execute_guarded(l, tx))
    }

    /// Objects of `owner` after `after` (exclusive), at most `limit`, optionally of one type.
    pub fn owned_page(
        &self,
        owner: &Address,
        object_type: Option<ObjectType>,
        after: Option<ObjectId>,
        limit: usize,
    ) -> (Vec<Object>, bool) {
        self.read(|l| {
            let mut page: Vec<Object> = l
                .owned_objects(owner, object_type)
                .filter(|o| after.is_none_or(|a| o.id().is_ok_and(|id| id > a)))
                .take(limit + 1)
                .cloned()
                .collect();
            let more = page.len() > limit;
            page.truncate(limit);
            (page, more)
        })
    }
}

fn executed_parts(e: &Executed) -> (&TransactionEffects, &[BalanceChange], Vec<Object>) {
    (
        &e.effects,
        &e.balance_changes,
        e.changes.written.values().cloned().collect(),
    )
}

fn record_of(
    (effects, balance_changes, objects): (&TransactionEffects, &[BalanceChange], Vec<Object>),
    signed: Option<Vec<u8>>,
    checkpoint: u64,
    timestamp_ms: u64,
) -> TransactionRecord {
    TransactionRecord {
        digest: effects.transaction_digest,
        signed,
        effects: effects.clone(),
        balance_changes: balance_changes.to_vec(),
        objects,
        checkpoint,
        timestamp_ms,
    }
}

fn stage_changes(batch: &mut Batch, changes: &Changes) {
    for (id, object) in &changes.written {
        batch.put(Table::Objects, id.hex(), object);
    }
    for id in &changes.deleted {
        batch.delete(Table::Objects, id.hex());
    }
}

/// Stages the system value (models apart) and each model that differs from `before` (every
/// model without it): a checkpoint writes the models that changed, not the whole registry.
fn stage_system(batch: &mut Batch, before: Option<&SystemState>, after: &SystemState) {
    batch.put(Table::System, SYSTEM_KEY, after);
    for (id, model) in &after.models {
        if before.and_then(|b| b.models.get(id)) != Some(model) {
            batch.put(Table::Models, id.hex(), model);
        }
    }
    if let Some(before) = before {
        for id in before
            .models
            .keys()
            .filter(|id| !after.models.contains_key(id))
        {
            batch.delete(Table::Models, id.hex());
        }
    }
}

fn stage(batch: &mut Batch, changes: &Changes, record: &TransactionRecord) {
    stage_changes(batch, changes);
    batch.put(Table::Transactions, record.digest.to_string(), record);
}

/// A batch did not reach the disk (its changes are already rolled back in memory). redb
/// refuses every later write until the database is reopened: try now, and again before each
/// later write until it works.
fn after_failed_commit(inner: &mut Inner, error: &StoreError) {
    tracing::error!("a disk write failed; nothing of it was kept: {error}");
    inner.needs_reopen = true;
    if let Err(e) = inner.reopen() {
        tracing::error!("the store cannot be reopened yet ({e}); retrying with the next write");
    }
}

/// The ledger as stored, and whether its models were still inside the system value (a data
/// directory of an earlier build).
fn load_ledger(store: &Store) -> Result<(Ledger, bool), StoreError> {
    let mut system: SystemState = store
        .get(Table::System, SYSTEM_KEY)?
        .ok_or_else(|| StoreError::Db("the system state is missing".into()))?;
    let stored = store.load_all::<crate::ledger::Model>(Table::Models)?;
    let models_inline = stored.is_empty() && !system.models.is_empty();
    if !models_inline {
        system.models = stored.into_iter().map(|(_, m)| (m.id, m)).collect();
    }
    let objects = store
        .load_all::<Object>(Table::Objects)?
        .into_iter()
        .map(|(_, o)| o);
    Ok((Ledger::new(system, objects), models_inline))
}

pub fn default_data_dir() -> PathBuf {
    Path::new(".somatrain").join("localnet")
}
