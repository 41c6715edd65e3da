"""Sample from a base, base + adapter, or merged model, streaming to the terminal.

    python -m finetune.sample checkpoints/docstring-tiny/final --prompt "def add(a, b):" --temperature 0
    python -m finetune.sample checkpoints/pretrain-tiny/final --adapter checkpoints/docstring-tiny/final --file f.py
    python -m finetune.sample checkpoints/docstring-tiny/final --task-examples data/tasks/docstring-tiny/val.jsonl -n 3
    python -m finetune.sample checkpoints/pretrain-cpu-fim/final --prompt "def add(a, b):\n" --suffix "\n\nprint(add(1, 2))\n"
    python -m finetune.sample checkpoints/pretrain-cpu-fim/final --file hole.py   # hole.py marks the hole with <FILL-HERE>

An adapter directory given as the model brings its own base. Every option of base/generate.py
applies; with --task-examples the prompts are a task's val examples, each followed by its
reference completion for comparison, and the task's stop strings apply unless --stop is given.
With --suffix (or a --file holding the hole marker once) the model fills the hole between the
prompt and the suffix (fill-in-the-middle), writing prefix, middle and suffix; a model not trained
for it still answers, with a warning.
"""

from __future__ import annotations

import argparse
import sys

from accelerate import PartialState

from base.errors import ArgumentParser, cli_entry, positive_int
from base.generate import (HOLE, add_sampling_args, not_trained_for_infilling, print_stream, read_prompts,
                           sampling_from_args)
from base.tokenizer import Tokenizer
from finetune.adapter import load_for_inference
from tasks.jsonl import read_jsonl
from tasks.registry import task_of, unknown_task


@cli_entry
def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="model directory or file, or an adapter directory")
    parser.add_argument("--adapter", help="LoRA adapter directory to put on the model")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--prompt", default="def ")
    source.add_argument("--file", help="read the prompt from a file")
    source.add_argument("--task-examples", help="a task's jsonl: sample from its prompts")
    parser.add_argument("--escapes", action="store_true", help="interpret \\n and \\t in --prompt and --suffix")
    parser.add_argument("--suffix", help="fill in the middle: the code after the hole (--prompt is the code before)")
    parser.add_argument("--hole", default=HOLE, help=f"the marker of the hole in --file (default {HOLE})")
    parser.add_argument("-n", "--num-samples", type=positive_int, default=1, help="samples per prompt, or task examples")
    add_sampling_args(parser)
    args = parser.parse_args(argv)
    sampling = sampling_from_args(args)
    # Read before the model loads, so a bad file is reported at once.
    examples = read_jsonl(args.task_examples, check=unknown_task)[: args.num_samples] if args.task_examples else None
    prompts, suffix = (None, None) if examples is not None else read_prompts(args)
    model, description = load_for_inference(args.model, args.adapter, device=PartialState().device)
    print(f"# {description}", file=sys.stderr)
    if suffix is not None and (warning := not_trained_for_infilling(model)):
        print(f"warning: {warning}", file=sys.stderr)
    tokenizer = Tokenizer()
    if examples is not None:
        for record in examples:
            task = task_of(record)
            if not args.stop:
                sampling.stop = list(task.stop)
            print_stream(model, tokenizer, [task.prompt(record)], sampling)
            print(f"# reference:\n{record['completion']}", flush=True)
        return
    print_stream(model, tokenizer, prompts * args.num_samples, sampling, suffix)


if __name__ == "__main__":
    main()
