"""One SFT step (forward, backward, AdamW) of the 70M model: our LoRA vs our full fine-tuning vs
peft's LoRA on the equivalent Hugging Face GPT2LMHeadModel (same architecture, rank, alpha, targets).

Each contender runs in its own process (peak memory is per process); step time is the median of
the timed steps after one warm-up step. peft and transformers are bench-only extras.

    .venv/bin/python -m bench.lora_step [--batch 4] [--block 512] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from codegpt.base.model import GPT, GPTConfig
from codegpt.finetune.lora import LoRAConfig, apply_lora
from bench.common import hf_gpt2, peak_rss_mib

TARGETS = ["c_attn", "c_proj", "c_fc"]


def build(kind: str, block: int, rank: int, alpha: float):
    torch.manual_seed(0)
    config = GPTConfig(block_size=block, dropout=0.0)
    if kind.startswith("ours"):
        model = GPT(config)
        if kind == "ours-lora":
            apply_lora(model, LoRAConfig(r=rank, alpha=alpha, dropout=0.0, targets=TARGETS))
        return model, lambda x, y: model(x, y)
    import peft

    hf = peft.get_peft_model(hf_gpt2(config), peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=TARGETS,
                                                 fan_in_fan_out=True))
    return hf, lambda x, y: hf(input_ids=x, labels=x).loss


def worker(kind: str, batch: int, block: int, steps: int, rank: int, alpha: float) -> dict:
    model, loss_fn = build(kind, block, rank, alpha)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    x = torch.randint(0, 100_000, (batch, block))
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        loss = loss_fn(x, x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - start)
    return {"kind": kind, "trainable": sum(p.numel() for p in params), "step_s": statistics.median(times),
            "spread_s": max(times) - min(times), "peak_mib": peak_rss_mib()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--block", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.batch, args.block, args.steps, args.rank, args.alpha)))
        return
    rows = []
    for kind in ("ours-lora", "ours-full", "peft-lora"):
        out = subprocess.run([sys.executable, "-m", "bench.lora_step", "--worker", kind, *(f"--{k}={getattr(args, k)}" for k in
                              ("batch", "block", "steps", "rank", "alpha"))], capture_output=True, text=True)
        if out.returncode:
            print(f"{kind}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"SFT step of CodeGPT-70M, {args.batch}x{args.block} tokens, fp32, CPU, {torch.get_num_threads()} threads; "
          f"LoRA r={args.rank} alpha={args.alpha:g} on {', '.join(TARGETS)}")
    print(f"{'contender':<11}{'trainable':>12}{'step s':>9}{'spread s':>10}{'peak MiB':>10}{'time vs ours-lora':>19}")
    for r in rows:
        print(f"{r['kind']:<11}{r['trainable']:>12,}{r['step_s']:>9.2f}{r['spread_s']:>10.2f}{r['peak_mib']:>10.0f}"
              f"{r['step_s'] / rows[0]['step_s']:>18.2f}x")


if __name__ == "__main__":
    main()
