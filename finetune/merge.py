"""Merge a LoRA adapter into its base: a standalone model in the base format, no LoRA code needed.

    codegpt merge checkpoints/docstring/final checkpoints/docstring-merged [--base PATH] [--overwrite]

The update scale * B @ A is added to each adapted weight in float32; the merged model computes
what base + adapter computes. OUT must not exist or be empty; `--overwrite` replaces a CodeGPT
model directory (everything in it) and nothing else. OUT is never the base or the adapter, nor a
directory that holds them.
"""

from __future__ import annotations

import argparse

from codegpt.base.checkpoint import save_model
from codegpt.base.outputs import check_output
from codegpt.base.provenance import provenance
from codegpt.base.errors import ArgumentParser, cli_entry
from codegpt.finetune.adapter import load_for_inference, read_adapter_config
from codegpt.finetune.lora import strip_lora


def merge_adapter(adapter: str, out: str, base: str | None = None, overwrite: bool = False) -> str:
    base = base or read_adapter_config(adapter)["base"]
    check_output(out, command="codegpt merge", inputs={"base model": base, "adapter": adapter}, overwrite=overwrite,
                 key="OUT")
    model, description = load_for_inference(base, adapter)
    strip_lora(model)
    save_model(out, model, meta=provenance(merged_from=description, adapter=str(adapter), base=str(base)))
    return description


@cli_entry
def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter", help="adapter directory (a LoRA run's final/ or step-N/)")
    parser.add_argument("out", help="directory for the merged model (new or empty)")
    parser.add_argument("--base", help="base model (default: the one the adapter records)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it is a CodeGPT model directory")
    args = parser.parse_args(argv)
    description = merge_adapter(args.adapter, args.out, args.base, args.overwrite)
    print(f"merged {description} -> {args.out}")


if __name__ == "__main__":
    main()
