//! A disk that fills up: every write fails (as ENOSPC does) while reads still work. Each write
//! request is answered with an error and changes nothing, reads show only what is durable, and
//! once space is back the same node process writes again, without a restart. Reopening the data
//! directory afterwards finds exactly the acknowledged state.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::{hooked_backend, transfer};
use somatrain_node::localnet::Localnet;
use somatrain_protocol::Keypair;

#[test]
fn a_full_disk_is_reported_changes_nothing_and_is_recovered_from_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let config = common::small_chain(dir.path());
    let full = Arc::new(AtomicBool::new(false));
    let disk = full.clone();
    // Every write, resize and sync fails (as ENOSPC does) while `full` is set.
    let backend = hooked_backend(Arc::new(move |_| {
        if disk.load(Ordering::SeqCst) {
            Err(std::io::Error::from_raw_os_error(28))
        } else {
            Ok(())
        }
    }));
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
