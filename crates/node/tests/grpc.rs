//! The localnet's gRPC services over real sockets on 127.0.0.1, driven by our generated clients:
//! execution and its checkpoint, idempotent resubmission, paging, and every kind of bad input
//! refused without changing state.

mod common;
use common::transfer_with;
use std::time::Duration;

use bytes::{Buf, BufMut};
use somatrain_node::grpc::{Services, serve};
use somatrain_node::ledger::Params;
use somatrain_node::localnet::{Localnet, LocalnetConfig};
use somatrain_protocol::{Address, Keypair, ObjectRef, SignedTransaction};
use somatrain_rpc::convert;
use somatrain_rpc::faucet::faucet_client::FaucetClient;
use somatrain_rpc::proto::{
    self, ledger_service_client::LedgerServiceClient, state_service_client::StateServiceClient,
    subscription_service_client::SubscriptionServiceClient,
    transaction_execution_service_client::TransactionExecutionServiceClient,
};
use somatrain_rpc::side::FaucetRequest;
use tonic::Code;
use tonic::transport::Channel;

struct Net {
    rpc: Channel,
    faucet: Channel,
    _dir: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn start() -> Net {
    let dir = tempfile::tempdir().unwrap();
    let config = LocalnetConfig {
        validators: 1,
        data_dir: dir.path().to_path_buf(),
        genesis: Params {
            embedding_dim: 4,
            ..Params::default()
        },
    };
    let node = Localnet::open(&config, 0).unwrap();
    let mut listeners = Vec::new();
    for _ in 0..4 {
        listeners.push(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap());
    }
    let addrs: Vec<_> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    let listeners: [tokio::net::TcpListener; 4] = listeners.try_into().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel();
    tokio::spawn(serve(
        Services {
            node,
            scorer: None,
            verify_submissions: false,
            weight_checks: None,
            closing: Default::default(),
            connection_limits: somatrain_node::limits::ConnectionLimits::for_this_process(),
            execution_slots: Default::default(),
        },
        listeners,
        async move {
            let _ = stopped.await;
        },
    ));
    let channel = |addr: std::net::SocketAddr| {
        Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .timeout(Duration::from_secs(20))
            .connect_lazy()
    };
    Net {
        rpc: channel(addrs[0]),
        faucet: channel(addrs[1]),
        _dir: dir,
        _stop: stop,
    }
}

async fn fund(net: &Net, who: &Keypair) {
    let reply = FaucetClient::new(net.faucet.clone())
        .request_gas(FaucetRequest {
            recipient: who.address().to_string(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.status, "Success");
}

async fn balance(net: &Net, who: Address) -> u64 {
    StateServiceClient::new(net.rpc.clone())
        .get_balance(proto::GetBalanceRequest {
            owner: Some(who.to_string()),
        })
        .await
        .unwrap()
        .into_inner()
        .balance
        .unwrap()
}

async fn coins(net: &Net, who: Address) -> Vec<ObjectRef> {
    let objects = StateServiceClient::new(net.rpc.clone())
        .list_owned_objects(proto::ListOwnedObjectsRequest {
            owner: Some(who.to_string()),
            object_type: Some("Coin".into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .objects;
    objects
        .iter()
        .map(|o| {
            convert::object_from_proto(o, "object")
                .unwrap()
                .reference()
                .unwrap()
        })
        .collect()
}

fn request(tx: &SignedTransaction) -> proto::ExecuteTransactionRequest {
    proto::ExecuteTransactionRequest {
        transaction: Some(convert::transaction_to_proto(&tx.data)),
        signatures: tx
            .signatures
            .iter()
            .map(convert::signature_to_proto)
            .collect(),
        read_mask: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_executes_once_is_checkpointed_and_found_by_digest() {
    let net = start().await;
    let alice = Keypair::from_secret([1; 32]);
    let bob = Keypair::from_secret([2; 32]);
    fund(&net, &alice).await;
    let gas = coins(&net, alice.address()).await[0];
    let tx = transfer_with(&alice, gas, bob.address(), 1_000_000);

    let mut stream = SubscriptionServiceClient::new(net.rpc.clone())
        .subscribe_checkpoints(proto::SubscribeCheckpointsRequest { read_mask: None })
        .await
        .unwrap()
        .into_inner();
    let mut exec = TransactionExecutionServiceClient::new(net.rpc.clone());
    let first = exec
        .execute_transaction(request(&tx))
        .await
        .unwrap()
        .into_inner();
    let first = first.transaction.unwrap();
    // The network's default mask is `effects`: the sender's own transaction is not sent back.
    assert!(first.transaction.is_none() && first.signatures.is_empty());
    let effects = first.effects.unwrap();
    assert_eq!(effects.status.as_ref().unwrap().success, Some(true));
    assert_eq!(
        effects.transaction_digest.as_deref(),
        Some(tx.digest().to_string().as_str())
    );

    let digest = tx.digest().to_string();
    let seen = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(message) = stream.message().await.unwrap() {
            let checkpoint = message.checkpoint.unwrap();
            if checkpoint
                .transactions
                .iter()
                .any(|t| t.digest.as_deref() == Some(digest.as_str()))
            {
                return true;
            }
        }
        false
    })
    .await
    .expect("no checkpoint with the transaction within 10 s");
    assert!(seen);

    // The same signed transaction again: its first outcome, executed once; asked for, the
    // transaction comes back as signed.
    let mut with_transaction = request(&tx);
    with_transaction.read_mask = Some(prost_types::FieldMask {
        paths: vec!["effects".into(), "transaction".into()],
    });
    let again = exec
        .execute_transaction(with_transaction)
        .await
        .unwrap()
        .into_inner()
        .transaction
        .unwrap();
    assert_eq!(
        convert::transaction_from_proto(&again.transaction.unwrap()).unwrap(),
        tx.data
    );
    assert_eq!(again.effects.unwrap(), effects);
    assert_eq!(balance(&net, bob.address()).await, 1_000_000);
    let fee = effects.fee.unwrap().total_fee.unwrap();
    assert_eq!(
        balance(&net, alice.address()).await,
        2_000_000_000 - 1_000_000 - fee
    );

    let found = LedgerServiceClient::new(net.rpc.clone())
        .get_transaction(proto::GetTransactionRequest {
            digest: Some(digest.clone()),
            read_mask: None,
        })
        .await
        .unwrap()
        .into_inner()
        .transaction
        .unwrap();
    assert_eq!(found.digest.as_deref(), Some(digest.as_str()));
    let rebuilt = convert::transaction_from_proto(&found.transaction.unwrap()).unwrap();
    assert_eq!(rebuilt, tx.data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_changes_nothing() {
    let net = start().await;
    let alice = Keypair::from_secret([1; 32]);
    let mallory = Keypair::from_secret([3; 32]);
    fund(&net, &alice).await;
    let gas = coins(&net, alice.address()).await[0];
    let mut exec = TransactionExecutionServiceClient::new(net.rpc.clone());
    let refused =
        |result: Result<tonic::Response<proto::ExecuteTransactionResponse>, tonic::Status>,
         code: Code,
         words: &str| {
            let status = result.expect_err("must be refused");
            assert_eq!(status.code(), code, "{status:?}");
            assert!(
                status.message().contains(words),
                "{status:?} lacks {words:?}"
            );
        };

    // A field changed after signing: the rebuilt bytes no longer match the signature.
    let tx = transfer_with(&alice, gas, mallory.address(), 1000);
    let mut changed = request(&tx);
    if let Some(proto::transaction_kind::Kind::TransferCoin(t)) = changed
        .transaction
        .as_mut()
        .and_then(|t| t.kind.as_mut())
        .and_then(|k| k.kind.as_mut())
    {
        t.amount = Some(1_000_000_000);
    }
    refused(
        exec.execute_transaction(changed).await,
        Code::InvalidArgument,
        "signature",
    );

    // Signed by someone else on the owner's behalf.
    let mut forged = tx.clone();
    forged.signatures = transfer_with(&mallory, gas, mallory.address(), 1000).signatures;
    refused(
        exec.execute_transaction(request(&forged)).await,
        Code::InvalidArgument,
        "signature",
    );

    // No signature, and a missing field.
    let mut unsigned = request(&tx);
    unsigned.signatures.clear();
    refused(
        exec.execute_transaction(unsigned).await,
        Code::InvalidArgument,
        "signature",
    );
    let mut no_sender = request(&tx);
    no_sender.transaction.as_mut().unwrap().sender = None;
    refused(
        exec.execute_transaction(no_sender).await,
        Code::InvalidArgument,
        "transaction.sender",
    );

    // A stale gas version, worded so that the SDK picks another coin.
    let stale = ObjectRef {
        version: gas.version + 1,
        ..gas
    };
    let tx_stale = transfer_with(&alice, stale, mallory.address(), 1000);
    refused(
        exec.execute_transaction(request(&tx_stale)).await,
        Code::FailedPrecondition,
        "is not available for consumption",
    );

    // Someone else's coin as gas.
    let theirs = transfer_with(&mallory, gas, mallory.address(), 1000);
    refused(
        exec.execute_transaction(request(&theirs)).await,
        Code::InvalidArgument,
        "not owned",
    );

    // Bytes that are not protobuf, and a message over the size limit.
    let mut raw = tonic::client::Grpc::new(net.rpc.clone());
    raw.ready().await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
        "/soma.rpc.TransactionExecutionService/ExecuteTransaction",
    );
    let status = raw
        .unary(
            tonic::Request::new(vec![0xff_u8; 16]),
            path.clone(),
            RawCodec,
        )
        .await
        .expect_err("garbage must be refused");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    raw.ready().await.unwrap();
    let status = raw
        .unary(
            tonic::Request::new(vec![0u8; somatrain_rpc::MAX_MESSAGE_BYTES + 1]),
            path,
            RawCodec,
        )
        .await
        .expect_err("an oversized message must be refused");
    // tonic checks the length before any decoding and answers OUT_OF_RANGE, naming the limit.
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(status.message().contains("4194304"), "{status:?}");

    // None of it moved a shannon or a version.
    assert_eq!(balance(&net, alice.address()).await, 2_000_000_000);
    assert_eq!(balance(&net, mallory.address()).await, 0);
    assert_eq!(coins(&net, alice.address()).await, vec![gas]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owned_objects_come_in_pages() {
    let net = start().await;
    let alice = Keypair::from_secret([4; 32]);
    for _ in 0..5 {
        fund(&net, &alice).await;
    }
    let mut state = StateServiceClient::new(net.rpc.clone());
    let mut seen = Vec::new();
    let mut token = None;
    for _ in 0..10 {
        let page = state
            .list_owned_objects(proto::ListOwnedObjectsRequest {
                owner: Some(alice.address().to_string()),
                page_size: Some(2),
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.objects.len() <= 2);
        seen.extend(page.objects.into_iter().map(|o| o.object_id.unwrap()));
        token = page.next_page_token;
        if token.is_none() {
            break;
        }
    }
    assert_eq!(seen.len(), 5);
    let mut unique = seen.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 5, "pages overlap: {seen:?}");
    let bad = state
        .list_owned_objects(proto::ListOwnedObjectsRequest {
            owner: Some(alice.address().to_string()),
            page_token: Some(vec![1, 2, 3]),
            ..Default::default()
        })
        .await
        .expect_err("a foreign page token is refused");
    assert_eq!(bad.code(), Code::InvalidArgument);
}

/// Sends and receives raw bytes, to put malformed messages on the wire.
#[derive(Default, Clone)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

/// As the network: a fresh chain already has its genesis checkpoint (0, no transactions), so a
/// newcomer's first "latest checkpoint" finds it; the first transaction lands in checkpoint 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_chain_serves_its_genesis_checkpoint() {
    let net = start().await;
    let mut ledger = LedgerServiceClient::new(net.rpc.clone());
    let latest = |ledger: &mut LedgerServiceClient<Channel>, id| {
        let mut ledger = ledger.clone();
        async move {
            ledger
                .get_checkpoint(proto::GetCheckpointRequest {
                    checkpoint_id: id,
                    read_mask: None,
                })
                .await
                .unwrap()
                .into_inner()
                .checkpoint
                .unwrap()
        }
    };
    let info = ledger
        .get_service_info(proto::GetServiceInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        info.checkpoint_height,
        Some(1),
        "genesis is the one checkpoint"
    );
    let genesis = latest(&mut ledger, None).await;
    assert_eq!(genesis.sequence_number, Some(0));
    assert!(genesis.transactions.is_empty());
    let by_number = latest(
        &mut ledger,
        Some(proto::get_checkpoint_request::CheckpointId::SequenceNumber(
            0,
        )),
    )
    .await;
    assert_eq!(by_number, genesis);

    let alice = Keypair::from_secret([1; 32]);
    fund(&net, &alice).await;
    let after = latest(&mut ledger, None).await;
    assert_eq!(after.sequence_number, Some(1));
    assert_eq!(after.transactions.len(), 1);
}
