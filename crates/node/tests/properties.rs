//! Random sequences of transactions and epoch changes, straight against the state machine:
//! whatever happens, supply is conserved, balances and stakes stay consistent, sequence numbers
//! only move forward, and refused transactions change nothing.

use std::collections::BTreeMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use somatrain_node::execute::{ChainState, advance_epoch, execute};
use somatrain_protocol::chain::{Account, ModelStatus, Params, SystemState, TargetState};
use somatrain_protocol::crypto::embedding_commitment;
use somatrain_protocol::tx::{Manifest, TxBody, TxDigest, TxKind};
use somatrain_protocol::{Address, Commitment, EncryptionKey, ObjectId};

const SOMA: u64 = 1_000_000_000;

fn genesis(params: Params) -> ChainState {
    let total = 10_000_000 * SOMA;
    ChainState {
        system: SystemState {
            epoch: 0,
            epoch_start_ms: 0,
            target_state: TargetState {
                distance_threshold: params.initial_distance_threshold,
                targets_generated_this_epoch: 0,
                hits_this_epoch: 0,
                hits_ema: 0,
                reward_per_target: somatrain_node::targets::reward_per_target(&params),
            },
            params,
            total_supply: total,
            faucet_reserve: total / 2,
            emission_pool: total - total / 2,
            fees_collected: 0,
            burned: 0,
        },
        accounts: BTreeMap::new(),
        models: BTreeMap::new(),
        targets: BTreeMap::new(),
    }
}

fn check_invariants(state: &ChainState) {
    assert_eq!(
        state.accounted_supply(),
        state.system.total_supply,
        "supply not conserved"
    );
    for m in state.models.values() {
        assert_eq!(
            m.stakes.values().sum::<u64>(),
            m.stake,
            "stakes of {} do not add up",
            m.id
        );
        if m.status == ModelStatus::Active {
            assert!(m.embedding.is_some() && m.decryption_key.is_some());
        }
    }
    for t in state.targets.values() {
        assert!(!t.model_ids.is_empty());
    }
}

/// Keys revealed later, by model.
struct Secrets {
    key: EncryptionKey,
    embedding: Vec<f32>,
}

#[test]
fn random_sequences_keep_every_invariant() {
    let params = Params {
        embedding_dim: 3,
        initial_targets_per_epoch: 4,
        ..Params::default()
    };
    let mut applied_by_kind: BTreeMap<&'static str, u64> = BTreeMap::new();
    for seed in 0..12u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut state = genesis(params.clone());
        let users: Vec<Address> = (0..5u8).map(|i| Address([i + 1; 32])).collect();
        for u in &users {
            state.accounts.insert(
                *u,
                Account {
                    balance: 20 * SOMA,
                    sequence: 0,
                    rewards: 0,
                },
            );
            state.system.faucet_reserve -= 20 * SOMA;
        }
        let mut secrets: BTreeMap<ObjectId, Secrets> = BTreeMap::new();
        let mut applied = 0;
        for step in 0..400u64 {
            if rng.random_ratio(1, 12) {
                let changes = advance_epoch(&state, step);
                state.apply(changes);
                check_invariants(&state);
                continue;
            }
            let mut sender = users[rng.random_range(0..users.len())];
            let models: Vec<ObjectId> = state.models.keys().copied().collect();
            let pending: Vec<ObjectId> = state
                .models
                .values()
                .filter(|m| m.pending.is_some())
                .map(|m| m.id)
                .collect();
            let targets: Vec<ObjectId> = state.targets.keys().copied().collect();
            let pick = |rng: &mut StdRng, ids: &[ObjectId]| {
                if ids.is_empty() || rng.random_ratio(1, 10) {
                    ObjectId([0xee; 32])
                } else {
                    ids[rng.random_range(0..ids.len())]
                }
            };
            let kind = match rng.random_range(0..9) {
                0 => TxKind::Transfer {
                    to: users[rng.random_range(0..users.len())],
                    amount: rng.random_range(0..SOMA),
                },
                1 => TxKind::CreateModel {
                    stake: rng.random_range(SOMA / 2..2 * SOMA),
                    commission_bps: rng.random_range(0..12_000),
                    architecture_version: 1,
                },
                2 => {
                    let id = pick(&mut rng, &models);
                    let key = EncryptionKey::generate();
                    let embedding: Vec<f32> = (0..3).map(|_| rng.random_range(-1.0..1.0)).collect();
                    let kind = TxKind::CommitModel {
                        model_id: id,
                        manifest: Manifest {
                            url: "u".into(),
                            checksum: Commitment::of_bytes(b"w"),
                            size: 1,
                        },
                        weights_commitment: Commitment::of_bytes(b"w"),
                        embedding_commitment: embedding_commitment(&embedding),
                        decryption_key_commitment: key.commitment(),
                    };
                    secrets.insert(id, Secrets { key, embedding });
                    kind
                }
                3 => {
                    let id = pick(
                        &mut rng,
                        if pending.is_empty() {
                            &models
                        } else {
                            &pending
                        },
                    );
                    match secrets.get(&id) {
                        Some(s) => TxKind::RevealModel {
                            model_id: id,
                            decryption_key: s.key.to_base58(),
                            embedding: s.embedding.clone(),
                        },
                        None => TxKind::DeactivateModel { model_id: id },
                    }
                }
                4 => TxKind::AddStake {
                    model_id: pick(&mut rng, &models),
                    amount: rng.random_range(0..SOMA / 2),
                },
                5 => TxKind::WithdrawStake {
                    model_id: pick(&mut rng, &models),
                    amount: rng.random_range(0..SOMA),
                },
                6 => {
                    let target_id = pick(&mut rng, &targets);
                    let model_id = state
                        .targets
                        .get(&target_id)
                        .map(|t| t.model_ids[0])
                        .unwrap_or_else(|| pick(&mut rng, &models));
                    TxKind::SubmitData {
                        target_id,
                        manifest: Manifest {
                            url: "d".into(),
                            checksum: Commitment::of_bytes(b"d"),
                            size: rng.random_range(1..2_000_000),
                        },
                        model_id,
                        embedding: vec![0.1, 0.2, 0.3],
                        distance: rng.random_range(0.5..1.2),
                        loss: 1.0,
                    }
                }
                7 => TxKind::ClaimRewards {
                    target_id: pick(&mut rng, &targets),
                },
                _ => TxKind::SetCommission {
                    model_id: pick(&mut rng, &models),
                    commission_bps: rng.random_range(0..12_000),
                },
            };
            // Owner-only operations mostly come from the owner, so that their paths run.
            if let TxKind::CommitModel { model_id, .. }
            | TxKind::RevealModel { model_id, .. }
            | TxKind::DeactivateModel { model_id }
            | TxKind::SetCommission { model_id, .. } = &kind
                && let Some(m) = state.models.get(model_id)
                && rng.random_ratio(9, 10)
            {
                sender = m.owner;
            }
            // Mostly the right sequence number; sometimes a replay or a gap.
            let expected = state.accounts.get(&sender).map_or(0, |a| a.sequence);
            let sequence = match rng.random_range(0..20) {
                0 => expected.saturating_sub(1),
                1 => expected + 1,
                _ => expected,
            };
            let kind_name = match &kind {
                TxKind::Transfer { .. } => "transfer",
                TxKind::CreateModel { .. } => "create",
                TxKind::CommitModel { .. } => "commit",
                TxKind::RevealModel { .. } => "reveal",
                TxKind::DeactivateModel { .. } => "deactivate",
                TxKind::SetCommission { .. } => "commission",
                TxKind::AddStake { .. } => "stake",
                TxKind::WithdrawStake { .. } => "withdraw",
                TxKind::SubmitData { .. } => "submit",
                TxKind::ClaimRewards { .. } => "claim",
            };
            let body = TxBody {
                sender,
                sequence,
                kind,
            };
            let digest = TxDigest::of_body(format!("{seed}-{step}").as_bytes());
            let before = state.accounted_supply();
            match execute(&state, &body, digest) {
                Ok((changes, _)) => {
                    state.apply(changes);
                    applied += 1;
                    *applied_by_kind.entry(kind_name).or_default() += 1;
                    assert_eq!(state.accounts[&sender].sequence, expected + 1);
                }
                Err(_) => assert_eq!(state.accounted_supply(), before),
            }
            check_invariants(&state);
        }
        assert!(
            applied > 50,
            "seed {seed}: only {applied} transactions applied"
        );
    }
    eprintln!("applied by kind: {applied_by_kind:?}");
    for kind in [
        "transfer", "create", "commit", "reveal", "stake", "withdraw", "submit", "claim",
    ] {
        assert!(
            applied_by_kind.get(kind).copied().unwrap_or(0) > 0,
            "no successful {kind}: the sequences miss a path"
        );
    }
}
