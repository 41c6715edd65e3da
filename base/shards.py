"""Filtered documents -> uint32 token shards, split into train and val by document.

Each stream of documents (the local files; or CodeParrot's train and its valid set) is cut into
shards in reading order: a shard ends with the document that brings it to `shard_docs` documents
or `shard_tokens` tokens, or reaches a cap. Shard i of a stream is `<stream>-<i>.train.bin` and
`.val.bin` (raw little-endian uint32, each document followed by <|endoftext|>), then
`<stream>-<i>.json`, which records the shard as finished: how many documents it read, its token
counts and its part of the filter report. Every file is written under a temporary name and
renamed, and `index.json` comes last. A build killed at any moment therefore restarts by reading
past the documents of finished shards (the dedup state needs them) without tokenizing them, and
ends with the same bytes as an uninterrupted build.

The main process reads and deduplicates; worker processes apply the quality filters and tokenize,
a bounded number of chunks ahead of the writer, so reading overlaps tokenization and memory stays
flat on a 50 GB stream. Drops are tied to the document that follows them, so the filter report
counts exactly the documents read up to the last one used, whatever was read ahead.

A document goes to val when the hash of its stripped content falls under `val_fraction`: the same
document always lands in the same split, whatever the order or the machine. CodeParrot has its own
validation set; there each stream keeps its split, and a cap is shared between them by
`val_fraction`.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import re
import time
from collections import deque
from itertools import islice
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm.auto import tqdm

from base.corpus import (Document, FilterReport, codeparrot_documents, content_hash, deduplicated, file_documents,
                         local_documents, local_files, quality_problem)
from base.fileio import atomic_write_bytes, atomic_write_text
from base.recipe import DataConfig
from base.tokenizer import Tokenizer

INDEX_FILE = "index.json"
FORMAT_VERSION = 2
SPLITS = ("train", "val")
CHUNK_CHARS = 1 << 18  # text per worker task: amortizes the round trip, and little is read past a cap
SHARD_FILE = re.compile(r"^.+-\d{5}\.(json|train\.bin|val\.bin)$")


def build_hash(config: DataConfig, tokenizer_name: str) -> str:
    """What the shards depend on: settings, tokenizer, and the input files' names, sizes and times."""
    inputs: list = []
    if config.source == "local":
        inputs = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in local_files(config.paths)]
    elif config.source == "files":
        files = map(os.path.expanduser, config.paths)
        inputs = [(p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in files if os.path.exists(p)]
    settings = {k: getattr(config, k) for k in ("source", "val_fraction", "max_docs", "max_tokens", "shard_docs",
                                                  "shard_tokens", "max_file_bytes")}
    blob = json.dumps([FORMAT_VERSION, tokenizer_name, settings, inputs], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def in_val(content: str, val_fraction: float) -> bool:
    return int(content_hash(content)[:8], 16) / 2**32 < val_fraction


def read_index(shard_dir: Path) -> dict | None:
    path = Path(shard_dir) / INDEX_FILE
    return json.loads(path.read_text()) if path.exists() else None


def shards_ready(config: DataConfig, tokenizer: Tokenizer, shard_dir: Path) -> bool:
    index = read_index(shard_dir)
    return index is not None and index["build_hash"] == build_hash(config, tokenizer.name)


def _streams(config: DataConfig, pending: FilterReport) -> list[tuple[str, Iterator[Document], str | None, float]]:
    """(name, deduplicated documents, fixed split or None = split by hash, share of the caps).
    Sources and dedup count their drops in `pending` as they read."""
    if config.source == "codeparrot":
        seen: set[bytes] = set()  # one dedup over both, so no validation document repeats a training one
        shares = {"train": 1 - config.val_fraction, "val": config.val_fraction}
        return [(f"codeparrot-{split}", deduplicated(codeparrot_documents(split), pending, seen), split, shares[split])
                for split in SPLITS]
    if config.source == "local":
        documents = local_documents(config.paths, pending, config.max_file_bytes)
        return [("stdlib" if not config.paths else "local", deduplicated(documents, pending), None, 1.0)]
    documents = file_documents(config.paths, pending, config.max_file_bytes)
    return [("files", deduplicated(documents, pending), None, 1.0)]


def _with_drops(documents: Iterator[Document], pending: FilterReport) -> Iterator[tuple[Document | None, FilterReport]]:
    """Each document with the drops counted while reading up to it; at the end (None, the rest)."""
    for doc in documents:
        yield doc, pending.take()
    yield None, pending.take()


_worker_tokenizer: Tokenizer | None = None


def _init_worker(name: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer(name)


def _process(texts: list[str]) -> list[tuple[str | None, np.ndarray | None]]:
    """The quality filter and, for documents that pass, their tokens (with <|endoftext|>)."""
    results = []
    for text in texts:
        problem = quality_problem(text)
        tokens = None if problem else np.asarray(_worker_tokenizer.encode_document(text), dtype=np.uint32)
        results.append((problem, tokens))
    return results


class _Encoder:
    """Filters and tokenizes a stream on `workers` processes (in this one when workers == 1),
    keeping a few chunks in flight per worker and yielding results in reading order."""

    def __init__(self, tokenizer_name: str, workers: int):
        self.workers, self.pool = workers, None
        if workers > 1:
            # fork: workers inherit the loaded encoding instead of each reading the BPE file again.
            context = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
            self.pool = context.Pool(workers, initializer=_init_worker, initargs=(tokenizer_name,))
        else:
            _init_worker(tokenizer_name)

    def __call__(self, items: Iterator[tuple[Document | None, FilterReport]]) -> Iterator[tuple]:
        """(document or None, drops before it, quality problem, tokens) for each item."""
        in_flight: deque = deque()
        for chunk in _chunks(items):
            texts = [doc.content for doc, _ in chunk if doc is not None]
            in_flight.append((chunk, self.pool.apply_async(_process, (texts,)) if self.pool else _process(texts)))
            if len(in_flight) > 2 * self.workers or self.pool is None:
                yield from _merge(*in_flight.popleft())
        while in_flight:
            yield from _merge(*in_flight.popleft())

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()  # tasks still in flight were read past a cap: nothing to wait for
            self.pool.join()


def _chunks(items: Iterator) -> Iterator[list]:
    chunk, chars = [], 0
    for item in items:
        chunk.append(item)
        chars += len(item[0].content) if item[0] is not None else 0
        if chars >= CHUNK_CHARS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def _merge(chunk: list, results) -> Iterator[tuple]:
    results = iter(results if isinstance(results, list) else results.get())
    for doc, drops in chunk:
        yield (doc, drops, *next(results)) if doc is not None else (None, drops, None, None)


class _Shard:
    """A shard being filled: its tokens per split, counts, and its part of the filter report."""

    def __init__(self):
        self.parts: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
        self.read = self.docs = self.tokens = 0
        self.report = FilterReport()

    def add(self, split: str, tokens: np.ndarray, size: int) -> None:
        self.parts[split].append(tokens)
        self.docs += 1
        self.tokens += len(tokens)
        self.report.keep(size)

    def write(self, out_dir: Path, stem: str, digest: str) -> dict:
        meta = {"build_hash": digest, "documents_read": self.read, "documents": {}, "tokens": {},
                "filter_report": self.report.to_dict()}
        for split in SPLITS:
            meta["documents"][split] = len(self.parts[split])
            meta["tokens"][split] = sum(len(p) for p in self.parts[split])
            if self.parts[split]:
                tokens = np.concatenate(self.parts[split]).astype("<u4", copy=False)
                atomic_write_bytes(out_dir / f"{stem}.{split}.bin", tokens.tobytes())
        atomic_write_text(out_dir / f"{stem}.json", json.dumps(meta) + "\n")
        return meta


class _Build:
    """The state of one build: totals, the caps left, the report, the progress bar."""

    def __init__(self, config: DataConfig, out_dir: Path, digest: str, bar: tqdm):
        self.config, self.out_dir, self.digest, self.bar = config, out_dir, digest, bar
        self.report = FilterReport()
        self.totals = {split: {"shards": [], "tokens": 0, "documents": 0} for split in SPLITS}
        self.files: set[str] = set()
        self.started, self.shown, self.new_bytes, self.new_tokens = time.perf_counter(), 0.0, 0, 0

    def finished_shard(self, stem: str) -> dict | None:
        path = self.out_dir / f"{stem}.json"
        meta = json.loads(path.read_text()) if path.exists() else None
        return meta if meta is not None and meta.get("build_hash") == self.digest else None

    def record(self, stem: str, meta: dict) -> None:
        self.files.add(f"{stem}.json")
        self.report.update(FilterReport.from_dict(meta["filter_report"]))
        for split in SPLITS:
            self.totals[split]["documents"] += meta["documents"][split]
            self.totals[split]["tokens"] += meta["tokens"][split]
            if meta["tokens"][split]:
                self.files.add(f"{stem}.{split}.bin")
                self.totals[split]["shards"].append({"file": f"{stem}.{split}.bin", "tokens": meta["tokens"][split],
                                                     "documents": meta["documents"][split]})

    def stream(self, name: str, items: Iterator, fixed_split: str | None, share: float, encoder: _Encoder) -> None:
        config = self.config
        docs_left = math.ceil(config.max_docs * share) if config.max_docs is not None else math.inf
        tokens_left = math.ceil(config.max_tokens * share) if config.max_tokens is not None else math.inf
        index = 0
        while (meta := self.finished_shard(f"{name}-{index:05d}")) is not None and docs_left > 0 and tokens_left > 0:
            for _ in islice(items, meta["documents_read"]):
                pass
            self.record(f"{name}-{index:05d}", meta)
            self.bar.update(meta["documents"]["train"] + meta["documents"]["val"])
            docs_left -= meta["documents"]["train"] + meta["documents"]["val"]
            tokens_left -= meta["tokens"]["train"] + meta["tokens"]["val"]
            index += 1
        if docs_left <= 0 or tokens_left <= 0:
            return
        shard = _Shard()
        for doc, drops, problem, tokens in encoder(items):
            shard.report.update(drops)
            if doc is None:  # the stream's end: drops after its last document belong to no shard
                break
            shard.read += 1
            size = len(doc.content.encode())
            if problem:
                shard.report.drop(problem, size)
                continue
            shard.add(fixed_split or ("val" if in_val(doc.content, config.val_fraction) else "train"), tokens, size)
            docs_left, tokens_left = docs_left - 1, tokens_left - len(tokens)
            self.new_bytes, self.new_tokens = self.new_bytes + size, self.new_tokens + len(tokens)
            self.bar.update(1)
            if time.perf_counter() - self.shown > 0.5:
                self.progress()
            capped = docs_left <= 0 or tokens_left <= 0
            if capped or shard.docs >= config.shard_docs or shard.tokens >= config.shard_tokens:
                self.record(f"{name}-{index:05d}", shard.write(self.out_dir, f"{name}-{index:05d}", self.digest))
                if capped:
                    return
                shard, index = _Shard(), index + 1
        if shard.docs:
            self.record(f"{name}-{index:05d}", shard.write(self.out_dir, f"{name}-{index:05d}", self.digest))
        else:
            self.report.update(shard.report)

    def progress(self) -> None:
        self.shown = time.perf_counter()
        seconds = max(self.shown - self.started, 1e-9)
        self.bar.set_postfix(MB=f"{self.new_bytes / 1e6:.1f}", tok_s=f"{self.new_tokens / seconds:,.0f}")


def build_shards(config: DataConfig, tokenizer: Tokenizer, out_dir: Path) -> dict:
    """Build (or finish building) the shards of `config` in `out_dir`; returns the index."""
    pending = FilterReport()
    streams = _streams(config, pending)  # a source that cannot be read fails here, before any writing
    digest = build_hash(config, tokenizer.name)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / INDEX_FILE).unlink(missing_ok=True)
    for stale in out_dir.glob(".*.tmp"):
        stale.unlink()
    workers = config.num_workers or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
    encoder = _Encoder(tokenizer.name, workers)
    bar = tqdm(desc="tokenizing", unit=" docs", dynamic_ncols=True)
    build = _Build(config, out_dir, digest, bar)
    try:
        for name, documents, fixed_split, share in streams:
            build.stream(name, _with_drops(documents, pending), fixed_split, share, encoder)
    finally:
        encoder.close()
        build.progress()
        bar.close()
    index = {"format_version": FORMAT_VERSION, "build_hash": digest, "tokenizer": tokenizer.name,
             "source": config.source, "val_fraction": config.val_fraction, "splits": build.totals,
             "filter_report": build.report.to_dict()}
    atomic_write_text(out_dir / INDEX_FILE, json.dumps(index, indent=2) + "\n")
    for path in out_dir.iterdir():  # shards of earlier builds with other inputs or settings
        if SHARD_FILE.match(path.name) and path.name not in build.files:
            path.unlink()
    return index
