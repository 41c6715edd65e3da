"""Fill-in-the-middle against left to right, side by side: for each model, the left-to-right
validation loss over every held-out window (the FIM paper's "FIM for free": training with FIM
should cost it little), the loss on the middle tokens of the same windows put in PSM order (every
document cut at two random points, the same cuts for every model), on all of them and on the
first few of each middle (where the suffix-to-middle jump is, and knowing the format matters
most), and HumanEval single-line infilling pass@1 (greedy, a seeded sample of holes, run in the
sandbox).

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
from codegpt.base.errors import ArgumentParser, cli_entry, positive_int
from codegpt.base.generate import Sampling
from codegpt.base.quality import validation_loss
from codegpt.base.tokenizer import Tokenizer
from codegpt.finetune.evaluate import infill
from codegpt.tasks.infill import SINGLE


FIRST = 4  # the first tokens of a middle, scored apart


def middle_targets(window: np.ndarray, tokens: FimTokens, first: int | None = None) -> np.ndarray:
    """Targets of a PSM window (inputs window[:-1]): the middle tokens (only the first `first` of
    each middle, if given), -100 elsewhere."""
    targets = np.full(len(window) - 1, -100, dtype=np.int64)
    inside, seen = False, 0
    for i, token in enumerate(window[1:].tolist()):
        if token == tokens.middle and not inside:
            inside, seen = True, 0
            continue
        if token in (tokens.eot, tokens.prefix):
            inside = False
        if inside and (first is None or seen < first):
            targets[i] = token
            seen += 1
    return targets


@torch.no_grad()
def middle_loss(model, shard_dir: str, tokens: FimTokens, first: int | None = None, seed: int = 0,
                batch_size: int = 16) -> dict:
    """Mean loss per middle token (or per token among each middle's first `first`) over every
    held-out window in PSM order."""
    loader = BatchLoader(shard_dir, "val", model.config.block_size, 1, shuffle=False, seed=seed,
                         fim=Fim(rate=1.0, spm_rate=0.0, tokens=tokens))
    model.eval()
    total, count = 0.0, 0
    for start in range(0, loader.num_windows, batch_size):
        batches = [loader.next_batch() for _ in range(min(batch_size, loader.num_windows - start))]
        x = torch.cat([b[0] for b in batches])
        windows = torch.cat([x, torch.cat([b[1] for b in batches])[:, -1:]], dim=1).numpy()
        y = torch.from_numpy(np.stack([middle_targets(w, tokens, first) for w in windows]))
        labelled = int((y != -100).sum())
        if labelled:
            total += model(x, y).item() * labelled
            count += labelled
    return {"middle_loss": total / count, "middle_tokens": count}


@cli_entry
def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+")
    parser.add_argument("--shards", required=True, help="the shard directory whose val split is held out")
    parser.add_argument("--holes", type=positive_int, default=200, help="single-line holes sampled for pass@1")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    tokenizer = Tokenizer()
    tokens = FimTokens.of(tokenizer)
    rows = []
    for path in args.models:
        model = load_model(path).eval()
        ltr = validation_loss(model, args.shards)
        middle = middle_loss(model, args.shards, tokens)
        opening = middle_loss(model, args.shards, tokens, first=FIRST)
        scored = infill(model, tokenizer, SINGLE, args.holes, Sampling(max_new_tokens=48, temperature=0.0), 1, 8)
        rows.append((path, model.config.fim, ltr, middle, opening, scored))
    print(f"CPU: {cpu_name()}, torch capability {torch.backends.cpu.get_cpu_capability()}")
    print("| model | trained with FIM | left-to-right val loss | middle-token loss (PSM) | "
          f"first {FIRST} middle tokens | infill-single pass@1 ({args.holes} holes) |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for path, fim, ltr, middle, opening, scored in rows:
        print(f"| {path} | {'yes' if fim else 'no'} | {ltr['val_loss']:.4f} | {middle['middle_loss']:.4f} | "
              f"{opening['middle_loss']:.4f} | {scored['pass@1']:.3f} |")
    print(f"left-to-right: {rows[0][2]['tokens']:,} held-out tokens; middle: {rows[0][3]['middle_tokens']:,} "
          f"tokens, of which {rows[0][4]['middle_tokens']:,} among the first {FIRST} of a middle")


if __name__ == "__main__":
    main()
