"""After `kill -9` and a restart, the SDK sees exactly the state the quickstart left.

Usage: after_restart.py RPC FAUCET SCORING ADMIN STATE_JSON
"""

import asyncio
import json
import sys

from soma_sdk import SomaClient

RPC, FAUCET, SCORING, ADMIN, STATE = sys.argv[1:6]


async def main():
    with open(STATE) as f:
        state = json.load(f)
    client = await SomaClient(RPC, faucet_url=FAUCET, scoring_url=SCORING, admin_url=ADMIN)
    for name, address in state["addresses"].items():
        got = round(await client.get_balance(address) * 1_000_000_000)
        assert got == state["balances"][name], f"{name}: {got} != {state['balances'][name]}"
    assert (await client.get_epoch()).epoch == state["epoch"]
    active = await client.get_active_models()
    assert [m.model_id for m in active] == [state["model_id"]], active
    open_targets = sorted(t.id for t in await client.get_targets(status="open"))
    assert open_targets == state["open_targets"]
    claimable = [t.id for t in await client.get_targets(claimable=True)]
    assert state["claimed_target"] not in claimable
    print("state after restart matches")


asyncio.run(main())
