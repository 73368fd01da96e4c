//! What several node tests share: a redb storage backend with a hook before every write, resize
//! and sync (to fail like a full disk, or to be slow like a busy one), a signed transfer, and a
//! ledger driven straight through execution with supply checked after every step.

#![allow(dead_code)]

use somatrain_protocol::transaction::TransferCoin;
use std::ops::Bound;
use std::sync::Arc;

use redb::{BackendError, StorageBackend};
use somatrain_node::ledger::Params;
use somatrain_node::localnet::{Localnet, LocalnetConfig};
use somatrain_protocol::{
    Address, Keypair, ObjectType, SignedTransaction, TransactionData, TransactionKind,
};

/// What the disk is about to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskOp {
    /// A write of this many bytes.
    Write(usize),
    SetLen,
    Sync,
}

pub type DiskHook = Arc<dyn Fn(DiskOp) -> std::io::Result<()> + Send + Sync>;

/// The file backend, calling `hook` before every write, resize and sync (an error fails it).
pub struct HookedDisk {
    inner: Box<dyn StorageBackend>,
    hook: DiskHook,
}

impl std::fmt::Debug for HookedDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HookedDisk")
    }
}

/// A backend factory for [`Localnet::open_with`] whose disks call `hook`.
pub fn hooked_backend(hook: DiskHook) -> somatrain_store::BackendFactory {
    Arc::new(move |path: &std::path::Path| {
        let inner = (somatrain_store::file_backend())(path)?;
        Ok(Box::new(HookedDisk {
            inner,
            hook: hook.clone(),
        }) as Box<dyn StorageBackend>)
    })
}

impl StorageBackend for HookedDisk {
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        self.inner.read(offset, out)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        (self.hook)(DiskOp::SetLen)?;
        self.inner.set_len(len)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        (self.hook)(DiskOp::Sync)?;
        self.inner.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        (self.hook)(DiskOp::Write(data.len()))?;
        self.inner.write(offset, data)
    }
    fn close(&self) -> std::io::Result<()> {
        self.inner.close()
    }
    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.try_lock_range(start, end)
    }
    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, BackendError> {
        self.inner.try_lock_shared_range(start, end)
    }
    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_range(start, end)
    }
    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_shared_range(start, end)
    }
    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.unlock_range(start, end)
    }
    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.query_lock_range(start, end)
    }
}

/// A transfer of `amount` from `from`'s richest coin (gas too) to `to`.
pub fn transfer(node: &Localnet, from: &Keypair, to: Address, amount: u64) -> SignedTransaction {
    let gas = node.read(|l| {
        l.owned_objects(&from.address(), Some(ObjectType::Coin))
            .max_by_key(|o| o.coin_balance().unwrap())
            .unwrap()
            .reference()
            .unwrap()
    });
    transfer_with(from, gas, to, amount)
}

/// A transfer of `amount` from coin `gas` (which pays the fee too) to `to`.
pub fn transfer_with(
    from: &Keypair,
    gas: somatrain_protocol::ObjectRef,
    to: Address,
    amount: u64,
) -> SignedTransaction {
    SignedTransaction::sign(
        from,
        TransactionData::new(
            TransactionKind::TransferCoin(TransferCoin {
                coin: gas,
                amount: Some(amount),
                recipient: to,
            }),
            from.address(),
            vec![gas],
        ),
    )
}

/// A chain in `dir` with one validator and 4-wide embeddings.
pub fn small_chain(dir: &std::path::Path) -> LocalnetConfig {
    LocalnetConfig {
        validators: 1,
        data_dir: dir.to_path_buf(),
        genesis: Params {
            embedding_dim: 4,
            ..Params::default()
        },
    }
}

/// A ledger driven straight through execution: every transaction and epoch change applied, and
/// supply checked after each.
pub struct LedgerChain {
    pub ledger: somatrain_node::ledger::Ledger,
    faucet_n: u8,
    supply: u128,
}

impl LedgerChain {
    pub fn new(ledger: somatrain_node::ledger::Ledger) -> Self {
        let supply = ledger.accounted_supply();
        LedgerChain {
            ledger,
            faucet_n: 0,
            supply,
        }
    }

    pub fn fund(&mut self, address: Address) {
        self.faucet_n += 1;
        let digest = somatrain_protocol::TxDigest([self.faucet_n; 32]);
        let paid = somatrain_node::ledger::execute::faucet(&self.ledger, address, digest).unwrap();
        self.ledger.apply(paid.changes);
    }

    /// Executes `kind` from `kp` with its richest coin; the outcome's status.
    pub fn run(
        &mut self,
        kp: &Keypair,
        kind: TransactionKind,
    ) -> (
        somatrain_protocol::TxDigest,
        Result<(), somatrain_protocol::effects::ExecutionErrorKind>,
    ) {
        let gas = self
            .ledger
            .owned_objects(&kp.address(), Some(ObjectType::Coin))
            .max_by_key(|o| o.coin_balance().unwrap())
            .unwrap()
            .reference()
            .unwrap();
        let tx = SignedTransaction::sign(kp, TransactionData::new(kind, kp.address(), vec![gas]));
        let executed = somatrain_node::ledger::execute::execute(&self.ledger, &tx)
            .expect("not refused before execution");
        let status = match &executed.effects.status {
            somatrain_protocol::effects::ExecutionStatus::Success => Ok(()),
            somatrain_protocol::effects::ExecutionStatus::Failure(f) => Err(f.kind),
        };
        self.ledger.apply(executed.changes);
        assert_eq!(
            self.ledger.accounted_supply(),
            self.supply,
            "supply conserved"
        );
        (tx.digest(), status)
    }

    /// The outcome's status alone.
    pub fn status(
        &mut self,
        kp: &Keypair,
        kind: TransactionKind,
    ) -> Result<(), somatrain_protocol::effects::ExecutionErrorKind> {
        self.run(kp, kind).1
    }

    /// Executes `kind`, which must succeed; its digest.
    pub fn ok(&mut self, kp: &Keypair, kind: TransactionKind) -> somatrain_protocol::TxDigest {
        let (digest, status) = self.run(kp, kind);
        assert_eq!(status, Ok(()));
        digest
    }

    /// Executes `kind`, which must fail with `expected`.
    pub fn fails(
        &mut self,
        kp: &Keypair,
        kind: TransactionKind,
        expected: somatrain_protocol::effects::ExecutionErrorKind,
    ) {
        assert_eq!(self.run(kp, kind).1, Err(expected));
    }

    pub fn model(&self, id: &somatrain_protocol::ObjectId) -> somatrain_node::ledger::Model {
        self.ledger.system.models[id].clone()
    }

    pub fn advance(&mut self) {
        let now = self.ledger.system.epoch_start_ms + 1;
        let changes = somatrain_node::ledger::epoch::advance_epoch(&self.ledger, now);
        self.ledger.apply(changes);
        assert_eq!(
            self.ledger.accounted_supply(),
            self.supply,
            "supply conserved"
        );
    }
}
