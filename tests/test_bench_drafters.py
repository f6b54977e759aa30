"""benchmarks/drafters.py at toy size: both ways of drafting run, and its table and files."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tiny(verifier: Any) -> dict[str, Any]:
    from _models import tiny_causal_lm, tiny_dflash

    from dg_stream._drafters import CausalDrafter, DFlashDrafter

    del verifier  # the toy drafters come with their own tiny verifier
    small = tiny_causal_lm("qwen3", 300)
    return {
        "dflash": DFlashDrafter(tiny_dflash(small, 2, block_size=5), small),
        "causal": CausalDrafter(tiny_causal_lm("llama", 300, seed=7)),
    }


def test_the_drafters_benchmark_times_both_ways_and_writes_its_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    sys.path.insert(0, str(ROOT))
    from benchmarks.drafters import main

    main(
        ["--rows", "1,3", "--block", "3", "--rounds", "2", "--repeats", "1",
         "--out", str(tmp_path), "--name", "toy"],
        build=_tiny,
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert "| dflash | 3 |" in printed and "| causal | 3 |" in printed
    document = json.loads((tmp_path / "drafters-toy.json").read_text())
    assert [(r["drafter"], r["rows"]) for r in document["rows"]] == [
        ("dflash", 1), ("dflash", 3), ("causal", 1), ("causal", 3),
    ]  # fmt: skip
    assert all(r["batched_trait"] and r["one_at_a_time_ms"] > 0 for r in document["rows"])
    assert (tmp_path / "drafters-toy.png").stat().st_size > 0
