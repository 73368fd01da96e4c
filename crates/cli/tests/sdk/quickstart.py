"""The quickstart's whole flow through the official SDK (soma-sdk 0.1.15) against `somatrain
localnet`, with exact balance arithmetic after every step and the refusals a user can meet.

Usage: quickstart.py RPC FAUCET SCORING ADMIN BLOBS CONFORMANCE_CASE STATE_OUT
Writes what it saw (balances, model, epoch, claimed target) to STATE_OUT as JSON, so the test can
check it again after the node is killed and restarted.
"""

import asyncio
import json
import math
import sys
import urllib.request

from soma_sdk import Keypair, SomaClient

RPC, FAUCET, SCORING, ADMIN, BLOBS, CASE, STATE_OUT = sys.argv[1:8]

# The network's fee rules (protocol-rpc.md section 4.3), written out independently of the node.
BASE_FEE = 1_000
WRITE_FEE = 300
VALUE_FEE_BPS = 10
BOND_PER_BYTE = 65
SHANNONS = 1_000_000_000


def fee(writes, value_fee=0):
    return BASE_FEE + WRITE_FEE * writes + value_fee


FAILED_FEE = fee(1)  # a failed transaction writes only its gas coin


def shannons(soma):
    return round(soma * SHANNONS)


def put_blob(name, data):
    request = urllib.request.Request(f"{BLOBS}/{name}", data=data, method="PUT")
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200, response.status
    return f"{BLOBS}/{name}"


def cosine_distance(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(y * y for y in b))
    return 1.0 - dot / (na * nb)


async def expect_failure(label, kind, call):
    try:
        await call
    except RuntimeError as error:
        assert kind in str(error), f"{label}: expected {kind}, got {error}"
        print(f"refused as expected: {label} ({kind})")
        return
    raise AssertionError(f"{label}: the transaction should have failed with {kind}")


async def main():
    client = await SomaClient(RPC, faucet_url=FAUCET, scoring_url=SCORING, admin_url=ADMIN)
    assert await client.get_chain_identifier() == "localnet"
    owner, submitter, claimer, payer = (Keypair.generate() for _ in range(4))
    expected = {}

    async def check(who, name):
        got = shannons(await client.get_balance(who.address()))
        assert got == expected[name], f"{name}: balance {got}, expected {expected[name]}"

    # Faucet: one 2-SOMA coin each.
    for who, name in [(owner, "owner"), (submitter, "submitter"), (claimer, "claimer"), (payer, "payer")]:
        response = await client.request_faucet(who.address())
        assert response.status == "Success", response
        expected[name] = 2 * SHANNONS
        await check(who, name)
    dim = await client.get_embedding_dim()
    assert dim == 16, dim

    # Create: the minimum stake (1 SOMA) and its halved value fee come out of the gas coin;
    # writes: gas coin, StakedSoma, system state.
    model_id = await client.create_model(owner, commission_rate=1000)
    stake = SHANNONS
    expected["owner"] -= stake + fee(3, stake * (VALUE_FEE_BPS // 2) // 10_000)
    await check(owner, "owner")

    # Commit: weights encrypted, uploaded to the blob host; writes: gas coin, system state.
    with open(f"{CASE}/weights.safetensors", "rb") as f:
        weights = f.read()
    with open(f"{CASE}/expected.json") as f:
        case = json.load(f)
    embedding = case["embedding"]
    encrypted, key = SomaClient.encrypt_weights(weights)
    weights_url = put_blob(f"model-{model_id}.enc", encrypted)
    await expect_failure(
        "a commit by someone else", "NotModelOwner",
        client.commit_model(submitter, model_id, weights_url, encrypted, key, embedding))
    expected["submitter"] -= FAILED_FEE
    await check(submitter, "submitter")
    await client.commit_model(owner, model_id, weights_url, encrypted, key, embedding)
    expected["owner"] -= fee(2)
    await check(owner, "owner")

    await expect_failure(
        "a reveal in the commit epoch", "ModelRevealEpochMismatch",
        client.reveal_model(owner, model_id, key, embedding))
    expected["owner"] -= FAILED_FEE
    await check(owner, "owner")

    assert await client.advance_epoch() == 1
    _, wrong_key = SomaClient.encrypt_weights(b"other")
    await expect_failure(
        "a reveal with the wrong key", "ModelDecryptionKeyCommitmentMismatch",
        client.reveal_model(owner, model_id, wrong_key, embedding))
    expected["owner"] -= FAILED_FEE
    await client.reveal_model(owner, model_id, key, embedding)
    expected["owner"] -= fee(2)
    await check(owner, "owner")

    active = await client.get_active_models()
    assert [m.model_id for m in active] == [model_id], active
    assert active[0].stake == 1.0, active[0].stake

    # The next epoch brings targets assigned to the model.
    assert await client.advance_epoch() == 2
    targets = await client.get_targets(status="open")
    assert targets, "no open targets after the epoch change"
    assert all(model_id in t.model_ids for t in targets), "the only model must be assigned"
    assert all(len(t.embedding) == dim and t.reward_pool > 0 for t in targets)

    # Score the conformance data with the network's procedure through the scoring service.
    with open(f"{CASE}/data.bin", "rb") as f:
        data = f.read()
    data_url = put_blob(f"data-{model_id}.bin", data)
    manifests = await client.get_model_manifests(targets[0])
    assert len(manifests) == 1 and manifests[0].decryption_key == key
    result = await client.score(data_url, manifests, targets[0].embedding, data=data, seed=case["seed"])
    assert result.winner == 0
    assert abs(result.loss_score[0] - case["loss"]) <= 1e-5 * abs(case["loss"]), result.loss_score
    assert all(abs(a - b) <= 1e-4 for a, b in zip(result.embedding, case["embedding"]))
    # The nearest target, scored again for the official distance.
    target = min(targets, key=lambda t: cosine_distance(result.embedding, t.embedding))
    result = await client.score(data_url, manifests, target.embedding, data=data, seed=case["seed"])
    distance = result.distance[result.winner]
    assert distance <= target.distance_threshold, (distance, target.distance_threshold)

    # Submit: bond = size x 65 from the gas coin; writes: gas coin, the target, its replacement,
    # system state.
    await client.submit_data(submitter, target.id, data, data_url, model_id, result.embedding,
                             distance, result.loss_score)
    bond = len(data) * BOND_PER_BYTE
    expected["submitter"] -= bond + fee(4)
    await check(submitter, "submitter")
    await expect_failure(
        "a second submission to a filled target", "TargetNotOpen",
        client.submit_data(claimer, target.id, data, data_url, model_id, result.embedding,
                           distance, result.loss_score))
    expected["claimer"] -= FAILED_FEE
    await expect_failure("a claim in the audit window", "AuditWindowOpen",
                         client.claim_rewards(claimer, target.id))
    expected["claimer"] -= FAILED_FEE
    await check(claimer, "claimer")

    assert await client.advance_epoch() == 3
    assert await client.advance_epoch() == 4
    claimable = await client.get_targets(claimable=True)
    assert target.id in [t.id for t in claimable]

    # Claim: 49.75% to the submitter (plus the remainder and the bond), 49.75% to the model's
    # owner, 0.5% to the claimer, who pays the halved value fee; writes: gas coin, three payouts.
    reward = target.reward_pool
    model_share = reward * 4975 // 10_000
    claimer_share = reward * 50 // 10_000
    submitter_share = reward - model_share - claimer_share
    await client.claim_rewards(claimer, target.id)
    expected["submitter"] += submitter_share + bond
    expected["owner"] += model_share
    expected["claimer"] += claimer_share - fee(4, reward * (VALUE_FEE_BPS // 2) // 10_000)
    for who, name in [(owner, "owner"), (submitter, "submitter"), (claimer, "claimer")]:
        await check(who, name)

    # Transfer from an account with a single coin (gas and source are the same coin):
    # writes: that coin and the recipient's new coin; value fee 10 bps of the amount.
    amount = SHANNONS // 4
    await client.transfer_coin(payer, owner.address(), 0.25)
    expected["payer"] -= amount + fee(2, amount * VALUE_FEE_BPS // 10_000)
    expected["owner"] += amount
    await check(payer, "payer")
    await check(owner, "owner")

    state = {
        "addresses": {name: who.address() for who, name in
                      [(owner, "owner"), (submitter, "submitter"), (claimer, "claimer"), (payer, "payer")]},
        "balances": expected,
        "model_id": model_id,
        "epoch": (await client.get_epoch()).epoch,
        "claimed_target": target.id,
        "open_targets": sorted(t.id for t in await client.get_targets(status="open")),
    }
    with open(STATE_OUT, "w") as f:
        json.dump(state, f)
    print("quickstart flow passed")


asyncio.run(main())
