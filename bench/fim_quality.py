"""Fill-in-the-middle against left to right, side by side: for each model, the left-to-right
validation loss over every held-out window (the FIM paper's "FIM for free": training with FIM
should cost it little), the loss on the middle tokens of the same windows put in PSM order (every
document cut at two random points, the same cuts for every model), and HumanEval single-line
infilling pass@1 (greedy, a seeded sample of holes, run in the sandbox).

    python -m bench.fim_quality checkpoints/pretrain-cpu/final checkpoints/pretrain-cpu-fim/final \\
        --shards data/shards/stdlib-all [--holes 200]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from bench.common import cpu_name
from codegpt.base.checkpoint import load_model
from codegpt.base.data.fim import Fim, FimTokens
from codegpt.base.data.loader import BatchLoader
from codegpt.base.generate import Sampling
from codegpt.base.quality import validation_loss
from codegpt.base.tokenizer import Tokenizer
from codegpt.finetune.evaluate import infill
from codegpt.tasks.infill import SINGLE


def middle_targets(window: np.ndarray, tokens: FimTokens) -> np.ndarray:
    """Targets of a PSM window (inputs window[:-1]): the middle tokens, -100 elsewhere."""
    targets = np.full(len(window) - 1, -100, dtype=np.int64)
    inside = False
    for i, token in enumerate(window[1:].tolist()):
        if token == tokens.middle and not inside:
            inside = True
            continue
        if token in (tokens.eot, tokens.prefix):
            inside = False
        if inside:
            targets[i] = token
    return targets


@torch.no_grad()
def middle_loss(model, shard_dir: str, tokens: FimTokens, seed: int = 0, batch_size: int = 16) -> dict:
    """Mean loss per middle token over every held-out window in PSM order."""
    loader = BatchLoader(shard_dir, "val", model.config.block_size, 1, shuffle=False, seed=seed,
                         fim=Fim(rate=1.0, spm_rate=0.0, tokens=tokens))
    model.eval()
    total, count = 0.0, 0
    for first in range(0, loader.num_windows, batch_size):
        batches = [loader.next_batch() for _ in range(min(batch_size, loader.num_windows - first))]
        x = torch.cat([b[0] for b in batches])
        windows = torch.cat([x, torch.cat([b[1] for b in batches])[:, -1:]], dim=1).numpy()
        y = torch.from_numpy(np.stack([middle_targets(w, tokens) for w in windows]))
        labelled = int((y != -100).sum())
        if labelled:
            total += model(x, y).item() * labelled
            count += labelled
    return {"middle_loss": total / count, "middle_tokens": count}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+")
    parser.add_argument("--shards", required=True, help="the shard directory whose val split is held out")
    parser.add_argument("--holes", type=int, default=200, help="single-line holes sampled for pass@1")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    tokenizer = Tokenizer()
    tokens = FimTokens.of(tokenizer)
    rows = []
    for path in args.models:
        model = load_model(path).eval()
        ltr = validation_loss(model, args.shards)
        middle = middle_loss(model, args.shards, tokens)
        scored = infill(model, tokenizer, SINGLE, args.holes, Sampling(max_new_tokens=48, temperature=0.0), 1, 8)
        rows.append((path, model.config.fim, ltr, middle, scored))
    print(f"CPU: {cpu_name()}, torch capability {torch.backends.cpu.get_cpu_capability()}")
    print("| model | trained with FIM | left-to-right val loss | middle-token loss (PSM) | "
          f"infill-single pass@1 ({args.holes} holes) |")
    print("| --- | --- | ---: | ---: | ---: |")
    for path, fim, ltr, middle, scored in rows:
        print(f"| {path} | {'yes' if fim else 'no'} | {ltr['val_loss']:.4f} | {middle['middle_loss']:.4f} | "
              f"{scored['pass@1']:.3f} |")
    print(f"left-to-right: {rows[0][2]['tokens']:,} held-out tokens; middle: {rows[0][3]['middle_tokens']:,} tokens")


if __name__ == "__main__":
    main()
