"""The one check of every path a command writes.

Every command calls `check_output` for each place it will write, before any work starts, so that a
bad output is one line (a UserError) instead of a traceback after an hour of work or, worse, a
user's file written over. It refuses, naming the path:

- an input of the same command, or a directory holding one; and a directory output inside an
  input directory (that directory is replaced whole by its owner, or refuses what it did not
  make), unless the inputs are source trees read for files of their own kind (`nest_in_inputs`);
- a path under a regular file, a place that cannot be written (a read-only or pseudo file system
  such as /proc, no permission);
- an existing directory where a file is written, and the converse;
- an existing output the command did not make: `foreign(path)` says what in it is not the
  command's own; without it, a non-empty directory is refused unless `overwrite` is given and it
  is a model directory (ours or Hugging Face GPT-2's), which the command then replaces whole.

Input files have their own check, base/fileio.py's `check_input_file` (no device, FIFO or socket).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Literal, Mapping, Sequence

from codegpt.base.checkpoint import CONFIG_FILE, FORMAT
from codegpt.base.errors import UserError
from codegpt.base.fileio import nearest_existing, read_json


PathLike = str | os.PathLike


def check_output(path: PathLike, *, command: str, inputs: Mapping[str, PathLike | Sequence[PathLike]] | None = None,
                 kind: Literal["directory", "file"] = "directory", overwrite: bool = False,
                 foreign: Callable[[Path], str | None] | None = None, nest_in_inputs: bool = False,
                 key: str | None = None) -> None:
    """Refuse, as a UserError, an output `path` that `command` (e.g. "codegpt merge") must not
    write: see the module's docstring. `inputs` names the command's inputs (name -> a path, or a
    list of paths), `key` how the user gave `path` (a flag or recipe key; the message ends with it)."""
    out = Path(path)
    where = f" ({key})" if key else ""
    target = out.resolve()
    named = [(name, p) for name, paths in (inputs or {}).items()
             for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
    for name, source in named:
        source = Path(source).expanduser().resolve()
        if target == source or target in source.parents:
            relation = "is the" if target == source else f"holds {source}, the"
            raise UserError(f"{out}: {relation} {name}; {command} never writes over its own input{where}")
        if kind == "directory" and not nest_in_inputs and source in target.parents and source.is_dir():
            raise UserError(f"{out}: inside {source}, the {name}; {command} writes its output outside its "
                            f"inputs{where}")
    existing = nearest_existing(target)
    if existing != target:
        if not existing.is_dir():
            raise UserError(f"{out}: {existing} is a file, not a directory{where}")
        _check_writable(out, existing, where)
        return
    if kind == "file":
        if target.is_dir():
            raise UserError(f"{out}: is a directory; a file is written here{where}")
        if not target.is_file():
            raise UserError(f"{out}: is not a regular file{where}")
        _check_writable(out, target.parent, where)
    else:
        if not target.is_dir():
            raise UserError(f"{out}: exists and is not a directory{where}")
        _check_writable(out, target, where)
        if not any(target.iterdir()):
            return
    if foreign is not None:
        if (reason := foreign(out)) is not None:
            raise UserError(f"{out}: {reason}{where}")
        return
    if kind == "file":
        raise UserError(f"{out}: exists; {command} writes only a new file{where}")
    first = min(p.name for p in target.iterdir())
    if not overwrite:
        raise UserError(f"{out}: not empty (holds {first}); pass --overwrite to replace a model directory{where}")
    if not is_model_directory(target):
        raise UserError(f"{out}: not a model directory (holds {first}); --overwrite replaces only a model "
                        f"directory{where}")


def is_model_directory(path: Path) -> bool:
    """A CodeGPT or Hugging Face GPT-2 model directory (by its config.json)."""
    config = path / CONFIG_FILE
    document = read_json(config, "") if config.is_file() else {}
    return document.get("format") == FORMAT or document.get("model_type") == "gpt2"


def _check_writable(out: Path, directory: Path, where: str) -> None:
    """`directory` accepts new entries: permissions (os.access), then a probe directory made and
    removed at once, which also catches what permissions do not show (/proc, /sys, root on a
    read-only bind)."""
    if not os.access(directory, os.W_OK | os.X_OK):
        raise UserError(f"{out}: cannot write in {directory} (permission denied or read-only){where}")
    try:
        os.rmdir(tempfile.mkdtemp(dir=directory, prefix=".codegpt-probe-"))
    except OSError as err:
        raise UserError(f"{out}: cannot write in {directory} ({err.strerror}){where}") from None
