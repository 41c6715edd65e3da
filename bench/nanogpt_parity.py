"""Loss parity with nanoGPT: the same initial weights and the same batches through CodeGPT's model
(its loss path, whichever the device picks) and through nanoGPT's model.py, with the same
optimizer and schedule, for a few optimizer steps of the seed's size.

Both use exact GELU (nanoGPT's model.py has no tanh variant), dropout 0, AdamW with decay on
matrices only (`base.optimizers.make_optimizers`), the seed's lr and betas with a 2-step warm-up,
clipping at 1.0, and bf16 autocast on a GPU (fp32 on CPU). Prints both loss curves and the
largest relative difference; the target is 0.5% over 12 steps of 2^19 tokens in bf16.

    python -m bench.nanogpt_parity --nanogpt PATH/model.py --train-bin SHARD.train.bin [--steps 12]
    python -m bench.nanogpt_parity --nanogpt PATH/model.py --train-bin ... --tiny   # a CPU check

nanoGPT's model.py is not part of CodeGPT: pass the file (../shared/peers/nanogpt_model.py here).
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np
import torch

from codegpt.base.model import GPT, GPTConfig
from codegpt.base.optimizers import make_optimizers
from codegpt.base.recipe import TrainConfig
from codegpt.base.train import learning_rate
from bench.common import nanogpt, nanogpt_module

SEED = dataclasses.replace(GPTConfig(), dropout=0.0, activation="gelu")
TINY = GPTConfig(block_size=128, vocab_size=100_352, n_layer=2, n_head=4, n_embd=64, dropout=0.0, activation="gelu")


def twin_models(nanogpt_path: str, config: GPTConfig, device: str):
    """CodeGPT and nanoGPT holding the same weights (CodeGPT's initialisation)."""
    torch.manual_seed(1337)
    ours = GPT(config).to(device)
    theirs = nanogpt(nanogpt_module(nanogpt_path), config).to(device)
    missing, unexpected = theirs.load_state_dict(ours.state_dict(), strict=False)
    # nanoGPT registers a causal-mask buffer per layer when flash attention is unavailable.
    if unexpected or any(not key.endswith(".attn.bias") for key in missing):
        raise SystemExit(f"weights do not map onto nanoGPT's model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return ours, theirs


def batches(train_bin: str, steps: int, accumulation: int, micro_batch: int, block: int):
    """steps x accumulation micro-batches of random windows, the same for both models."""
    data = np.memmap(train_bin, dtype="<u4", mode="r")
    starts = np.random.default_rng(0).integers(0, len(data) - block - 1, size=(steps, accumulation, micro_batch))
    for step in starts:
        yield [(torch.from_numpy(np.stack([data[i : i + block] for i in micro]).astype(np.int64)),
                torch.from_numpy(np.stack([data[i + 1 : i + block + 1] for i in micro]).astype(np.int64)))
               for micro in step]


def run(nanogpt_path: str, train_bin: str, steps: int = 12, accumulation: int = 32, micro_batch: int = 16,
        config: GPTConfig | None = None, device: str = "cuda") -> dict:
    config = config or SEED
    train = TrainConfig(lr=6e-4, min_lr=6e-5, warmup_steps=2, max_steps=steps, weight_decay=0.01)
    ours, theirs = twin_models(nanogpt_path, config, device)
    models = {"codegpt": ours, "nanogpt": theirs}
    optimizers = {name: make_optimizers(model, train, torch.device(device))[0] for name, model in models.items()}
    curves = {name: [] for name in models}
    norms = {name: [] for name in models}
    bf16 = device == "cuda"
    for step, micro_batches in enumerate(batches(train_bin, steps, accumulation, micro_batch, config.block_size)):
        for name, model in models.items():
            for group in optimizers[name].param_groups:
                group["lr"] = learning_rate(step, train)
            total = 0.0
            for x, y in micro_batches:
                x, y = x.to(device), y.to(device)
                with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
                    out = model(x, y)
                loss = out[1] if isinstance(out, tuple) else out
                (loss / accumulation).backward()
                total += loss.item() / accumulation
            norms[name].append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)))
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            curves[name].append(total)
    differences = [abs(a - b) / b for a, b in zip(curves["codegpt"], curves["nanogpt"])]
    return {"losses": curves, "grad_norms": norms, "max_relative_difference": max(differences),
            "tokens_per_step": accumulation * micro_batch * config.block_size, "precision": "bf16" if bf16 else "fp32"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nanogpt", required=True, help="nanoGPT's model.py")
    parser.add_argument("--train-bin", required=True, help="a uint32 token shard (codegpt data builds them)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--accumulation", type=int, default=32)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model: a quick check of the script on CPU")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()
    config = TINY if args.tiny else SEED
    result = run(args.nanogpt, args.train_bin, args.steps, args.accumulation, args.micro_batch, config, args.device)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"loss parity on {name}, {result['precision']}, {result['tokens_per_step']:,} tokens per step")
    print(f"{'step':>4}{'CodeGPT':>10}{'nanoGPT':>10}{'rel diff':>10}{'norm ours':>11}{'norm nano':>11}")
    for i, (a, b) in enumerate(zip(*result["losses"].values())):
        print(f"{i + 1:>4}{a:>10.4f}{b:>10.4f}{abs(a - b) / b:>10.3%}{result['grad_norms']['codegpt'][i]:>11.3f}"
              f"{result['grad_norms']['nanogpt'][i]:>11.3f}")
    verdict = "within" if result["max_relative_difference"] <= 0.005 else "OUTSIDE"
    print(f"largest relative difference {result['max_relative_difference']:.3%} ({verdict} the 0.5% target)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
