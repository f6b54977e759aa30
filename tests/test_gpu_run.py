"""The prepared GPU run (benchmarks/gpu_run.py) in its smoke mode: every phase on the CPU at
toy sizes, so that the script cannot rot between the rare hours on a GPU.

No timing assertions: what must hold is the bookkeeping (at most 8 files, each phase's JSON
and status, the headline figures), the oracle's acceptance of exactly k, greedy identity of
the embedded pair, and that a failing or hanging phase loses neither the others nor its own
partial figures.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from dg_stream import LocalBackend
from dg_stream.bench._oracle import OracleDrafter, OracleOverDrafter

ROOT = Path(__file__).resolve().parent.parent
PNG = b"\x89PNG\r\n\x1a\n"


def _script(name: str) -> ModuleType:
    module_name = f"_gpu_run_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


def _run(out: Path, *extra: str, env: dict[str, str] | None = None) -> Any:
    import os

    return subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_run", "--smoke", "--out", str(out), *extra],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=240,
    )


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    out = tmp_path_factory.mktemp("gpu-run")
    return out, _run(out)


def test_smoke_run_writes_every_phase(smoke: tuple[Path, Any]) -> None:
    out, done = smoke
    assert done.returncode == 0, done.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(
        [
            "summary.json",
            "tests.json",
            "pair.json",
            "oracle.json",
            "dflash.json",
            "pair.png",
            "efficiency.png",
        ]
    )
    assert len(files) <= 8
    for png in ("pair.png", "efficiency.png"):
        assert (out / png).read_bytes().startswith(PNG)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "smoke" and summary["device"] == "cpu"
    assert summary["total_limit_seconds"] <= 480
    assert {n: p["status"] for n, p in summary["phases"].items()} == dict.fromkeys(
        ("tests", "pair", "oracle", "dflash"), "ok"
    )
    assert sum(p["limit_seconds"] for p in summary["phases"].values()) <= 480
    assert summary["machine"]["torch"]
    assert "| phase | status |" in done.stdout and "hybrid ÷ plain" in done.stdout


def test_smoke_tests_phase_collects_the_gpu_tests(smoke: tuple[Path, Any]) -> None:
    out, _ = smoke
    tests = json.loads((out / "tests.json").read_text())
    assert tests["status"] == "ok" and tests["exit_code"] == 0
    names = {t["name"] for t in tests["tests"]}
    assert len(names) >= 5
    if not torch.cuda.is_available():  # skipped cleanly, every one of them
        assert all(t["outcome"] == "skipped" for t in tests["tests"])


def test_smoke_pair_is_lossless_and_complete(smoke: tuple[Path, Any]) -> None:
    out, _ = smoke
    pair = json.loads((out / "pair.json").read_text())
    assert pair["status"] == "ok"
    rows = {(r["mode"], r["streams"]): r for r in pair["results"]}
    assert set(rows) == {(m, s) for m in ("greedy", "sampled") for s in (1, 2)}
    for (mode, streams), row in rows.items():
        assert row["hybrid_vs_plain"] > 0
        for kind in ("plain", "hybrid"):
            assert row[kind]["tokens_per_second"] > 0
            if mode == "greedy":  # both give the pre-pass's greedy tokens
                assert row[kind]["identical"] == f"{streams}/{streams}"
            else:
                assert row[kind]["identical"] is None
    assert pair["settings"]["hybrid"]["block_size"]  # the backend's defaults, recorded


@pytest.mark.parametrize("phase", ["oracle", "dflash"])
def test_smoke_efficiency_accepts_every_draft(smoke: tuple[Path, Any], phase: str) -> None:
    out, _ = smoke
    result = json.loads((out / f"{phase}.json").read_text())
    assert result["status"] == "ok"
    (model,) = result["models"]
    assert model["model"] == "toy" and model["complete"]
    assert model["plain"]["tokens_per_second"] > 0 and model["plain"]["deterministic"]
    assert [row["k"] for row in model["k"]] == [2, 4, 8]
    for row in model["k"]:
        assert row["acceptance"] == 1.0  # the oracle: every draft kept
        assert row["divergence_from_plain"] is None  # float32: identical to plain
        assert row["overhead"] > 0 and row["speedup"] > 0 and row["ideal_speedup"] > 0
        assert row["bare_verify_ms"] > 0
        assert (row["bare_draft_ms"] > 0) == (phase == "dflash")
    static = model.get("static")
    assert (static is not None) == (phase == "oracle")  # static shapes: the oracle phase only
    if static is not None:  # captured ("eager" backend in the smoke run), padded, exact
        assert static["k"] == 4 and static["acceptance"] == 1.0
        assert static["divergence_from_plain"] is None and static["tokens_per_second"] > 0
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["headline"][phase]) == 3 + (static is not None)


def test_a_failing_phase_loses_nothing_else(tmp_path: Path) -> None:
    done = _run(tmp_path, "--phases", "pair,oracle", env={"DG_STREAM_GPU_RUN_FAULT": "pair:fail"})
    assert done.returncode == 1  # a phase failed
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["phases"]["pair"]["status"] == "failed"
    assert summary["phases"]["oracle"]["status"] == "ok"
    pair = json.loads((tmp_path / "pair.json").read_text())
    assert pair["status"] == "failed" and "injected fault" in pair["error"]
    assert pair["partial"] == "written before the fault"
    assert json.loads((tmp_path / "oracle.json").read_text())["models"][0]["complete"]


def test_a_hanging_phase_is_stopped_at_its_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gpu_run = _script("gpu_run")
    monkeypatch.setenv("DG_STREAM_GPU_RUN_FAULT", "oracle:hang")
    settings = gpu_run.RunSettings(out=tmp_path, smoke=True, device="cpu")
    phase = gpu_run._spawn("oracle", settings, 8.0)
    assert phase["status"] == "timeout" and phase["seconds"] < 30
    kept = json.loads((tmp_path / "oracle.json").read_text())
    assert kept["status"] == "timeout" and kept["partial"] == "written before the fault"


def test_oracle_drafters_follow_the_drafter_protocol(tiny_tok: Any) -> None:
    """The oracle proposes the known continuation from the context's length; over a real
    drafter it runs that drafter's forward and keeps its block size and feature settings."""
    from _models import tiny_causal_lm, tiny_dflash

    from dg_stream import SamplingParams
    from dg_stream._drafters import DFlashDrafter
    from dg_stream._drafters.base import DraftRequest

    prompt = [5, 6, 7]
    oracle = OracleDrafter([[*prompt, 9, 10, 11, 12]], max_block_size=8)
    session = oracle.session()
    greedy = SamplingParams()
    first = session.propose(DraftRequest(torch.tensor(prompt), 2, greedy, None))
    assert first.tokens.tolist() == [9, 10]
    rest = session.propose(DraftRequest(torch.tensor([*prompt, 9]), 8, greedy, None))
    assert rest.tokens.tolist() == [10, 11, 12]
    unknown = oracle.session().propose(DraftRequest(torch.tensor([1, 2]), 4, greedy, None))
    assert unknown.tokens.numel() == 0 and unknown.q is None

    verifier = tiny_causal_lm("qwen3", len(tiny_tok))
    inner = DFlashDrafter(tiny_dflash(verifier, tiny_tok.mask_token_id, block_size=9), verifier)
    over = OracleOverDrafter(inner, OracleDrafter([prompt], max_block_size=16))
    assert over.traits.max_block_size == 8
    assert over.traits.feature_layers == inner.traits.feature_layers
    assert over.traits.feature_stream and over.traits.raw_features
    backend = LocalBackend(verifier, over, tokenizer=tiny_tok, block_size=4)
    expected = [t for c in _greedy(LocalBackend(verifier, None), prompt, 20) for t in c]
    over.oracle.set_sequences([prompt + expected])
    got = _greedy(backend, prompt, 20)
    assert [t for c in got for t in c] == expected
    assert len(got) == 4  # 20 tokens, 5 a round: every draft kept


def _greedy(backend: LocalBackend, prompt: list[int], new: int) -> list[tuple[int, ...]]:
    from dg_stream import GenerationRequest

    session = backend.engine.session(GenerationRequest(prompt=prompt, max_new_tokens=new))
    chunks = []
    while (chunk := session.step()) is not None:
        chunks.append(chunk.token_ids)
    return chunks
