"""``python -m benchmarks.structured``: the structured-output benchmark from a checkout.

A thin entry point, with the same options and outputs as ``dg-stream bench structured``: the
benchmark is the harness's structured mode (``dg_stream.bench._structured``, whose docstring
says what it measures; its options in ``_cli``, its report in ``_structured_report``).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from dg_stream.bench._cli import structured_main
from dg_stream.bench._structured import (
    SPEED_METHODS,
    TASKS,
    Settings,
    measure_masks,
    run_structured,
)
from dg_stream.bench._structured_report import markdown, plot

__all__ = [
    "SPEED_METHODS", "TASKS", "Settings", "main", "markdown", "measure_masks", "plot",
    "run_structured", "structured_main",
]  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    return structured_main(argv, prog="python -m benchmarks.structured")


if __name__ == "__main__":
    sys.exit(main())
