"""benchmarks/defaults.py at toy size: its table, JSON and figure, and greedy identity."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_defaults_benchmark_writes_its_table_and_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    sys.path.insert(0, str(ROOT))
    from benchmarks.defaults import main

    main(
        [
            "--prompts", "1", "--new-tokens", "6", "--repeats", "1",
            "--dtypes", "float32", "--out", str(tmp_path), "--name", "toy",
        ]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert "| float32 | greedy |" in printed and "| float32 | seeded |" in printed
    document = json.loads((tmp_path / "defaults-toy.json").read_text())
    assert [r["mode"] for r in document["rows"]] == ["greedy", "sampled", "seeded"]
    assert document["rows"][0]["identical"] is True  # the default writes plain's tokens
    assert all(r["ratio"] > 0 for r in document["rows"])
    assert (tmp_path / "defaults-toy.png").stat().st_size > 0
