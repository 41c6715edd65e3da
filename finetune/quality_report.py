"""Sample-quality report of any model: the share of samples that parse, and two of them.

    codegpt quality checkpoints/pretrain-cpu/final [--adapter DIR] [-k 20] [--show 2]
                               [--shards data/shards/stdlib-all]

With --shards, also the validation loss and perplexity over every window of that split's held-out files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from accelerate import PartialState

from codegpt.base.errors import ArgumentParser, cli_entry, positive_int
from codegpt.base.fileio import atomic_write_text
from codegpt.base.outputs import check_output
from codegpt.base.quality import describe, parse_rate, validation_loss
from codegpt.base.tokenizer import Tokenizer
from codegpt.finetune.adapter import load_for_inference


@cli_entry
def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--adapter")
    parser.add_argument("-k", "--samples", type=positive_int, default=20)
    parser.add_argument("--max-new-tokens", type=positive_int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--show", type=int, default=2, help="samples to print")
    parser.add_argument("--shards", help="token shards whose validation split to score")
    parser.add_argument("--json", help="also write the report here")
    args = parser.parse_args(argv)
    if args.json:
        inputs = {"model": args.model, "adapter": args.adapter, "shards": args.shards}
        check_output(args.json, command="codegpt quality", kind="file", inputs={k: v for k, v in inputs.items() if v},
                     foreign=_not_report, key="--json")
    model, description = load_for_inference(args.model, args.adapter, device=PartialState().device)
    report = parse_rate(model, Tokenizer(), args.samples, args.max_new_tokens, args.seed)
    print(description)
    if args.shards:
        report["validation"] = validation_loss(model, args.shards)
        print(f"validation loss {report['validation']['val_loss']:.4f} (perplexity "
              f"{report['validation']['perplexity']:.1f}) over {report['validation']['tokens']:,} held-out tokens")
    print(describe(report, args.show))
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")


def _not_report(path: Path) -> str | None:
    """Why an existing --json is not an earlier report of this command (which it replaces)."""
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError):
        document = None
    if isinstance(document, dict) and {"samples", "parsable", "rate"} <= document.keys():
        return None
    return "exists and is not a report of codegpt quality; name a new file"


if __name__ == "__main__":
    main()
