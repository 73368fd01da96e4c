//! `validators`, `stake --validator` and `unstake` through the real binary against a localnet
//! process with two validators: voting power, commission, activation at the next epoch, the
//! rewards of two epochs and the fees, each checked with the network's arithmetic written out
//! here, not taken from the node.

use somatrain_protocol::{Keypair, ObjectType, SHANNONS_PER_SOMA};

mod common;
use common::GrpcLocalnet;

const BASE_FEE: u64 = 1_000;
const WRITE_FEE: u64 = 300;
const VALUE_FEE_BPS: u64 = 10;
const GENESIS_STAKE: u64 = 20_000 * SHANNONS_PER_SOMA;
const COMMISSION_BPS: u64 = 200;

fn fee(writes: u64, value_fee: u64) -> u64 {
    BASE_FEE + WRITE_FEE * writes + value_fee
}

/// A validator's pool as the network's rules move it.
struct Pool {
    soma: u64,
    tokens: u64,
    pending: u64,
    voting_power: u64,
    rates: std::collections::BTreeMap<u64, (u64, u64)>,
}

impl Pool {
    fn genesis() -> Pool {
        Pool {
            soma: GENESIS_STAKE,
            tokens: GENESIS_STAKE,
            pending: 0,
            voting_power: 5_000,
            rates: [(0, (GENESIS_STAKE, GENESIS_STAKE))].into(),
        }
    }

    fn value(&self, principal: u64, activation_epoch: u64, epoch: u64) -> u64 {
        let (soma_at, tokens_at) = self.rates[&activation_epoch];
        let tokens = (tokens_at as u128 * principal as u128 / soma_at as u128) as u64;
        let (soma_now, tokens_now) = self.rates[&epoch];
        (soma_now as u128 * tokens as u128 / tokens_now as u128) as u64
    }
}

/// The change into `new_epoch` for two validators: 70% of the epoch's fees split by voting
/// power, 2% of each share staked as commission, the rest compounding; pending stake joins;
/// voting power is set again (each capped at 5,000 of 10,000, the remainder shared equally,
/// the odd unit to the larger stake).
fn epoch_change(pools: &mut [Pool; 2], new_epoch: u64, epoch_fees: u64) {
    let allocation = epoch_fees * 7_000 / 10_000;
    for pool in pools.iter_mut() {
        let reward = allocation * pool.voting_power / 10_000;
        let commission = reward * COMMISSION_BPS / 10_000;
        pool.soma += reward - commission;
        pool.pending += commission;
        let (soma_before, tokens_before) = (pool.soma, pool.tokens);
        pool.soma += pool.pending;
        pool.tokens = (tokens_before as u128 * pool.soma as u128 / soma_before as u128) as u64;
        pool.pending = 0;
        pool.rates.insert(new_epoch, (pool.soma, pool.tokens));
    }
    let total = pools[0].soma + pools[1].soma;
    let mut handed_out = 0;
    for pool in pools.iter_mut() {
        pool.voting_power = (pool.soma as u128 * 10_000 / total as u128).min(5_000) as u64;
        handed_out += pool.voting_power;
    }
    let remaining = 10_000 - handed_out;
    let larger = usize::from(pools[1].soma > pools[0].soma);
    for (i, pool) in pools.iter_mut().enumerate() {
        pool.voting_power += remaining / 2 + u64::from(i == larger && remaining % 2 == 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staking_with_a_validator_earns_what_the_rules_say() {
    let dir = tempfile::tempdir().unwrap();
    let net = GrpcLocalnet::start(
        dir.path(),
        &["--validators", "2", "--faucet-amount", "100000000000000"],
    );
    let chain = net.client();
    let (staker, payer) = (Keypair::generate(), Keypair::generate());
    chain.faucet(&staker.address()).await.unwrap();
    chain.faucet(&payer.address()).await.unwrap();
    let run = |kp: &Keypair, args: &[&str]| common::run_as(&net, kp, args);
    let json = |kp: &Keypair, args: &[&str]| {
        let (ok, out, err) = run(kp, args);
        assert!(ok, "{args:?} failed: {err}");
        serde_json::from_str::<serde_json::Value>(out.trim()).unwrap()
    };

    let listed = json(&staker, &["validators", "--json"]);
    let validators = listed["validators"].as_array().unwrap();
    assert_eq!(validators.len(), 2);
    for v in validators {
        assert_eq!(v["voting_power"], 5_000);
        assert_eq!(v["stake"], GENESIS_STAKE);
        assert_eq!(v["commission_bps"], COMMISSION_BPS);
    }
    let validator = validators[0]["address"].as_str().unwrap().to_string();
    let (ok, table, _) = run(&staker, &["validators"]);
    assert!(
        ok && table.contains(&validator) && table.contains("2.00%"),
        "{table}"
    );

    // Not a validator: refused before anything is sent.
    let (ok, _, err) = run(
        &staker,
        &[
            "stake",
            "--validator",
            &payer.address().to_string(),
            "--amount",
            "1",
        ],
    );
    assert!(!ok && err.contains("not a validator"), "{err}");
    let mut staker_balance = 100_000 * SHANNONS_PER_SOMA;
    assert_eq!(
        chain.balance(&staker.address()).await.unwrap(),
        staker_balance
    );

    // Epoch 0: stake 20,000 SOMA from the staker's one coin (gas too): the coin, the StakedSoma
    // and the system state are written; the value fee is half the rate.
    let principal = 20_000 * SHANNONS_PER_SOMA;
    let stake_fee = fee(3, principal * (VALUE_FEE_BPS / 2) / 10_000);
    let (ok, out, err) = run(
        &staker,
        &["stake", "--validator", &validator, "--amount", "20000"],
    );
    assert!(ok, "{err}");
    assert!(out.contains("earning from epoch 1"), "{out}");
    staker_balance -= principal + stake_fee;
    assert_eq!(
        chain.balance(&staker.address()).await.unwrap(),
        staker_balance
    );
    let staked = chain
        .owned_objects(&staker.address(), Some(ObjectType::StakedSoma))
        .await
        .unwrap();
    assert_eq!(staked.len(), 1);
    let staked_id = staked[0].id().unwrap().to_string();
    // Our validator as `validators --json` shows it now.
    let shown_now = || {
        let listed = json(&staker, &["validators", "--json"]);
        listed["validators"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["address"] == validator.as_str())
            .unwrap()
            .clone()
    };
    let shown = shown_now();
    assert_eq!(shown["pending_stake"], principal);
    assert_eq!(shown["stake"], GENESIS_STAKE);

    let staked_with = validators
        .iter()
        .position(|v| v["address"] == validator.as_str())
        .unwrap();
    let mut pools = [Pool::genesis(), Pool::genesis()];
    pools[staked_with].pending = principal;
    let mut epoch_fees = stake_fee;
    // Epochs 1 and 2: a transfer of 10,000 SOMA in each (writes: its coin and the new one).
    for epoch in 1..=2 {
        chain.advance_epoch().await.unwrap();
        epoch_change(&mut pools, epoch, epoch_fees);
        let amount = 10_000 * SHANNONS_PER_SOMA;
        let (ok, _, err) = run(
            &payer,
            &[
                "transfer",
                "--to",
                &Keypair::generate().address().to_string(),
                "--amount",
                "10000",
            ],
        );
        assert!(ok, "{err}");
        epoch_fees = fee(2, amount * VALUE_FEE_BPS / 10_000);
    }
    chain.advance_epoch().await.unwrap();
    epoch_change(&mut pools, 3, epoch_fees);
    let pool = &pools[staked_with];

    let shown = shown_now();
    assert_eq!(shown["stake"], pool.soma, "{shown} {:?}", pool.rates);
    assert_eq!(shown["voting_power"], pool.voting_power);
    assert!(shown["apy"].as_f64().unwrap() > 0.0, "{shown}");
    // The validator's commissions came as StakedSoma: its genesis stake and one per epoch.
    let validator_stakes = chain
        .owned_objects(&validator.parse().unwrap(), Some(ObjectType::StakedSoma))
        .await
        .unwrap();
    assert_eq!(validator_stakes.len(), 4, "{validator_stakes:?}");

    // Epoch 3: the stake earned through the changes into epochs 2 and 3.
    let worth = pool.value(principal, 1, 3);
    assert!(worth > principal);
    let (ok, out, err) = run(&staker, &["unstake", &staked_id]);
    assert!(ok, "{err}");
    assert!(out.contains("in epoch 3"), "{out}");
    staker_balance += worth - fee(3, principal * (VALUE_FEE_BPS / 2) / 10_000);
    assert_eq!(
        chain.balance(&staker.address()).await.unwrap(),
        staker_balance
    );

    // Withdrawn again: the object is gone.
    let (ok, _, err) = run(&staker, &["unstake", &staked_id]);
    assert!(!ok && err.contains("no object"), "{err}");
}
