//! Simulation never copies the ledger: 64 concurrent simulations over a ledger of 100,000
//! coins (unsigned, one with a made-up gas coin) leave the process's memory flat. A test file
//! of its own, so no other test's allocations move the resident size it measures.

use somatrain_node::ledger::Params;
use somatrain_node::localnet::{Localnet, LocalnetConfig};
use somatrain_protocol::transaction::{PayCoins, TransferCoin};
use somatrain_protocol::{
    Keypair, ObjectDigest, ObjectId, ObjectRef, ObjectType, SHANNONS_PER_SOMA, SignedTransaction,
    TransactionData, TransactionKind,
};

fn resident_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc/self/status");
    kib * 1024
}

fn gas_of(node: &Localnet, kp: &Keypair) -> ObjectRef {
    node.read(|l| {
        l.owned_objects(&kp.address(), Some(ObjectType::Coin))
            .max_by_key(|o| o.coin_balance().unwrap_or(0))
            .map(|o| o.reference().unwrap())
            .unwrap()
    })
}

#[test]
fn concurrent_simulations_over_a_large_ledger_leave_memory_flat() {
    let dir = tempfile::tempdir().unwrap();
    let config = LocalnetConfig {
        validators: 1,
        data_dir: dir.path().to_path_buf(),
        genesis: Params {
            embedding_dim: 4,
            faucet_amount: 1000 * SHANNONS_PER_SOMA,
            ..Params::default()
        },
    };
    let node = Localnet::open(&config, 0).unwrap();
    let whale = Keypair::generate();
    node.faucet(whale.address(), 1).unwrap();
    // 100,000 one-shannon coins, a thousand per payment.
    let sink = Keypair::generate().address();
    for _ in 0..100 {
        let gas = gas_of(&node, &whale);
        let data = TransactionData::new(
            TransactionKind::PayCoins(PayCoins {
                coins: vec![gas],
                amounts: Some(vec![1; 1000]),
                recipients: vec![sink; 1000],
            }),
            whale.address(),
            vec![gas],
        );
        let record = node
            .submit(SignedTransaction::sign(&whale, data), 2)
            .unwrap();
        assert!(record.effects.status.is_success());
    }
    let coins = node.read(|l| l.owned_objects(&sink, Some(ObjectType::Coin)).count());
    assert_eq!(coins, 100_000);

    let gas = gas_of(&node, &whale);
    let made_up = ObjectRef {
        id: ObjectId([7; 32]),
        version: 1,
        digest: ObjectDigest([7; 32]),
    };
    let before = resident_bytes();
    std::thread::scope(|scope| {
        for i in 0..64 {
            let node = &node;
            let whale = &whale;
            scope.spawn(move || {
                for _ in 0..20 {
                    let gas = if i % 2 == 0 { gas } else { made_up };
                    let tx = SignedTransaction {
                        data: TransactionData::new(
                            TransactionKind::TransferCoin(TransferCoin {
                                coin: gas,
                                amount: Some(1),
                                recipient: whale.address(),
                            }),
                            whale.address(),
                            vec![gas],
                        ),
                        signatures: vec![],
                    };
                    let result = node.simulate(&tx);
                    assert_eq!(result.is_ok(), i % 2 == 0, "{result:?}");
                }
            });
        }
    });
    let grown = resident_bytes().saturating_sub(before);
    eprintln!(
        "64 x 20 simulations grew the process by {} KiB",
        grown >> 10
    );
    // One copy of this ledger is tens of megabytes; 64 at once were gigabytes.
    assert!(
        grown < 16 << 20,
        "64 concurrent simulations grew the process by {} MiB",
        grown >> 20
    );
}
