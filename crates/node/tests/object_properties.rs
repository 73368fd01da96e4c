//! Random object transactions and epoch changes straight against the object chain. Whatever
//! happens: supply is conserved; a refused transaction is refused before it touches anything; a
//! failed one changes nothing but its gas coin (balance down by exactly the fee, version up) and
//! the fees collected; a successful one writes every object at the new lamport version, and the
//! balance changes it reports are what the coins show.

use somatrain_protocol::transaction::{
    AddStake, AddStakeToModel, ClaimRewards, CommitModel, CreateModel, DeactivateModel, PayCoins,
    ReportModel, RevealModel, SetModelCommissionRate, SubmitData, TransferCoin, WithdrawStake,
};
use std::collections::BTreeMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use somatrain_node::ledger::execute::{execute, faucet};
use somatrain_node::ledger::validators::{GENESIS_VALIDATOR_STAKE, Validator, ValidatorPool};
use somatrain_node::ledger::{Ledger, ModelState, Params, SystemState, epoch};
use somatrain_node::validator_keys::ValidatorKeys;
use somatrain_protocol::crypto::embedding_commitment;
use somatrain_protocol::effects::{ExecutionStatus, IdOperation};
use somatrain_protocol::{
    Address, Commitment, Digest, EncryptionKey, Keypair, Manifest, ObjectId, ObjectRef, ObjectType,
    Owner, SignedTransaction, SomaTensor, TransactionData, TransactionKind, TxDigest,
};

const DIM: usize = 4;

fn params() -> Params {
    Params {
        embedding_dim: DIM as u64,
        initial_targets_per_epoch: 3,
        ..Params::default()
    }
}

fn coins(ledger: &Ledger, owner: &Address) -> Vec<ObjectRef> {
    ledger
        .owned_objects(owner, Some(ObjectType::Coin))
        .map(|o| o.reference().unwrap())
        .collect()
}

/// A validator whose account is the world's key 3. Its pool id is fixed: it is inside every
/// StakedSoma, so a random one would make the run differ from one time to the next.
fn validator() -> Validator {
    let mut v = ValidatorKeys::generate("v".into()).genesis_validator(0, GENESIS_VALIDATOR_STAKE);
    v.address = Keypair::from_secret([4; 32]).address();
    v.pool = ValidatorPool::genesis(ObjectId([0xaa; 32]), GENESIS_VALIDATOR_STAKE);
    v
}

struct World {
    ledger: Ledger,
    keys: Vec<Keypair>,
    /// Keys of committed rounds, by model: (key, embedding).
    secrets: BTreeMap<ObjectId, (EncryptionKey, Vec<f32>)>,
    /// The key and embedding of the commit being tried, kept only if it succeeds.
    proposed_secret: Option<(ObjectId, EncryptionKey, Vec<f32>)>,
    rng: StdRng,
    faucet_n: u64,
}

impl World {
    fn random_kind(&mut self, sender: usize) -> TransactionKind {
        self.proposed_secret = None;
        let me = self.keys[sender].address();
        let epoch = self.ledger.system.epoch;
        // Half the time, the sender moves one of its models along its lifecycle.
        let due = self.ledger.system.models.values().find(|m| {
            m.owner == me
                && (m.state == ModelState::Created
                    || m.pending
                        .as_ref()
                        .is_some_and(|p| p.commit_epoch + 1 == epoch))
        });
        if let Some(model) = due.cloned()
            && self.rng.random_bool(0.5)
        {
            if let (Some(_), Some((key, embedding))) = (&model.pending, self.secrets.get(&model.id))
            {
                return TransactionKind::RevealModel(RevealModel {
                    model_id: model.id,
                    decryption_key: Digest(*key.as_bytes()),
                    embedding: SomaTensor::vector(embedding),
                });
            }
            let key = EncryptionKey::from_bytes(self.rng.random());
            let embedding: Vec<f32> = (0..DIM).map(|_| self.rng.random_range(-1.0..1.0)).collect();
            let kind = TransactionKind::CommitModel(CommitModel {
                model_id: model.id,
                manifest: Manifest {
                    url: "http://127.0.0.1/w".into(),
                    checksum: Commitment([1; 32]),
                    size: 10,
                },
                weights_commitment: Commitment([1; 32]),
                embedding_commitment: embedding_commitment(&embedding),
                decryption_key_commitment: key.commitment(),
            });
            self.proposed_secret = Some((model.id, key, embedding));
            return kind;
        }
        let rng = &mut self.rng;
        let other = self.keys[rng.random_range(0..self.keys.len())].address();
        let my_coins = coins(&self.ledger, &me);
        // Mostly the sender's own models, so that commits and reveals often pass.
        let own: Vec<ObjectId> = self
            .ledger
            .system
            .models
            .values()
            .filter(|m| m.owner == me)
            .map(|m| m.id)
            .collect();
        let models: Vec<ObjectId> = if !own.is_empty() && rng.random_bool(0.8) {
            own
        } else {
            self.ledger.system.models.keys().copied().collect()
        };
        let model = models
            .get(rng.random_range(0..models.len().max(1)))
            .copied()
            .unwrap_or(ObjectId([9; 32]));
        let all_targets: Vec<&somatrain_protocol::Object> = self
            .ledger
            .objects
            .values()
            .filter(|o| o.object_type() == ObjectType::Target)
            .collect();
        let live: Vec<ObjectId> = all_targets
            .iter()
            .filter(|o| {
                o.target()
                    .is_ok_and(|t| t.generation_epoch == self.ledger.system.epoch)
            })
            .map(|o| o.id().unwrap())
            .collect();
        // Mostly targets still open for submissions.
        let targets: Vec<ObjectId> = if !live.is_empty() && rng.random_bool(0.7) {
            live
        } else {
            all_targets.iter().map(|o| o.id().unwrap()).collect()
        };
        let target = targets
            .get(rng.random_range(0..targets.len().max(1)))
            .copied()
            .unwrap_or(ObjectId([8; 32]));
        let coin = my_coins
            .get(rng.random_range(0..my_coins.len().max(1)))
            .copied();
        let amount = [0, 1, 1000, 300_000_000, 5_000_000_000][rng.random_range(0..5)];
        match rng.random_range(0..11) {
            0 | 1 => TransactionKind::TransferCoin(TransferCoin {
                coin: coin.unwrap_or(ObjectRef {
                    id: ObjectId([7; 32]),
                    version: 1,
                    digest: Default::default(),
                }),
                amount: (amount > 0).then_some(amount),
                recipient: other,
            }),
            2 => TransactionKind::PayCoins(PayCoins {
                coins: my_coins.clone(),
                amounts: Some(vec![amount, amount / 2]),
                recipients: vec![other, me],
            }),
            3 => TransactionKind::CreateModel(CreateModel {
                stake_amount: [1_000_000_000, 10, 1_200_000_000][rng.random_range(0..3)],
                commission_rate: [0, 1000, 20_000][rng.random_range(0..3)],
                architecture_version: [1, 1, 2][rng.random_range(0..3)],
            }),
            4 => {
                let key = EncryptionKey::from_bytes(rng.random());
                let embedding: Vec<f32> = (0..DIM).map(|_| rng.random_range(-1.0..1.0)).collect();
                let kind = TransactionKind::CommitModel(CommitModel {
                    model_id: model,
                    manifest: Manifest {
                        url: "http://127.0.0.1/w".into(),
                        checksum: Commitment([1; 32]),
                        size: 10,
                    },
                    weights_commitment: Commitment([1; 32]),
                    embedding_commitment: embedding_commitment(&embedding),
                    decryption_key_commitment: key.commitment(),
                });
                self.proposed_secret = Some((model, key, embedding));
                kind
            }
            5 => {
                let (key, embedding) = self
                    .secrets
                    .get(&model)
                    .cloned()
                    .unwrap_or_else(|| (EncryptionKey::from_bytes([0; 32]), vec![0.5; DIM]));
                TransactionKind::RevealModel(RevealModel {
                    model_id: model,
                    decryption_key: Digest(*key.as_bytes()),
                    embedding: SomaTensor::vector(&embedding),
                })
            }
            6 if rng.random_bool(0.5) => TransactionKind::AddStake(AddStake {
                validator: self.ledger.system.validators[0].address,
                coin_ref: coin.unwrap_or(ObjectRef {
                    id: ObjectId([6; 32]),
                    version: 1,
                    digest: Default::default(),
                }),
                amount: (amount > 0).then_some(amount),
            }),
            6 => TransactionKind::AddStakeToModel(AddStakeToModel {
                model_id: model,
                coin_ref: coin.unwrap_or(ObjectRef {
                    id: ObjectId([6; 32]),
                    version: 1,
                    digest: Default::default(),
                }),
                amount: (amount > 0).then_some(amount),
            }),
            7 => {
                let staked: Vec<ObjectRef> = self
                    .ledger
                    .owned_objects(&me, Some(ObjectType::StakedSoma))
                    .map(|o| o.reference().unwrap())
                    .collect();
                match staked.first() {
                    Some(s) => TransactionKind::WithdrawStake(WithdrawStake { staked_soma: *s }),
                    None => TransactionKind::DeactivateModel(DeactivateModel { model_id: model }),
                }
            }
            8 => {
                let embedding: Vec<f32> = (0..DIM).map(|_| rng.random_range(-1.0..1.0)).collect();
                // Usually a model the target was assigned.
                let assigned = self
                    .ledger
                    .object(&target)
                    .and_then(|o| o.target().ok())
                    .and_then(|t| t.model_ids.first().copied())
                    .filter(|_| rng.random_bool(0.8));
                TransactionKind::SubmitData(SubmitData {
                    target_id: target,
                    data_manifest: Manifest {
                        url: "http://127.0.0.1/d".into(),
                        checksum: Commitment([2; 32]),
                        size: [10, 1000, 2_000_000][rng.random_range(0..3)],
                    },
                    model_id: assigned.unwrap_or(model),
                    embedding: SomaTensor::vector(&embedding),
                    distance_score: SomaTensor::scalar(rng.random_range(0.0..1.5)),
                    loss_score: SomaTensor::vector(&[1.0]),
                    bond_coin: coin.unwrap_or(ObjectRef {
                        id: ObjectId([5; 32]),
                        version: 1,
                        digest: Default::default(),
                    }),
                })
            }
            9 => TransactionKind::ClaimRewards(ClaimRewards { target_id: target }),
            // Only the validator (key 3) may report; anyone else fails with NotAValidator.
            10 if rng.random_bool(0.1) => {
                TransactionKind::ReportModel(ReportModel { model_id: model })
            }
            _ => TransactionKind::SetModelCommissionRate(SetModelCommissionRate {
                model_id: model,
                new_rate: [100, 20_000][rng.random_range(0..2)],
            }),
        }
    }

    fn gas(&mut self, sender: usize) -> Vec<ObjectRef> {
        let mut gas = coins(&self.ledger, &self.keys[sender].address());
        match self.rng.random_range(0..10) {
            // A stale version: the SDK's "not available for consumption".
            0 => {
                if let Some(g) = gas.first_mut() {
                    g.version += 1;
                }
                gas.truncate(1);
            }
            1 => {} // every coin: extra gas coins are merged
            _ => gas.truncate(1),
        }
        gas
    }
}

fn coin_balance(ledger: &Ledger, id: &ObjectId) -> u64 {
    ledger
        .object(id)
        .and_then(|o| o.coin_balance().ok())
        .unwrap_or(0)
}

#[test]
fn random_object_transactions_keep_every_invariant() {
    for seed in 0..4u64 {
        let mut world = World {
            ledger: Ledger::new(SystemState::genesis(params(), 0, vec![validator()]), []),
            keys: (0..4)
                .map(|i| Keypair::from_secret([i as u8 + 1; 32]))
                .collect(),
            secrets: BTreeMap::new(),
            proposed_secret: None,
            rng: StdRng::seed_from_u64(seed),
            faucet_n: 0,
        };
        let (mut refused, mut failed, mut succeeded) = (0, 0, 0);
        let mut kinds: BTreeMap<&'static str, usize> = BTreeMap::new();
        let mut failures: BTreeMap<String, usize> = BTreeMap::new();
        for step in 0..600 {
            let sender = world.rng.random_range(0..world.keys.len());
            match world.rng.random_range(0..20) {
                0 => {
                    let changes = epoch::advance_epoch(&world.ledger, step);
                    world.ledger.apply(changes);
                }
                1 | 2 => {
                    world.faucet_n += 1;
                    let digest = TxDigest([world.faucet_n as u8; 32]);
                    let address = world.keys[sender].address();
                    let paid = faucet(&world.ledger, address, digest).unwrap();
                    world.ledger.apply(paid.changes);
                }
                _ => {
                    let kind = world.random_kind(sender);
                    let gas = world.gas(sender);
                    let key = &world.keys[sender];
                    let tx = SignedTransaction::sign(
                        key,
                        TransactionData::new(kind, key.address(), gas.clone()),
                    );
                    let before = world.ledger.clone();
                    match execute(&world.ledger, &tx) {
                        Err(_) => refused += 1,
                        Ok(executed) => {
                            let effects = &executed.effects;
                            let lamport = effects.lamport_version;
                            for object in executed.changes.written.values() {
                                assert_eq!(object.version(), lamport);
                                assert_eq!(object.previous_transaction, tx.digest());
                            }
                            for change in &effects.changed_objects {
                                match change.id_operation {
                                    IdOperation::Created => {
                                        assert!(before.object(&change.id).is_none())
                                    }
                                    IdOperation::Deleted => {
                                        assert!(executed.changes.deleted.contains(&change.id))
                                    }
                                    IdOperation::None => assert!(change.input.is_some()),
                                }
                            }
                            let gas_id = gas[0].id;
                            let fee = effects.fee;
                            assert_eq!(
                                fee.total_fee,
                                fee.base_fee + fee.operation_fee + fee.value_fee
                            );
                            if let ExecutionStatus::Failure(f) = &effects.status {
                                failed += 1;
                                *failures.entry(format!("{:?}", f.kind)).or_insert(0) += 1;
                                // Only the gas coins changed: merged into the first, which paid.
                                let merged: u64 =
                                    gas.iter().map(|g| coin_balance(&before, &g.id)).sum();
                                let others: Vec<_> = executed
                                    .changes
                                    .written
                                    .keys()
                                    .filter(|id| **id != gas_id)
                                    .collect();
                                assert!(others.is_empty(), "a failure wrote {others:?}");
                                let system = executed.changes.system.clone().unwrap();
                                let mut expected_system = before.system.clone();
                                expected_system.fees_collected += fee.total_fee;
                                assert_eq!(system, expected_system, "a failure changed the system");
                                let after =
                                    executed.changes.written[&gas_id].coin_balance().unwrap();
                                assert_eq!(after, merged - fee.total_fee);
                            } else {
                                succeeded += 1;
                                *kinds.entry(tx.data.kind.name()).or_insert(0) += 1;
                                if let Some((model, key, embedding)) = world.proposed_secret.take()
                                {
                                    world.secrets.insert(model, (key, embedding));
                                }
                            }
                            world.proposed_secret = None;
                            let reported: BTreeMap<Address, i128> = executed
                                .balance_changes
                                .iter()
                                .map(|b| (b.address, b.amount))
                                .collect();
                            world.ledger.apply(executed.changes);
                            for key in &world.keys {
                                let a = key.address();
                                let delta =
                                    world.ledger.balance(&a) as i128 - before.balance(&a) as i128;
                                assert_eq!(
                                    reported.get(&a).copied().unwrap_or(0),
                                    delta,
                                    "reported balance change of {a}"
                                );
                            }
                        }
                    }
                }
            }
            assert_eq!(
                world.ledger.accounted_supply(),
                world.ledger.system.total_supply as u128,
                "supply not conserved at step {step} (seed {seed})"
            );
            for model in world.ledger.system.models.values() {
                if model.state == ModelState::Active {
                    assert!(model.embedding.is_some() && model.decryption_key.is_some());
                }
            }
            for object in world.ledger.objects.values() {
                if let Owner::AddressOwner(owner) = object.owner {
                    assert!(world.ledger.owned[&owner].contains(&object.id().unwrap()));
                }
            }
            let targets: std::collections::BTreeSet<ObjectId> = world
                .ledger
                .objects
                .iter()
                .filter(|(_, o)| o.object_type() == ObjectType::Target)
                .map(|(id, _)| *id)
                .collect();
            assert_eq!(
                world
                    .ledger
                    .targets
                    .iter()
                    .copied()
                    .collect::<std::collections::BTreeSet<_>>(),
                targets,
                "the target index at step {step} (seed {seed})"
            );
        }
        // Every path was exercised, or the test shows nothing.
        assert!(
            refused > 10 && failed > 10 && succeeded > 10,
            "{refused}/{failed}/{succeeded}"
        );
        for kind in [
            "AddStake",
            "WithdrawStake",
            "TransferCoin",
            "CreateModel",
            "CommitModel",
            "RevealModel",
            "SubmitData",
        ] {
            assert!(
                kinds.contains_key(kind),
                "no {kind} succeeded (seed {seed}): {kinds:?}; failures {failures:?}"
            );
        }
        assert!(
            world
                .ledger
                .system
                .models
                .values()
                .any(|m| m.state == ModelState::Active),
            "no model ever became active (seed {seed}): {:?}",
            world
                .ledger
                .system
                .models
                .values()
                .map(|m| (
                    m.state,
                    m.create_epoch,
                    m.pending.as_ref().map(|p| p.commit_epoch)
                ))
                .collect::<Vec<_>>()
        );
    }
}
