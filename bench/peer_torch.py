"""The quickstart's own trainer, timed: soma-models' PyTorch V1 (`soma_models.v1.torch`), trained
as the quickstart trains it (Adam at 1e-4, dropout 0.1, micro-batches of 2 x 1024 with gradient
accumulation, `compute_loss` = cross-entropy + SIGReg), in f32 as it runs or under bf16 autocast.

Usage: python bench/peer_torch.py [--preset v1] [--micro-batch 2] [--accumulation 4]
                                  [--runs 3] [--autocast bf16] [--device cuda]
Prints one JSON line with tokens_per_s and mfu_bf16/mfu_f32-ready numbers, like `somatrain bench`.
Needs: torch and soma-models (pip install soma-models; it is pure Python, plus safetensors).
"""
import argparse, json, time

import torch

from soma_models.v1.torch import Model, ModelConfig, SIGReg, SIGRegConfig, compute_loss

PRESETS = {
    "tiny": (16, 2, 4, 64),
    "small": (64, 2, 4, 256),
    "medium": (512, 4, 2, 2048),
    "v1": (2048, 24, 8, 8192),
}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="v1")
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--accumulation", type=int, default=4)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--autocast", choices=["none", "bf16"], default="none")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    d, layers, heads, ffn = PRESETS[a.preset]
    device = torch.device(a.device)
    cfg = ModelConfig(dropout_rate=0.1, embedding_dim=d, num_layers=layers, num_heads=heads,
                      pwff_hidden_dim=ffn)
    model = Model(cfg).to(device)
    model.train()
    sig_reg = SIGReg(SIGRegConfig()).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    ids = torch.tensor([[(i * 31 + 7 + b) % 256 for i in range(a.seq)] for b in range(a.micro_batch)],
                       device=device)
    targets = torch.roll(ids, -1, dims=1)

    def step():
        optimizer.zero_grad()
        for _ in range(a.accumulation):
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                                enabled=a.autocast == "bf16"):
                loss, _ = compute_loss(model, sig_reg, ids, targets)
            (loss / a.accumulation).backward()
            loss.item()  # as the quickstart does, once per micro-batch
        optimizer.step()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up
    sync()
    times = []
    for _ in range(a.runs):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    times.sort()
    median = times[len(times) // 2]
    tokens = a.micro_batch * a.accumulation * a.seq
    params = sum(p.numel() for p in model.parameters())
    # Forward FLOPs as `somatrain bench` counts them: 2 per weight per token, plus the causal
    # half of attention; a training step is three times that.
    attention = 2 * layers * a.seq * d  # per token, causal half of QK^T and PV
    flops = 3 * tokens * (2 * params + attention)
    out = {
        "bench": "peer-torch-train",
        "implementation": "soma_models.v1.torch (the quickstart's trainer)",
        "precision": "bf16-autocast" if a.autocast == "bf16" else "f32",
        "preset": a.preset,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "micro_batch": a.micro_batch,
        "accumulation": a.accumulation,
        "seconds_per_step": median,
        "tokens_per_s": tokens / median,
        "gflops_per_s": flops / median / 1e9,
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
