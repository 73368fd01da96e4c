//! Executing one signed transaction over objects, as the network does (§4.3 of
//! `protocol-rpc.md`, `protocol-models.md`, `protocol-targets.md`).
//!
//! Two outcomes besides success:
//! - **Refused** ([`Refusal`]): the transaction cannot run at all (a system kind, a gas or input
//!   object that is unknown, stale, someone else's or of the wrong type, gas below the base fee).
//!   Nothing changes; the client is told why.
//! - **Failed**: a chain rule said no. As on the network the fee is charged, the gas coin's
//!   version moves, and the effects carry the error kind; nothing else changes.
//!
//! Fees come out of the primary gas coin (`gas_payment[0]`; other gas coins are merged into it):
//! the base fee, `write_object_fee` per object written, and the value fee of the kind.

use std::collections::{BTreeMap, BTreeSet};

use somatrain_protocol::crypto::embedding_commitment;
use somatrain_protocol::effects::{
    BalanceChange, ChangedObject, ExecutionErrorKind as Kind, ExecutionFailure, ExecutionStatus,
    IdOperation, ObjectState, TransactionEffects, TransactionFee,
};
use somatrain_protocol::object::{StakedSoma, TargetStatus};
use somatrain_protocol::{
    Address, EncryptionKey, Object, ObjectId, ObjectRef, ObjectType, Owner, SignedTransaction,
    TransactionKind, TxDigest,
};

use super::system::{BPS_DENOMINATOR, ModelState, PendingCommit, StakingPool, bps};
use super::{Changes, Ledger, Model, Overlay};

/// Why a transaction was refused before execution. Nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{0} transactions come only from the system")]
    SystemKind(&'static str),
    #[error("a transaction needs at least one gas coin")]
    NoGas,
    #[error("gas coin {0} is listed twice")]
    DuplicateGas(ObjectId),
    #[error("Object {0} not found")]
    ObjectNotFound(ObjectId),
    /// Worded as the network words it: the SDK picks another coin on this message.
    #[error(
        "Object ({id}, SequenceNumber({version}), o#{digest}) is not available for consumption, its current version: SequenceNumber({current})"
    )]
    Stale {
        id: ObjectId,
        version: u64,
        digest: String,
        current: u64,
    },
    #[error("object {id} is not owned by the sender {sender}")]
    NotOwned { id: ObjectId, sender: Address },
    #[error("object {id} is a {found}, not a {expected}")]
    WrongType {
        id: ObjectId,
        expected: &'static str,
        found: &'static str,
    },
    #[error("object {0} is both an input and an extra gas coin (merged into the first)")]
    MergedInput(ObjectId),
    #[error("gas coins hold {balance} shannons, below the base fee of {base_fee}")]
    InsufficientGas { balance: u64, base_fee: u64 },
    /// A bug met while executing this transaction: it is refused, nothing changed, and the
    /// node goes on serving.
    #[error("the node failed while executing this transaction ({0}); nothing changed")]
    Panicked(String),
}

/// The amount that makes a `TransferCoin` panic inside execution, in a build with the `faults`
/// feature (the node's own tests), to show that a panic fails one transaction and nothing else.
#[cfg(feature = "faults")]
pub const FAULT_AMOUNT: u64 = 64_023;

impl Refusal {
    /// Refusals a client fixes by picking or re-reading a coin (FAILED_PRECONDITION); the rest
    /// are malformed requests (INVALID_ARGUMENT).
    pub fn is_precondition(&self) -> bool {
        matches!(
            self,
            Refusal::Stale { .. } | Refusal::ObjectNotFound(_) | Refusal::InsufficientGas { .. }
        )
    }
}

/// Everything an executed transaction produced.
#[derive(Debug, Clone)]
pub struct Executed {
    pub effects: TransactionEffects,
    pub changes: Changes,
    pub balance_changes: Vec<BalanceChange>,
}

/// A chain rule's refusal inside execution.
type Rule<T> = Result<T, ExecutionFailure>;

fn fail<T>(kind: Kind, description: impl Into<String>) -> Rule<T> {
    Err(ExecutionFailure {
        kind,
        description: description.into(),
        object_id: None,
    })
}

fn fail_on<T>(kind: Kind, id: ObjectId, description: impl Into<String>) -> Rule<T> {
    Err(ExecutionFailure {
        kind,
        description: description.into(),
        object_id: Some(id),
    })
}

/// The owned objects a kind consumes besides gas, each checked like gas.
fn owned_inputs(kind: &TransactionKind) -> Vec<(ObjectRef, Option<ObjectType>)> {
    match kind {
        TransactionKind::TransferCoin { coin, .. } => vec![(*coin, Some(ObjectType::Coin))],
        TransactionKind::PayCoins { coins, .. } => {
            coins.iter().map(|c| (*c, Some(ObjectType::Coin))).collect()
        }
        TransactionKind::TransferObjects { objects, .. } => {
            objects.iter().map(|o| (*o, None)).collect()
        }
        TransactionKind::AddStake { coin_ref, .. }
        | TransactionKind::AddStakeToModel { coin_ref, .. } => {
            vec![(*coin_ref, Some(ObjectType::Coin))]
        }
        TransactionKind::WithdrawStake { staked_soma } => {
            vec![(*staked_soma, Some(ObjectType::StakedSoma))]
        }
        TransactionKind::SubmitData { bond_coin, .. } => vec![(*bond_coin, Some(ObjectType::Coin))],
        _ => vec![],
    }
}

fn check_owned(
    ledger: &Ledger,
    reference: &ObjectRef,
    sender: Address,
    expected: Option<ObjectType>,
) -> Result<(), Refusal> {
    let object = ledger
        .object(&reference.id)
        .ok_or(Refusal::ObjectNotFound(reference.id))?;
    let digest = object.digest();
    if object.version() != reference.version || digest != reference.digest {
        return Err(Refusal::Stale {
            id: reference.id,
            version: reference.version,
            digest: reference.digest.to_string(),
            current: object.version(),
        });
    }
    if object.owner != Owner::AddressOwner(sender) {
        return Err(Refusal::NotOwned {
            id: reference.id,
            sender,
        });
    }
    if let Some(expected) = expected
        && object.object_type() != expected
    {
        return Err(Refusal::WrongType {
            id: reference.id,
            expected: expected.name(),
            found: object.object_type().name(),
        });
    }
    Ok(())
}

/// Per-transaction execution context: the overlay, ids to create, and the value fee so far.
struct Context<'a> {
    o: Overlay<'a>,
    digest: TxDigest,
    sender: Address,
    gas: ObjectId,
    next_id: u64,
    value_fee: u64,
}

impl Context<'_> {
    fn epoch(&self) -> u64 {
        self.o.system().epoch
    }

    fn fresh_id(&mut self) -> ObjectId {
        let id = ObjectId::derive(&self.digest, self.next_id);
        self.next_id += 1;
        id
    }

    fn coin_balance(&self, id: &ObjectId) -> u64 {
        self.o
            .object(id)
            .and_then(|o| o.coin_balance().ok())
            .unwrap_or(0)
    }

    /// Rewrites a coin's balance, keeping its id, owner and (until finalized) version.
    fn set_coin(&mut self, id: ObjectId, balance: u64) {
        let old = self.o.object(&id).expect("coin exists");
        let owner = match old.owner {
            Owner::AddressOwner(a) => a,
            _ => unreachable!("coins are address-owned"),
        };
        self.o.write(Object::coin(
            id,
            old.version(),
            balance,
            owner,
            old.previous_transaction,
        ));
    }

    fn new_coin(&mut self, owner: Address, balance: u64) {
        if balance == 0 {
            return;
        }
        let id = self.fresh_id();
        self.o
            .write(Object::coin(id, 0, balance, owner, self.digest));
    }

    /// Takes `amount` out of a coin (`None`: all of it). A coin emptied is kept (it may pay gas).
    fn debit(&mut self, coin: ObjectId, amount: Option<u64>, kind: Kind) -> Rule<u64> {
        let balance = self.coin_balance(&coin);
        let amount = amount.unwrap_or(balance);
        if amount > balance {
            return fail_on(
                kind,
                coin,
                format!("coin holds {balance} shannons, {amount} needed"),
            );
        }
        self.set_coin(coin, balance - amount);
        Ok(amount)
    }

    /// Takes stake out of `coin` as the network does: `amount`, or with `None` the whole
    /// coin (the gas coin: all but the fees). A coin other than gas emptied by it is deleted.
    /// Charges the staking value fee (half the rate) and returns the stake.
    fn take_stake(&mut self, coin: ObjectId, amount: Option<u64>) -> Rule<u64> {
        let params = &self.o.system().params;
        let balance = self.coin_balance(&coin);
        let is_gas = coin == self.gas;
        let value_fee = bps(amount.unwrap_or(balance), params.value_fee_bps / 2);
        // The fees of a staking transaction paid from the same coin: the StakedSoma, the gas
        // coin and the system state written.
        let fees = value_fee + params.base_fee + params.write_object_fee * 3;
        let stake = match amount {
            Some(0) => return fail(Kind::InvalidArguments, "amount must be positive"),
            Some(amount) if balance < amount + if is_gas { fees } else { 0 } => {
                return fail_on(
                    Kind::InsufficientCoinBalance,
                    coin,
                    format!("coin holds {balance} shannons; {amount} and the fees needed"),
                );
            }
            Some(amount) => amount,
            None if is_gas => {
                if balance <= fees {
                    return fail_on(
                        Kind::InsufficientCoinBalance,
                        coin,
                        format!("the gas coin's {balance} shannons do not cover fees of {fees}"),
                    );
                }
                balance - fees
            }
            None => balance,
        };
        if !is_gas && stake == balance {
            self.o.delete(coin);
        } else {
            self.set_coin(coin, balance - stake);
        }
        self.value_fee += value_fee;
        Ok(stake)
    }

    fn validator_sender(&self) -> Rule<()> {
        if self.o.system().validator(&self.sender).is_none() {
            return fail(
                Kind::NotAValidator,
                format!("{} is not a validator", self.sender),
            );
        }
        Ok(())
    }

    fn owned_model(&self, id: &ObjectId) -> Rule<Model> {
        let model = self
            .o
            .model(id)
            .cloned()
            .ok_or_else(|| model_not_found(id))?;
        if model.owner != self.sender {
            return fail_on(
                Kind::NotModelOwner,
                *id,
                "only the model's owner may do this",
            );
        }
        Ok(model)
    }

    fn staked_soma(&mut self, pool_id: ObjectId, activation_epoch: u64, principal: u64) {
        let id = self.fresh_id();
        self.o.write(Object::new(
            ObjectType::StakedSoma,
            id,
            0,
            &StakedSoma {
                pool_id,
                stake_activation_epoch: activation_epoch,
                principal,
            },
            Owner::AddressOwner(self.sender),
            self.digest,
        ));
    }
}

fn model_not_found(id: &ObjectId) -> ExecutionFailure {
    ExecutionFailure {
        kind: Kind::ModelNotFound,
        description: format!("no model {id}"),
        object_id: Some(*id),
    }
}

/// Runs `tx` (already signature-checked) against `ledger`.
/// [`execute`], with a panic inside it caught and turned into [`Refusal::Panicked`]: execution
/// only reads the ledger (its writes go to the returned changes), so there is nothing to roll
/// back and no lock is poisoned.
pub fn execute_guarded(ledger: &Ledger, tx: &SignedTransaction) -> Result<Executed, Refusal> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| execute(ledger, tx))).unwrap_or_else(
        |payload| {
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into());
            tracing::error!("executing transaction {} panicked: {message}", tx.digest());
            Err(Refusal::Panicked(message))
        },
    )
}

pub fn execute(ledger: &Ledger, tx: &SignedTransaction) -> Result<Executed, Refusal> {
    let data = &tx.data;
    #[cfg(feature = "faults")]
    if let TransactionKind::TransferCoin {
        amount: Some(FAULT_AMOUNT),
        ..
    } = &data.kind
    {
        panic!("fault injected: a TransferCoin of {FAULT_AMOUNT} shannons");
    }
    let digest = data.digest();
    if data.kind.is_system() {
        return Err(Refusal::SystemKind(data.kind.name()));
    }
    let sender = data.sender;
    let Some(primary) = data.gas_payment.first() else {
        return Err(Refusal::NoGas);
    };
    let mut seen = BTreeSet::new();
    for gas in &data.gas_payment {
        if !seen.insert(gas.id) {
            return Err(Refusal::DuplicateGas(gas.id));
        }
        check_owned(ledger, gas, sender, Some(ObjectType::Coin))?;
    }
    for (input, expected) in owned_inputs(&data.kind) {
        check_owned(ledger, &input, sender, expected)?;
        if data.gas_payment[1..].iter().any(|g| g.id == input.id) {
            return Err(Refusal::MergedInput(input.id));
        }
    }
    let gas_balance: u64 = data
        .gas_payment
        .iter()
        .filter_map(|g| ledger.object(&g.id).and_then(|o| o.coin_balance().ok()))
        .fold(0u64, |a, b| a.saturating_add(b));
    let params = &ledger.system.params;
    if gas_balance < params.base_fee {
        return Err(Refusal::InsufficientGas {
            balance: gas_balance,
            base_fee: params.base_fee,
        });
    }

    let run = |with_kind: bool| -> (Context<'_>, Rule<()>) {
        let mut cx = Context {
            o: Overlay::new(ledger),
            digest,
            sender,
            gas: primary.id,
            next_id: 0,
            value_fee: 0,
        };
        // Merge the other gas coins into the primary one.
        let merged: u64 = data.gas_payment[1..]
            .iter()
            .map(|g| cx.coin_balance(&g.id))
            .sum();
        for extra in &data.gas_payment[1..] {
            cx.o.delete(extra.id);
        }
        let balance = cx.coin_balance(&primary.id);
        cx.set_coin(primary.id, balance + merged);
        let result = if with_kind {
            run_kind(&mut cx, &data.kind).and_then(|()| charge_fees(&mut cx))
        } else {
            charge_fees(&mut cx)
        };
        (cx, result)
    };

    let (cx, status) = match run(true) {
        (cx, Ok(())) => (cx, ExecutionStatus::Success),
        (_, Err(failure)) => {
            // The kind's writes are dropped; the fee is charged on the gas coin alone. A gas coin
            // that cannot cover it pays what it holds.
            let (mut cx, charged) = run(false);
            if charged.is_err() {
                let balance = cx.coin_balance(&cx.gas);
                cx.set_coin(cx.gas, 0);
                cx.o.system_mut().fees_collected += balance;
                cx.value_fee = 0;
            }
            (cx, ExecutionStatus::Failure(failure))
        }
    };
    Ok(finalize(ledger, cx, status, digest))
}

/// Deducts base, write and value fees from the gas coin.
fn charge_fees(cx: &mut Context<'_>) -> Rule<()> {
    let params = cx.o.system().params.clone();
    // Every object this transaction leaves written: the gas coin among them, and the system
    // state object when the kind changed it (models, targets, emissions).
    let written = cx.o.changes.written.len() as u64 + u64::from(cx.o.changes.system.is_some());
    let total = params.base_fee + params.write_object_fee * written + cx.value_fee;
    let balance = cx.coin_balance(&cx.gas);
    if balance < total {
        return fail_on(
            Kind::InsufficientGas,
            cx.gas,
            format!("gas coin holds {balance} shannons; fees are {total}"),
        );
    }
    cx.set_coin(cx.gas, balance - total);
    cx.o.system_mut().fees_collected += total;
    Ok(())
}

fn run_kind(cx: &mut Context<'_>, kind: &TransactionKind) -> Rule<()> {
    let params = cx.o.system().params.clone();
    let epoch = cx.epoch();
    let half_rate = params.value_fee_bps / 2;
    match kind {
        TransactionKind::TransferCoin {
            coin,
            amount,
            recipient,
        } => {
            if *amount == Some(0) {
                return fail(Kind::InvalidArguments, "amount must be positive");
            }
            match amount {
                Some(amount) => {
                    cx.debit(coin.id, Some(*amount), Kind::InsufficientCoinBalance)?;
                    cx.new_coin(*recipient, *amount);
                    cx.value_fee += bps(*amount, params.value_fee_bps);
                }
                None => {
                    let object = cx.o.object(&coin.id).expect("checked input");
                    cx.value_fee += bps(object.coin_balance().unwrap_or(0), params.value_fee_bps);
                    transfer(cx, coin.id, *recipient);
                }
            }
        }
        TransactionKind::PayCoins {
            coins,
            amounts,
            recipients,
        } => {
            let amounts = amounts.clone().unwrap_or_default();
            let Some(first) = coins.first() else {
                return fail(Kind::InvalidArguments, "no coins to pay from");
            };
            let mut unique = BTreeSet::new();
            let mut total = 0u64;
            for coin in coins {
                if unique.insert(coin.id) {
                    total = total.saturating_add(cx.coin_balance(&coin.id));
                }
            }
            for coin in unique.iter().filter(|id| **id != first.id) {
                if *coin == cx.gas {
                    return fail(Kind::InvalidArguments, "the gas coin cannot be merged away");
                }
                cx.o.delete(*coin);
            }
            cx.set_coin(first.id, total);
            if amounts.is_empty() && recipients.len() == 1 {
                cx.value_fee += bps(total, params.value_fee_bps);
                transfer(cx, first.id, recipients[0]);
            } else {
                if amounts.len() != recipients.len() {
                    return fail(
                        Kind::InvalidArguments,
                        format!(
                            "{} amounts for {} recipients",
                            amounts.len(),
                            recipients.len()
                        ),
                    );
                }
                let sum = amounts.iter().fold(0u64, |a, b| a.saturating_add(*b));
                cx.debit(first.id, Some(sum), Kind::InsufficientCoinBalance)?;
                for (amount, recipient) in amounts.iter().zip(recipients) {
                    cx.new_coin(*recipient, *amount);
                }
                cx.value_fee += bps(sum, params.value_fee_bps);
            }
        }
        TransactionKind::TransferObjects { objects, recipient } => {
            for object in objects {
                transfer(cx, object.id, *recipient);
            }
        }
        TransactionKind::AddStake {
            validator: address,
            coin_ref,
            amount,
        } => {
            if cx.o.system().validator(address).is_none() {
                return fail(
                    Kind::ValidatorNotFound,
                    format!("{address} is not a validator"),
                );
            }
            let stake = cx.take_stake(coin_ref.id, *amount)?;
            let receipt =
                cx.o.system_mut()
                    .validator_mut(address)
                    .expect("checked above")
                    .request_add_stake(stake, epoch);
            cx.staked_soma(
                receipt.pool_id,
                receipt.stake_activation_epoch,
                receipt.principal,
            );
        }
        TransactionKind::WithdrawStake { staked_soma } => {
            let receipt =
                cx.o.object(&staked_soma.id)
                    .expect("checked input")
                    .staked_soma()
                    .map_err(|e| ExecutionFailure {
                        kind: Kind::InvalidObjectType,
                        description: e.to_string(),
                        object_id: Some(staked_soma.id),
                    })?;
            // The network's value fee is on the principal, whatever the stake is worth now.
            cx.value_fee += bps(receipt.principal, half_rate);
            if let Some(validator) =
                cx.o.system_mut()
                    .validators
                    .iter_mut()
                    .find(|v| v.pool.id == receipt.pool_id)
            {
                let amount = validator.request_withdraw_stake(&receipt, epoch);
                cx.o.delete(staked_soma.id);
                let sender = cx.sender;
                cx.new_coin(sender, amount);
                return Ok(());
            }
            let Some(mut model) =
                cx.o.system()
                    .models
                    .values()
                    .find(|m| m.staking_pool.id == receipt.pool_id)
                    .cloned()
            else {
                return fail(Kind::StakingPoolNotFound, "no pool for this stake");
            };
            let value = model.staking_pool.redeem_value(receipt.principal);
            model.staking_pool.soma_balance -= value;
            model.staking_pool.pool_token_balance -= receipt.principal;
            cx.o.put_model(model);
            cx.o.delete(staked_soma.id);
            let sender = cx.sender;
            cx.new_coin(sender, value);
        }
        TransactionKind::CreateModel {
            stake_amount,
            commission_rate,
            architecture_version,
        } => {
            if *architecture_version != params.model_architecture_version {
                return fail(
                    Kind::ModelArchitectureVersionMismatch,
                    format!(
                        "architecture {architecture_version}; the network runs {}",
                        params.model_architecture_version
                    ),
                );
            }
            if *stake_amount < params.model_min_stake {
                return fail(
                    Kind::ModelMinStakeNotMet,
                    format!("stake {stake_amount} is below {}", params.model_min_stake),
                );
            }
            if *commission_rate > BPS_DENOMINATOR {
                return fail(
                    Kind::ModelCommissionRateTooHigh,
                    format!("commission {commission_rate} bps exceeds 10000"),
                );
            }
            let value_fee = bps(*stake_amount, half_rate);
            let needed = stake_amount
                .saturating_add(value_fee)
                .saturating_add(params.write_object_fee * 3);
            let balance = cx.coin_balance(&cx.gas);
            if balance < needed {
                return fail_on(
                    Kind::InsufficientCoinBalance,
                    cx.gas,
                    format!("gas coin holds {balance}; stake and fees need {needed}"),
                );
            }
            let gas = cx.gas;
            cx.set_coin(gas, balance - stake_amount);
            let model_id = cx.fresh_id();
            let pool_id = cx.fresh_id();
            cx.o.put_model(Model {
                id: model_id,
                owner: cx.sender,
                architecture_version: *architecture_version,
                state: ModelState::Created,
                create_epoch: epoch,
                pending: None,
                manifest: None,
                weights_commitment: None,
                embedding_commitment: None,
                decryption_key_commitment: None,
                decryption_key: None,
                embedding: None,
                commission_rate: *commission_rate,
                next_epoch_commission_rate: *commission_rate,
                staking_pool: StakingPool {
                    id: pool_id,
                    activation_epoch: Some(epoch),
                    deactivation_epoch: None,
                    soma_balance: *stake_amount,
                    pool_token_balance: *stake_amount,
                },
                commit_window_missed: false,
            });
            cx.staked_soma(pool_id, epoch + 1, *stake_amount);
            cx.value_fee += value_fee;
        }
        TransactionKind::CommitModel {
            model_id,
            manifest,
            weights_commitment,
            embedding_commitment,
            decryption_key_commitment,
        } => {
            let mut model = cx.owned_model(model_id)?;
            let pending = PendingCommit {
                manifest: manifest.clone(),
                weights_commitment: *weights_commitment,
                embedding_commitment: *embedding_commitment,
                decryption_key_commitment: *decryption_key_commitment,
                commit_epoch: epoch,
            };
            match model.state {
                ModelState::Created if !model.commit_window_missed => {
                    model.state = ModelState::Pending;
                    model.pending = Some(pending);
                }
                // An update; a later commit in the same window replaces an earlier one.
                ModelState::Active => model.pending = Some(pending),
                ModelState::Created => {
                    return fail_on(
                        Kind::ModelNotActive,
                        *model_id,
                        "the model missed its commit window",
                    );
                }
                other => {
                    return fail_on(
                        Kind::ModelNotActive,
                        *model_id,
                        format!("a {} model cannot commit", other.name()),
                    );
                }
            }
            cx.o.put_model(model);
        }
        TransactionKind::RevealModel {
            model_id,
            decryption_key,
            embedding,
        } => {
            let mut model = cx.owned_model(model_id)?;
            let Some(pending) = model.pending.clone() else {
                return match model.state {
                    ModelState::Active => {
                        fail_on(Kind::ModelNoPendingUpdate, *model_id, "no update to reveal")
                    }
                    other => fail_on(
                        Kind::ModelNotPending,
                        *model_id,
                        format!("a {} model has nothing to reveal", other.name()),
                    ),
                };
            };
            if epoch != pending.commit_epoch + 1 {
                return fail_on(
                    Kind::ModelRevealEpochMismatch,
                    *model_id,
                    format!(
                        "a commit of epoch {} is revealed in epoch {}, not {epoch}",
                        pending.commit_epoch,
                        pending.commit_epoch + 1
                    ),
                );
            }
            let key = EncryptionKey::from_bytes(decryption_key.0);
            if key.commitment() != pending.decryption_key_commitment {
                return fail_on(
                    Kind::ModelDecryptionKeyCommitmentMismatch,
                    *model_id,
                    "the key does not match its commitment",
                );
            }
            let values = embedding.vector_values().map_err(|e| ExecutionFailure {
                kind: Kind::InvalidArguments,
                description: e.to_string(),
                object_id: None,
            })?;
            if values.len() as u64 != params.embedding_dim {
                return fail(
                    Kind::EmbeddingDimensionMismatch,
                    format!(
                        "embedding has {} values; the network's dimension is {}",
                        values.len(),
                        params.embedding_dim
                    ),
                );
            }
            if values.iter().any(|v| !v.is_finite()) {
                return fail(Kind::InvalidArguments, "embedding holds a non-finite value");
            }
            if embedding_commitment(&values) != pending.embedding_commitment {
                return fail_on(
                    Kind::ModelEmbeddingCommitmentMismatch,
                    *model_id,
                    "the embedding does not match its commitment",
                );
            }
            model.manifest = Some(pending.manifest);
            model.weights_commitment = Some(pending.weights_commitment);
            model.embedding_commitment = Some(pending.embedding_commitment);
            model.decryption_key_commitment = Some(pending.decryption_key_commitment);
            model.decryption_key = Some(*decryption_key);
            model.embedding = Some(values);
            model.pending = None;
            if model.state == ModelState::Pending {
                model.state = ModelState::Active;
            }
            cx.o.put_model(model);
            // The validators check these weights before the epoch closes.
            let revealed = &mut cx.o.system_mut().revealed_this_epoch;
            if !revealed.contains(model_id) {
                revealed.push(*model_id);
            }
        }
        TransactionKind::AddStakeToModel {
            model_id,
            coin_ref,
            amount,
        } => {
            let mut model =
                cx.o.model(model_id)
                    .cloned()
                    .ok_or_else(|| model_not_found(model_id))?;
            if model.state == ModelState::Inactive {
                return fail_on(
                    Kind::ModelAlreadyInactive,
                    *model_id,
                    "the model is inactive",
                );
            }
            let staked = cx.take_stake(coin_ref.id, *amount)?;
            let pool = &mut model.staking_pool;
            let tokens = if pool.soma_balance == 0 || pool.pool_token_balance == 0 {
                staked
            } else {
                ((staked as u128 * pool.pool_token_balance as u128) / pool.soma_balance as u128)
                    as u64
            };
            pool.soma_balance += staked;
            pool.pool_token_balance += tokens;
            let pool_id = pool.id;
            cx.o.put_model(model);
            cx.staked_soma(pool_id, epoch + 1, tokens);
        }
        TransactionKind::SetModelCommissionRate { model_id, new_rate } => {
            let mut model = cx.owned_model(model_id)?;
            if model.state != ModelState::Active {
                return fail_on(Kind::ModelNotActive, *model_id, "the model is not active");
            }
            if *new_rate > BPS_DENOMINATOR {
                return fail(
                    Kind::ModelCommissionRateTooHigh,
                    format!("commission {new_rate} bps exceeds 10000"),
                );
            }
            model.next_epoch_commission_rate = *new_rate;
            cx.o.put_model(model);
        }
        TransactionKind::DeactivateModel { model_id } => {
            let mut model = cx.owned_model(model_id)?;
            match model.state {
                ModelState::Active => {}
                ModelState::Inactive => {
                    return fail_on(Kind::ModelAlreadyInactive, *model_id, "already inactive");
                }
                other => {
                    return fail_on(
                        Kind::ModelNotActive,
                        *model_id,
                        format!("a {} model cannot be deactivated", other.name()),
                    );
                }
            }
            model.state = ModelState::Inactive;
            model.staking_pool.deactivation_epoch = Some(epoch);
            model.pending = None;
            cx.o.put_model(model);
            cx.o.system_mut().model_reports.remove(model_id);
        }
        TransactionKind::SubmitData {
            target_id,
            data_manifest,
            model_id,
            embedding,
            distance_score,
            loss_score,
            bond_coin,
        } => submit_data(
            cx,
            *target_id,
            data_manifest,
            *model_id,
            embedding,
            distance_score,
            loss_score,
            bond_coin.id,
        )?,
        TransactionKind::ClaimRewards { target_id } => claim_rewards(cx, *target_id)?,
        TransactionKind::SetCommissionRate { new_rate } => {
            let sender = cx.sender;
            let Some(validator) = cx.o.system_mut().validator_mut(&sender) else {
                return fail(Kind::NotAValidator, "only a validator sets its commission");
            };
            if *new_rate > BPS_DENOMINATOR {
                return fail(
                    Kind::InvalidArguments,
                    format!("commission {new_rate} bps exceeds 10000"),
                );
            }
            validator.next_epoch_commission_rate = *new_rate;
        }
        TransactionKind::ReportModel { model_id } => {
            cx.validator_sender()?;
            let model =
                cx.o.model(model_id)
                    .ok_or_else(|| model_not_found(model_id))?;
            if model.state != ModelState::Active {
                return fail_on(Kind::ModelNotActive, *model_id, "the model is not active");
            }
            let sender = cx.sender;
            let system = cx.o.system_mut();
            system
                .model_reports
                .entry(*model_id)
                .or_default()
                .insert(sender);
        }
        TransactionKind::UndoReportModel { model_id } => {
            cx.validator_sender()?;
            let sender = cx.sender;
            let system = cx.o.system_mut();
            let removed = system
                .model_reports
                .get_mut(model_id)
                .is_some_and(|reporters| reporters.remove(&sender));
            if !removed {
                return fail_on(
                    Kind::ReportRecordNotFound,
                    *model_id,
                    "this validator has not reported the model",
                );
            }
            system
                .model_reports
                .retain(|_, reporters| !reporters.is_empty());
        }
        TransactionKind::ReportValidator { reportee } => {
            cx.validator_sender()?;
            if cx.o.system().validator(reportee).is_none() {
                return fail(
                    Kind::NotAValidator,
                    format!("{reportee} is not a validator"),
                );
            }
            if *reportee == cx.sender {
                return fail(
                    Kind::CannotReportOneself,
                    "a validator cannot report itself",
                );
            }
            let sender = cx.sender;
            let system = cx.o.system_mut();
            system
                .validator_reports
                .entry(*reportee)
                .or_default()
                .insert(sender);
        }
        TransactionKind::UndoReportValidator { reportee } => {
            cx.validator_sender()?;
            let sender = cx.sender;
            let system = cx.o.system_mut();
            let removed = system
                .validator_reports
                .get_mut(reportee)
                .is_some_and(|reporters| reporters.remove(&sender));
            if !removed {
                return fail(
                    Kind::ReportRecordNotFound,
                    "this validator has not reported that validator",
                );
            }
            system
                .validator_reports
                .retain(|_, reporters| !reporters.is_empty());
        }
        TransactionKind::AddValidator(_)
        | TransactionKind::RemoveValidator { .. }
        | TransactionKind::UpdateValidatorMetadata(_)
        | TransactionKind::ReportSubmission { .. }
        | TransactionKind::UndoReportSubmission { .. } => {
            cx.validator_sender()?;
            return fail(
                Kind::InvalidTransactionType,
                format!(
                    "{} is not supported by this localnet: its validators are fixed at genesis",
                    kind.name()
                ),
            );
        }
        TransactionKind::Genesis { .. }
        | TransactionKind::ConsensusCommitPrologueV1 { .. }
        | TransactionKind::ChangeEpoch { .. } => unreachable!("refused before execution"),
    }
    Ok(())
}

fn transfer(cx: &mut Context<'_>, id: ObjectId, recipient: Address) {
    let mut object = cx.o.object(&id).expect("checked input");
    object.owner = Owner::AddressOwner(recipient);
    cx.o.write(object);
}

fn target_object(
    cx: &Context<'_>,
    id: ObjectId,
) -> Rule<(Object, somatrain_protocol::object::Target)> {
    let object =
        cx.o.object(&id)
            .filter(|o| o.object_type() == ObjectType::Target)
            .ok_or(ExecutionFailure {
                kind: Kind::TargetNotFound,
                description: format!("no target {id}"),
                object_id: Some(id),
            })?;
    let target = object.target().map_err(|e| ExecutionFailure {
        kind: Kind::TargetNotFound,
        description: e.to_string(),
        object_id: Some(id),
    })?;
    Ok((object, target))
}

#[allow(clippy::too_many_arguments)]
fn submit_data(
    cx: &mut Context<'_>,
    target_id: ObjectId,
    manifest: &somatrain_protocol::Manifest,
    model_id: ObjectId,
    embedding: &somatrain_protocol::SomaTensor,
    distance: &somatrain_protocol::SomaTensor,
    loss: &somatrain_protocol::SomaTensor,
    bond_coin: ObjectId,
) -> Rule<()> {
    let params = cx.o.system().params.clone();
    let epoch = cx.epoch();
    let (object, mut target) = target_object(cx, target_id)?;
    if target.status != TargetStatus::Open {
        return fail_on(
            Kind::TargetNotOpen,
            target_id,
            "the target is already filled",
        );
    }
    if epoch > target.generation_epoch {
        return fail_on(
            Kind::TargetExpired,
            target_id,
            format!(
                "a target of epoch {} expired (now epoch {epoch})",
                target.generation_epoch
            ),
        );
    }
    if !target.model_ids.contains(&model_id) {
        return fail_on(
            Kind::ModelNotInTarget,
            model_id,
            "the model is not assigned to this target",
        );
    }
    let invalid = |e: somatrain_protocol::tensor::TensorError| ExecutionFailure {
        kind: Kind::InvalidArguments,
        description: e.to_string(),
        object_id: None,
    };
    let values = embedding.vector_values().map_err(invalid)?;
    let target_dim = target.embedding.shape().first().copied().unwrap_or(0);
    if values.len() as u64 != target_dim {
        return fail(
            Kind::EmbeddingDimensionMismatch,
            format!(
                "embedding has {} values; the target has {target_dim}",
                values.len()
            ),
        );
    }
    if values.iter().any(|v| !v.is_finite()) {
        return fail(Kind::InvalidArguments, "embedding holds a non-finite value");
    }
    let distance_value = distance.scalar_value().map_err(invalid)?;
    loss.values().map_err(invalid)?;
    let threshold = target.distance_threshold.scalar_value().unwrap_or(0.0);
    if !(distance_value.is_finite() && distance_value <= threshold) {
        return fail_on(
            Kind::DistanceExceedsThreshold,
            target_id,
            format!("distance {distance_value} exceeds the threshold {threshold}"),
        );
    }
    if manifest.size > params.max_submission_bytes {
        return fail(
            Kind::DataExceedsMaxSize,
            format!(
                "data of {} bytes exceeds the {}-byte limit",
                manifest.size, params.max_submission_bytes
            ),
        );
    }
    let model =
        cx.o.model(&model_id)
            .cloned()
            .ok_or_else(|| model_not_found(&model_id))?;
    if model.state != ModelState::Active {
        return fail_on(Kind::ModelNotActive, model_id, "the model is not active");
    }
    let bond = manifest
        .size
        .saturating_mul(params.submission_bond_per_byte);
    cx.debit(bond_coin, Some(bond), Kind::InsufficientBond)?;
    target.status = TargetStatus::Filled { fill_epoch: epoch };
    target.submitter = Some(cx.sender);
    target.winning_model_id = Some(model_id);
    target.winning_model_owner = Some(model.owner);
    target.bond_amount = bond;
    target.winning_data_manifest = Some(manifest.clone());
    target.winning_embedding = Some(embedding.clone());
    target.winning_distance_score = Some(distance.clone());
    target.winning_loss_score = Some(loss.clone());
    cx.o.write(Object::new(
        ObjectType::Target,
        target_id,
        object.version(),
        &target,
        object.owner,
        object.previous_transaction,
    ));
    cx.o.system_mut().target_state.hits_this_epoch += 1;
    let n = cx.next_id;
    cx.next_id += 1;
    let digest = cx.digest;
    super::epoch::spawn_target(&mut cx.o, &digest, n);
    Ok(())
}

fn claim_rewards(cx: &mut Context<'_>, target_id: ObjectId) -> Rule<()> {
    let params = cx.o.system().params.clone();
    let epoch = cx.epoch();
    let (_, target) = target_object(cx, target_id)?;
    let reward = target.reward_pool;
    let claimer_share = bps(reward, params.claimer_share_bps);
    let sender = cx.sender;
    match target.status {
        TargetStatus::Filled { fill_epoch } => {
            if epoch <= fill_epoch + 1 {
                return fail_on(
                    Kind::ChallengeWindowOpen,
                    target_id,
                    format!(
                        "filled in epoch {fill_epoch}: claimable from epoch {}",
                        fill_epoch + 2
                    ),
                );
            }
            let model_share = bps(reward, params.model_share_bps);
            let submitter_share = reward - model_share - claimer_share;
            let submitter = target.submitter.expect("filled targets have a submitter");
            let owner = target
                .winning_model_owner
                .expect("filled targets have a model owner");
            cx.new_coin(submitter, submitter_share + target.bond_amount);
            cx.new_coin(owner, model_share);
            cx.new_coin(sender, claimer_share);
        }
        TargetStatus::Open => {
            if epoch <= target.generation_epoch {
                return fail_on(
                    Kind::TargetNotFilled,
                    target_id,
                    format!(
                        "the target is open until the end of epoch {}",
                        target.generation_epoch
                    ),
                );
            }
            cx.new_coin(sender, claimer_share);
            cx.o.system_mut().emission_pool += reward - claimer_share;
        }
        TargetStatus::Claimed => {
            return fail_on(Kind::TargetAlreadyClaimed, target_id, "already claimed");
        }
    }
    cx.o.delete(target_id);
    cx.value_fee += bps(reward, params.value_fee_bps / 2);
    Ok(())
}

/// Sets versions and previous transaction on every written object and builds the effects.
fn finalize(
    ledger: &Ledger,
    cx: Context<'_>,
    status: ExecutionStatus,
    digest: TxDigest,
) -> Executed {
    let epoch = cx.epoch();
    let gas = cx.gas;
    let mut changes = cx.o.changes;
    let input_state = |id: &ObjectId| {
        ledger.object(id).map(|o| ObjectState {
            version: o.version(),
            digest: o.digest(),
            owner: o.owner,
        })
    };
    let touched: BTreeSet<ObjectId> = changes
        .written
        .keys()
        .chain(changes.deleted.iter())
        .copied()
        .collect();
    let lamport_version = touched
        .iter()
        .filter_map(|id| ledger.object(id).map(|o| o.version()))
        .max()
        .unwrap_or(0)
        + 1;
    for object in changes.written.values_mut() {
        object.data.version = lamport_version;
        object.previous_transaction = digest;
    }
    let mut coin_delta: BTreeMap<Address, i128> = BTreeMap::new();
    let mut add = |object: &Object, sign: i128| {
        if let (Owner::AddressOwner(owner), Ok(balance)) = (object.owner, object.coin_balance()) {
            *coin_delta.entry(owner).or_default() += sign * balance as i128;
        }
    };
    let mut changed_objects = Vec::with_capacity(touched.len());
    for id in &touched {
        if let Some(before) = ledger.object(id) {
            add(before, -1);
        }
        let output = changes.written.get(id);
        if let Some(after) = output {
            add(after, 1);
        }
        let input = input_state(id);
        changed_objects.push(ChangedObject {
            id: *id,
            input,
            output: output.map(|o| ObjectState {
                version: o.version(),
                digest: o.digest(),
                owner: o.owner,
            }),
            id_operation: match (input.is_some(), output.is_some()) {
                (false, _) => IdOperation::Created,
                (true, false) => IdOperation::Deleted,
                (true, true) => IdOperation::None,
            },
        });
    }
    let gas_object_index = changed_objects
        .iter()
        .position(|c| c.id == gas)
        .map(|i| i as u32);
    let fees_before = ledger.system.fees_collected;
    let fees_after = changes
        .system
        .as_ref()
        .map_or(fees_before, |s| s.fees_collected);
    let total_fee = fees_after - fees_before;
    let params = &ledger.system.params;
    let value_fee = if status.is_success() { cx.value_fee } else { 0 };
    let base_fee = params.base_fee.min(total_fee);
    let fee = TransactionFee {
        base_fee,
        operation_fee: total_fee - base_fee - value_fee.min(total_fee - base_fee),
        value_fee: value_fee.min(total_fee - base_fee),
        total_fee,
    };
    let balance_changes = coin_delta
        .into_iter()
        .filter(|(_, amount)| *amount != 0)
        .map(|(address, amount)| BalanceChange { address, amount })
        .collect();
    Executed {
        effects: TransactionEffects {
            status,
            executed_epoch: epoch,
            fee,
            transaction_digest: digest,
            gas_object_index,
            dependencies: vec![],
            lamport_version,
            changed_objects,
            unchanged_shared_objects: vec![],
        },
        changes,
        balance_changes,
    }
}

/// A faucet payment: one new coin of the faucet amount for `recipient`, from the reserve, as a
/// system transaction named `digest`. `None` when the reserve is empty.
pub fn faucet(ledger: &Ledger, recipient: Address, digest: TxDigest) -> Option<Executed> {
    let amount = ledger.system.params.faucet_amount;
    if ledger.system.faucet_reserve < amount {
        return None;
    }
    let mut o = Overlay::new(ledger);
    o.system_mut().faucet_reserve -= amount;
    let id = ObjectId::derive(&digest, 0);
    o.write(Object::coin(id, 0, amount, recipient, digest));
    let cx = Context {
        o,
        digest,
        sender: recipient,
        gas: id,
        next_id: 1,
        value_fee: 0,
    };
    let mut executed = finalize(ledger, cx, ExecutionStatus::Success, digest);
    executed.effects.gas_object_index = None;
    Some(executed)
}
