"""The concurrency benchmark (benchmarks/concurrency.py) at a tiny scale: files and their keys.

Tiny random-init models, 1 and 2 streams of 4 tokens: no timing assertions, only the
bookkeeping, the losslessness of every dg_stream method and that transformers' continuous
batching ran beside them.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from _saved_models import save_tiny_pair

ROOT = Path(__file__).resolve().parent.parent
PNG = b"\x89PNG\r\n\x1a\n"
PROMPTS = [
    ("short", "def add(a, b):\n    return"),
    (
        "long",
        "class Stack:\n    def __init__(self):\n        self.items = []\n    def push(self, x):\n",
    ),
    ("short", "print('héllo wörld')\ndef"),
    ("long", "import os\nimport sys\n\n\ndef main(argv):\n    for name in argv:\n"),
]


def _script() -> ModuleType:
    name = "_bench_concurrency"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "concurrency.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_files(
    tmp_path_factory: pytest.TempPathFactory, tiny_tok: Any, tiny_verifier: Any, tiny_drafter: Any
) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("concurrency-models")
    verifier, drafter = save_tiny_pair(root, tiny_tok, tiny_verifier, tiny_drafter)
    prompts = root / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"id": f"{kind}-{i}", "kind": kind, "source": "test", "text": text}) + "\n"
            for i, (kind, text) in enumerate(PROMPTS)
        )
    )
    return {"verifier": verifier, "drafter": drafter, "prompts": prompts}


def test_tiny_run_writes_json_png_and_table(
    tiny_files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    script = _script()
    argv = [
        "--verifier", str(tiny_files["verifier"]),
        "--drafter", str(tiny_files["drafter"]),
        "--prompts", str(tiny_files["prompts"]),
        "--streams", "1,2",
        "--new-tokens", "4",
        "--repeats", "1",
        "--threads", "1",
        "--out", str(tmp_path),
        "--name", "tiny",
    ]  # fmt: skip
    assert script.main(argv) == 0
    out = capsys.readouterr().out
    assert "| streams | method | tokens/s |" in out and "**targets**" in out
    assert (tmp_path / "concurrency-tiny-cpu.png").read_bytes().startswith(PNG)

    result = json.loads((tmp_path / "concurrency-tiny-cpu.json").read_text())
    for key in ("machine", "settings", "methods", "prompts", "results", "targets", "runs"):
        assert key in result, key
    assert result["machine"]["torch"] and result["machine"]["cpu"]
    settings = result["settings"]
    assert settings["streams"] == [1, 2] and settings["new_tokens"] == 4
    assert settings["threads"] == 1 and settings["greedy"] is True
    assert settings["transformers_continuous_batching"]["allow_block_sharing"] is False
    methods = list(result["methods"])
    assert methods == [
        "batched hybrid",
        "batched plain",
        "one-at-a-time hybrid",
        "transformers generate_batch",
    ]

    rows = {(r["streams"], r["method"]): r for r in result["results"]}
    assert set(rows) == {(c, m) for c in (1, 2) for m in methods}
    for (streams, method), row in rows.items():
        assert row["generations"] == streams and row["tokens_per_second"] > 0
        assert row["first_chunk_p50_ms"] > 0 and row["tokens_per_forward"] > 0
        assert row["first_chunk_p95_ms"] >= row["first_chunk_p50_ms"]
        assert row["vs_one_at_a_time"] is not None
        # Greedy everywhere: every stream gives the pre-pass's tokens (transformers' too).
        assert row["identical"] == row["generations"], (streams, method)
        if method.startswith("transformers"):  # no batch size per forward from transformers
            assert row["rows_per_call"] is None and row["unavailable"]["rows_per_call"]
        else:
            assert 1.0 <= row["rows_per_call"] <= streams
    assert rows[(1, "one-at-a-time hybrid")]["vs_one_at_a_time"] == pytest.approx(1.0)
    assert rows[(2, "one-at-a-time hybrid")]["rows_per_call"] == pytest.approx(1.0)
    assert set(result["batched_vs_one_at_a_time"]) == {"1", "2"}

    # Raw figures: one run per level and method, each stream with its chunk times.
    assert len(result["runs"]) == 2 * len(methods)
    for run in result["runs"]:
        assert len(run["stream_results"]) == run["streams"]
        for stream in run["stream_results"]:
            assert len(stream["chunk_seconds"]) == len(stream["chunk_tokens"])
            assert sum(stream["chunk_tokens"]) == stream["new_tokens"] <= 4

    # Only the single-stream target can be judged without a 16-stream level.
    status = [t["status"] for t in result["targets"]]
    assert status[0] == status[2] == "not measured" and status[1] in ("PASS", "FAIL")
