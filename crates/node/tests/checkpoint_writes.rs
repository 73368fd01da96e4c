//! A checkpoint writes what changed: what a transfer's commit writes does not grow with the
//! model registry (the system value is stored without its models, each model apart), and the
//! models come back whole after a restart.

mod common;

use somatrain_protocol::transaction::CreateModel;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::{DiskOp, hooked_backend, transfer};
use somatrain_node::localnet::Localnet;
use somatrain_protocol::{Keypair, SignedTransaction, TransactionData, TransactionKind};

#[test]
fn what_a_transfer_writes_does_not_grow_with_the_model_registry() {
    let dir = tempfile::tempdir().unwrap();
    let config = common::small_chain(dir.path());
    let written = Arc::new(AtomicUsize::new(0));
    let counter = written.clone();
    let backend = hooked_backend(Arc::new(move |op| {
        if let DiskOp::Write(bytes) = op {
            counter.fetch_add(bytes, Ordering::SeqCst);
        }
        Ok(())
    }));
    let node = Localnet::open_with(&config, 1_000, backend).unwrap();
    let mut created = 0u64;
    let mut create_models = |n: u64| {
        for _ in 0..n {
            created += 1;
            let owner = Keypair::generate();
            node.faucet(owner.address(), 1_000 + created).unwrap();
            let gas = node.read(|l| {
                l.owned_objects(&owner.address(), None)
                    .next()
                    .unwrap()
                    .reference()
                    .unwrap()
            });
            let create = SignedTransaction::sign(
                &owner,
                TransactionData::new(
                    TransactionKind::CreateModel(CreateModel {
                        stake_amount: 1_000_000_000,
                        commission_rate: 0,
                        architecture_version: 1,
                    }),
                    owner.address(),
                    vec![gas],
                ),
            );
            let record = node.submit(create, 2_000 + created).unwrap();
            assert!(record.effects.status.is_success());
        }
    };
    let (alice, bob) = (Keypair::generate(), Keypair::generate().address());
    node.faucet(alice.address(), 1_000).unwrap();
    // Bytes the disk takes for one transfer's commit (redb writes whole pages).
    let transfer_bytes = || {
        let before = written.load(Ordering::SeqCst);
        node.submit(transfer(&node, &alice, bob, 5), 3_000).unwrap();
        written.load(Ordering::SeqCst) - before
    };
    create_models(10);
    let registry_bytes = |models: &imbl::OrdMap<_, _>| {
        serde_json::to_vec(&models.values().collect::<Vec<_>>())
            .unwrap()
            .len()
    };
    let small_registry = node.read(|l| registry_bytes(&l.system.models));
    let with_few = transfer_bytes();
    create_models(190);
    let models = node.read(|l| l.system.models.clone());
    assert_eq!(models.len(), 200);
    let large_registry = registry_bytes(&models);
    let with_many = transfer_bytes();
    // The registry grew by some 130 KB; what a transfer writes may not grow with it (writing
    // the whole system value, as before, grew it by the registry's growth at least).
    let growth = large_registry - small_registry;
    assert!(growth > 100_000, "{growth}");
    assert!(
        with_many < with_few + growth / 4,
        "a transfer wrote {with_few} bytes beside 10 models and {with_many} beside 200 \
         (the registry grew by {growth})"
    );
    drop(node);

    let reopened = Localnet::open(&config, 4_000).unwrap();
    assert_eq!(reopened.read(|l| l.system.models.clone()), models);
    assert_eq!(reopened.read(|l| l.balance(&bob)), 10);
}
