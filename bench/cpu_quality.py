"""The CPU recipe's quality at its budget: pretrain it, then score what it learned.

Runs `recipes/pretrain-cpu.yaml` (or the recipe given, with key=value overrides) from scratch
through `accelerate launch` on one process and every core, times it, then measures the final model:
validation loss and perplexity over every window of the held-out files, and how many of 20
samples parse. Prints them, and the CPU, next to two quoted references (a nanoGPT-style 4x128
model trained for the same 12.5 minutes, and this recipe before its time budget) and the target.

    .venv/bin/python -m bench.cpu_quality                                     # the 12.5-minute budget
    .venv/bin/python -m bench.cpu_quality train.time_budget_minutes=60       # one CPU-hour
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from codegpt.base.checkpoint import load_model
from codegpt.base.recipe_loader import load_recipe, split_cli_args
from codegpt.base.data.build import ensure_shards
from codegpt.base.errors import cli_entry
from codegpt.base.quality import describe, parse_rate, validation_loss
from codegpt.base.recipe import PretrainRecipe
from codegpt.base.tokenizer import Tokenizer
from bench.common import cpu_name

ROOT = Path(__file__).resolve().parent.parent
# Quoted, not re-run (re-running the first needs nanoGPT's own code): issue 9's nanoGPT-style 4x128
# model trained for 12.5 minutes, scored on our held-out split; and this recipe as it was before the
# time budget (6x128 over all 100,352 ids, 700 steps), as issue 15 measured it on a 2-core AMD EPYC.
REFERENCES = {
    "nanoGPT-style 4x128, 12.5 min (issue 9)": {"tokens": 356_000, "tok_s": 491, "val_loss": 6.59,
                                                "perplexity": 728, "parsable": 0},
    "the recipe before, 700 steps (issue 15, AMD EPYC, 24 min)": {"tokens": 1_433_600, "tok_s": 994,
                                                                  "val_loss": 5.50, "perplexity": 245,
                                                                  "parsable": 0},
}


@cli_entry
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     usage="%(prog)s [recipe.yaml] [section.key=value ...] [--out DIR]")
    parser.add_argument("--out", help="run directory (default: a temporary one)")
    args, rest = parser.parse_known_args()
    path, args.overrides = split_cli_args(rest, parser.format_usage())
    args.recipe = path or str(ROOT / "recipes" / "pretrain-cpu.yaml")
    recipe = load_recipe(PretrainRecipe, args.recipe, args.overrides)
    tokenizer = Tokenizer()
    shard_dir = ensure_shards(recipe.data, tokenizer)  # built before the clock starts

    with tempfile.TemporaryDirectory() as scratch:
        out = Path(args.out or scratch) / "run"
        command = [str(Path(sys.executable).with_name("accelerate")), "launch", "--num_processes", "1",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   str(ROOT / "base" / "pretrain.py"), args.recipe, *args.overrides,
                   f"out_dir={out}", "train.resume=false", "log.quality_samples=0", "log.wandb=disabled"]
        start = time.perf_counter()
        subprocess.run(command, check=True, cwd=ROOT)
        minutes = (time.perf_counter() - start) / 60
        model = load_model(out / "final")
        provenance = json.loads((out / "final" / "config.json").read_text())["provenance"]
        steps, tokens = provenance["step"], provenance["tokens_seen"]
        validation = validation_loss(model, str(shard_dir))
        report = parse_rate(model, tokenizer, k=20)

    config = recipe.model
    ours = {"tokens": tokens, "tok_s": tokens / (minutes * 60), "val_loss": validation["val_loss"],
            "perplexity": validation["perplexity"], "parsable": report["parsable"]}
    print(f"\n{Path(args.recipe).name} {' '.join(args.overrides)}: {config.n_layer} layers x {config.n_embd}, "
          f"block {config.block_size}, {recipe.train.batch_tokens} tokens/step, {steps} steps, "
          f"{minutes:.1f} min wall (start-up and evaluations included)")
    print(f"validation: {validation['tokens']:,} held-out tokens, every window\n")
    print("| run | tokens | tok/s | val loss | perplexity | parse of 20 |\n| --- | --- | --- | --- | --- | --- |")
    for name, row in (*REFERENCES.items(), ("this run", ours)):
        print(f"| {name} | {row['tokens']:,} | {row['tok_s']:,.0f} | {row['val_loss']:.2f} | {row['perplexity']:,.0f} | "
              f"{row['parsable']} |")
    print(f"\nCPU: {cpu_name()}, torch capability {torch.backends.cpu.get_cpu_capability()}")
    print("target at the 12.5-minute budget on a 2-core AVX2 CPU: val loss <= 5.0\n")
    print(describe(report))


if __name__ == "__main__":
    main()
