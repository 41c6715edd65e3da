"""Merge a LoRA adapter into its base: a standalone model in the base format, no LoRA code needed.

    python -m finetune.merge checkpoints/docstring/final checkpoints/docstring-merged [--base PATH] [--overwrite]

The update scale * B @ A is added to each adapted weight in float32; the merged model computes
what base + adapter computes. OUT must not exist or be empty; `--overwrite` replaces a CodeGPT
model directory (everything in it) and nothing else. OUT is never the base or the adapter, nor a
directory that holds them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from base.checkpoint import provenance, read_config, save_model
from base.errors import ArgumentParser, UserError, cli_entry
from finetune.adapter import load_for_inference, read_adapter_config
from finetune.lora import strip_lora


def check_out(out: Path, adapter: Path, base: Path, overwrite: bool) -> None:
    """Refuse an OUT whose replacement would delete what the user did not ask to replace."""
    target = out.resolve()
    for name, path in (("base model", base), ("adapter", adapter)):
        path = path.resolve()
        if target == path or target in path.parents:
            where = "is the" if target == path else f"holds {path}, the"
            raise UserError(f"{out}: {where} {name}; a merge never writes over its {name}")
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory")
    content = sorted(p.name for p in out.iterdir())
    if not content:
        return
    if not overwrite:
        raise UserError(f"{out}: not empty (holds {content[0]}); pass --overwrite to replace a model directory")
    try:
        read_config(out)
    except UserError:
        raise UserError(f"{out}: not a CodeGPT model directory (holds {content[0]}); --overwrite replaces only "
                        "a model directory") from None


def merge_adapter(adapter: str, out: str, base: str | None = None, overwrite: bool = False) -> str:
    base = base or read_adapter_config(adapter)["base"]
    check_out(Path(out), Path(adapter), Path(base), overwrite)
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
