"""The `codegpt` command: one entry point for every step, each a subcommand that runs the module
that does the work.

    codegpt pretrain recipes/pretrain-70m.yaml [key=value ...]     # through Accelerate
    codegpt sft recipes/docstring.yaml [key=value ...]             # through Accelerate
    codegpt generate checkpoints/docstring/final --prompt "def add(a, b):"
    codegpt --help

`pretrain` and `sft` go through `accelerate launch` with the user's Accelerate config (`accelerate
config`), so several GPUs or machines work as they do there; launcher options go before the
recipe (`codegpt pretrain --num_processes 2 --multi_gpu recipes/x.yaml`). The other subcommands
run in this process.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# name: (module whose main() runs it, what it does)
COMMANDS = {
    "pretrain": ("codegpt.base.pretrain", "pretrain a model from a recipe (through accelerate launch)"),
    "sft": ("codegpt.finetune.sft", "fine-tune a model on a task, LoRA or full (through accelerate launch)"),
    "data": ("codegpt.base.data.build", "build a recipe's token shards"),
    "tasks": ("codegpt.tasks.build", "build a task's jsonl examples (docstring, bugfix)"),
    "generate": ("codegpt.finetune.sample", "sample from a model, adapter or merged model; fill in the middle"),
    "merge": ("codegpt.finetune.merge", "merge an adapter into its base"),
    "evaluate": ("codegpt.finetune.evaluate", "HumanEval pass@k, infilling, bug fixing, a task's examples"),
    "quality": ("codegpt.finetune.quality_report", "share of samples that parse; validation loss"),
    "convert": ("codegpt.base.convert", "convert between CodeGPT, nanoGPT and Hugging Face GPT-2"),
    "serve": ("codegpt.serve.__main__", "the OpenAI-compatible server and web page: a base and its adapters, batched"),
}
ALIASES = {"sample": "generate"}
LAUNCHED = {"pretrain": "base/pretrain.py", "sft": "finetune/sft.py"}


def usage() -> str:
    lines = ["usage: codegpt <command> [args ...]   (codegpt <command> --help for its options)", "", "commands:"]
    lines += [f"  {name:<10}{help}" for name, (_, help) in COMMANDS.items()]
    lines += [f"  {alias:<10}same as {name}" for alias, name in ALIASES.items()]
    return "\n".join(lines)


def launch(name: str, args: list[str]) -> int:
    """`accelerate launch <script> ...`, reading the user's Accelerate config as that command does.
    Launcher options come first: everything before the recipe (a .yaml file) or the first
    key=value override."""
    if "-h" in args or "--help" in args:
        print(importlib.import_module(COMMANDS[name][0]).__doc__)
        return 0
    from accelerate.commands.launch import launch_command, launch_command_parser

    split = next((i for i, arg in enumerate(args) if not arg.startswith("-") and
                  (arg.endswith((".yaml", ".yml")) or ("=" in arg and (i == 0 or not args[i - 1].startswith("-"))))),
                 len(args))
    try:
        launch_command(launch_command_parser().parse_args([*args[:split], str(ROOT / LAUNCHED[name]), *args[split:]]))
    except subprocess.CalledProcessError as failed:
        # The script has printed its own error; accelerate's traceback around it would only bury it.
        return failed.returncode
    except Exception as failed:  # torchrun's ChildFailedError, for several processes
        failures = getattr(failed, "failures", None)
        if not failures:
            raise
        return next(iter(failures.values())).exitcode
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name = ALIASES.get(argv[0], argv[0])
    if name not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}\n{usage()}", file=sys.stderr)
        return 2
    if name in LAUNCHED:
        return launch(name, argv[1:])
    sys.argv[0] = f"codegpt {argv[0]}"  # what argparse names in its usage lines
    return importlib.import_module(COMMANDS[name][0]).main(argv[1:]) or 0
