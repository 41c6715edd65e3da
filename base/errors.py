"""User-facing errors: one line naming what is wrong and where, exit code 2, no traceback."""

from __future__ import annotations

import functools
import sys

EXIT_USAGE = 2


class UserError(Exception):
    """Bad input from the user (a recipe, a file, a checkpoint, an argument). The message names
    the file, line and key where they are known; commands print it alone and exit with 2."""


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
