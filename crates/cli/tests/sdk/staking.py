"""Staking with the localnet's validator through the official SDK (soma-sdk 0.1.15): the
validator as `get_latest_system_state()` shows it, `add_stake`, activation at the next epoch,
rewards over two epochs, `withdraw_stake`, and a withdrawal before activation; every balance
and the pool checked against the network's rules, computed here independently of the node.

Usage: staking.py RPC FAUCET ADMIN
The localnet must run with `--faucet-amount 100000000000000` (100,000 SOMA per request).
"""

import asyncio
import sys

from soma_sdk import Keypair, SomaClient

RPC, FAUCET, ADMIN = sys.argv[1:4]

BASE_FEE = 1_000
WRITE_FEE = 300
VALUE_FEE_BPS = 10
SHANNONS = 1_000_000_000
FAUCET_AMOUNT = 100_000 * SHANNONS
GENESIS_STAKE = 20_000 * SHANNONS  # the network's default validator stake
VALIDATOR_SHARE_BPS = 7_000  # validator_reward_allocation_bps
COMMISSION_BPS = 200  # the localnet validator's commission


def fee(writes, value_fee=0):
    return BASE_FEE + WRITE_FEE * writes + value_fee


def shannons(soma):
    return round(soma * SHANNONS)


class Pool:
    """The validator's staking pool as the network's rules move it."""

    def __init__(self):
        self.soma = GENESIS_STAKE
        self.tokens = GENESIS_STAKE
        self.pending = 0
        self.rates = {0: (GENESIS_STAKE, GENESIS_STAKE)}

    def epoch_change(self, new_epoch, epoch_fees):
        # No emission: the admin closes epochs long before their 24 h are up.
        reward = epoch_fees * VALIDATOR_SHARE_BPS // 10_000
        commission = reward * COMMISSION_BPS // 10_000
        self.soma += reward - commission
        self.pending += commission
        before = (self.soma, self.tokens)
        self.soma += self.pending
        self.tokens = before[1] * self.soma // before[0]
        self.pending = 0
        self.rates[new_epoch] = (self.soma, self.tokens)
        return reward, commission

    def value(self, principal, activation_epoch, epoch):
        soma_at, tokens_at = self.rates[activation_epoch]
        tokens = tokens_at * principal // soma_at
        soma_now, tokens_now = self.rates[epoch]
        return soma_now * tokens // tokens_now


async def main():
    client = await SomaClient(RPC, faucet_url=FAUCET, admin_url=ADMIN)
    state = await client.get_latest_system_state()
    validators = state.validators.validators
    assert len(validators) == 1, validators
    validator = validators[0]
    address = validator.metadata.soma_address
    assert validator.voting_power == 10_000, validator.voting_power
    assert validator.commission_rate == COMMISSION_BPS, validator.commission_rate
    assert validator.staking_pool.soma_balance == GENESIS_STAKE
    assert state.validators.total_stake == GENESIS_STAKE
    print(f"validator {address}: voting power 10000, {GENESIS_STAKE // SHANNONS} SOMA staked")

    staker, payer, other = Keypair.generate(), Keypair.generate(), Keypair.generate()
    balance = {}
    for who, name in [(staker, "staker"), (payer, "payer")]:
        assert (await client.request_faucet(who.address())).status == "Success"
        balance[name] = FAUCET_AMOUNT

    async def check(who, name):
        got = shannons(await client.get_balance(who.address()))
        assert got == balance[name], f"{name}: balance {got}, expected {balance[name]}"

    pool = Pool()
    epoch = (await client.get_epoch()).epoch
    assert epoch == 0, epoch

    # Epoch 0: stake 20,000 SOMA from the staker's only coin (gas and stake the same coin):
    # writes the coin, the StakedSoma and the system state; the value fee is half the rate.
    principal = 20_000 * SHANNONS
    stake_fee = fee(3, principal * (VALUE_FEE_BPS // 2) // 10_000)
    await client.add_stake(staker, address, 20_000.0)
    balance["staker"] -= principal + stake_fee
    await check(staker, "staker")
    staked = await client.list_owned_objects(staker.address(), "staked_soma")
    assert len(staked) == 1, staked
    staked_id = staked[0].id
    pool.pending += principal
    fees = [stake_fee]

    # Two epochs of fees: a transfer of 10,000 SOMA in each (writes: its coin and the new one).
    for _ in range(2):
        epoch += 1
        await client.advance_epoch()
        reward, commission = pool.epoch_change(epoch, sum(fees))
        fees = []
        amount = 10_000 * SHANNONS
        transfer_fee = fee(2, amount * VALUE_FEE_BPS // 10_000)
        await client.transfer_coin(payer, other.address(), 10_000.0)
        balance["payer"] -= amount + transfer_fee
        await check(payer, "payer")
        fees.append(transfer_fee)
        state = await client.get_latest_system_state()
        chain_pool = state.validators.validators[0].staking_pool
        assert chain_pool.soma_balance == pool.soma, (epoch, chain_pool.soma_balance, pool.soma)
        assert chain_pool.pool_token_balance == pool.tokens, (epoch, chain_pool.pool_token_balance)
        print(f"epoch {epoch}: validators earned {reward} shannons ({commission} commission)")
    epoch += 1
    await client.advance_epoch()
    pool.epoch_change(epoch, sum(fees))

    # Epoch 3: withdraw. The stake activated in epoch 1 and earned through the changes into
    # epochs 2 and 3; the value fee is on the principal; writes: gas coin, new coin, system.
    worth = pool.value(principal, 1, epoch)
    assert worth > principal, (worth, principal)
    await client.withdraw_stake(staker, staked_id)
    balance["staker"] += worth - fee(3, principal * (VALUE_FEE_BPS // 2) // 10_000)
    await check(staker, "staker")
    print(f"withdrew {principal} principal and {worth - principal} shannons of rewards")

    # Stake withdrawn before it activates comes back whole. A fresh account with one coin, so
    # that the SDK's stake coin is its gas coin (three writes, as above).
    early = Keypair.generate()
    assert (await client.request_faucet(early.address())).status == "Success"
    balance["early"] = FAUCET_AMOUNT
    await client.add_stake(early, address, 1.0)
    balance["early"] -= SHANNONS + fee(3, SHANNONS * (VALUE_FEE_BPS // 2) // 10_000)
    await check(early, "early")
    staked = await client.list_owned_objects(early.address(), "staked_soma")
    assert len(staked) == 1, staked
    await client.withdraw_stake(early, staked[0].id)
    balance["early"] += SHANNONS - fee(3, SHANNONS * (VALUE_FEE_BPS // 2) // 10_000)
    await check(early, "early")
    print("staking flow passed")


asyncio.run(main())
