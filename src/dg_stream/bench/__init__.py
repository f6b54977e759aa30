"""Benchmarks: dg_stream's hybrid decoding against plain decoding and its peers.

``dg-stream bench --quick`` (or ``python -m benchmarks.run --quick`` in a checkout) runs every
method on the same verifier in one process, interleaved, and writes a JSON file with every
raw figure, PNG plots and a Markdown table. See the README's Benchmarks section.
"""

from __future__ import annotations

from ._cli import main
from ._config import BenchConfig
from ._run import run_benchmark

__all__ = ["BenchConfig", "main", "run_benchmark"]
