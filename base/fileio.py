"""Atomic writes: a file or a directory appears complete under its final name, or not at all.

A full disk (or quota) during a write is a UserError naming the path and the bytes it needs; the
temporaries are removed and the previous file or directory stays in place. Reads of a file the
user names go through `check_input_file` first: a device, FIFO or socket is refused before it is
opened (/dev/zero would fill memory, a FIFO would block forever).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path

from codegpt.base.errors import UserError


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# The errors of a full disk or quota, also as Rust libraries (safetensors) word them.
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_RUST_DISK_FULL = re.compile(rf"\(os error (?:{'|'.join(map(str, _DISK_FULL))})\)")


def _disk_full(err: BaseException | None) -> bool:
    """Whether `err` comes of a full disk: an OSError saying so, safetensors' error quoting one, or
    an error raised while handling one (torch.save into a file object wraps the OSError)."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in _DISK_FULL or _RUST_DISK_FULL.search(str(err)):
            return True
        err = err.__cause__ or err.__context__
    return False


class DiskFull(UserError):
    """A write that found the disk (or quota) full; the message names the path and the bytes."""


def _disk_full_error(path: Path, needs: str) -> DiskFull:
    free = shutil.disk_usage(nearest_existing(path)).free
    return DiskFull(f"{path}: no space left on the device (needs {needs} bytes, {free:,} free); nothing was "
                     "replaced")


def nearest_existing(path: Path) -> Path:
    """`path` or its nearest ancestor that exists."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# tempfile makes its files 0600 and directories 0700, private to the writer; what appears under
# the final name gets the modes any new file or directory would (0644 and 0755 under umask 022).
_UMASK = _umask()
FILE_MODE, DIRECTORY_MODE = 0o666 & ~_UMASK, 0o777 & ~_UMASK


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if _disk_full(err):
            raise _disk_full_error(path, f"{len(data):,}") from None
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, size: int | None = None):
    """Yield a temporary directory beside `path`; on success it replaces `path` whole.

    The old directory is moved aside before the new one is renamed in and deleted after, so at
    every instant `path` is either the old complete directory, the new one, or (for the moment
    between two renames) absent with the old one at `<path>.old`, which `recover` puts back.
    `size`, the bytes the directory will hold where the caller knows them, is what a full disk's
    message says it needs (otherwise: more than was written before the disk filled).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        tmp.chmod(DIRECTORY_MODE)
        yield tmp
        for child in tmp.iterdir():
            if child.is_file():
                with open(child, "rb") as f:
                    os.fchmod(f.fileno(), FILE_MODE)  # safetensors writes 0600 files too
                    os.fsync(f.fileno())
        old = path.with_name(path.name + ".old")
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException as err:
        full = isinstance(err, DiskFull) or _disk_full(err)  # a DiskFull names a file inside `tmp`
        written = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file()) if full else 0
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise _disk_full_error(path, f"{size:,}" if size is not None else f"more than {written:,}") from None
        raise


def recover(path: str | os.PathLike) -> None:
    """Undo a replacement cut short between its two renames (see `atomic_directory`)."""
    path = Path(path)
    old = path.with_name(path.name + ".old")
    if not path.exists() and old.is_dir():
        os.replace(old, path)


def temporary_names(names: str) -> re.Pattern:
    """The temporary names the atomic writes above give the files or directories whose final
    names match the regular expression `names`: `.NAME.XXXXXXXX.tmp` (tempfile's 8 random
    characters)."""
    return re.compile(rf"^\.(?:{names})\.[a-z0-9_]{{8}}\.tmp$")


def remove_temporaries(directory: str | os.PathLike, names: str) -> None:
    """Remove what atomic writes of `names` left in `directory` when killed midway, and nothing
    else: a user's `.notes.tmp` stays."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    pattern = temporary_names(names)
    for path in directory.iterdir():
        if pattern.match(path.name):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()


def special_file(path: str | os.PathLike) -> str | None:
    """What `path` is when it is a device, FIFO or socket ("a FIFO", ...), else None (a regular
    file, a directory, or nothing there)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"))
    return next((name for test, name in kinds if test(mode)), None)


def check_input_file(path: str | os.PathLike, what: str) -> None:
    """Refuse a device, FIFO or socket given as the input file `what` (e.g. "prompt file"),
    before it is opened. A missing path or a directory is left to the caller's own message."""
    if (kind := special_file(path)) is not None:
        raise UserError(f"{path}: is {kind}, not a regular file ({what})")


def read_json(path: str | os.PathLike, missing: str) -> dict:
    """The JSON object in a file; `missing` is the UserError message when it does not exist, and
    anything else that is not a JSON object (unreadable, not UTF-8, invalid, a list, a device) is a
    UserError naming the file (and the line where JSON says)."""
    check_input_file(path, "a JSON file")
    try:
        document = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(missing) from None
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror})") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not a JSON text file (byte {err.start} is not UTF-8)") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}: invalid JSON: {err.msg}") from None
    if not isinstance(document, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(document).__name__}")
    return document
