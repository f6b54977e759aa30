"""``dg-stream bench``: hands its arguments to ``dg_stream.bench``, which parses its own."""

from __future__ import annotations

import importlib
from collections.abc import Sequence

from .._errors import missing_extra
from ._usage import UsageError

__all__ = ["cmd_bench"]


def cmd_bench(argv: Sequence[str]) -> int:
    try:
        bench = importlib.import_module("dg_stream.bench")
    except ImportError as exc:
        if getattr(exc, "name", None) not in ("dg_stream.bench", None):
            raise missing_extra("dg-stream bench", ("bench",), exc) from None
        raise UsageError(
            "benchmarks are not available in this installation (dg_stream.bench is missing)", code=1
        ) from None
    return int(bench.main(list(argv)) or 0)
