"""Tokenization throughput of the shard builder on the standard-library corpus, 1 and 2 workers,
measured side by side in one run (each build from scratch into its own directory).

    .venv/bin/python bench/tokenize_throughput.py [--max-tokens N]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from base.recipe import DataConfig
from base.shards import build_shards
from base.tokenizer import Tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=None, help="cap per build (default: the whole stdlib)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    tokenizer = Tokenizer()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for workers in args.workers:
            config = DataConfig(source="local", shard_dir=str(Path(tmp, f"w{workers}")), val_fraction=0.05,
                                max_tokens=args.max_tokens, num_workers=workers)
            started = time.perf_counter()
            index = build_shards(config, tokenizer, Path(config.shard_dir))
            seconds = time.perf_counter() - started
            kept = index["filter_report"]["kept"]
            tokens = sum(split["tokens"] for split in index["splits"].values())
            rows.append((workers, kept["docs"], kept["bytes"], tokens, seconds))
    print("Shard build (read, filter, dedup, tokenize, write) of this Python's standard library")
    print(f"{'workers':>7}{'documents':>11}{'MB':>9}{'tokens':>13}{'seconds':>9}{'MB/s':>8}{'tokens/s':>12}{'tokens/byte':>13}")
    for workers, docs, size, tokens, seconds in rows:
        print(f"{workers:>7}{docs:>11,}{size / 1e6:>9.1f}{tokens:>13,}{seconds:>9.1f}{size / 1e6 / seconds:>8.2f}"
              f"{tokens / seconds:>12,.0f}{tokens / size:>13.3f}")


if __name__ == "__main__":
    main()
