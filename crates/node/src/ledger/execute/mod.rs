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
//!
//! This module checks inputs, charges fees and builds effects; each kind's rules live with its
//! family: `coins`, `staking` (validators and stake), `models` and `submissions`
//! (targets and claims).

use somatrain_protocol::transaction::{
    AddStake, AddStakeToModel, PayCoins, SubmitData, TransferCoin, TransferObjects, WithdrawStake,
};
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

use super::system::{BPS_DENOMINATOR, ModelState, NewModel, PendingCommit, bps};

mod coins;
mod models;
mod staking;
mod submissions;
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
        TransactionKind::TransferCoin(TransferCoin { coin, .. }) => {
            vec![(*coin, Some(ObjectType::Coin))]
        }
        TransactionKind::PayCoins(PayCoins { coins, .. }) => {
            coins.iter().map(|c| (*c, Some(ObjectType::Coin))).collect()
        }
        TransactionKind::TransferObjects(TransferObjects { objects, .. }) => {
            objects.iter().map(|o| (*o, None)).collect()
        }
        TransactionKind::AddStake(AddStake { coin_ref, .. })
        | TransactionKind::AddStakeToModel(AddStakeToModel { coin_ref, .. }) => {
            vec![(*coin_ref, Some(ObjectType::Coin))]
        }
        TransactionKind::WithdrawStake(WithdrawStake { staked_soma }) => {
            vec![(*staked_soma, Some(ObjectType::StakedSoma))]
        }
        TransactionKind::SubmitData(SubmitData { bond_coin, .. }) => {
            vec![(*bond_coin, Some(ObjectType::Coin))]
        }
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
    if let TransactionKind::TransferCoin(TransferCoin {
        amount: Some(FAULT_AMOUNT),
        ..
    }) = &data.kind
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

/// Runs the kind's rules, by family.
fn run_kind(cx: &mut Context<'_>, kind: &TransactionKind) -> Rule<()> {
    use TransactionKind as K;
    match kind {
        K::TransferCoin(_) | K::PayCoins(_) | K::TransferObjects(_) => coins::run(cx, kind),
        K::AddStake(_)
        | K::WithdrawStake(_)
        | K::SetCommissionRate(_)
        | K::ReportValidator(_)
        | K::UndoReportValidator(_) => staking::run(cx, kind),
        K::CreateModel(_)
        | K::CommitModel(_)
        | K::RevealModel(_)
        | K::AddStakeToModel(_)
        | K::SetModelCommissionRate(_)
        | K::DeactivateModel(_)
        | K::ReportModel(_)
        | K::UndoReportModel(_) => models::run(cx, kind),
        K::SubmitData(_)
        | K::ClaimRewards(_)
        | K::ReportSubmission(_)
        | K::UndoReportSubmission(_) => submissions::run(cx, kind),
        TransactionKind::AddValidator(_)
        | TransactionKind::RemoveValidator(_)
        | TransactionKind::UpdateValidatorMetadata(_) => {
            cx.validator_sender()?;
            fail(
                Kind::InvalidTransactionType,
                format!(
                    "{} is not supported by this localnet: its validators are fixed at genesis",
                    kind.name()
                ),
            )
        }
        TransactionKind::Genesis(_)
        | TransactionKind::ConsensusCommitPrologueV1(_)
        | TransactionKind::ChangeEpoch(_) => unreachable!("refused before execution"),
    }
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
