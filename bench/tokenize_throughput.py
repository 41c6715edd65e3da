"""Tokenization throughput on the standard-library corpus: the bare tokenizer on one core, then the
shard builder (read, dedup, filter, tokenize, write) with 1 and 2 workers, side by side in one run.

    .venv/bin/python -m bench.tokenize_throughput [--max-tokens N] [--workers 1 2 4] [--repeats 3]

Each configuration runs `--repeats` times, interleaved with the others so that load from other
processes falls on all of them alike, and the fastest run is reported. Every build starts from an
empty directory; the first pass also warms the page cache for the ones after it.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from codegpt.base.data.corpus import FilterReport, filtered, local_documents
from codegpt.base.recipe import DataConfig
from codegpt.base.data.shards import build_shards
from codegpt.base.tokenizer import Tokenizer


def bare_tokenizer(tokenizer: Tokenizer, texts: list[str]) -> tuple[float, int]:
    started = time.perf_counter()
    tokens = sum(len(tokenizer.encode_document(t)) for t in texts)
    return time.perf_counter() - started, tokens


def shard_build(tokenizer: Tokenizer, workers: int, max_tokens: int | None, tmp: str) -> tuple[float, int, int]:
    config = DataConfig(source="local", shard_dir=tempfile.mkdtemp(dir=tmp), val_fraction=0.05,
                        max_tokens=max_tokens, num_workers=workers)
    started = time.perf_counter()
    index = build_shards(config, tokenizer, Path(config.shard_dir))
    seconds = time.perf_counter() - started
    return seconds, index["filter_report"]["kept"]["bytes"], sum(s["tokens"] for s in index["splits"].values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=None, help="cap per build (default: the whole stdlib)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    tokenizer = Tokenizer()
    report = FilterReport()
    texts = [d.content for d in filtered(local_documents([], report), report)]
    rows: dict[str, tuple[float, int, int]] = {}

    def keep_fastest(name: str, seconds: float, size: int, tokens: int) -> None:
        if name not in rows or seconds < rows[name][0]:
            rows[name] = (seconds, size, tokens)

    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            seconds, tokens = bare_tokenizer(tokenizer, texts)
            keep_fastest("tokenizer alone, 1 core", seconds, sum(len(t.encode()) for t in texts), tokens)
            for workers in args.workers:
                keep_fastest(f"shard build, {workers} worker{'s' if workers > 1 else ''}",
                             *shard_build(tokenizer, workers, args.max_tokens, tmp))

    print(f"Tokenization of this Python's standard library ({len(texts):,} documents after filters), "
          f"fastest of {args.repeats}")
    print(f"{'':<26}{'MB':>8}{'tokens':>12}{'seconds':>9}{'MB/s':>8}{'tokens/s':>12}{'tokens/byte':>13}")
    for name, (seconds, size, tokens) in rows.items():
        print(f"{name:<26}{size / 1e6:>8.1f}{tokens:>12,}{seconds:>9.2f}{size / 1e6 / seconds:>8.2f}"
              f"{tokens / seconds:>12,.0f}{tokens / size:>13.3f}")


if __name__ == "__main__":
    main()
