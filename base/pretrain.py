"""Pretrain CodeGPT from scratch with the seed's schedule.

    codegpt pretrain [launcher options] [recipe.yaml] [section.key=value ...]
    accelerate launch [launcher options] base/pretrain.py [recipe.yaml] [section.key=value ...]

With no recipe it runs recipes/pretrain-70m.yaml, the seed's run on CodeParrot for one A100.
Token shards are built on first use (see base/data/build.py); a run directory that holds
checkpoints is resumed from the newest one unless `train.resume=false` (see base/run_dir.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

from codegpt.base.checkpoint import WEIGHTS_FILE
from codegpt.base.wrappers import unwrap
from codegpt.base.recipe_loader import load_recipe, split_cli_args
from codegpt.base.data.build import ensure_shards
from codegpt.base.errors import UserError, cli_entry
from codegpt.base.fileio import atomic_write_text
from codegpt.base.data.fim import Fim, FimTokens
from codegpt.base.data.loader import BatchLoader
from codegpt.base.model import GPT, GPTConfig
from codegpt.base.quality import describe, parse_rate
from codegpt.base.recipe import PretrainRecipe
from codegpt.base.run_dir import QUALITY_FILE, RunDirectory
from codegpt.base.data.shards import read_index
from codegpt.base.tokenizer import Tokenizer
from codegpt.base.train import Trainer, make_accelerator, validation_sample

DEFAULT_RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "pretrain-70m.yaml"
USAGE = "usage: accelerate launch base/pretrain.py [recipe.yaml] [section.key=value ...]"
# What a checkpoint's weights are made for; dropout and FIM training may change when a run resumes.
MODEL_KEYS = tuple(f"model.{f.name}" for f in dataclasses.fields(GPTConfig) if f.name not in ("dropout", "fim"))


def data_vocabulary(shard_dir: Path, tokenizer: Tokenizer, vocab_size: int) -> torch.Tensor:
    """The sorted ids that occur in the shards (both splits, so that no held-out target falls
    outside the softmax) and the tokenizer's special tokens (end of text, fill-in-the-middle)."""
    seen = np.zeros(vocab_size, dtype=bool)
    for split in read_index(shard_dir)["splits"].values():
        for shard in split["shards"]:
            tokens = np.memmap(shard_dir / shard["file"], dtype="<u4", mode="r")
            seen |= np.bincount(tokens, minlength=vocab_size)[:vocab_size] > 0
    seen[list(tokenizer.special_ids.values())] = True
    return torch.from_numpy(np.flatnonzero(seen))


def pretrain(recipe: PretrainRecipe) -> dict:
    accelerator = make_accelerator(recipe.train)
    tokenizer = Tokenizer()
    if recipe.model.vocab_size < tokenizer.vocab_size:
        raise UserError(f"model.vocab_size: {recipe.model.vocab_size} is smaller than the tokenizer's "
                        f"{tokenizer.vocab_size} ids")
    with RunDirectory(recipe.out_dir, "pretrain", accelerator, inputs={"shard directory": recipe.data.shard_dir},
                      weights_file=WEIGHTS_FILE) as run_dir:
        last = _pretrain(recipe, accelerator, tokenizer, run_dir)
    accelerator.end_training()
    return last


def _pretrain(recipe: PretrainRecipe, accelerator, tokenizer: Tokenizer, run_dir: RunDirectory) -> dict:
    with accelerator.main_process_first():
        shard_dir = ensure_shards(recipe.data, tokenizer)
    active_ids = data_vocabulary(shard_dir, tokenizer, recipe.model.vocab_size) if recipe.data.vocab_subset else None
    if active_ids is not None:
        recipe.model = dataclasses.replace(recipe.model, active_vocab=len(active_ids))
    if recipe.data.fim_rate:
        recipe.model = dataclasses.replace(recipe.model, fim=True)
    torch.manual_seed(recipe.train.seed)
    model = GPT(recipe.model)
    if active_ids is not None:
        model.active_ids.copy_(active_ids)
        accelerator.print(f"softmax over the {len(active_ids):,} ids the shards hold, of {recipe.model.vocab_size:,}")
    rank, world = accelerator.process_index, accelerator.num_processes
    fim = Fim(recipe.data.fim_rate, recipe.data.fim_spm_rate, FimTokens.of(tokenizer)) if recipe.data.fim_rate else None
    # Validation windows drawn across the whole split (a fixed shuffle), not its first files.
    val_windows = BatchLoader(str(shard_dir), "val", recipe.model.block_size, recipe.train.micro_batch_size, rank,
                              world, seed=recipe.train.seed)
    train_batches = BatchLoader(str(shard_dir), "train", recipe.model.block_size, recipe.train.micro_batch_size,
                                rank, world, seed=recipe.train.seed, fim=fim)
    trainer = Trainer(model=model, train_batches=train_batches,
                      val_batches=validation_sample(val_windows, recipe.train, recipe.model.block_size, world,
                                                    "data.val_fraction"),
                      train=recipe.train, log=recipe.log, run_dir=run_dir, accelerator=accelerator,
                      recipe=recipe, block_size=recipe.model.block_size, fixed_keys=MODEL_KEYS)
    last = trainer.run()
    if accelerator.is_main_process and "val_loss" in last:
        print(f"done: step {last['step']}, val loss {last['val_loss']:.4f} (perplexity "
              f"{math.exp(last['val_loss']):.2f}); model in {run_dir.final}")
    if accelerator.is_main_process and recipe.log.quality_samples:
        report = parse_rate(unwrap(trainer.model), tokenizer, recipe.log.quality_samples)
        atomic_write_text(run_dir.path / QUALITY_FILE, json.dumps(report, indent=2) + "\n")
        print(describe(report))
    return last


@cli_entry
def main(argv: list[str] | None = None) -> None:
    path, overrides = split_cli_args(sys.argv[1:] if argv is None else argv, USAGE)
    pretrain(load_recipe(PretrainRecipe, path or DEFAULT_RECIPE, overrides))


if __name__ == "__main__":
    main()
