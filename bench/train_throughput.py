"""Training throughput and MFU of the tiny and the 70M configs, eager and compiled, in one run.

MFU = model FLOPs per second / a matmul peak measured in this same run on this same device
(fp32 on CPU). Model FLOPs per token = 6 x (matmul parameters, the tied head included) +
12 x n_layer x n_embd x block_size (attention scores and values, forward and backward).
Also prints an estimate, from the FLOP count alone, of the 70M recipe's wall time on one A100.

    .venv/bin/python -m bench.train_throughput [--steps 3] [--device cpu|cuda] [--skip-compile]
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.common import flops_per_token, matmul_peak, sync
from codegpt.base.recipe_loader import load_recipe
from codegpt.base.model import GPT, GPTConfig
from codegpt.base.recipe import PretrainRecipe

A100_BF16_PEAK = 312e12  # dense bf16 tensor-core FLOP/s, NVIDIA's datasheet
ASSUMED_A100_MFU = 0.40  # typical for a ~100M GPT at 1024 context with torch.compile and flash attention


def train_tokens_per_s(config: GPTConfig, batch: int, steps: int, device: str, compiled: bool) -> float:
    torch.manual_seed(0)
    model = GPT(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    step_model = torch.compile(model) if compiled else model
    x = torch.randint(0, 100_000, (batch, config.block_size), device=device)

    def step():
        loss = step_model(x, x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up (and compilation)
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return batch * config.block_size * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-compile", action="store_true")
    args = parser.parse_args()
    tiny = load_recipe(PretrainRecipe, "recipes/pretrain-tiny.yaml")
    seed = load_recipe(PretrainRecipe, "recipes/pretrain-70m.yaml")
    contenders = [("tiny", tiny.model, tiny.train.micro_batch_size), ("70M", seed.model, 1)]
    peak = matmul_peak(args.device)
    print(f"device {args.device}, {torch.get_num_threads()} threads, fp32; measured matmul peak "
          f"{peak / 1e9:.1f} GFLOP/s")
    print(f"{'model':<6}{'mode':<10}{'batch':>10}{'tokens/s':>11}{'GFLOP/s':>10}{'MFU':>7}")
    for name, config, batch in contenders:
        for compiled in (False, True):
            if compiled and args.skip_compile:
                continue
            tps = train_tokens_per_s(config, batch, args.steps, args.device, compiled)
            achieved = tps * flops_per_token(config)
            print(f"{name:<6}{'compiled' if compiled else 'eager':<10}{f'{batch}x{config.block_size}':>10}"
                  f"{tps:>11,.0f}{achieved / 1e9:>10.1f}{achieved / peak:>7.0%}")
    total = flops_per_token(seed.model) * seed.train.max_steps * seed.train.batch_tokens
    hours = total / (A100_BF16_PEAK * ASSUMED_A100_MFU) / 3600
    print(f"estimate: recipes/pretrain-70m.yaml = {total:.2e} FLOPs = {hours:.1f} h on one A100 at "
          f"{ASSUMED_A100_MFU:.0%} MFU of {A100_BF16_PEAK / 1e12:.0f} TFLOP/s bf16 (an estimate from the FLOP count, not a measurement)")


if __name__ == "__main__":
    main()
