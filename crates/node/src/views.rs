//! The ledger as the network shows it: each piece of chain state as the shared view of
//! `somatrain_rpc::view`, whose `to_proto` the gRPC services send. What the ledger keeps that
//! the network never shows (a model's missed commit window, the fees of the epoch) stays here.

use std::collections::{BTreeMap, BTreeSet};

use somatrain_protocol::object::{Target, TargetStatus};
use somatrain_protocol::{Address, ObjectId, SignedTransaction};
use somatrain_rpc::view::{
    ChainParams, CommitView, Commitments, EpochView, Executed, ModelView, TargetView,
    ValidatorKeysView, ValidatorView,
};

use crate::ledger::SystemState;
use crate::ledger::system::{Model, PROTOCOL_VERSION, PendingCommit};
use crate::ledger::validators::Validator;
use crate::localnet::TransactionRecord;

/// With `with_transaction`, the signed transaction too (what lookups by digest send).
pub fn executed(record: &TransactionRecord, with_transaction: bool) -> Executed {
    let signed = record
        .signed
        .as_deref()
        .filter(|_| with_transaction)
        .and_then(|b| SignedTransaction::from_bcs(b).ok());
    Executed {
        digest: record.digest,
        transaction: signed.as_ref().map(|s| s.data.clone()),
        signatures: signed.map(|s| s.signatures).unwrap_or_default(),
        effects: record.effects.clone(),
        balance_changes: record.balance_changes.clone(),
        objects: record.objects.clone(),
        checkpoint: Some(record.checkpoint),
        timestamp_ms: Some(record.timestamp_ms),
    }
}

fn commit(p: &PendingCommit) -> CommitView {
    CommitView {
        manifest: p.manifest.clone(),
        commitments: Commitments {
            weights: p.weights_commitment,
            embedding: p.embedding_commitment,
            decryption_key: p.decryption_key_commitment,
        },
        commit_epoch: p.commit_epoch,
    }
}

pub fn model(m: &Model) -> ModelView {
    let revealed_commitments = match (
        m.weights_commitment,
        m.embedding_commitment,
        m.decryption_key_commitment,
    ) {
        (Some(weights), Some(embedding), Some(decryption_key)) => Some(Commitments {
            weights,
            embedding,
            decryption_key,
        }),
        _ => None,
    };
    ModelView {
        id: m.id,
        owner: m.owner,
        state: m.state,
        architecture_version: m.architecture_version,
        create_epoch: m.create_epoch,
        stake: m.staking_pool.soma_balance,
        pool_token_balance: m.staking_pool.pool_token_balance,
        pool_id: Some(m.staking_pool.id),
        activation_epoch: m.staking_pool.activation_epoch,
        deactivation_epoch: m.staking_pool.deactivation_epoch,
        commission_bps: m.commission_rate,
        next_commission_bps: m.next_epoch_commission_rate,
        manifest: m.manifest.clone(),
        revealed_commitments,
        decryption_key: m.decryption_key,
        embedding: m.embedding.clone(),
        pending: m.pending.as_ref().map(commit),
    }
}

pub fn validator(v: &Validator) -> ValidatorView {
    let pool = &v.pool;
    ValidatorView {
        address: v.address,
        voting_power: v.voting_power,
        commission_bps: v.commission_rate,
        next_commission_bps: v.next_epoch_commission_rate,
        pool_id: pool.id,
        stake: pool.soma_balance,
        pending_stake: pool.pending_stake,
        next_epoch_stake: v.next_epoch_stake,
        exchange_rates: pool
            .exchange_rates
            .iter()
            .map(|(epoch, rate)| (*epoch, rate.soma_amount, rate.pool_token_amount))
            .collect(),
        rewards_pool: pool.rewards_pool,
        pool_token_balance: pool.pool_token_balance,
        pending_total_soma_withdraw: pool.pending_total_soma_withdraw,
        pending_pool_token_withdraw: pool.pending_pool_token_withdraw,
        activation_epoch: pool.activation_epoch,
        deactivation_epoch: pool.deactivation_epoch,
        keys: ValidatorKeysView {
            protocol_pubkey: v.protocol_pubkey.clone(),
            network_pubkey: v.network_pubkey.clone(),
            worker_pubkey: v.worker_pubkey.clone(),
            proof_of_possession: v.proof_of_possession.clone(),
            net_address: v.net_address.clone(),
            p2p_address: v.p2p_address.clone(),
            primary_address: v.primary_address.clone(),
            proxy_address: v.proxy_address.clone(),
        },
    }
}

fn reporters<K: Ord + Copy>(records: &BTreeMap<K, BTreeSet<Address>>) -> BTreeMap<K, Vec<Address>> {
    records
        .iter()
        .map(|(k, by)| (*k, by.iter().copied().collect()))
        .collect()
}

pub fn epoch(s: &SystemState) -> EpochView {
    let p = &s.params;
    EpochView {
        epoch: s.epoch,
        start_ms: s.epoch_start_ms,
        protocol_version: Some(PROTOCOL_VERSION),
        params: ChainParams {
            epoch_duration_ms: p.epoch_duration_ms,
            model_min_stake: p.model_min_stake,
            model_architecture_version: p.model_architecture_version,
            embedding_dim: p.embedding_dim,
            base_fee: p.base_fee,
            write_object_fee: p.write_object_fee,
            value_fee_bps: p.value_fee_bps,
            submission_bond_per_byte: p.submission_bond_per_byte,
            max_submission_data_size: p.max_submission_bytes,
            model_reward_share_bps: Some(p.model_share_bps),
            models_per_target: p.models_per_target,
            initial_targets_per_epoch: Some(p.initial_targets_per_epoch),
            target_hits_per_epoch: Some(p.target_hits_per_epoch),
            emission_per_epoch: Some(p.emission_per_epoch),
            validator_reward_allocation_bps: Some(p.validator_reward_allocation_bps),
            model_reveal_slash_rate_bps: Some(p.model_reveal_slash_rate_bps),
            model_tally_slash_rate_bps: Some(p.model_tally_slash_rate_bps),
            target_epoch_fee_collection: Some(p.target_epoch_fee_collection),
            min_value_fee_bps: Some(p.min_value_fee_bps),
            max_value_fee_bps: Some(p.max_value_fee_bps),
            fee_adjustment_rate_bps: Some(p.fee_adjustment_rate_bps),
            initial_distance_threshold: Some(p.initial_distance_threshold),
            target_reward_allocation_bps: Some(p.target_reward_allocation_bps),
            hits_ema_decay_bps: Some(p.hits_ema_decay_bps),
            difficulty_adjustment_rate_bps: Some(p.difficulty_adjustment_rate_bps),
            max_distance_threshold: Some(p.max_distance_threshold),
            min_distance_threshold: Some(p.min_distance_threshold),
            submitter_reward_share_bps: Some(p.submitter_share_bps),
            claimer_incentive_bps: Some(p.claimer_share_bps),
            // The network has no challenges yet.
            challenger_bond_per_byte: None,
        },
        distance_threshold: s.target_state.distance_threshold,
        reward_per_target: s.target_state.reward_per_target,
        hits_ema: s.target_state.hits_ema,
        hits_this_epoch: s.target_state.hits_this_epoch,
        targets_generated_this_epoch: s.target_state.targets_generated_this_epoch,
        emission_pool: s.emission_pool,
        total_model_stake: s.models.values().map(|m| m.staking_pool.soma_balance).sum(),
        models: s.models.values().map(model).collect(),
        validators: s.validators.iter().map(validator).collect(),
        validator_reports: reporters(&s.validator_reports),
        model_reports: reporters(&s.model_reports),
    }
}

/// A target's status as the network derives it, virtual `expired` included.
pub fn target_status(t: &Target, epoch: u64) -> &'static str {
    match t.status {
        TargetStatus::Open if t.generation_epoch < epoch => "expired",
        TargetStatus::Open => "open",
        TargetStatus::Filled { .. } => "filled",
        TargetStatus::Claimed => "claimed",
    }
}

pub fn target(id: ObjectId, t: &Target, epoch: u64) -> TargetView {
    TargetView {
        id,
        embedding: t.embedding.values().unwrap_or_default(),
        model_ids: t.model_ids.clone(),
        // Stored thresholds are scalars: the ledger makes them so.
        distance_threshold: t.distance_threshold.scalar_value().unwrap_or(f32::NAN),
        reward_pool: t.reward_pool,
        generation_epoch: t.generation_epoch,
        status: target_status(t, epoch).to_string(),
        fill_epoch: match t.status {
            TargetStatus::Filled { fill_epoch } => Some(fill_epoch),
            _ => None,
        },
        submitter: t.submitter,
        winning_model_id: t.winning_model_id,
        winning_model_owner: t.winning_model_owner,
        bond_amount: t.bond_amount,
        data_url: t.winning_data_manifest.as_ref().map(|m| m.url.clone()),
    }
}
