"""User-facing errors: one line naming what is wrong and where, exit code 2, no traceback."""

from __future__ import annotations

import argparse
import functools
import sys

EXIT_USAGE = 2


class UserError(Exception):
    """Bad input from the user (a recipe, a file, a checkpoint, an argument). The message names
    the file, line and key where they are known; commands print it alone and exit with 2."""


class InvalidValue(Exception):
    """Raised by a recipe dataclass's `validate()`: `key` is relative to that dataclass; the
    recipe loader turns it into a UserError naming the file, line and dotted key."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key
        self.message = message


def cli_entry(main):
    """Wrap a command's main(): a UserError becomes `error: <message>` on stderr and exit 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            sys.stdout.flush()
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(EXIT_USAGE)

    return wrapper


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes are UserErrors, so a bad argument is one line naming it and exit 2
    (argparse's own prints the usage too); --help still prints the whole usage."""

    def error(self, message):
        raise UserError(f"{message} (see --help)")


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1 (a count of samples, a batch, a limit)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value
