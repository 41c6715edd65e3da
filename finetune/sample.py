"""Sample from a base, base + adapter, or merged model, streaming to the terminal.

    python -m finetune.sample checkpoints/docstring-tiny/final --prompt "def add(a, b):" --temperature 0
    python -m finetune.sample checkpoints/pretrain-tiny/final --adapter checkpoints/docstring-tiny/final --file f.py
    python -m finetune.sample checkpoints/docstring-tiny/final --task-examples data/tasks/docstring-tiny/val.jsonl -n 3

An adapter directory given as the model brings its own base. Every option of base/generate.py
applies; with --task-examples the prompts are a task's val examples, each followed by its
reference completion for comparison, and the task's stop strings apply unless --stop is given.
"""

from __future__ import annotations

import argparse
import sys

from accelerate import PartialState

from base.errors import ArgumentParser, cli_entry, positive_int
from base.generate import add_sampling_args, print_stream, read_prompts, sampling_from_args
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
    parser.add_argument("--escapes", action="store_true", help="interpret \\n and \\t in --prompt")
    parser.add_argument("-n", "--num-samples", type=positive_int, default=1, help="samples per prompt, or task examples")
    add_sampling_args(parser)
    args = parser.parse_args(argv)
    sampling = sampling_from_args(args)
    # Read before the model loads, so a bad file is reported at once.
    examples = read_jsonl(args.task_examples, check=unknown_task)[: args.num_samples] if args.task_examples else None
    prompts = None if examples is not None else read_prompts(args) * args.num_samples
    model, description = load_for_inference(args.model, args.adapter, device=PartialState().device)
    print(f"# {description}", file=sys.stderr)
    tokenizer = Tokenizer()
    if examples is not None:
        for record in examples:
            task = task_of(record)
            if not args.stop:
                sampling.stop = list(task.stop)
            print_stream(model, tokenizer, [task.prompt(record)], sampling)
            print(f"# reference:\n{record['completion']}", flush=True)
        return
    print_stream(model, tokenizer, prompts, sampling)


if __name__ == "__main__":
    main()
