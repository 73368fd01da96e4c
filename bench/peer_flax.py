"""Side-by-side peer: the official soma-models (Flax/JAX, CPU, jit) on a somatrain preset.

Usage: python bench/peer_flax.py [score|train] [--preset medium] [--runs 5]
Prints one JSON line with tokens_per_s, like `somatrain bench`.
Install: pip install soma-models jax flax optax
"""
import argparse, json, time

import jax
import jax.numpy as jnp
from flax import nnx

from soma_models.v1.configs import ModelConfig, SIGRegConfig
from soma_models.v1.flax.modules.model import Model
from soma_models.v1.flax.modules.sig_reg import SIGReg
from soma_models.v1.flax.loss import compute_loss

PRESETS = {
    "tiny": (16, 2, 4, 64),
    "small": (64, 2, 4, 256),
    "medium": (512, 4, 2, 2048),
    "v1": (2048, 24, 8, 8192),
}

def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["score", "train"])
    p.add_argument("--preset", default="medium")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--runs", type=int, default=5)
    a = p.parse_args()
    d, layers, heads, ffn = PRESETS[a.preset]
    cfg = ModelConfig(dropout_rate=0.0, embedding_dim=d, num_layers=layers, num_heads=heads, pwff_hidden_dim=ffn)
    rngs = nnx.Rngs(0)
    model = Model(cfg, rngs)
    sig = SIGReg(SIGRegConfig(), rngs)
    tokens = jnp.array([[(i * 31 + 7) % 256 for i in range(a.seq)]] * a.batch, dtype=jnp.int32)
    targets = jnp.roll(tokens, -1, axis=1)

    if a.mode == "score":
        model.eval()
        @nnx.jit
        def step(model, sig, t, y):
            return compute_loss(model, sig, t, y)
    else:
        import optax
        model.train()
        opt = nnx.Optimizer(model, optax.adam(1e-4), wrt=nnx.Param)
        @nnx.jit
        def step(model, opt, sig, t, y):
            def lf(m, s):
                return compute_loss(m, s, t, y)
            (loss, emb), grads = nnx.value_and_grad(lf, has_aux=True)(model, sig)
            opt.update(model, grads)
            return loss, emb

    def run():
        if a.mode == "score":
            out = step(model, sig, tokens, targets)
        else:
            out = step(model, opt, sig, tokens, targets)
        jax.block_until_ready(out)

    run()  # compile
    times = []
    for _ in range(a.runs):
        t0 = time.perf_counter(); run(); times.append(time.perf_counter() - t0)
    times.sort()
    med = times[len(times) // 2]
    print(json.dumps({"peer": "soma-models flax", "mode": a.mode, "preset": a.preset,
                      "tokens": a.batch * a.seq, "seconds_per_run": med,
                      "tokens_per_s": a.batch * a.seq / med, "jax": jax.__version__}))

if __name__ == "__main__":
    main()
