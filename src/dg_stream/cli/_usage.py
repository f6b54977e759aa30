"""What every command shares about failing: the program's name and the usage error (exit code
2, or 1 for a missing part of the installation)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

__all__ = ["PROG", "UsageError", "missing"]

PROG = "dg-stream"


def missing(what: str, module: str, hint: str) -> Callable[[argparse.Namespace], int]:
    """A command handler for a part of the installation that is absent: it fails with exit
    code 1, saying that ``module`` cannot be imported and how to install it (``hint``)."""

    def fail(args: argparse.Namespace) -> int:
        raise UsageError(
            f"{what} is not available in this installation ({module} cannot be imported; {hint})",
            code=1,
        )

    return fail


class UsageError(Exception):
    """A wrong command line or a part of the installation that is missing; ``main`` prints it
    as one line and exits with ``code``."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code
