//! A panic inside execution fails that one transaction: the node keeps serving, its lock is
//! not poisoned, the writer thread lives on, and the next transaction succeeds. The panic comes
//! from the `faults` build's hook (`ledger::execute::FAULT_AMOUNT`).

use somatrain_node::ledger::Params;
use somatrain_node::ledger::execute::{FAULT_AMOUNT, Refusal};
use somatrain_node::localnet::{Localnet, LocalnetConfig, LocalnetError};
use somatrain_protocol::transaction::TransferCoin;
use somatrain_protocol::{
    Keypair, ObjectType, SignedTransaction, TransactionData, TransactionKind,
};

fn transfer(node: &Localnet, from: &Keypair, amount: u64) -> SignedTransaction {
    let gas = node.read(|l| {
        l.owned_objects(&from.address(), Some(ObjectType::Coin))
            .next()
            .map(|o| o.reference().unwrap())
            .unwrap()
    });
    let data = TransactionData::new(
        TransactionKind::TransferCoin(TransferCoin {
            coin: gas,
            amount: Some(amount),
            recipient: Keypair::generate().address(),
        }),
        from.address(),
        vec![gas],
    );
    SignedTransaction::sign(from, data)
}

/// A queued transaction's answer, or a failure after 30 s (a dead writer must not hang the test).
async fn within<T>(answer: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(std::time::Duration::from_secs(30), answer)
        .await
        .expect("the writer thread answered within 30 s")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_transaction_fails_alone() {
    let dir = tempfile::tempdir().unwrap();
    let config = LocalnetConfig {
        validators: 1,
        data_dir: dir.path().to_path_buf(),
        genesis: Params::default(),
    };
    let node = Localnet::open(&config, 0).unwrap();
    let alice = Keypair::generate();
    node.faucet(alice.address(), 1).unwrap();
    let before = node.read(|l| l.system.checkpoint_height);

    // On the caller's thread, through simulation and through the writer thread.
    let faulty = transfer(&node, &alice, FAULT_AMOUNT);
    for result in [
        node.submit(faulty.clone(), 2).map(|_| ()),
        node.simulate(&faulty)
            .map(|_| ())
            .map_err(LocalnetError::Refused),
        within(node.submit_queued(faulty.clone())).await.map(|_| ()),
    ] {
        match result {
            Err(LocalnetError::Refused(Refusal::Panicked(message))) => {
                assert!(message.contains("fault injected"), "{message}")
            }
            other => panic!("expected a refusal for the panic, got {other:?}"),
        }
    }
    assert_eq!(
        node.read(|l| l.system.checkpoint_height),
        before,
        "nothing was committed"
    );
    // The node goes on: the next transactions execute, on both paths.
    let ok = node.submit(transfer(&node, &alice, 1000), 3).unwrap();
    assert!(ok.effects.status.is_success());
    let ok = within(node.submit_queued(transfer(&node, &alice, 1000)))
        .await
        .unwrap();
    assert!(ok.effects.status.is_success());
}
