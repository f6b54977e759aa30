"""The benchmarks in one harness: the concurrency benchmark is a mode of ``dg_stream.bench``.

``benchmarks/concurrency.py`` is a thin entry point (no second table, percentile or report
writer beside the package's), the concurrency report is written with the package's table
helper, and ``dg-stream bench concurrency`` reaches the mode. No models are loaded here: the
tiny end-to-end run is ``test_bench_concurrency.py``.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import benchmarks.concurrency as shim
from dg_stream.bench import _concurrency, _concurrency_report, _report, main

ROOT = Path(__file__).resolve().parent.parent
SHIM = ROOT / "benchmarks" / "concurrency.py"


def test_the_script_is_a_thin_entry_point_to_the_package() -> None:
    text = SHIM.read_text(encoding="utf-8")
    assert len(text.splitlines()) < 60
    tree = ast.parse(text)
    defined = [
        node.name
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
    ]
    assert defined == ["main"]  # the entry point; every other name is the package's
    # What benchmarks/gpu_run.py imports from it is the package's own.
    assert shim.OursMethod is _concurrency.OursMethod
    assert shim.Settings is _concurrency.Settings
    assert shim._candidates is _concurrency.candidates
    assert shim._choose_prompts is _concurrency.choose_prompts
    assert shim._record is _concurrency.record
    assert shim._percentile is _report.percentile
    assert shim.markdown is _concurrency_report.markdown


@pytest.mark.parametrize("script", ["concurrency.py", "structured.py"])
def test_no_function_of_the_package_is_written_again_in_the_concurrency_script(
    script: str,
) -> None:
    package = ROOT / "src" / "dg_stream" / "bench"
    ours = {
        node.name
        for path in package.glob("*.py")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.FunctionDef)
    }
    defined = {
        node.name
        for node in ast.walk(ast.parse((SHIM.parent / script).read_text(encoding="utf-8")))
        if isinstance(node, ast.FunctionDef)
    }
    assert defined & ours <= {"main"}


def _result() -> dict[str, Any]:
    """A concurrency result document as ``run_concurrency`` returns it, at two levels."""
    rows = []
    for level in (1, 2):
        for method in _concurrency.METHODS:
            peer = method == _concurrency.PEER
            rows.append(
                {
                    "streams": level,
                    "method": method,
                    "tokens_per_second": 100.0 * level,
                    "tokens_per_second_runs": [90.0 * level, 110.0 * level],
                    "vs_one_at_a_time": 1.5 if method == _concurrency.SUBJECT else 1.0,
                    "first_chunk_p50_ms": 12.5,
                    "first_chunk_p95_ms": 20.0,
                    "gap_p50_ms": 5.0,
                    "gap_p95_ms": None if peer else 9.0,
                    "rows_per_call": None if peer else float(level),
                    "tokens_per_forward": 2.25,
                    "generations": level,
                    "identical": level,
                    "unavailable": dict(_concurrency.PEER_UNAVAILABLE) if peer else {},
                }
            )
    return {
        "name": "unit",
        "machine": {
            "cpu": "a CPU",
            "torch": "2.x",
            "transformers": "5.x",
            "load_average_at_start": [0.4, 0.5, 0.5],
        },
        "settings": {
            "streams": [1, 2],
            "new_tokens": 8,
            "repeats": 2,
            "device": "cpu",
            "dtype": "torch.float32",
            "threads": 2,
            "prompt_kind": "mixed",
            "hybrid": {"block_size": 8, "adaptive": True},
        },
        "prompts": [{"prompt_tokens": 10}, {"prompt_tokens": 30}],
        "results": rows,
        "batched_vs_one_at_a_time": {"1": 1.5, "2": 1.5},
        "targets": _concurrency.targets(rows),
        "transformers_log": [],
        "notes": ["a note"],
    }


def test_the_concurrency_report_is_written_with_the_package_table(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[Any, ...]] = []

    def spy(header: Any, align: str, rows: Any) -> list[str]:
        rows = [list(r) for r in rows]
        calls.append((tuple(header), align, rows))
        return _report.markdown_table(header, align, rows)

    monkeypatch.setattr(_concurrency_report, "markdown_table", spy)
    text = _concurrency_report.markdown(_result())
    assert [c[0][:2] for c in calls] == [("streams", "method"), ("streams", "1")]
    lines = text.splitlines()
    assert lines[0].startswith("dg_stream concurrency `unit`: streams 1, 2, 8 new tokens, 2 rep")
    assert lines[0].endswith(
        "cpu float32, 2 threads, a CPU, torch 2.x, transformers 5.x, load average 0.4 at start"
    )
    header = "| " + " | ".join(_concurrency_report.TABLE_HEADER) + " |"
    at = lines.index(header)
    assert lines[at + 1] == "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    assert lines[at + 2] == (
        "| 1 | batched hybrid | 100 (90–110) | 1.50× | 12.5 | 20.0 | 5.0 | 9.0 | 1.00 | 2.25 "
        "| 1/1 |"
    )
    peer = (
        "| 1 | transformers generate_batch | 100 (90–110) | 1.00× | 12.5 | 20.0 | 5.0 | n/a "
        "| n/a [1] | 2.25 | 1/1 |"
    )
    assert peer in lines
    assert "[1] " + _concurrency.PEER_UNAVAILABLE["rows_per_call"] in lines
    ratios = lines.index("| streams | 1 | 2 |")
    assert lines[ratios + 1 : ratios + 3] == ["|---|---:|---:|", "| ratio | 1.50× | 1.50× |"]
    assert "**targets**" in lines and lines[-1] == "note: a note"


def test_the_shared_table_and_percentile() -> None:
    assert _report.markdown_table(("a", "b"), "lr", [(1, "x")]) == [
        "| a | b |",
        "|---|---:|",
        "| 1 | x |",
    ]
    with pytest.raises(ValueError, match="columns"):
        _report.markdown_table(("a", "b"), "l", [])
    with pytest.raises(ValueError, match="cells"):
        _report.markdown_table(("a", "b"), "lr", [(1,)])
    values = [3.0, 1.0, 4.0, 1.5, 9.0, 2.6]
    for q in (0, 50, 95, 100):
        assert _report.percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert _report.percentile([], 50) is None
    assert _report.fmt(None) == "n/a" and _report.fmt(1.234, ".2f") == "1.23"


def test_the_harness_reaches_the_concurrency_mode(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["concurrency", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: dg-stream bench concurrency") and "--streams" in out
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "dg-stream bench concurrency" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        shim.main(["--help"])
    assert capsys.readouterr().out.startswith("usage: python -m benchmarks.concurrency")
