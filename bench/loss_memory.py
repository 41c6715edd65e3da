"""Peak memory of one training step (forward, backward, AdamW step) of the seed's 70M model at
4 x 1024 tokens: our chunked head + loss against a naive loss over full float32 logits.

Each contender runs in a fresh process, so each peak is its own. Rows come with the seed's
dropout 0.1 and with 0.0: on CPU, PyTorch's fused attention has no dropout, so attention dropout
falls back to the math kernel and its T x T matrices (about 0.5 GB a layer here); on CUDA the
flash kernel does dropout and the two settings cost the same.

    .venv/bin/python -m bench.loss_memory [--batch 4] [--block 1024] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from codegpt.base.model import GPT, GPTConfig
from bench.common import peak_rss_mib, rss_mib


def worker(loss_kind: str, batch: int, block: int, device: str, dropout: float) -> dict:
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=block, dropout=dropout)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    idx = torch.randint(0, 100_277, (batch, block), device=device)
    targets = torch.randint(0, 100_277, (batch, block), device=device)
    # The baseline holds what every contender holds: weights, gradients and AdamW's two moments.
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)
    baseline = rss_mib() if device == "cpu" else torch.cuda.memory_allocated() / 2**20
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    if loss_kind == "chunked":
        loss = model(idx, targets)
    else:
        logits = model(idx)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
    loss.backward()
    optimizer.step()
    seconds = time.perf_counter() - start
    peak = peak_rss_mib() if device == "cpu" else torch.cuda.max_memory_allocated() / 2**20
    return {"loss": loss_kind, "dropout": dropout, "value": loss.item(), "baseline_mib": baseline, "peak_mib": peak, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--block", type=int, default=1024)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--worker", choices=("chunked", "naive"), help=argparse.SUPPRESS)
    parser.add_argument("--dropout", type=float, default=0.1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.batch, args.block, args.device, args.dropout)))
        return
    rows = []
    for dropout in (0.1, 0.0):
        for kind in ("chunked", "naive"):
            out = subprocess.run([sys.executable, "-m", "bench.loss_memory", "--worker", kind, "--batch", str(args.batch),
                                  "--block", str(args.block), "--device", args.device, "--dropout", str(dropout)],
                                 capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    memory = "peak RSS" if args.device == "cpu" else "peak allocated"
    print(f"One train step of CodeGPT-70M at {args.batch}x{args.block} tokens, fp32, {args.device}, {memory}")
    print(f"{'loss':<9}{'dropout':>8}{'loss value':>11}{'weights+optim MiB':>19}{'peak MiB':>10}"
          f"{'step MiB':>10}{'seconds':>9}{'peak vs naive':>15}")
    for i, r in enumerate(rows):
        naive = rows[i | 1]
        print(f"{r['loss']:<9}{r['dropout']:>8.1f}{r['value']:>11.4f}{r['baseline_mib']:>19.0f}{r['peak_mib']:>10.0f}"
              f"{r['peak_mib'] - r['baseline_mib']:>10.0f}{r['seconds']:>9.1f}{r['peak_mib'] / naive['peak_mib']:>14.2f}x")


if __name__ == "__main__":
    main()
