"""The Hugging Face export's tokenizer against tiktoken on every .py file of this Python's standard
library: files, tokens, files whose ids differ, files whose text decodes differently, and the
seconds each side takes, on this CPU.

    .venv/bin/python -m bench.hf_tokenizer [--show 5]

The tokenizer is written as `codegpt convert --to hf` writes it and read back with AutoTokenizer,
offline. Two modes, as our tokenizer has them: special-token strings in the text read as plain
text (`Tokenizer.encode`, our default; transformers with split_special_tokens=True) and read as
the special tokens (`allow_special=True`; transformers' default). Each file is tokenized alone,
one call per file on one thread, as a server tokenizes a prompt. A file that is not valid UTF-8
is read with replacement characters (counted), so that every file is compared.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from transformers import AutoTokenizer  # noqa: E402

from bench.common import cpu_name  # noqa: E402
from codegpt.base.data.corpus import default_local_paths, local_files  # noqa: E402
from codegpt.base.hf_tokenizer import write_hf_tokenizer  # noqa: E402
from codegpt.base.tokenizer import ENCODING, Tokenizer  # noqa: E402


def read_all(files: list[Path]) -> tuple[list[str], int]:
    texts, not_utf8 = [], 0
    for path in files:
        data = path.read_bytes()
        try:
            texts.append(data.decode("utf-8"))
        except UnicodeDecodeError:
            texts.append(data.decode("utf-8", errors="replace"))
            not_utf8 += 1
    return texts, not_utf8


def timed(encode, texts: list[str], repeats: int) -> tuple[list[list[int]], float]:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        ids = [encode(text) for text in texts]
        best = min(best, time.perf_counter() - started)
    return ids, best


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--show", type=int, default=5, help="mismatched files to describe, per mode")
    parser.add_argument("--repeats", type=int, default=1, help="timed passes per side; the fastest is reported")
    args = parser.parse_args()
    ours = Tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        # No length limit: whole files are tokenized here, not model inputs.
        write_hf_tokenizer(Path(tmp), ENCODING, max_length=sys.maxsize)
        convert_s = time.perf_counter() - started
        hf = AutoTokenizer.from_pretrained(tmp)
    files = local_files([])
    texts, not_utf8 = read_all(files)
    print(f"CPU: {cpu_name()}; tiktoken {version('tiktoken')} ({ours.encoding.name}), "
          f"tokenizers {version('tokenizers')}, transformers {version('transformers')} ({type(hf).__name__})")
    print(f"every .py file under {default_local_paths()[0]} (site-packages left out): {len(files):,} files, "
          f"{sum(len(t) for t in texts):,} characters ({not_utf8} not UTF-8, read with replacement); "
          f"tokenizer converted in {convert_s:.1f} s")
    modes = {
        "special strings as text": (lambda t: ours.encode(t),
                                    lambda t: hf.encode(t, add_special_tokens=False, split_special_tokens=True)),
        "special strings as tokens": (lambda t: ours.encode(t, allow_special=True),
                                      lambda t: hf.encode(t, add_special_tokens=False)),
    }
    print("\n| mode | files | tokens | id mismatches | decode mismatches | tiktoken s | transformers s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    details = []
    for mode, (tiktoken_encode, hf_encode) in modes.items():
        expected, tiktoken_s = timed(tiktoken_encode, texts, args.repeats)
        got, hf_s = timed(hf_encode, texts, args.repeats)
        mismatched = [i for i, (a, b) in enumerate(zip(expected, got)) if a != b]
        decode_mismatched = [i for i, ids in enumerate(expected)
                             if hf.decode(ids, clean_up_tokenization_spaces=False) != ours.decode(ids)]
        print(f"| {mode} | {len(texts):,} | {sum(map(len, expected)):,} | {len(mismatched)} | "
              f"{len(decode_mismatched)} | {tiktoken_s:.2f} | {hf_s:.2f} |")
        for i in mismatched[: args.show]:
            at = first_difference(expected[i], got[i])
            details.append(f"{mode}: {files[i]}: token {at}: tiktoken {expected[i][at:at + 5]} "
                           f"transformers {got[i][at:at + 5]}")
        details += [f"{mode}: {files[i]}: decodes differently" for i in decode_mismatched[: args.show]]
    print("\n".join(["", *details]) if details else "\nevery file: equal ids, equal decoded text")


if __name__ == "__main__":
    main()
