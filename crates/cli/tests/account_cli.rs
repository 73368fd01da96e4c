//! `balance`, `pay`, `send`, `merge-coins`, `objects` and `tx` through the real binary against a
//! localnet process, each checked against what the chain then holds.

use somatrain_protocol::{Keypair, ObjectType, SHANNONS_PER_SOMA};

mod common;
use common::{GrpcLocalnet, sent_fees};

fn run(net: &GrpcLocalnet, kp: &Keypair, args: &[&str]) -> (bool, String, String) {
    common::run_as(net, kp, args)
}

fn json(net: &GrpcLocalnet, kp: &Keypair, args: &[&str]) -> serde_json::Value {
    let (ok, out, err) = run(net, kp, args);
    assert!(ok, "{args:?} failed: {err}");
    serde_json::from_str(out.trim()).unwrap()
}

/// The Base58 digest after "transaction " in a command's output.
fn digest_in(text: &str) -> String {
    text.split("transaction ")
        .nth(1)
        .and_then(|rest| rest.split([' ', ')', ';']).next())
        .unwrap_or_else(|| panic!("no digest in {text}"))
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn account_commands_do_what_the_chain_then_shows() {
    let dir = tempfile::tempdir().unwrap();
    let net = GrpcLocalnet::start(dir.path(), &[]);
    let chain = net.client();
    let alice = Keypair::generate();
    let (bob, carol) = (Keypair::generate(), Keypair::generate());
    for _ in 0..3 {
        chain.faucet(&alice.address()).await.unwrap();
    }

    let balance = json(&net, &alice, &["balance", "--with-coins", "--json"]);
    assert_eq!(balance["balance_shannons"], 6 * SHANNONS_PER_SOMA);
    assert_eq!(balance["coins"], 3);
    assert_eq!(balance["coin_list"].as_array().unwrap().len(), 3);
    // Anyone's balance by address, no key needed.
    let (ok, out, _) = run(
        &net,
        &bob,
        &["balance", "--address", &alice.address().to_string()],
    );
    assert!(ok && out.contains("6.000000000 SOMA in 3 coins"), "{out}");

    // Two recipients in one transaction; the fee is the chain's.
    let (ok, out, err) = run(
        &net,
        &alice,
        &[
            "pay",
            "--to",
            &format!("{},{}", bob.address(), carol.address()),
            "--amount",
            "1,0.5",
        ],
    );
    assert!(ok, "{err}");
    let pay_digest = digest_in(&out);
    assert_eq!(
        chain.balance(&bob.address()).await.unwrap(),
        SHANNONS_PER_SOMA
    );
    assert_eq!(
        chain.balance(&carol.address()).await.unwrap(),
        SHANNONS_PER_SOMA / 2
    );
    let pay_fee = sent_fees(&chain, &alice, "PayCoins").await;
    assert_eq!(
        chain.balance(&alice.address()).await.unwrap(),
        6 * SHANNONS_PER_SOMA - 3 * SHANNONS_PER_SOMA / 2 - pay_fee
    );
    let tx = json(&net, &alice, &["tx", &pay_digest, "--json"]);
    assert_eq!(tx["kind"], "PayCoins");
    assert_eq!(tx["status"], "success");
    assert_eq!(tx["fee"]["total"], pay_fee);
    let to_bob = tx["balance_changes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["address"] == bob.address().to_string())
        .unwrap();
    assert_eq!(to_bob["amount_shannons"], SHANNONS_PER_SOMA.to_string());
    let (ok, _, err) = run(
        &net,
        &alice,
        &["pay", "--to", &bob.address().to_string(), "--amount", "1,2"],
    );
    assert!(!ok && err.contains("one amount per recipient"), "{err}");

    // A payment the chain refuses: its digest shows the failure and the network's error kind.
    let (ok, _, err) = run(
        &net,
        &carol,
        &["send", "--to", &bob.address().to_string(), "--amount", "5"],
    );
    assert!(!ok, "carol has 0.5 SOMA");
    let failed = json(&net, &carol, &["tx", &digest_in(&err), "--json"]);
    assert_eq!(failed["status"], "failure", "{failed}");
    assert_eq!(failed["error_kind"], "InsufficientCoinBalance", "{failed}");

    // Merging: fewer coins, the balance less exactly the merge's fee.
    let coins_before = json(&net, &alice, &["objects", "--type", "coin", "--json"]);
    let before = chain.balance(&alice.address()).await.unwrap();
    let (ok, out, err) = run(&net, &alice, &["merge-coins"]);
    assert!(ok, "{err}");
    let merge_fee = sent_fees(&chain, &alice, "TransferCoin").await;
    assert_eq!(
        chain.balance(&alice.address()).await.unwrap(),
        before - merge_fee
    );
    let coins_after = chain
        .owned_objects(&alice.address(), Some(ObjectType::Coin))
        .await
        .unwrap();
    assert!(
        coins_after.len() < coins_before.as_array().unwrap().len(),
        "{out}"
    );
    let objects = json(&net, &alice, &["objects", "--json"]);
    assert_eq!(objects.as_array().unwrap().len(), coins_after.len());
    assert!(
        objects
            .as_array()
            .unwrap()
            .iter()
            .all(|o| o["type"] == "Coin" && o["balance_shannons"].is_u64())
    );
    let (ok, _, err) = run(&net, &alice, &["objects", "--type", "model"]);
    assert!(!ok && err.contains("coin or staked-soma"), "{err}");
}
