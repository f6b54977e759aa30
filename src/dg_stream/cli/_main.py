"""``main``: runs a ``dg-stream`` command line and turns every way it can end into an exit code
and at most one line on stderr."""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Sequence

from .._errors import DGStreamError, InvalidRequestError
from ._bench import cmd_bench
from ._parser import build_parser
from ._usage import PROG, UsageError

__all__ = ["main"]


def _error(message: str) -> None:
    first = message.strip().splitlines()[0] if message.strip() else "unknown error"
    print(f"{PROG}: error: {first}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``dg-stream`` with ``argv`` (default: the command line); returns the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    debug = bool(os.environ.get("DG_STREAM_DEBUG"))
    try:
        try:
            if args_list[:1] == ["bench"]:  # bench parses its own options
                return cmd_bench(args_list[1:])
            args = build_parser().parse_args(args_list)
        except SystemExit as exc:  # --help, --version, or a usage error (already printed)
            return int(exc.code or 0) if isinstance(exc.code, int) else 2
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (``| head``): say nothing more, and do not let the interpreter
        # complain about the unflushable stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except UsageError as exc:
        _error(str(exc))
        return exc.code
    except InvalidRequestError as exc:
        _error(f"invalid request: {exc}")
        return 2
    except DGStreamError as exc:
        if debug:
            traceback.print_exc()
        _error(str(exc))
        return 1
    except Exception as exc:  # a bug: still one line, with a way to get the details
        if debug:
            traceback.print_exc()
        _error(
            f"internal error: {type(exc).__name__}: {exc} (set DG_STREAM_DEBUG=1 for the traceback)"
        )
        return 1
