//! Validators' reports of a filled target's submission, straight against the ledger, as the
//! network's `submission.rs` rules them: only a validator reports, only a filled target, only in
//! the epoch after the fill (the audit window); an undo needs a report. At the claim, reporters
//! holding a quorum of voting power take the submitter's bond, split evenly (the first reporter
//! by address takes the remainder), the reward returns to the emission pool less the claimer's
//! share, and neither the submitter nor the model owner is paid. Below quorum the claim pays as
//! usual. Supply is conserved throughout.

use somatrain_node::ledger::validators::GENESIS_VALIDATOR_STAKE;
use somatrain_node::ledger::{Ledger, Params, SystemState};
use somatrain_node::validator_keys::ValidatorKeys;
use somatrain_protocol::crypto::embedding_commitment;
use somatrain_protocol::effects::ExecutionErrorKind as Kind;
use somatrain_protocol::object::TargetStatus;
use somatrain_protocol::transaction::{
    ClaimRewards, CommitModel, CreateModel, ReportSubmission, RevealModel, SubmitData,
    UndoReportSubmission,
};
use somatrain_protocol::{
    Address, Commitment, Digest, EncryptionKey, Keypair, Manifest, ObjectId, ObjectType,
    SomaTensor, TransactionKind,
};

const SOMA: u64 = 1_000_000_000;
const DIM: usize = 4;

mod common;

fn target(chain: &common::LedgerChain, id: &ObjectId) -> somatrain_protocol::object::Target {
    chain.ledger.object(id).unwrap().target().unwrap()
}

/// Open targets of this epoch assigned to `model`.
fn open_targets(chain: &common::LedgerChain, model: &ObjectId) -> Vec<ObjectId> {
    chain
        .ledger
        .objects
        .values()
        .filter(|o| o.object_type() == ObjectType::Target)
        .filter(|o| {
            o.target().is_ok_and(|t| {
                t.status == TargetStatus::Open
                    && t.generation_epoch == chain.ledger.system.epoch
                    && t.model_ids.contains(model)
            })
        })
        .map(|o| o.id().unwrap())
        .collect()
}

fn report(target_id: ObjectId) -> TransactionKind {
    TransactionKind::ReportSubmission(ReportSubmission { target_id })
}

fn undo(target_id: ObjectId) -> TransactionKind {
    TransactionKind::UndoReportSubmission(UndoReportSubmission { target_id })
}

fn claim(target_id: ObjectId) -> TransactionKind {
    TransactionKind::ClaimRewards(ClaimRewards { target_id })
}

#[test]
fn reported_submissions_lose_their_bond_to_a_quorum_of_validators() {
    // Four validators of equal stake: 2,500 of voting power each, so three make a quorum
    // (6,667) and two do not.
    let validator_keys: Vec<ValidatorKeys> = (0..4)
        .map(|i| ValidatorKeys::generate(format!("v{i}")))
        .collect();
    let validators = validator_keys
        .iter()
        .enumerate()
        .map(|(i, k)| k.genesis_validator(i, GENESIS_VALIDATOR_STAKE))
        .collect();
    let params = Params {
        embedding_dim: DIM as u64,
        ..Params::default()
    };
    let mut chain =
        common::LedgerChain::new(Ledger::new(SystemState::genesis(params, 0, validators), []));
    assert!(
        chain
            .ledger
            .system
            .validators
            .iter()
            .all(|v| v.voting_power == 2_500)
    );
    // Reporters in address order: the first of them takes a split's remainder.
    let mut accounts: Vec<Keypair> = validator_keys.iter().map(|k| k.account()).collect();
    accounts.sort_by_key(|k| k.address());
    let owner = Keypair::from_secret([1; 32]);
    let submitter = Keypair::from_secret([2; 32]);
    let claimer = Keypair::from_secret([3; 32]);
    for address in accounts.iter().map(Keypair::address).chain([
        owner.address(),
        submitter.address(),
        claimer.address(),
    ]) {
        chain.fund(address);
    }

    // A model, committed and revealed, so that the next epoch's targets are assigned to it.
    chain
        .status(
            &owner,
            TransactionKind::CreateModel(CreateModel {
                stake_amount: SOMA,
                commission_rate: 0,
                architecture_version: 1,
            }),
        )
        .unwrap();
    let model_id = *chain.ledger.system.models.keys().next().unwrap();
    let key = EncryptionKey::generate();
    let embedding = vec![0.5, -0.5, 0.25, 0.0];
    let checksum = Commitment::of_bytes(b"weights");
    chain
        .status(
            &owner,
            TransactionKind::CommitModel(CommitModel {
                model_id,
                manifest: Manifest {
                    url: "http://127.0.0.1/weights".into(),
                    checksum,
                    size: 7,
                },
                weights_commitment: checksum,
                embedding_commitment: embedding_commitment(&embedding),
                decryption_key_commitment: key.commitment(),
            }),
        )
        .unwrap();
    chain.advance();
    chain
        .status(
            &owner,
            TransactionKind::RevealModel(RevealModel {
                model_id,
                decryption_key: Digest(*key.as_bytes()),
                embedding: SomaTensor::vector(&embedding),
            }),
        )
        .unwrap();
    chain.advance();
    let targets = open_targets(&chain, &model_id);
    assert!(targets.len() >= 3, "{} targets", targets.len());
    let (reported, unreported, open) = (targets[0], targets[1], targets[2]);

    // An open target has no submission to report.
    assert_eq!(
        chain.status(&accounts[0], report(open)),
        Err(Kind::TargetNotFilled)
    );

    // Two hits. A bond of 1,001 bytes' worth does not split evenly in three.
    let size = 1_001;
    for target_id in [reported, unreported] {
        let target = target(&chain, &target_id);
        chain
            .status(
                &submitter,
                TransactionKind::SubmitData(SubmitData {
                    target_id,
                    data_manifest: Manifest {
                        url: "http://127.0.0.1/data".into(),
                        checksum: Commitment::of_bytes(b"data"),
                        size,
                    },
                    model_id,
                    embedding: target.embedding.clone(),
                    distance_score: SomaTensor::scalar(0.0),
                    loss_score: SomaTensor::vector(&[1.0]),
                    bond_coin: chain
                        .ledger
                        .owned_objects(&submitter.address(), Some(ObjectType::Coin))
                        .max_by_key(|o| o.coin_balance().unwrap())
                        .unwrap()
                        .reference()
                        .unwrap(),
                }),
            )
            .unwrap();
    }
    let bond = size * chain.ledger.system.params.submission_bond_per_byte;
    assert_eq!(target(&chain, &reported).bond_amount, bond);
    assert_ne!(bond % 3, 0, "the split must leave a remainder to check");

    // The fill epoch is not the audit window yet.
    assert_eq!(
        chain.status(&accounts[0], report(reported)),
        Err(Kind::ChallengeWindowClosed)
    );
    chain.advance();

    // The audit window: only validators report, and an undo needs a report.
    assert_eq!(
        chain.status(&owner, report(reported)),
        Err(Kind::NotAValidator)
    );
    assert_eq!(
        chain.status(&owner, undo(reported)),
        Err(Kind::NotAValidator)
    );
    assert_eq!(
        chain.status(&accounts[3], undo(reported)),
        Err(Kind::ReportRecordNotFound)
    );
    for reporter in &accounts[..3] {
        chain.status(reporter, report(reported)).unwrap();
    }
    // Reporting twice changes nothing; the fourth reports and takes it back.
    chain.status(&accounts[0], report(reported)).unwrap();
    chain.status(&accounts[3], report(reported)).unwrap();
    chain.status(&accounts[3], undo(reported)).unwrap();
    let mut expected: Vec<Address> = accounts[..3].iter().map(Keypair::address).collect();
    expected.sort();
    assert_eq!(target(&chain, &reported).submission_reports, expected);
    // Two of four are no quorum.
    for reporter in &accounts[..2] {
        chain.status(reporter, report(unreported)).unwrap();
    }
    // A claim waits for the window to close.
    assert_eq!(
        chain.status(&claimer, claim(reported)),
        Err(Kind::ChallengeWindowOpen)
    );
    chain.advance();
    // The window is closed to reports.
    assert_eq!(
        chain.status(&accounts[3], report(reported)),
        Err(Kind::ChallengeWindowClosed)
    );

    let params = chain.ledger.system.params.clone();
    let share = |reward: u64, bps: u64| (reward as u128 * bps as u128 / 10_000) as u64;

    // The quorum's claim.
    let reward = target(&chain, &reported).reward_pool;
    assert!(reward > 0);
    let claimer_share = share(reward, params.claimer_share_bps);
    let balances = |chain: &common::LedgerChain| {
        [
            &accounts[0],
            &accounts[1],
            &accounts[2],
            &accounts[3],
            &owner,
            &submitter,
        ]
        .map(|k| chain.ledger.balance(&k.address()))
    };
    let before = balances(&chain);
    let pool_before = chain.ledger.system.emission_pool;
    let claimer_before = chain.ledger.balance(&claimer.address());
    chain.status(&claimer, claim(reported)).unwrap();
    let after = balances(&chain);
    let gained: Vec<i128> = before
        .iter()
        .zip(&after)
        .map(|(b, a)| *a as i128 - *b as i128)
        .collect();
    let third = (bond / 3) as i128;
    assert_eq!(
        gained,
        vec![third + (bond % 3) as i128, third, third, 0, 0, 0],
        "the bond split among the three reporters; nothing to the owner or the submitter"
    );
    assert_eq!(
        chain.ledger.system.emission_pool,
        pool_before + reward - claimer_share,
        "the reward returns to the emission pool less the claimer's share"
    );
    let fee = claimer_before + claimer_share - chain.ledger.balance(&claimer.address());
    assert!(
        fee > 0 && fee < SOMA / 1_000,
        "the claimer paid only its gas: {fee}"
    );

    // Below quorum: the usual payout, the bond back to the submitter.
    let reward = target(&chain, &unreported).reward_pool;
    let model_share = share(reward, params.model_share_bps);
    let claimer_share = share(reward, params.claimer_share_bps);
    let before = balances(&chain);
    chain.status(&claimer, claim(unreported)).unwrap();
    let after = balances(&chain);
    assert_eq!(after[..4], before[..4], "no validator is paid");
    assert_eq!(after[4] - before[4], model_share);
    assert_eq!(
        after[5] - before[5],
        reward - model_share - claimer_share + bond
    );
}
