"""What the command-line tools share: bad input ends in one line and exit status 2."""

from __future__ import annotations

import sys
from typing import NoReturn

from absl import flags

__all__ = ["fail", "parse_flags"]


def fail(message: str) -> NoReturn:
    """Prints `error: <message>` on stderr and exits with status 2 (bad input)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parser for `app.run(..., flags_parser=parse_flags)`: a bad flag is one
    `fail` line instead of absl's usage text."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        fail(str(error))
