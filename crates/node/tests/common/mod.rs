//! What several node tests share: a redb storage backend with a hook before every write, resize
//! and sync (to fail like a full disk, or to be slow like a busy one), and a signed transfer.

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
