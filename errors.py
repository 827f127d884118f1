"""User-facing errors: bad input is reported as one line on stderr with exit code 2, no traceback."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


class UserError(Exception):
    """A problem with the user's input (file, config, flag). Its message names the problem and the fix."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as a single line (argparse's default also prints the usage)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def run_main(main: Callable[[], object]) -> None:
    """Run a CLI entry point; a UserError becomes `error: <message>` on stderr and exit code 2."""
    try:
        main()
    except UserError as e:
        print_error(str(e))
        sys.exit(2)


def print_error(message: str) -> None:
    """The one line a CLI prints for a problem it stops on."""
    print(f"error: {message}", file=sys.stderr, flush=True)
