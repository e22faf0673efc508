"""How every ``python -m`` entry point reports a user's mistake: one ``error: ...`` line, exit 2.

A mistake in the user's input (config key or value, checkpoint, data root, image, VOC file,
profile or cluster file) raises a :class:`UserError` (or FileNotFoundError) whose message names the file /
key and the problem; :func:`run_cli` turns it into one line on stderr and exit status 2, like
argparse does for a bad flag. Anything else is a bug and keeps its traceback (exit 1).

    if __name__ == "__main__":
        run_cli(cli)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any, NoReturn


class UserError(ValueError):
    """Bad input from the user; the message names the file or key and the problem."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes (unknown flag, bad choice or number) print the usage, then raise a
    UserError, so that :func:`run_cli` reports them like every other mistake."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        raise UserError(message)


USER_ERRORS: tuple[type[BaseException], ...] = (UserError, FileNotFoundError)


def run_cli(entry: Callable[..., Any], *args: Any) -> Any:
    """``entry(*args)``; a user mistake -> ``error: <message>`` (one line) on stderr, exit 2. An int
    returned by ``entry`` is the exit status (``sys.exit``), anything else is returned."""
    try:
        out = entry(*args)
    except USER_ERRORS as err:
        message = " ".join(str(err).split("\n")) or type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
    if isinstance(out, int) and not isinstance(out, bool):
        raise SystemExit(out)
    return out
