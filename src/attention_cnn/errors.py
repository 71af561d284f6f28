"""User-facing errors: bad input that the user can fix, reported as one clear line, never a traceback."""

from __future__ import annotations

import functools
import sys
from typing import Callable


class UserError(Exception):
    """Bad input (params, files, folders). The message names the key or path and says what to do."""


def exit_on_user_error(main: Callable[..., None]) -> Callable[..., None]:
    """Wrap a stage or CLI entry point: a UserError prints `error: ...` to stderr and exits with status 2; Ctrl-C
    exits with 130, as the shell reports a SIGINT, without a traceback (what was stopped says so itself)."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            sys.exit(130)

    return wrapper
