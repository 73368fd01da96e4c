//! Readers never wait on the writer: while a commit sits in a slow disk sync, balances, objects,
//! transactions and checkpoints are read at once, and show the state before that commit; once
//! the commit lands, the next read shows it.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{DiskOp, hooked_backend, transfer};
use somatrain_node::localnet::Localnet;
use somatrain_protocol::Keypair;

const SLOW_SYNC: Duration = Duration::from_millis(1_500);

#[test]
fn reads_do_not_wait_for_a_commit_in_its_disk_sync() {
    let dir = tempfile::tempdir().unwrap();
    let config = common::small_chain(dir.path());
    let slow = Arc::new(AtomicBool::new(false));
    let syncing = Arc::new(AtomicBool::new(false));
    let (disk_slow, disk_syncing) = (slow.clone(), syncing.clone());
    let backend = hooked_backend(Arc::new(move |op| {
        if op == DiskOp::Sync && disk_slow.load(Ordering::SeqCst) {
            disk_syncing.store(true, Ordering::SeqCst);
            std::thread::sleep(SLOW_SYNC);
            disk_syncing.store(false, Ordering::SeqCst);
        }
        Ok(())
    }));
    let node = Localnet::open_with(&config, 1_000, backend).unwrap();
    let (alice, bob) = (Keypair::generate(), Keypair::generate().address());
    let paid = node.faucet(alice.address(), 1_001).unwrap();
    let before = node.read(|l| l.balance(&alice.address()));

    slow.store(true, Ordering::SeqCst);
    let sent = transfer(&node, &alice, bob, 7);
    let writer = {
        let node = node.clone();
        std::thread::spawn(move || node.submit(sent, 1_002))
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !syncing.load(Ordering::SeqCst) {
        assert!(
            Instant::now() < deadline,
            "the writer never reached its disk sync"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let started = Instant::now();
    let balance = node.read(|l| l.balance(&alice.address()));
    let bob_balance = node.read(|l| l.balance(&bob));
    let old = node.transaction(&paid.digest).unwrap();
    let genesis = node.checkpoint(0).unwrap();
    let took = started.elapsed();
    assert!(
        syncing.load(Ordering::SeqCst),
        "the reads must overlap the writer's sync (they took {took:?})"
    );
    assert!(took < SLOW_SYNC / 3, "reads waited {took:?} for the writer");
    // The state as of the last commit: the transfer is not there yet.
    assert_eq!((balance, bob_balance), (before, 0));
    assert!(old.is_some() && genesis.is_some());

    // The writer finishes after its slow sync; a hung one fails the test instead of hanging it.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !writer.is_finished() {
        assert!(
            Instant::now() < deadline,
            "the writer never finished its commit"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let record = writer.join().unwrap().unwrap();
    slow.store(false, Ordering::SeqCst);
    assert_eq!(node.read(|l| l.balance(&bob)), 7);
    assert!(node.transaction(&record.digest).unwrap().is_some());
}
