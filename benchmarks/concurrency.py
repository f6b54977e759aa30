"""``python -m benchmarks.concurrency``: the concurrent-streams benchmark from a checkout.

A thin entry point, with the same options and outputs as ``dg-stream bench concurrency``: the
benchmark is the harness's concurrency mode (``dg_stream.bench._concurrency``, whose docstring
says what it measures; its options in ``_cli``, its report in ``_concurrency_report``). The
names below are re-exported for ``benchmarks/gpu_run.py``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from dg_stream.bench._cli import concurrency_main
from dg_stream.bench._concurrency import (
    BASELINE,
    DEFAULT_PROMPTS,
    METHODS,
    PEER,
    PLAIN,
    SUBJECT,
    OursMethod,
    PeerMethod,
    Run,
    Settings,
    Stream,
    run_concurrency,
    targets,
)
from dg_stream.bench._concurrency import candidates as _candidates
from dg_stream.bench._concurrency import choose_prompts as _choose_prompts
from dg_stream.bench._concurrency import record as _record
from dg_stream.bench._concurrency_report import markdown, plot
from dg_stream.bench._config import default_models as _default_models
from dg_stream.bench._report import percentile as _percentile

__all__ = [
    "BASELINE", "DEFAULT_PROMPTS", "METHODS", "PEER", "PLAIN", "SUBJECT", "OursMethod",
    "PeerMethod", "Run", "Settings", "Stream", "_candidates", "_choose_prompts",
    "_default_models", "_percentile", "_record", "main", "markdown", "plot", "run_concurrency",
    "targets",
]  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    return concurrency_main(argv, prog="python -m benchmarks.concurrency")


if __name__ == "__main__":
    sys.exit(main())
