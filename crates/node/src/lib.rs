//! The localnet: a single-node network that follows SOMA's rules.
//!
//! The node of record speaks the network's own protocol:
//! - [`ledger`]: the object chain (coins, `StakedSoma`, shared targets, the model registry),
//!   execution with the network's gas and fees, epoch changes. Pure.
//! - [`localnet::Localnet`]: the ledger made durable in redb, group commit, checkpoints.
//! - [`grpc`]: the `soma.rpc` services and the BCS side services (faucet, admin, scoring through
//!   the [`grpc::ScoringBackend`] trait the binary implements).
//! - [`blobs`]: the HTTP blob host.
//!
//! These use only the protocol types, the rpc crate and the store. The rest of this crate is the
//! first localnet (HTTP+JSON, accounts with sequence numbers), kept while the publishing and
//! submitter commands move to gRPC; its `--verify-submissions` ([`verify`]) still reaches the
//! client, submit and model crates, and goes with it. It owns the chain state machine ([`execute`]), its persistence (through `somatrain-store`: every
//! transaction and epoch change is one durable batch, written before the response), the epoch
//! clock, and the HTTP API ([`api`], versioned under `/v1`). It never trains or scores models.
//!
//! - [`Node`]: the state behind a lock, the store, the clock.
//! - [`api::router`]: the axum `Router`, so tests can drive it with or without a socket.

pub mod api;
pub mod blobs;
pub mod execute;
pub mod grpc;
pub mod ledger;
pub mod localnet;
pub mod targets;
pub mod verify;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use somatrain_protocol::Address;
use somatrain_protocol::chain::{
    Account, Model, Params, SystemState, Target, TargetState, TxRecord,
};
use somatrain_protocol::tx::{SHANNONS_PER_SOMA, SignedTx, TxDigest};
use somatrain_store::{Batch, Store, StoreError, Table};

use execute::{ChainState, Changes, TxError};

/// Total supply of the network: 10 million SOMA. On a localnet it all starts in the faucet.
pub const TOTAL_SUPPLY: u64 = 10_000_000 * SHANNONS_PER_SOMA;

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub data_dir: PathBuf,
    /// Parameters for a new chain; an existing data directory keeps its own.
    pub genesis: Params,
    /// Token for the admin endpoints; `None` disables them.
    pub admin_token: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("transaction rejected: {0}")]
    Envelope(#[from] somatrain_protocol::tx::EnvelopeError),
    #[error("transaction failed: {0}")]
    Tx(#[from] TxError),
    #[error("faucet reserve is empty")]
    FaucetEmpty,
}

pub use somatrain_protocol::chain::now_ms;

struct Inner {
    state: ChainState,
    store: Store,
}

/// A running chain.
type Slot = Arc<Mutex<Option<Result<TxRecord, NodeError>>>>;

/// A verified transaction waiting for the next group commit.
struct Queued {
    body: somatrain_protocol::TxBody,
    digest: TxDigest,
    slot: Slot,
}

pub struct Node {
    inner: Mutex<Inner>,
    queue: Mutex<Vec<Queued>>,
    pub admin_token: Option<String>,
    pub blob_dir: PathBuf,
    verifier: std::sync::OnceLock<verify::Verifier>,
}

impl Node {
    /// Opens the data directory, creating genesis on first use.
    pub fn open(config: &NodeConfig) -> Result<Arc<Node>, NodeError> {
        let store = Store::open(&config.data_dir)?;
        if store.get::<SystemState>(Table::System, "system")?.is_none() {
            {
                let system = SystemState {
                    epoch: 0,
                    epoch_start_ms: now_ms(),
                    params: config.genesis.clone(),
                    total_supply: TOTAL_SUPPLY,
                    // Half the supply funds the faucet, half the emissions that fund targets.
                    faucet_reserve: TOTAL_SUPPLY / 2,
                    emission_pool: TOTAL_SUPPLY - TOTAL_SUPPLY / 2,
                    fees_collected: 0,
                    burned: 0,
                    target_state: TargetState {
                        distance_threshold: config.genesis.initial_distance_threshold,
                        targets_generated_this_epoch: 0,
                        hits_this_epoch: 0,
                        hits_ema: 0,
                        reward_per_target: targets::reward_per_target(&config.genesis),
                    },
                };
                let mut batch = Batch::default();
                batch.put(Table::System, "system", &system);
                store.commit(batch)?;
                tracing::info!("created a new localnet in {}", config.data_dir.display());
            }
        }
        let state = load_state(&store)?;
        assert_eq!(
            state.accounted_supply(),
            state.system.total_supply,
            "stored state does not conserve supply"
        );
        let blob_dir = config.data_dir.join("blobs");
        std::fs::create_dir_all(&blob_dir).map_err(|e| StoreError::Open {
            path: blob_dir.clone(),
            reason: e.to_string(),
        })?;
        Ok(Arc::new(Node {
            inner: Mutex::new(Inner { state, store }),
            queue: Mutex::new(Vec::new()),
            admin_token: config.admin_token.clone(),
            blob_dir,
            verifier: std::sync::OnceLock::new(),
        }))
    }

    fn commit(inner: &mut Inner, changes: Changes, extra: Batch) -> Result<(), NodeError> {
        let mut batch = changes.to_batch();
        batch.extend(extra);
        inner.store.commit(batch)?;
        inner.state.apply(changes);
        debug_assert_eq!(
            inner.state.accounted_supply(),
            inner.state.system.total_supply
        );
        Ok(())
    }

    /// Verifies, executes and durably commits a transaction. Sending the same signed
    /// transaction again returns its record instead of failing, so a client that lost the
    /// response can simply retry.
    ///
    /// Group commit: a submitter queues its transaction, then takes the state lock; whoever holds
    /// the lock executes everything queued so far in order and commits it in one durable batch
    /// (one fsync for many transactions). A submitter whose transaction a previous holder already
    /// committed just reads its result.
    pub fn submit(&self, tx: &SignedTx) -> Result<TxRecord, NodeError> {
        let body = tx.verify()?;
        let slot: Slot = Arc::new(Mutex::new(None));
        self.queue.lock().expect("queue lock").push(Queued {
            body,
            digest: tx.digest(),
            slot: slot.clone(),
        });
        let mut inner = self.inner.lock().expect("node lock");
        if let Some(result) = slot.lock().expect("slot lock").take() {
            return result;
        }
        let queued = std::mem::take(&mut *self.queue.lock().expect("queue lock"));
        Self::execute_batch(&mut inner, queued);
        drop(inner);
        slot.lock()
            .expect("slot lock")
            .take()
            .expect("the batch that held our transaction answered it")
    }

    fn execute_batch(inner: &mut Inner, queued: Vec<Queued>) {
        let mut batch = Batch::default();
        let mut results: Vec<Result<TxRecord, NodeError>> = Vec::with_capacity(queued.len());
        let mut seen: std::collections::HashMap<TxDigest, TxRecord> = Default::default();
        for q in &queued {
            let key = q.digest.to_string();
            let previous = match seen.get(&q.digest) {
                Some(r) => Ok(Some(r.clone())),
                None => inner.store.get::<TxRecord>(Table::Transactions, &key),
            };
            let result = match previous {
                Ok(Some(record)) => Ok(record),
                Err(e) => Err(NodeError::Store(e)),
                Ok(None) => match execute::execute(&inner.state, &q.body, q.digest) {
                    Ok((changes, record)) => {
                        batch.extend(changes.to_batch());
                        batch.put(Table::Transactions, key, &record);
                        inner.state.apply(changes);
                        seen.insert(q.digest, record.clone());
                        Ok(record)
                    }
                    Err(e) => Err(NodeError::Tx(e)),
                },
            };
            results.push(result);
        }
        if !batch.is_empty()
            && let Err(e) = inner.store.commit(batch)
        {
            // Memory ran ahead of the disk: reload what is durable and fail the whole batch.
            tracing::error!("commit failed, reloading state: {e}");
            match load_state(&inner.store) {
                Ok(state) => inner.state = state,
                Err(reload) => panic!("state cannot be reloaded after a failed commit: {reload}"),
            }
            let message = e.to_string();
            results = queued
                .iter()
                .map(|_| Err(NodeError::Store(StoreError::Db(message.clone()))))
                .collect();
        }
        debug_assert_eq!(
            inner.state.accounted_supply(),
            inner.state.system.total_supply
        );
        for (q, result) in queued.into_iter().zip(results) {
            *q.slot.lock().expect("slot lock") = Some(result);
        }
    }

    pub fn transaction(&self, digest: &TxDigest) -> Result<Option<TxRecord>, NodeError> {
        let inner = self.inner.lock().expect("node lock");
        Ok(inner.store.get(Table::Transactions, &digest.to_string())?)
    }

    /// Pays the faucet amount to `address` from the faucet reserve.
    pub fn faucet(&self, address: Address) -> Result<Account, NodeError> {
        let mut inner = self.inner.lock().expect("node lock");
        let amount = inner.state.system.params.faucet_amount;
        if inner.state.system.faucet_reserve < amount {
            return Err(NodeError::FaucetEmpty);
        }
        let mut changes = Changes::default();
        let mut system = inner.state.system.clone();
        system.faucet_reserve -= amount;
        let mut account = inner
            .state
            .accounts
            .get(&address)
            .copied()
            .unwrap_or_default();
        account.balance += amount;
        changes.system = Some(system);
        changes.accounts.insert(address, account);
        Self::commit(&mut inner, changes, Batch::default())?;
        Ok(account)
    }

    /// Closes the current epoch now.
    pub fn advance_epoch(&self) -> Result<u64, NodeError> {
        let mut inner = self.inner.lock().expect("node lock");
        let changes = execute::advance_epoch(&inner.state, now_ms());
        Self::commit(&mut inner, changes, Batch::default())?;
        tracing::info!("epoch {} started", inner.state.system.epoch);
        Ok(inner.state.system.epoch)
    }

    /// Closes the epoch if its duration has run out; called by the clock task.
    pub fn tick(&self, now: u64) -> Result<bool, NodeError> {
        let due = {
            let inner = self.inner.lock().expect("node lock");
            let s = &inner.state.system;
            now >= s.epoch_start_ms + s.params.epoch_duration_ms
        };
        if due {
            self.advance_epoch()?;
        }
        Ok(due)
    }

    pub fn system(&self) -> SystemState {
        self.inner.lock().expect("node lock").state.system.clone()
    }

    pub fn account(&self, address: &Address) -> Account {
        self.inner
            .lock()
            .expect("node lock")
            .state
            .accounts
            .get(address)
            .copied()
            .unwrap_or_default()
    }

    pub fn models(&self) -> Vec<Model> {
        self.inner
            .lock()
            .expect("node lock")
            .state
            .models
            .values()
            .cloned()
            .collect()
    }

    pub fn targets(&self) -> Vec<Target> {
        self.inner
            .lock()
            .expect("node lock")
            .state
            .targets
            .values()
            .cloned()
            .collect()
    }

    pub fn target(&self, id: &somatrain_protocol::ObjectId) -> Option<Target> {
        self.inner
            .lock()
            .expect("node lock")
            .state
            .targets
            .get(id)
            .cloned()
    }

    pub fn model(&self, id: &somatrain_protocol::ObjectId) -> Option<Model> {
        self.inner
            .lock()
            .expect("node lock")
            .state
            .models
            .get(id)
            .cloned()
    }

    /// Supply held anywhere, for invariant checks.
    pub fn accounted_supply(&self) -> u64 {
        self.inner
            .lock()
            .expect("node lock")
            .state
            .accounted_supply()
    }

    /// Turns on re-scoring of data submissions (see [`verify`]); `work_dir` caches weights.
    pub fn enable_verification(&self, work_dir: &std::path::Path) {
        let _ = self.verifier.set(verify::Verifier::new(work_dir));
    }

    pub fn verifier(&self) -> Option<&verify::Verifier> {
        self.verifier.get()
    }

    pub fn data_dir_blob(&self, name: &str) -> PathBuf {
        self.blob_dir.join(name)
    }
}

/// Reads the whole chain state from the store.
fn load_state(store: &Store) -> Result<ChainState, StoreError> {
    let system: SystemState = store
        .get(Table::System, "system")?
        .ok_or_else(|| StoreError::Db("the system state is missing".into()))?;
    let accounts: BTreeMap<Address, Account> = store
        .load_all::<Account>(Table::Accounts)?
        .into_iter()
        .filter_map(|(k, v)| k.parse().ok().map(|a| (a, v)))
        .collect();
    let models: BTreeMap<_, Model> = store
        .load_all::<Model>(Table::Models)?
        .into_iter()
        .filter_map(|(k, v)| k.parse().ok().map(|id| (id, v)))
        .collect();
    let targets: BTreeMap<_, Target> = store
        .load_all::<Target>(Table::Targets)?
        .into_iter()
        .filter_map(|(k, v)| k.parse().ok().map(|id| (id, v)))
        .collect();
    let state = ChainState {
        system,
        accounts,
        models,
        targets,
    };
    Ok(state)
}

/// Runs the epoch clock until the process ends.
pub async fn run_clock(node: Arc<Node>) {
    let mut interval = tokio::time::interval(std::time::Duration::from_millis(200));
    loop {
        interval.tick().await;
        let node = node.clone();
        let result = tokio::task::spawn_blocking(move || node.tick(now_ms())).await;
        if let Ok(Err(e)) = result {
            tracing::error!("epoch change failed: {e}");
        }
    }
}

/// Serves the API on `listener` and runs the clock, until `shutdown` resolves.
pub async fn serve(
    node: Arc<Node>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let clock = tokio::spawn(run_clock(node.clone()));
    let result = axum::serve(listener, api::router(node))
        .with_graceful_shutdown(shutdown)
        .await;
    clock.abort();
    result
}

pub fn default_data_dir() -> PathBuf {
    Path::new(".somatrain").join("localnet")
}
