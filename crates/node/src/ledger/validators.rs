//! Validators and their staking pools, by the network's rules (`types/src/system_state/
//! validator.rs` and `staking.rs` of the snapshot the reference cites): delegated stake that
//! activates at the next epoch, each epoch's validator rewards split by voting power, commission
//! paid to the validator as new stake, the rest compounding in the pool through its exchange
//! rate, and voting power out of 10,000 for quorums.
//!
//! Model pools keep their own simpler rule ([`super::system::StakingPool`]): see its doc.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use somatrain_protocol::object::StakedSoma;
use somatrain_protocol::{Address, ObjectId};

use super::system::{BPS_DENOMINATOR, bps};

/// The network's `TOTAL_VOTING_POWER`.
pub const TOTAL_VOTING_POWER: u64 = 10_000;
/// The network's `QUORUM_THRESHOLD`: reports carrying this much voting power decide.
pub const QUORUM_THRESHOLD: u64 = 6_667;
/// The network's `MAX_VOTING_POWER`: no validator holds more while others can take the rest.
pub const MAX_VOTING_POWER: u64 = 1_000;
/// The network's `reward_slashing_rate_bps`: a reported validator loses this much of its
/// epoch reward to the others.
pub const REWARD_SLASHING_RATE_BPS: u64 = 5_000;
/// The network's default genesis stake of a validator: 20,000 SOMA.
pub const GENESIS_VALIDATOR_STAKE: u64 = 20_000 * super::system::SHANNONS_PER_SOMA;

/// Pool tokens and SOMA at the start of an epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExchangeRate {
    pub soma_amount: u64,
    pub pool_token_amount: u64,
}

impl ExchangeRate {
    const NONE: ExchangeRate = ExchangeRate {
        soma_amount: 0,
        pool_token_amount: 0,
    };

    fn is_unset(&self) -> bool {
        self.soma_amount == 0 || self.pool_token_amount == 0
    }

    pub fn soma_for(&self, tokens: u64) -> u64 {
        if self.is_unset() {
            return tokens;
        }
        (self.soma_amount as u128 * tokens as u128 / self.pool_token_amount as u128) as u64
    }

    pub fn tokens_for(&self, soma: u64) -> u64 {
        if self.is_unset() {
            return soma;
        }
        (self.pool_token_amount as u128 * soma as u128 / self.soma_amount as u128) as u64
    }
}

/// A validator's staking pool: the network's `StakingPool`, field for field. New stake waits in
/// `pending_stake` and withdrawals in `pending_*_withdraw` until the epoch change, which records
/// the pool's exchange rate for the new epoch; rewards raise `soma_balance` (and
/// `rewards_pool`) without minting tokens, so every token is worth more.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValidatorPool {
    pub id: ObjectId,
    pub activation_epoch: Option<u64>,
    pub deactivation_epoch: Option<u64>,
    pub soma_balance: u64,
    pub rewards_pool: u64,
    pub pool_token_balance: u64,
    pub exchange_rates: BTreeMap<u64, ExchangeRate>,
    pub pending_stake: u64,
    pub pending_total_soma_withdraw: u64,
    pub pending_pool_token_withdraw: u64,
}

impl ValidatorPool {
    /// A pool active from genesis holding `stake`.
    pub fn genesis(id: ObjectId, stake: u64) -> Self {
        let mut pool = ValidatorPool {
            id,
            activation_epoch: Some(0),
            deactivation_epoch: None,
            soma_balance: 0,
            rewards_pool: 0,
            pool_token_balance: 0,
            exchange_rates: BTreeMap::new(),
            pending_stake: stake,
            pending_total_soma_withdraw: 0,
            pending_pool_token_withdraw: 0,
        };
        pool.process_pending_stake();
        pool.record_exchange_rate(0);
        pool
    }

    /// Shannons this pool holds for its stakers: its balance, plus stake not yet processed,
    /// less withdrawals already paid out but not yet processed.
    pub fn held(&self) -> u64 {
        self.soma_balance + self.pending_stake - self.pending_total_soma_withdraw
    }

    pub fn rate_at(&self, epoch: u64) -> ExchangeRate {
        let Some(activation) = self.activation_epoch else {
            return ExchangeRate::NONE;
        };
        if epoch < activation {
            return ExchangeRate::NONE;
        }
        let epoch = self.deactivation_epoch.map_or(epoch, |d| d.min(epoch));
        self.exchange_rates
            .range(activation..=epoch)
            .next_back()
            .map_or(ExchangeRate::NONE, |(_, rate)| *rate)
    }

    /// Adds stake that activates at `activation_epoch`.
    fn add_stake(&mut self, stake: u64, activation_epoch: u64) -> StakedSoma {
        self.pending_stake += stake;
        if self.activation_epoch.is_none() {
            self.process_pending_stake();
        }
        StakedSoma {
            pool_id: self.id,
            stake_activation_epoch: activation_epoch,
            principal: stake,
        }
    }

    /// Withdraws a receipt in `epoch`: its principal, plus the rewards its pool tokens earned
    /// since it activated (none when it has not activated yet).
    fn withdraw(&mut self, receipt: &StakedSoma, epoch: u64) -> u64 {
        if receipt.stake_activation_epoch > epoch {
            self.pending_stake -= receipt.principal;
            return receipt.principal;
        }
        let tokens = self
            .rate_at(receipt.stake_activation_epoch)
            .tokens_for(receipt.principal);
        let worth = self.rate_at(epoch).soma_for(tokens);
        let rewards = worth
            .saturating_sub(receipt.principal)
            .min(self.rewards_pool);
        self.rewards_pool -= rewards;
        let total = receipt.principal + rewards;
        self.pending_total_soma_withdraw += total;
        self.pending_pool_token_withdraw += tokens;
        if self.deactivation_epoch.is_some() {
            self.process_pending_withdraws();
        }
        total
    }

    fn process_pending_withdraws(&mut self) {
        self.soma_balance -= self.pending_total_soma_withdraw;
        self.pool_token_balance -= self.pending_pool_token_withdraw;
        self.pending_total_soma_withdraw = 0;
        self.pending_pool_token_withdraw = 0;
    }

    fn process_pending_stake(&mut self) {
        let rate = ExchangeRate {
            soma_amount: self.soma_balance,
            pool_token_amount: self.pool_token_balance,
        };
        self.soma_balance += self.pending_stake;
        self.pool_token_balance =
            if self.soma_balance == self.pending_stake && self.pool_token_balance == 0 {
                self.pending_stake
            } else {
                rate.tokens_for(self.soma_balance)
            };
        self.pending_stake = 0;
    }

    fn record_exchange_rate(&mut self, epoch: u64) {
        self.exchange_rates.insert(
            epoch,
            ExchangeRate {
                soma_amount: self.soma_balance,
                pool_token_amount: self.pool_token_balance,
            },
        );
    }

    fn deposit_rewards(&mut self, amount: u64) {
        self.soma_balance += amount;
        self.rewards_pool += amount;
    }

    /// The epoch change into `new_epoch`: withdrawals, then new stake, then the new rate.
    fn advance(&mut self, new_epoch: u64) {
        self.process_pending_withdraws();
        self.process_pending_stake();
        self.record_exchange_rate(new_epoch);
    }
}

/// A validator as the system state holds it. Keys are stored as the network encodes them
/// (BLS12-381 G2 public key, 96 bytes; Ed25519 network and worker keys, 32 bytes; the proof of
/// possession, a 48-byte BLS signature); addresses are multiaddr strings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Validator {
    pub address: Address,
    pub name: String,
    #[serde(with = "hex_bytes")]
    pub protocol_pubkey: Vec<u8>,
    #[serde(with = "hex_bytes")]
    pub network_pubkey: Vec<u8>,
    #[serde(with = "hex_bytes")]
    pub worker_pubkey: Vec<u8>,
    #[serde(with = "hex_bytes")]
    pub proof_of_possession: Vec<u8>,
    pub net_address: String,
    pub p2p_address: String,
    pub primary_address: String,
    pub proxy_address: String,
    pub voting_power: u64,
    pub commission_rate: u64,
    pub next_epoch_commission_rate: u64,
    pub next_epoch_stake: u64,
    pub pool: ValidatorPool,
}

mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        hex::decode(String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

impl Validator {
    /// Stake from `staker`'s coin in `epoch`: it joins the pool and earns from `epoch + 1`.
    pub fn request_add_stake(&mut self, stake: u64, epoch: u64) -> StakedSoma {
        let receipt = self.pool.add_stake(stake, epoch + 1);
        self.next_epoch_stake += stake;
        receipt
    }

    pub fn request_withdraw_stake(&mut self, receipt: &StakedSoma, epoch: u64) -> u64 {
        let amount = self.pool.withdraw(receipt, epoch);
        self.next_epoch_stake = self.next_epoch_stake.saturating_sub(amount);
        amount
    }
}

/// Voting power out of [`TOTAL_VOTING_POWER`], by stake, capped at [`MAX_VOTING_POWER`] (or at
/// the least cap that lets everything be handed out), the remainder shared equally, one more
/// to the largest stakes first. The network's `set_voting_power`.
pub fn set_voting_power(validators: &mut [Validator]) {
    let total_stake: u64 = validators.iter().map(|v| v.pool.soma_balance).sum();
    if total_stake == 0 || validators.is_empty() {
        return;
    }
    let cap = TOTAL_VOTING_POWER
        .div_ceil(validators.len() as u64)
        .clamp(MAX_VOTING_POWER, TOTAL_VOTING_POWER);
    let mut order: Vec<usize> = (0..validators.len()).collect();
    order.sort_by(|&a, &b| {
        let (a, b) = (&validators[a], &validators[b]);
        b.pool
            .soma_balance
            .cmp(&a.pool.soma_balance)
            .then_with(|| a.address.cmp(&b.address))
    });
    let mut handed_out = 0;
    for &i in &order {
        let v = &mut validators[i];
        let share =
            (v.pool.soma_balance as u128 * TOTAL_VOTING_POWER as u128 / total_stake as u128) as u64;
        v.voting_power = share.min(cap);
        handed_out += v.voting_power;
    }
    let remaining = TOTAL_VOTING_POWER.saturating_sub(handed_out);
    let each = remaining / validators.len() as u64;
    let leftover = remaining % validators.len() as u64;
    for (rank, &i) in order.iter().enumerate() {
        validators[i].voting_power += each + u64::from((rank as u64) < leftover);
    }
}

/// The summed voting power of those `addresses` that are validators.
pub fn voting_power_of(validators: &[Validator], addresses: &BTreeSet<Address>) -> u64 {
    validators
        .iter()
        .filter(|v| addresses.contains(&v.address))
        .map(|v| v.voting_power)
        .sum()
}

/// What the epoch change did for the validators.
#[derive(Debug, Default)]
pub struct EpochRewards {
    /// Shannons credited to validators and their pools; the rest of the allocation goes back
    /// to the emission pool.
    pub distributed: u64,
    /// Each validator's commission, staked with its own pool as a new `StakedSoma`.
    pub commissions: Vec<(Address, StakedSoma)>,
}

/// The validators' part of the epoch change into `new_epoch` (the network's
/// `ValidatorSet::advance_epoch`): the allocation is split by voting power (a validator reported
/// by a quorum gives up [`REWARD_SLASHING_RATE_BPS`] of its share to the others), commission is
/// staked for the validator, the rest compounds in the pool; then commissions rotate, pools
/// process their pending stake and withdrawals, and voting power is set anew.
pub fn advance_epoch(
    validators: &mut [Validator],
    reports: &BTreeMap<Address, BTreeSet<Address>>,
    allocation: u64,
    new_epoch: u64,
) -> EpochRewards {
    let mut outcome = EpochRewards::default();
    let total_power: u64 = validators.iter().map(|v| v.voting_power).sum();
    if total_power > 0 {
        let slashed: BTreeSet<Address> = reports
            .iter()
            .filter(|(reportee, reporters)| {
                validators.iter().any(|v| v.address == **reportee)
                    && voting_power_of(validators, reporters) >= QUORUM_THRESHOLD
            })
            .map(|(reportee, _)| *reportee)
            .collect();
        let unadjusted: Vec<u64> = validators
            .iter()
            .map(|v| (v.voting_power as u128 * allocation as u128 / total_power as u128) as u64)
            .collect();
        let mut cuts = vec![0u64; validators.len()];
        for (i, v) in validators.iter().enumerate() {
            if slashed.contains(&v.address) {
                cuts[i] = bps(unadjusted[i], REWARD_SLASHING_RATE_BPS);
            }
        }
        let total_cut: u64 = cuts.iter().sum();
        let unslashed_power = total_power - voting_power_of(validators, &slashed);
        for (i, v) in validators.iter_mut().enumerate() {
            let reward = if slashed.contains(&v.address) {
                unadjusted[i] - cuts[i]
            } else {
                unadjusted[i]
                    + (total_cut as u128 * v.voting_power as u128 / unslashed_power as u128) as u64
            };
            let commission =
                (reward as u128 * v.commission_rate as u128 / BPS_DENOMINATOR as u128) as u64;
            if commission > 0 {
                let receipt = v.request_add_stake(commission, new_epoch - 1);
                outcome.commissions.push((v.address, receipt));
            }
            let to_stakers = reward - commission;
            if to_stakers > 0 {
                v.next_epoch_stake += to_stakers;
                v.pool.deposit_rewards(to_stakers);
            }
            outcome.distributed += reward;
        }
    }
    for v in validators.iter_mut() {
        v.commission_rate = v.next_epoch_commission_rate;
        v.pool.advance(new_epoch);
    }
    set_voting_power(validators);
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    fn validator(seed: u8, stake: u64) -> Validator {
        Validator {
            address: Address([seed; 32]),
            name: format!("v{seed}"),
            protocol_pubkey: vec![],
            network_pubkey: vec![],
            worker_pubkey: vec![],
            proof_of_possession: vec![],
            net_address: String::new(),
            p2p_address: String::new(),
            primary_address: String::new(),
            proxy_address: String::new(),
            voting_power: 0,
            commission_rate: 0,
            next_epoch_commission_rate: 0,
            next_epoch_stake: stake,
            pool: ValidatorPool::genesis(ObjectId([seed; 32]), stake),
        }
    }

    #[test]
    fn voting_power_is_capped_and_sums_to_the_total() {
        let mut one = vec![validator(1, 5)];
        set_voting_power(&mut one);
        assert_eq!(one[0].voting_power, TOTAL_VOTING_POWER);

        // Four equal stakes: the cap rises to 2,500 so that everything is handed out.
        let mut four: Vec<Validator> = (1..=4).map(|i| validator(i, 100)).collect();
        set_voting_power(&mut four);
        assert!(four.iter().all(|v| v.voting_power == 2_500));

        // Twelve validators, one with half the stake: it is capped at 1,000 and the remainder
        // goes to everyone equally, the largest stakes first for the odd units.
        let mut twelve: Vec<Validator> = (1..=11).map(|i| validator(i, 10)).collect();
        twelve.push(validator(12, 110));
        set_voting_power(&mut twelve);
        let total: u64 = twelve.iter().map(|v| v.voting_power).sum();
        assert_eq!(total, TOTAL_VOTING_POWER);
        // 110/220 of 10,000 = 5,000, capped at 1,000; each small one 454; 10,000 - 1,000 -
        // 11 × 454 = 4,006 left: 333 each and 10 over, one each to the first ten by stake.
        assert_eq!(twelve[11].voting_power, 1_000 + 333 + 1);
        let small: Vec<u64> = twelve[..11].iter().map(|v| v.voting_power).collect();
        assert_eq!(small.iter().filter(|p| **p == 454 + 333 + 1).count(), 9);
        assert_eq!(small.iter().filter(|p| **p == 454 + 333).count(), 2);
    }

    #[test]
    fn stake_earns_from_the_epoch_after_it_joins() {
        let mut v = vec![validator(1, 1_000)];
        set_voting_power(&mut v);
        // Epoch 0: someone stakes 1,000; it waits in pending_stake.
        let receipt = v[0].request_add_stake(1_000, 0);
        assert_eq!(receipt.stake_activation_epoch, 1);
        assert_eq!(
            (v[0].pool.soma_balance, v[0].pool.pending_stake),
            (1_000, 1_000)
        );
        // Into epoch 1 with 500 of rewards: all of it goes to the genesis stake (the new stake
        // had not joined yet), then the new stake joins at the rate 1,500 SOMA per 1,000
        // tokens, so it gets 666 tokens.
        advance_epoch(&mut v, &BTreeMap::new(), 500, 1);
        let pool = &v[0].pool;
        assert_eq!(pool.soma_balance, 2_500);
        assert_eq!(pool.pool_token_balance, 1_666);
        // Into epoch 2 with 2,500 of rewards: the pool doubles, to 5,000 for 1,666 tokens.
        advance_epoch(&mut v, &BTreeMap::new(), 2_500, 2);
        // The receipt's 666 tokens are worth 666 × 5,000 / 1,666 = 1,998 now: 998 of reward.
        let paid = v[0].request_withdraw_stake(&receipt, 2);
        assert_eq!(paid, 1_998);
        assert_eq!(v[0].pool.rewards_pool, 3_000 - 998);
        advance_epoch(&mut v, &BTreeMap::new(), 0, 3);
        assert_eq!(v[0].pool.soma_balance, 5_000 - 1_998);
        assert_eq!(v[0].pool.pool_token_balance, 1_000);
    }

    #[test]
    fn stake_withdrawn_before_it_activates_returns_the_principal() {
        let mut v = [validator(1, 1_000)];
        let receipt = v[0].request_add_stake(700, 4);
        assert_eq!(v[0].request_withdraw_stake(&receipt, 4), 700);
        assert_eq!(v[0].pool.pending_stake, 0);
        assert_eq!(v[0].pool.held(), 1_000);
    }

    #[test]
    fn commission_is_staked_for_the_validator_and_a_reported_one_pays_the_others() {
        let mut v: Vec<Validator> = (1..=4).map(|i| validator(i, 1_000)).collect();
        set_voting_power(&mut v);
        v[0].commission_rate = 1_000;
        v[0].next_epoch_commission_rate = 2_000;
        // Three validators (7,500 of voting power) report the fourth.
        let reporters: BTreeSet<Address> = v[..3].iter().map(|v| v.address).collect();
        let reports = BTreeMap::from([(v[3].address, reporters)]);
        let outcome = advance_epoch(&mut v, &reports, 4_000, 1);
        // 1,000 each unadjusted; the fourth loses 500, shared 7,500ths-wise: 166 to each other.
        assert_eq!(outcome.distributed, 3 * 1_166 + 500);
        // 10% commission on 1,166 = 116, staked (pending until the next change, then joined).
        assert_eq!(outcome.commissions.len(), 1);
        assert_eq!(outcome.commissions[0].1.principal, 116);
        assert_eq!(outcome.commissions[0].1.stake_activation_epoch, 1);
        assert_eq!(v[0].pool.soma_balance, 1_000 + 1_050 + 116);
        assert_eq!(v[3].pool.soma_balance, 1_500);
        assert_eq!(v[0].commission_rate, 2_000);
    }
}
