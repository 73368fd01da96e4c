//! The model lifecycle rules on the object chain, one scenario straight against the ledger: the
//! refusals at creation, commit and reveal (each an executed failure with the network's error
//! kind), an update overwritten by a second commit, a missed update reveal (dropped, nothing
//! slashed), a missed first reveal and a never-committed model (half the stake slashed each),
//! commission changes at the next epoch, and deactivation. Supply is conserved throughout.

use somatrain_node::ledger::{Ledger, ModelState, Params, SystemState};
use somatrain_protocol::crypto::embedding_commitment;
use somatrain_protocol::effects::ExecutionErrorKind as Kind;
use somatrain_protocol::transaction::{
    CommitModel, CreateModel, DeactivateModel, RevealModel, SetModelCommissionRate,
};
use somatrain_protocol::{
    Commitment, Digest, EncryptionKey, Keypair, Manifest, ObjectId, SomaTensor, TransactionKind,
};

const SOMA: u64 = 1_000_000_000;

mod common;

fn chain() -> common::LedgerChain {
    let params = Params {
        embedding_dim: 4,
        ..Params::default()
    };
    common::LedgerChain::new(Ledger::new(SystemState::genesis(params, 0, vec![]), []))
}

struct Commit {
    key: EncryptionKey,
    embedding: Vec<f32>,
    kind: TransactionKind,
}

fn commit_for(model_id: ObjectId, seed: f32) -> Commit {
    let key = EncryptionKey::generate();
    let embedding = vec![seed, 1.0 - seed, 0.25, -seed];
    let checksum = Commitment::of_bytes(&seed.to_le_bytes());
    let kind = TransactionKind::CommitModel(CommitModel {
        model_id,
        manifest: Manifest {
            url: "http://127.0.0.1/weights".into(),
            checksum,
            size: 4,
        },
        weights_commitment: checksum,
        embedding_commitment: embedding_commitment(&embedding),
        decryption_key_commitment: key.commitment(),
    });
    Commit {
        key,
        embedding,
        kind,
    }
}

fn reveal(model_id: ObjectId, key: &EncryptionKey, embedding: &[f32]) -> TransactionKind {
    TransactionKind::RevealModel(RevealModel {
        model_id,
        decryption_key: Digest(*key.as_bytes()),
        embedding: SomaTensor::vector(embedding),
    })
}

fn create(stake: u64, commission: u64, version: u64) -> TransactionKind {
    TransactionKind::CreateModel(CreateModel {
        stake_amount: stake,
        commission_rate: commission,
        architecture_version: version,
    })
}

#[test]
fn the_model_lifecycle_with_an_update_and_both_slashing_paths() {
    let mut c = chain();
    let (owner, stranger) = (Keypair::generate(), Keypair::generate());
    for kp in [&owner, &owner, &owner, &stranger] {
        c.fund(kp.address());
    }

    // Refusals at creation.
    c.fails(
        &owner,
        create(SOMA, 10_001, 1),
        Kind::ModelCommissionRateTooHigh,
    );
    c.fails(&owner, create(SOMA - 1, 0, 1), Kind::ModelMinStakeNotMet);
    c.fails(
        &owner,
        create(SOMA, 0, 2),
        Kind::ModelArchitectureVersionMismatch,
    );

    // Model A: create, commit, reveal in the next epoch, active.
    let a = ObjectId::derive(&c.ok(&owner, create(SOMA, 1000, 1)), 0);
    assert_eq!(c.model(&a).state, ModelState::Created);
    let first = commit_for(a, 0.5);
    c.fails(&stranger, first.kind.clone(), Kind::NotModelOwner);
    c.ok(&owner, first.kind.clone());
    assert_eq!(c.model(&a).state, ModelState::Pending);
    c.fails(
        &owner,
        reveal(a, &first.key, &first.embedding),
        Kind::ModelRevealEpochMismatch,
    );
    c.advance();
    c.fails(
        &owner,
        reveal(a, &EncryptionKey::generate(), &first.embedding),
        Kind::ModelDecryptionKeyCommitmentMismatch,
    );
    c.fails(
        &owner,
        reveal(a, &first.key, &[9.0; 4]),
        Kind::ModelEmbeddingCommitmentMismatch,
    );
    c.fails(
        &owner,
        reveal(a, &first.key, &[1.0; 3]),
        Kind::EmbeddingDimensionMismatch,
    );
    c.ok(&owner, reveal(a, &first.key, &first.embedding));
    let model = c.model(&a);
    assert_eq!(model.state, ModelState::Active);
    assert_eq!(model.embedding.as_deref(), Some(first.embedding.as_slice()));
    assert_eq!(model.decryption_key, Some(Digest(*first.key.as_bytes())));

    // An update: committed, overwritten by a second commit, revealed next epoch.
    let update_1 = commit_for(a, 0.7);
    let update_2 = commit_for(a, 0.9);
    c.ok(&owner, update_1.kind.clone());
    c.ok(&owner, update_2.kind.clone());
    assert_eq!(
        c.model(&a).embedding.as_deref(),
        Some(first.embedding.as_slice()),
        "the old weights stay live until the reveal"
    );
    c.advance();
    c.fails(
        &owner,
        reveal(a, &update_1.key, &update_1.embedding),
        Kind::ModelDecryptionKeyCommitmentMismatch,
    );
    c.ok(&owner, reveal(a, &update_2.key, &update_2.embedding));
    assert_eq!(
        c.model(&a).embedding.as_deref(),
        Some(update_2.embedding.as_slice())
    );

    // A missed update reveal drops the update and slashes nothing.
    c.ok(&owner, commit_for(a, 0.3).kind);
    c.advance();
    c.advance();
    let model = c.model(&a);
    assert!(model.pending.is_none());
    assert_eq!(
        (model.state, model.staking_pool.soma_balance),
        (ModelState::Active, SOMA)
    );

    // Model B: committed, never revealed: half its stake is slashed and it goes inactive.
    let b = ObjectId::derive(&c.ok(&owner, create(SOMA, 0, 1)), 0);
    let commit_b = commit_for(b, 0.1);
    c.ok(&owner, commit_b.kind.clone());
    c.advance();
    assert_eq!(
        c.model(&b).state,
        ModelState::Pending,
        "still inside its reveal window"
    );
    c.advance();
    let model_b = c.model(&b);
    assert_eq!(model_b.state, ModelState::Inactive);
    assert_eq!(model_b.staking_pool.soma_balance, SOMA / 2);
    c.fails(
        &owner,
        reveal(b, &commit_b.key, &commit_b.embedding),
        Kind::ModelNotPending,
    );

    // Model C: created but never committed: slashed once after its window, then frozen.
    let model_c = ObjectId::derive(&c.ok(&owner, create(SOMA, 0, 1)), 0);
    c.advance();
    c.advance();
    c.advance();
    assert_eq!(c.model(&model_c).staking_pool.soma_balance, SOMA / 2);
    let late = commit_for(model_c, 0.2);
    let (_, status) = c.run(&owner, late.kind);
    assert!(
        status.is_err(),
        "a model past its commit window cannot commit"
    );

    // Commission changes take effect at the next epoch; only the owner may change it or
    // deactivate the model.
    c.ok(
        &owner,
        TransactionKind::SetModelCommissionRate(SetModelCommissionRate {
            model_id: a,
            new_rate: 2500,
        }),
    );
    assert_eq!(c.model(&a).commission_rate, 1000);
    c.advance();
    assert_eq!(c.model(&a).commission_rate, 2500);
    c.fails(
        &stranger,
        TransactionKind::DeactivateModel(DeactivateModel { model_id: a }),
        Kind::NotModelOwner,
    );
    c.ok(
        &owner,
        TransactionKind::DeactivateModel(DeactivateModel { model_id: a }),
    );
    assert_eq!(c.model(&a).state, ModelState::Inactive);
}
