"""Merge a LoRA adapter into its base: a standalone model in the base format, no LoRA code needed.

    python -m finetune.merge checkpoints/docstring/final checkpoints/docstring-merged [--base PATH]

The update scale * B @ A is added to each adapted weight in float32; the merged model computes
what base + adapter computes.
"""

from __future__ import annotations

import argparse

from base.checkpoint import provenance, save_model
from base.errors import cli_entry
from finetune.adapter import load_for_inference, read_adapter_config
from finetune.lora import strip_lora


def merge_adapter(adapter: str, out: str, base: str | None = None) -> str:
    base = base or read_adapter_config(adapter)["base"]
    model, description = load_for_inference(base, adapter)
    strip_lora(model)
    save_model(out, model, meta=provenance(merged_from=description, adapter=str(adapter), base=str(base)))
    return description


@cli_entry
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter", help="adapter directory (a LoRA run's final/ or step-N/)")
    parser.add_argument("out", help="directory for the merged model")
    parser.add_argument("--base", help="base model (default: the one the adapter records)")
    args = parser.parse_args(argv)
    description = merge_adapter(args.adapter, args.out, args.base)
    print(f"merged {description} -> {args.out}")


if __name__ == "__main__":
    main()
