"""Supervised fine-tuning of a CodeGPT base on a task, with LoRA or all weights.

    codegpt sft [launcher options] recipes/docstring.yaml [section.key=value ...]
    accelerate launch [launcher options] finetune/sft.py recipes/docstring.yaml [section.key=value ...]

The story: load the base the recipe names (any format the importers read); build the task's
jsonl if it is not there yet; encode prompt + completion with the prompt's labels masked and pack
them into rows; wrap the target layers with LoRA (or train everything with `method: full`);
then the same training loop as pretraining: same checkpoints and exact resume, metrics, plots.
A LoRA run's checkpoints hold only the adapter and the hash of the base it was trained on.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import torch

from codegpt.base.checkpoint import WEIGHTS_FILE
from codegpt.base.convert import load_any

from codegpt.base.provenance import weights_hash
from codegpt.base.recipe_loader import load_recipe, split_cli_args
from codegpt.base.errors import UserError, cli_entry
from codegpt.base.run_dir import RunDirectory
from codegpt.base.tokenizer import Tokenizer
from codegpt.base.train import Trainer, make_accelerator, validation_sample
from codegpt.finetune.adapter import ADAPTER_FILE, read_adapter_weights, write_adapter_files
from codegpt.finetune.lora import LoRAConfig, apply_lora, trainable_summary
from codegpt.finetune.packing import PackedBatches, encode_example
from codegpt.finetune.recipe import SFTRecipe
from codegpt.tasks.build import build_task_data
from codegpt.tasks.jsonl import read_jsonl

USAGE = "usage: accelerate launch finetune/sft.py recipe.yaml [section.key=value ...]"
# What a run's checkpoints are made for; LoRA's dropout alone may change when a run resumes.
RUN_KEYS = ("base", "method")
ADAPTER_KEYS = tuple(f"lora.{f.name}" for f in dataclasses.fields(LoRAConfig) if f.name != "dropout")


def task_examples(recipe: SFTRecipe, tokenizer: Tokenizer, split: str) -> list[tuple[list[int], list[int]]]:
    path = Path(recipe.task.data_dir) / f"{split}.jsonl"
    records = read_jsonl(path)
    if not records:
        raise UserError(f"{path}: no examples (task.max_examples, task.paths or task.val_fraction leave none)")
    if recipe.task.format == "infill" and any("suffix" not in r for r in records):
        raise UserError(f"{path}: task.format infill needs each example's suffix (the code after the function); "
                        "these examples predate it: build the task data again")
    return [encode_example(tokenizer, r["prompt"], r["completion"], r["suffix"] if recipe.task.format == "infill" else None)
            for r in records]


def sft(recipe: SFTRecipe) -> dict:
    if not Path(recipe.base).exists():
        raise UserError(f"base: {recipe.base} not found (pretrain one with base/pretrain.py, or name a checkpoint)")
    accelerator = make_accelerator(recipe.train)
    inputs = {"base model": recipe.base, "task data": recipe.task.data_dir}
    with RunDirectory(recipe.out_dir, "sft", accelerator, inputs=inputs,
                      weights_file=ADAPTER_FILE if recipe.method == "lora" else WEIGHTS_FILE) as run_dir:
        last = _sft(recipe, accelerator, run_dir)
    accelerator.end_training()
    return last


def _sft(recipe: SFTRecipe, accelerator, run_dir: RunDirectory) -> dict:
    model = load_any(recipe.base)
    if recipe.task.format == "infill":  # what it learns: the model and its adapter say so
        model.config = dataclasses.replace(model.config, fim=True)
    block_size = recipe.block_size or model.config.block_size
    if block_size > model.config.block_size:
        raise UserError(f"block_size: {block_size} exceeds the base's context of {model.config.block_size}")
    if recipe.method == "lora":
        base_hash = weights_hash(model.state_dict())
        torch.manual_seed(recipe.train.seed)  # LoRA's initial A is drawn here, the same on every rank
        adapted = apply_lora(model, recipe.lora)  # refuses patterns that match nothing, before any work
        accelerator.print(f"LoRA r={recipe.lora.r} alpha={recipe.lora.alpha} on {len(adapted)} layers; "
                          f"{trainable_summary(model)}")
    with accelerator.main_process_first():
        if not (Path(recipe.task.data_dir) / "train.jsonl").exists():
            if accelerator.is_main_process:
                build_task_data(recipe.task)
    tokenizer = Tokenizer()
    train_examples, val_examples = task_examples(recipe, tokenizer, "train"), task_examples(recipe, tokenizer, "val")
    rank, world = accelerator.process_index, accelerator.num_processes
    train_rows = PackedBatches(train_examples, block_size, recipe.train.micro_batch_size, rank, world,
                               seed=recipe.train.seed)
    val_rows = PackedBatches(val_examples, block_size, recipe.train.micro_batch_size, rank, world, seed=recipe.train.seed)
    accelerator.print(f"{len(train_examples):,} train examples in {train_rows.rows_per_epoch:,} packed rows of "
                      f"{block_size} ({train_rows.dropped_too_long} too long, dropped); {len(val_examples):,} val")

    hooks = {}
    if recipe.method == "lora":
        hooks = dict(write_weights=lambda d, m, meta: write_adapter_files(d, m, recipe.lora, recipe.base, base_hash, meta),
                     read_weights=read_adapter_weights)
    trainer = Trainer(model=model, train_batches=train_rows,
                      val_batches=validation_sample(val_rows, recipe.train, block_size, world, "task.val_fraction"), train=recipe.train,
                      log=recipe.log, run_dir=run_dir, accelerator=accelerator, recipe=recipe,
                      block_size=block_size, fixed_keys=RUN_KEYS + (ADAPTER_KEYS if recipe.method == "lora" else ()),
                      **hooks)
    last = trainer.run()
    if accelerator.is_main_process and "val_loss" in last:
        print(f"done: step {last['step']}, val loss {last['val_loss']:.4f} (perplexity {math.exp(last['val_loss']):.2f}); "
              f"{'adapter' if recipe.method == 'lora' else 'model'} in {run_dir.final}")
    return last


@cli_entry
def main(argv: list[str] | None = None) -> None:
    path, overrides = split_cli_args(sys.argv[1:] if argv is None else argv, USAGE)
    if path is None:
        raise UserError(f"name a recipe ({USAGE})")
    sft(load_recipe(SFTRecipe, path, overrides))


if __name__ == "__main__":
    main()
