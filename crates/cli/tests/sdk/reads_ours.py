"""The official SDK reads what `somatrain commit` and `reveal` wrote: the model is active with its
stake, and an open target's manifests name the weights URL our publisher uploaded.

Usage: reads_ours.py RPC FAUCET SCORING ADMIN MODEL_ID WEIGHTS_URL
"""

import asyncio
import sys

from soma_sdk import SomaClient

RPC, FAUCET, SCORING, ADMIN, MODEL_ID, WEIGHTS_URL = sys.argv[1:7]


async def main():
    client = await SomaClient(RPC, faucet_url=FAUCET, scoring_url=SCORING, admin_url=ADMIN)
    active = await client.get_active_models()
    ids = [m.model_id for m in active]
    assert ids == [MODEL_ID], f"active models {ids}, expected [{MODEL_ID}]"
    assert active[0].stake == 1.0, active[0].stake
    targets = await client.get_targets(status="open")
    assert targets, "no open targets for our model"
    manifests = await client.get_model_manifests(targets[0])
    assert WEIGHTS_URL in str(manifests), f"{WEIGHTS_URL} not in {manifests}"
    print("the SDK reads what somatrain wrote")


asyncio.run(main())
