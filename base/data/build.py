"""Build the token shards of a recipe's `data` section.

    codegpt data recipes/pretrain-tiny.yaml [section.key=value ...]

Pretraining calls `ensure_shards` itself, so running this first is optional.
"""

from __future__ import annotations

import sys
from pathlib import Path

from codegpt.base.recipe_loader import load_recipe, split_cli_args
from codegpt.base.data.corpus import FilterReport
from codegpt.base.errors import cli_entry
from codegpt.base.recipe import DataConfig, PretrainRecipe
from codegpt.base.data.shards import build_shards, read_index, shards_ready
from codegpt.base.tokenizer import Tokenizer

USAGE = "usage: codegpt data [recipe.yaml] [data.key=value ...]"


def ensure_shards(config: DataConfig, tokenizer: Tokenizer) -> Path:
    """The shard directory of `config`, built first if missing or made from other inputs."""
    shard_dir = Path(config.shard_dir)
    if not shards_ready(config, tokenizer, shard_dir):
        print(f"building token shards in {shard_dir} from {config.source} data", flush=True)
        describe(build_shards(config, tokenizer, shard_dir))
    return shard_dir


def describe(index: dict) -> None:
    print(FilterReport.from_dict(index["filter_report"]).table())
    for split, info in index["splits"].items():
        print(f"{split}: {info['documents']:,} documents, {info['tokens']:,} tokens in {len(info['shards'])} shard(s)")


@cli_entry
def main(argv: list[str] | None = None) -> None:
    path, overrides = split_cli_args(sys.argv[1:] if argv is None else argv, USAGE)
    recipe = load_recipe(PretrainRecipe, path, overrides)
    tokenizer, shard_dir = Tokenizer(), Path(recipe.data.shard_dir)
    if shards_ready(recipe.data, tokenizer, shard_dir):
        print(f"token shards in {shard_dir} are up to date (same inputs and settings)")
        describe(read_index(shard_dir))
    else:
        ensure_shards(recipe.data, tokenizer)
    print(f"shards ready in {shard_dir} (tokenizer {read_index(shard_dir)['tokenizer']})")
