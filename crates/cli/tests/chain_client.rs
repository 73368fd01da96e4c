//! The gRPC chain client against a `somatrain localnet` process: funding, transfers waited for
//! in their checkpoint, lookups by digest, model creation, a stale coin retried, and a node that
//! accepts and never answers (the call fails at its deadline instead of hanging).

mod common;

use somatrain_protocol::transaction::{CreateModel, DeactivateModel, TransferCoin};
use std::time::{Duration, Instant};

use common::GrpcLocalnet;
use somatrain_client::chain::{ChainClient, ChainError, Endpoints};
use somatrain_protocol::{
    Keypair, ObjectId, ObjectType, SignedTransaction, TransactionData, TransactionKind,
};

fn endpoints(node: &GrpcLocalnet) -> Endpoints {
    Endpoints {
        rpc: node.rpc.clone(),
        faucet: Some(node.faucet.clone()),
        admin: Some(node.admin.clone()),
        scoring: Some(node.scoring.clone()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chain_client_funds_transfers_and_creates_over_grpc() {
    let dir = tempfile::tempdir().unwrap();
    let node = GrpcLocalnet::start(dir.path(), &["--embedding-dim", "16"]);
    let client = ChainClient::new(endpoints(&node)).unwrap();
    let info = client.service_info().await.unwrap();
    assert_eq!(info.chain.as_deref(), Some("localnet"));

    let alice = Keypair::generate();
    let bob = Keypair::generate();
    client.faucet(&alice.address()).await.unwrap();
    assert_eq!(
        client.balance(&alice.address()).await.unwrap(),
        2_000_000_000
    );

    let sent = client
        .sign_and_execute(&alice, |gas| {
            TransactionKind::TransferCoin(TransferCoin {
                coin: gas[0],
                amount: Some(300_000_000),
                recipient: bob.address(),
            })
        })
        .await
        .unwrap()
        .success()
        .unwrap();
    assert!(sent.checkpoint.is_some(), "waited for the checkpoint");
    assert_eq!(client.balance(&bob.address()).await.unwrap(), 300_000_000);
    let found = client.transaction(&sent.digest).await.unwrap().unwrap();
    assert_eq!(found.effects, sent.effects);

    // A stale coin (spent by the transfer above) is refused in the SDK's words; the client's
    // own path re-reads coins.
    let spent = sent
        .effects
        .changed_objects
        .iter()
        .find(|c| c.input.is_some())
        .map(|c| somatrain_protocol::ObjectRef {
            id: c.id,
            version: c.input.unwrap().version,
            digest: c.input.unwrap().digest,
        })
        .unwrap();
    let stale = SignedTransaction::sign(
        &alice,
        TransactionData::new(
            TransactionKind::TransferCoin(TransferCoin {
                coin: spent,
                amount: Some(1),
                recipient: bob.address(),
            }),
            alice.address(),
            vec![spent],
        ),
    );
    match client.execute(&stale).await {
        Err(ChainError::Refused { message, .. }) => {
            assert!(
                message.contains("not available for consumption"),
                "{message}"
            )
        }
        other => panic!("a stale coin must be refused, got {other:?}"),
    }

    let created = client
        .sign_and_execute(&alice, |_| {
            TransactionKind::CreateModel(CreateModel {
                stake_amount: 1_000_000_000,
                commission_rate: 500,
                architecture_version: 1,
            })
        })
        .await
        .unwrap()
        .success()
        .unwrap();
    let model_id = ObjectId::derive(&created.digest, 0);
    // The clock alone: the same epoch, start and duration as the full read, without the state.
    let clock = client.epoch_clock().await.unwrap();
    let view = client.epoch_view().await.unwrap();
    assert_eq!(
        (clock.epoch, clock.start_ms, clock.epoch_duration_ms),
        (view.epoch, view.start_ms, view.params.epoch_duration_ms)
    );
    let epoch = client.epoch().await.unwrap();
    let models = epoch.system_state.unwrap().model_registry.unwrap().models;
    assert_eq!(
        models[&model_id.to_string()].state.as_deref(),
        Some("created")
    );
    let staked = client
        .owned_objects(&alice.address(), Some(ObjectType::StakedSoma))
        .await
        .unwrap();
    assert_eq!(staked.len(), 1);
    assert_eq!(staked[0].staked_soma().unwrap().principal, 1_000_000_000);

    // A chain rule's failure is an executed transaction, not an error.
    let failed = client
        .sign_and_execute(&bob, |_| {
            TransactionKind::DeactivateModel(DeactivateModel { model_id })
        })
        .await
        .unwrap();
    assert!(failed.success().is_err());
    assert_eq!(client.advance_epoch().await.unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_never_answers_fails_at_the_deadline() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    // Accepts connections and never says a word.
    let _hold = std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            held.push(stream);
        }
    });
    let mut silent = Endpoints::parse(&format!("http://{addr}")).unwrap();
    silent.admin = Some(format!("http://{addr}"));
    let client = ChainClient::with_call_timeout(silent, Duration::from_secs(2)).unwrap();
    let started = Instant::now();
    let result = tokio::time::timeout(
        Duration::from_secs(30),
        client.balance(&Keypair::generate().address()),
    )
    .await
    .expect("the client itself must give up, well before 30 s");
    let error = result.expect_err("a silent node cannot answer");
    assert!(error.is_transient(), "{error:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    // A localnet's epoch change answers once its validators have checked the revealed weights,
    // minutes with V1's: the admin's calls outlast the call timeout (and have their own,
    // ADMIN_CALL_TIMEOUT).
    let waited = tokio::time::timeout(Duration::from_secs(5), client.advance_epoch()).await;
    assert!(
        waited.is_err(),
        "the epoch change gave up with the other calls: {waited:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_says_so() {
    // A port that was just free: nothing listens there.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let client = ChainClient::new(Endpoints::parse(&format!("http://{addr}")).unwrap()).unwrap();
    let error = tokio::time::timeout(
        Duration::from_secs(30),
        client.balance(&Keypair::generate().address()),
    )
    .await
    .expect("a refused connection fails at once")
    .expect_err("nothing listens");
    let text = error.to_string();
    assert!(error.is_transient(), "{text}");
    assert!(text.contains(&addr.to_string()), "{text}");
    // The OS's words, not just tonic's "tcp connect error".
    assert!(text.contains("Connection refused"), "{text}");
    assert_eq!(text.matches("tcp connect error").count(), 1, "{text}");
}

#[test]
fn networks_parse_by_name_or_url() {
    assert_eq!(Endpoints::parse("localnet").unwrap(), Endpoints::localnet());
    assert_eq!(
        Endpoints::parse("testnet").unwrap().rpc,
        "https://fullnode.testnet.soma.org"
    );
    assert_eq!(
        Endpoints::parse("http://127.0.0.1:5/").unwrap().rpc,
        "http://127.0.0.1:5"
    );
    assert!(Endpoints::parse("mainnet").is_err());
}
