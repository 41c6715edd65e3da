"""The sampling command (`codegpt generate`, alias `sample`): any model, streaming to the terminal.

    codegpt generate checkpoints/docstring-tiny/final --prompt "def add(a, b):" --temperature 0
    codegpt generate checkpoints/pretrain-tiny/final --adapter checkpoints/docstring-tiny/final --file f.py
    codegpt generate checkpoints/docstring-tiny/final --task-examples data/tasks/docstring-tiny/val.jsonl -n 3
    codegpt generate checkpoints/pretrain-cpu-fim/final --prompt "def add(a, b):\n" --suffix "\n\nprint(add(1, 2))\n"
    codegpt generate checkpoints/pretrain-cpu-fim/final --file hole.py   # hole.py marks the hole with <FILL-HERE>

The model is a base (ours, a nanoGPT .pt or a Hugging Face GPT-2 directory), a merged model, or
a base plus --adapter; an adapter directory given as the model brings its own base. The sampling
options set base/generate.py's `Sampling`; with --task-examples the prompts are a task's val examples, each followed by its
reference completion for comparison, and the task's stop strings apply unless --stop is given.
With --suffix (or a --file holding the hole marker once) the model fills the hole between the
prompt and the suffix (fill-in-the-middle), writing prefix, middle and suffix; a model not trained
for it still answers, with a warning.
"""

from __future__ import annotations

import argparse
import sys

from accelerate import PartialState

from codegpt.base.errors import ArgumentParser, UserError, cli_entry, positive_int
from codegpt.base.fileio import check_input_file
from codegpt.base.generate import not_trained_for_infilling, stream
from codegpt.base.model import GPT
from codegpt.base.sampling import MIN_TEMPERATURE, BadOption, Sampling
from codegpt.base.tokenizer import Tokenizer
from codegpt.finetune.adapter import load_for_inference
from codegpt.tasks.jsonl import read_jsonl
from codegpt.tasks.registry import task_of, unknown_task


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-new-tokens", type=int, default=Sampling.max_new_tokens)
    group.add_argument("--temperature", type=float, default=Sampling.temperature,
                       help=f"0 = greedy; otherwise at least {MIN_TEMPERATURE:g}")
    group.add_argument("--top-k", type=int, default=None)
    group.add_argument("--top-p", type=float, default=None)
    group.add_argument("--stop", action="append", default=[], help="stop string (repeatable); \\n escapes work")
    group.add_argument("--seed", type=int, default=None, help="0 to 2**63 - 1")


def sampling_from_args(args: argparse.Namespace) -> Sampling:
    stop = [s.encode().decode("unicode_escape") for s in args.stop]
    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, stop, args.seed)
    try:
        sampling.validate()
    except BadOption as bad:
        raise UserError(f"--{bad.field.replace('_', '-')}: {bad.message}") from None
    return sampling


def print_stream(model: GPT, tokenizer: Tokenizer, prompts: list[str], sampling: Sampling, suffix: str | None = None,
                 out=None) -> list[str]:
    """Stream each prompt and its completion to `out` (stdout), one prompt after the other; with
    `suffix`, each middle and then the suffix."""
    out = out or sys.stdout
    completions = []
    for i, prompt in enumerate(prompts):
        out.write(prompt)
        text = ""
        # Each sample of a seeded run gets its own seed, so repeated prompts give different samples.
        for _, piece in stream(model, tokenizer, [prompt], sampling.nth(i), [suffix]):
            out.write(piece)
            out.flush()
            text += piece
        out.write((suffix or "") + "\n" + "-" * 40 + "\n")
        completions.append(text)
    return completions


# Marks the hole of a --file to fill in the middle (as in the SantaCoder and StarCoder demos).
HOLE = "<FILL-HERE>"


def read_prompts(args: argparse.Namespace) -> tuple[list[str], str | None]:
    """([prompt], suffix or None) from --prompt/--suffix, or from --file (where --hole marks a hole)."""
    if not args.file:
        unescape = (lambda t: t.encode().decode("unicode_escape")) if args.escapes else (lambda t: t)
        return [unescape(args.prompt)], None if args.suffix is None else unescape(args.suffix)
    check_input_file(args.file, "--file")
    try:
        with open(args.file, encoding="utf-8") as f:
            text = f.read()
    except OSError as err:
        raise UserError(f"{args.file}: cannot read prompt file ({err.strerror})") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{args.file}: the prompt file is not UTF-8 text (byte {err.start})") from None
    holes = text.count(args.hole)
    if holes == 0:
        if args.suffix is not None:
            raise UserError(f"{args.file}: no hole marker {args.hole} in the file (--suffix needs the file to mark "
                            "where the code before the hole ends)")
        return [text], None
    if holes > 1:
        line = text[: text.index(args.hole, text.index(args.hole) + 1)].count("\n") + 1
        raise UserError(f"{args.file}:{line}: a second hole marker {args.hole} (fill one hole at a time)")
    prefix, suffix = text.split(args.hole)
    return [prefix], suffix


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
    if not args.hole:
        parser.error("--hole: must not be empty")
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
