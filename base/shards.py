"""Filtered documents -> uint32 token shards, split into train and val by document.

The filtered stream is cut into shards of `shard_docs` documents; shard i holds documents
[i * shard_docs, (i + 1) * shard_docs) as `<stream>-<i>.train.bin` and `.val.bin` (raw
little-endian uint32, each document followed by <|endoftext|>), then `<stream>-<i>.json` records
it as finished. Every file is written under a temporary name and renamed, and `index.json` comes
last, so a build killed at any moment restarts by re-reading the documents, skipping the
tokenization of finished shards, and ends with the same bytes as an uninterrupted build.

A document goes to val when the hash of its stripped content falls under `val_fraction`: the same
document always lands in the same split, whatever the order or the machine. (CodeParrot has its
own validation set; there each stream keeps its own split.)
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import time
from itertools import islice
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm.auto import tqdm

from base.corpus import (FilterReport, codeparrot_documents, content_hash, file_documents, filtered, local_documents,
                         local_files)
from base.fileio import atomic_write_bytes, atomic_write_text
from base.recipe import DataConfig
from base.tokenizer import Tokenizer

INDEX_FILE = "index.json"
FORMAT_VERSION = 1
SPLITS = ("train", "val")
TOKENIZE_BATCH = 512


def build_hash(config: DataConfig, tokenizer_name: str) -> str:
    """What the shards depend on: settings, tokenizer, and the input files' names, sizes and times."""
    inputs: list = []
    if config.source == "local":
        inputs = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in local_files(config.paths)]
    elif config.source == "files":
        inputs = [(p, os.path.getsize(p), os.stat(p).st_mtime_ns) for p in config.paths if os.path.exists(p)]
    settings = {k: getattr(config, k) for k in ("source", "val_fraction", "max_docs", "max_tokens", "shard_docs",
                                                  "max_file_bytes")}
    blob = json.dumps([FORMAT_VERSION, tokenizer_name, settings, inputs], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def in_val(content: str, val_fraction: float) -> bool:
    return int(content_hash(content)[:8], 16) / 2**32 < val_fraction


def _streams(config: DataConfig, report: FilterReport) -> list[tuple[str, Iterator, str | None]]:
    """(name, filtered documents, fixed split or None = split by hash)."""
    if config.source == "codeparrot":
        return [(split, filtered(codeparrot_documents(split), report), split) for split in SPLITS]
    if config.source == "local":
        return [("stdlib" if not config.paths else "local", filtered(local_documents(config.paths, report, config.max_file_bytes), report), None)]
    return [("files", filtered(file_documents(config.paths, report), report), None)]


_worker_tokenizer: Tokenizer | None = None


def _init_worker(name: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer(name)


def _encode(texts: list[str]) -> list[np.ndarray]:
    return [np.asarray(_worker_tokenizer.encode_document(t), dtype=np.uint32) for t in texts]


class _Encoder:
    """Tokenizes lists of documents on `workers` processes (in this one when workers == 1)."""

    def __init__(self, tokenizer_name: str, workers: int):
        self.pool = None
        if workers > 1:
            context = multiprocessing.get_context("spawn" if os.name != "posix" else "fork")
            self.pool = context.Pool(workers, initializer=_init_worker, initargs=(tokenizer_name,))
        else:
            _init_worker(tokenizer_name)
        self.workers = workers

    def __call__(self, texts: list[str]) -> list[np.ndarray]:
        if self.pool is None:
            return _encode(texts)
        size = max(1, len(texts) // (self.workers * 8))
        chunks = [texts[i : i + size] for i in range(0, len(texts), size)]
        return [arr for part in self.pool.map(_encode, chunks) for arr in part]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool.join()


def build_shards(config: DataConfig, tokenizer: Tokenizer, out_dir: Path) -> dict:
    """Build (or finish building) the shards of `config` in `out_dir`; returns the index."""
    report = FilterReport()
    streams = _streams(config, report)  # a source that cannot be read fails here, before any writing
    digest = build_hash(config, tokenizer.name)
    out_dir.mkdir(parents=True, exist_ok=True)
    index_path = out_dir / INDEX_FILE
    index_path.unlink(missing_ok=True)
    for stale in out_dir.glob(".*.tmp"):
        stale.unlink()
    workers = config.num_workers or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
    encoder = _Encoder(tokenizer.name, workers)
    totals = {split: {"shards": [], "tokens": 0, "documents": 0} for split in SPLITS}
    docs_left = config.max_docs if config.max_docs is not None else float("inf")
    tokens_left = config.max_tokens if config.max_tokens is not None else float("inf")
    started, seen_bytes, seen_tokens = time.perf_counter(), 0, 0
    bar = tqdm(desc="tokenizing", unit="doc", dynamic_ncols=True)
    try:
        for name, documents, fixed_split in streams:
            for shard in range(10**9):
                if docs_left <= 0 or tokens_left <= 0:
                    break
                stem = f"{name}-{shard:05d}"
                meta_path = out_dir / f"{stem}.json"
                meta = json.loads(meta_path.read_text()) if meta_path.exists() else None
                if meta is not None and meta.get("build_hash") == digest:
                    # Finished before: read past its documents (the dedup state needs them) without tokenizing.
                    used_docs = list(islice(documents, meta["documents_used"]))
                else:
                    used_docs, meta = _write_shard(out_dir, stem, documents, encoder, fixed_split, config,
                                                   docs_left, tokens_left, digest)
                for doc in used_docs:
                    report.keep(len(doc.content.encode()))
                shard_tokens = meta["tokens"]["train"] + meta["tokens"]["val"]
                docs_left -= len(used_docs)
                tokens_left -= shard_tokens
                for split in SPLITS:
                    totals[split]["documents"] += meta["documents"][split]
                    totals[split]["tokens"] += meta["tokens"][split]
                    if meta["tokens"][split]:
                        totals[split]["shards"].append({"file": f"{stem}.{split}.bin", "tokens": meta["tokens"][split]})
                seen_bytes += sum(len(d.content.encode()) for d in used_docs)
                seen_tokens += shard_tokens
                bar.update(len(used_docs))
                bar.set_postfix(MB=f"{seen_bytes / 1e6:.1f}",
                                tok_s=f"{seen_tokens / max(time.perf_counter() - started, 1e-9):,.0f}")
                if len(used_docs) < config.shard_docs:
                    break
    finally:
        encoder.close()
        bar.close()
    index = {"format_version": FORMAT_VERSION, "build_hash": digest, "tokenizer": tokenizer.name,
             "source": config.source, "val_fraction": config.val_fraction, "splits": totals,
             "filter_report": report.to_dict()}
    atomic_write_text(index_path, json.dumps(index, indent=2) + "\n")
    return index


def _write_shard(out_dir: Path, stem: str, documents: Iterator, encoder: _Encoder, fixed_split: str | None,
                 config: DataConfig, docs_left, tokens_left, digest: str) -> tuple[list, dict]:
    """Tokenize up to shard_docs documents (fewer at a cap or the stream's end), in batches small
    enough that a cap stops the reading soon after it is reached."""
    parts: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
    used: list = []
    while len(used) < config.shard_docs and docs_left > 0 and tokens_left > 0:
        batch = list(islice(documents, int(min(TOKENIZE_BATCH, config.shard_docs - len(used), docs_left))))
        if not batch:
            break
        for doc, tokens in zip(batch, encoder([d.content for d in batch])):
            if tokens_left <= 0:
                break
            split = fixed_split or ("val" if in_val(doc.content, config.val_fraction) else "train")
            parts[split].append(tokens)
            used.append(doc)
            docs_left -= 1
            tokens_left -= len(tokens)
    meta = {"build_hash": digest, "documents_used": len(used), "documents": {}, "tokens": {}}
    for split in SPLITS:
        data = np.concatenate(parts[split]) if parts[split] else np.zeros(0, dtype=np.uint32)
        atomic_write_bytes(out_dir / f"{stem}.{split}.bin", data.astype("<u4").tobytes())
        meta["documents"][split] = len(parts[split])
        meta["tokens"][split] = int(data.size)
    atomic_write_text(out_dir / f"{stem}.json", json.dumps(meta) + "\n")
    return used, meta


def read_index(shard_dir: Path) -> dict | None:
    path = Path(shard_dir) / INDEX_FILE
    return json.loads(path.read_text()) if path.exists() else None


def shards_ready(config: DataConfig, tokenizer: Tokenizer, shard_dir: Path) -> bool:
    index = read_index(shard_dir)
    return index is not None and index["build_hash"] == build_hash(config, tokenizer.name)
