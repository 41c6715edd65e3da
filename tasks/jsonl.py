"""Task examples as jsonlines: written atomically, read back with errors that name file and line."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Callable, Iterable

import jsonlines

from codegpt.base.errors import UserError
from codegpt.base.fileio import atomic_write_text, check_input_file


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> int:
    buffer = io.StringIO()
    with jsonlines.Writer(buffer, compact=True, sort_keys=False) as writer:
        count = 0
        for record in records:
            writer.write(record)
            count += 1
    atomic_write_text(path, buffer.getvalue())
    return count


def read_jsonl(path: str | os.PathLike, required: tuple[str, ...] = ("prompt", "completion"),
               check: Callable[[dict], str | None] | None = None) -> list[dict]:
    """Every record of a jsonl file; a bad line is a UserError naming the file, the line and the
    problem. `check(record)` may name a problem of the caller's own."""
    path = Path(path)
    check_input_file(path, "jsonl file")
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read ({err})") from None
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{number}: invalid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}:{number}: expected an object, got {type(record).__name__}")
        for field in required:
            if not isinstance(record.get(field), str):
                problem = "missing" if field not in record else f"not a string ({type(record[field]).__name__})"
                raise UserError(f"{path}:{number}: field {field!r} is {problem}")
        if check is not None and (problem := check(record)) is not None:
            raise UserError(f"{path}:{number}: {problem}")
        records.append(record)
    return records
