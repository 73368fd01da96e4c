//! A disk that fills up: every write fails (as ENOSPC does) while reads still work. Each write
//! request is answered with an error and changes nothing, reads show only what is durable, and
//! once space is back the same node process writes again, without a restart. Reopening the data
//! directory afterwards finds exactly the acknowledged state.

use std::ops::Bound;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use redb::{BackendError, StorageBackend};
use somatrain_node::ledger::Params;
use somatrain_node::localnet::{Localnet, LocalnetConfig};
use somatrain_protocol::{
    Address, Keypair, ObjectType, SignedTransaction, TransactionData, TransactionKind,
};

/// The file backend, failing every write, resize and sync while `full` is set.
#[derive(Debug)]
struct FillingDisk {
    inner: Box<dyn StorageBackend>,
    full: Arc<AtomicBool>,
}

impl FillingDisk {
    fn check(&self) -> std::io::Result<()> {
        if self.full.load(Ordering::SeqCst) {
            Err(std::io::Error::from_raw_os_error(28)) // ENOSPC
        } else {
            Ok(())
        }
    }
}

impl StorageBackend for FillingDisk {
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        self.inner.read(offset, out)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.check()?;
        self.inner.set_len(len)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.check()?;
        self.inner.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.check()?;
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

fn transfer(node: &Localnet, from: &Keypair, to: Address, amount: u64) -> SignedTransaction {
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
            TransactionKind::TransferCoin {
                coin: gas,
                amount: Some(amount),
                recipient: to,
            },
            from.address(),
            vec![gas],
        ),
    )
}

#[test]
fn a_full_disk_is_reported_changes_nothing_and_is_recovered_from_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let config = LocalnetConfig {
        validators: 1,
        data_dir: dir.path().to_path_buf(),
        genesis: Params {
            embedding_dim: 4,
            ..Params::default()
        },
    };
    let full = Arc::new(AtomicBool::new(false));
    let disk = full.clone();
    let backend: somatrain_store::BackendFactory = Arc::new(move |path: &std::path::Path| {
        let inner = (somatrain_store::file_backend())(path)?;
        Ok(Box::new(FillingDisk {
            inner,
            full: disk.clone(),
        }) as Box<dyn StorageBackend>)
    });
    let node = Localnet::open_with(&config, 1_000, backend).unwrap();
    let (alice, bob) = (Keypair::generate(), Keypair::generate().address());
    node.faucet(alice.address(), 1_001).unwrap();
    node.submit(transfer(&node, &alice, bob, 1), 1_002).unwrap();
    let balances = || node.read(|l| (l.balance(&alice.address()), l.balance(&bob)));
    let before = balances();
    assert_eq!(before.1, 1);

    full.store(true, Ordering::SeqCst);
    let refused = node
        .submit(transfer(&node, &alice, bob, 1), 1_003)
        .expect_err("a write on a full disk must fail");
    assert!(
        refused.to_string().contains("No space left on device")
            || refused.to_string().contains("not writable"),
        "{refused}"
    );
    assert!(node.faucet(bob, 1_004).is_err());
    assert!(node.advance_epoch(1_005).is_err());
    // Nothing of the failed writes shows.
    assert_eq!(balances(), before);
    assert_eq!(node.read(|l| l.system.epoch), 0);

    // Space is back: the same process writes again.
    full.store(false, Ordering::SeqCst);
    let sent = transfer(&node, &alice, bob, 1);
    let digest = sent.digest();
    node.submit(sent, 1_006).unwrap();
    assert_eq!(balances().1, 2);
    assert_eq!(node.advance_epoch(1_007).unwrap(), 1);
    let durable = (balances(), node.read(|l| l.accounted_supply()));
    drop(node);

    let reopened = Localnet::open(&config, 2_000).unwrap();
    assert_eq!(
        reopened.read(|l| (
            (l.balance(&alice.address()), l.balance(&bob)),
            l.accounted_supply()
        )),
        durable
    );
    assert_eq!(reopened.read(|l| l.system.epoch), 1);
    assert!(reopened.transaction(&digest).unwrap().is_some());
}
