"""Text from the command line and stdin, repaired: Python hands undecodable bytes over as lone
surrogates, which no tokenizer takes."""

from __future__ import annotations

import argparse
import sys

from ._usage import PROG

__all__ = ["repair_text_options", "valid_text"]


def valid_text(text: str, what: str) -> str:
    """``text`` with invalid UTF-8 replaced by U+FFFD, and a warning on stderr when it had any.

    Python hands undecodable bytes of the command line and of stdin over as lone surrogates
    (``surrogateescape``); no tokenizer takes those.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        print(
            f"{PROG}: warning: {what} is not valid UTF-8; invalid bytes were replaced with U+FFFD",
            file=sys.stderr,
            flush=True,
        )
    return text


def repair_text_options(args: argparse.Namespace) -> None:
    """``--system`` and ``--stop`` texts with invalid UTF-8 replaced (see ``valid_text``)."""
    if args.system is not None:
        args.system = valid_text(args.system, "--system")
    if args.stop:
        args.stop = [valid_text(text, "--stop") for text in args.stop]
