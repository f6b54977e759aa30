"""The prepared GPU run: one command, at most 8 minutes on one H100/H200, at most 8 files.

    python -m benchmarks.gpu_run [--out DIR]       # CUDA, bf16 (benchmarks/gpu.sh calls this)
    python -m benchmarks.gpu_run --smoke [--out DIR]   # the same on the CPU at toy sizes, < 60 s

Four phases, each in its own process with its own time limit, so that one that fails or hangs
loses nothing of the others (each phase writes its JSON as it goes; a phase killed at its limit
keeps what it had written):

1. ``tests``: ``pytest -m gpu tests/test_gpu.py`` (greedy identity in fp32, bf16 divergences
   only at near-ties, the sampling chi-square, batching, the DFlash drafter, seeded sampling
   alone and batched, all on CUDA) -> ``tests.json``;
2. ``pair``: the embedded pair through ``dg_stream.generate()`` with the backend's default
   options, hybrid ÷ plain, greedy and sampled, 1 and 16 concurrent streams (the concurrency
   benchmark's methods and prompts, ``benchmarks/concurrency.py``) -> ``pair.json``;
3. ``oracle``: engine efficiency at real sizes without downloads: random-weight Qwen3-0.6B and
   Qwen3-8B shapes with an oracle drafter that proposes the verifier's own greedy continuation
   (acceptance exactly k): round wall time ÷ (verify + draft forward) and tokens/s at k = 4, 8,
   16 against plain decoding of the same model (``benchmarks/efficiency.py``) -> ``oracle.json``;
4. ``dflash``: the same on the Qwen3-8B shape with a random DFlash drafter of the published
   Qwen3-8B-DFlash-b16 shape running its forward every round (k = 4, 8, 15) -> ``dflash.json``.

Then ``pair.png``, ``efficiency.png`` and ``summary.json`` (every phase's status, time and log
tail, the machine, the headline figures); the same headlines are printed as Markdown. Seven
files in all. Precision: bf16 on CUDA, float32 on a CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PHASES = ("tests", "pair", "oracle", "dflash")
#: Hard limits per phase in seconds (a phase stops starting new measurements at 3/4 of its
#: own); together with model loading and the summary they stay inside TOTAL.
BUDGET = {"tests": 130, "pair": 100, "oracle": 150, "dflash": 75}
SMOKE_BUDGET = {"tests": 40, "pair": 40, "oracle": 30, "dflash": 30}
TOTAL = 480.0  # 8 minutes
SMOKE_TOTAL = 110.0
RESERVE = 12.0  # kept back for plots and the summary
SOFT = 0.75
#: What the phases import; a missing one is named in the summary (pip install it).
NEEDED = (
    "torch",
    "transformers",
    "safetensors",
    "tokenizers",
    "anyio",
    "httpx",
    "msgspec",
    "pytest",
    "scipy",
    "matplotlib",
)
LOG_TAIL = 4000


def _log(message: str) -> None:
    print(f"[gpu_run {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class RunSettings:
    out: Path
    smoke: bool = False
    device: str = "cuda"
    phases: tuple[str, ...] = PHASES
    total: float = TOTAL
    threads: int | None = None

    @property
    def budget(self) -> dict[str, float]:
        return dict(SMOKE_BUDGET if self.smoke else BUDGET)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomically: a phase killed mid-write leaves the previous version."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(json.dumps(data, indent=1, ensure_ascii=False, default=str) + "\n")
    partial.replace(path)


# -- phase 1: the GPU-marked tests ------------------------------------------------------------


def phase_tests(
    settings: RunSettings, deadline: float, save: Callable[[dict[str, Any]], None]
) -> dict[str, Any]:
    result: dict[str, Any] = {"command": None, "exit_code": None, "tests": []}
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        args = [
            "-m",
            "gpu",
            str(ROOT / "tests" / "test_gpu.py"),
            str(ROOT / "tests" / "test_static_shapes.py"),
            "-q",
            "-rA",
            "-p",
            "no:cacheprovider",
            f"--rootdir={ROOT}",
            # pytest-asyncio (from the dev extra) knows this option; a bare machine may lack it.
            "-W",
            "ignore:Unknown config option:pytest.PytestConfigWarning",
            # The suite turns warnings into errors; on a GPU machine's other library versions a
            # deprecation notice must not cost the rare GPU hour its tests.
            "-W",
            "ignore::DeprecationWarning",
            "-W",
            "ignore::FutureWarning",
            f"--junitxml={xml}",
        ]
        result["command"] = "pytest " + " ".join(args[:3])
        save(result)
        # A child pytest: the phase's own process limit still bounds it, and pytest (a test
        # tool, not a dependency of any extra) is only needed where it is installed.
        code = subprocess.run([sys.executable, "-m", "pytest", *args], cwd=ROOT).returncode
        result["exit_code"] = int(code)
        if xml.exists():
            result.update(_junit(xml))
    result["passed_all"] = result["exit_code"] == 0 and not result.get("counts", {}).get("failed")
    return result


def _junit(path: Path) -> dict[str, Any]:
    """Each test's outcome, time, message and recorded properties from a JUnit XML file."""
    import xml.etree.ElementTree as ET

    tests = []
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", None
        for tag, name in (("failure", "failed"), ("error", "errors"), ("skipped", "skipped")):
            node = case.find(tag)
            if node is not None:
                outcome = name
                message = (node.get("message") or "")[:600]
                if name != "skipped" and node.text:
                    message = (message + "\n" + node.text[-1500:]).strip()
                break
        counts[outcome] += 1
        properties = {
            p.get("name"): _maybe_json(p.get("value"))
            for p in case.iter("property")
            if p.get("name")
        }
        tests.append(
            {
                "name": case.get("name"),
                "outcome": outcome.rstrip("s") if outcome == "errors" else outcome,
                "seconds": float(case.get("time") or 0.0),
                "message": message,
                "properties": properties,
            }
        )
    return {"counts": counts, "tests": tests}


def _maybe_json(value: str | None) -> Any:
    if value is None:
        return None
    try:
        return json.loads(value)
    except ValueError:
        return value


# -- phase 2: the embedded pair, hybrid ÷ plain -----------------------------------------------


def phase_pair(
    settings: RunSettings, deadline: float, save: Callable[[dict[str, Any]], None]
) -> dict[str, Any]:
    import gc

    from benchmarks import concurrency as cc
    from dg_stream import LocalBackend
    from dg_stream.bench._machine import describe_machine

    smoke = settings.smoke
    levels = (1, 2) if smoke else (1, 16)
    new_tokens = 8 if smoke else 128
    repeats = 1 if smoke else 3
    modes = {"greedy": 0.0, "sampled": 0.8}
    verifier, drafter = cc._default_models()
    hybrid_backend = LocalBackend(verifier, drafter, device=settings.device)
    plain_backend = LocalBackend(verifier, None, device=settings.device)
    defaults = hybrid_backend.defaults
    result: dict[str, Any] = {
        "settings": {
            "streams": list(levels),
            "new_tokens": new_tokens,
            "repeats": repeats,
            "device": str(plain_backend.device),
            "dtype": str(plain_backend.dtype).removeprefix("torch."),
            "temperatures": modes,
            "sampling": "unseeded (a seed would turn the adaptive default off)",
            "hybrid": {
                "backend": "LocalBackend.default(): the embedded verifier and drafter",
                "block_size": defaults.block_size,
                "steps": defaults.steps,
                "adaptive": defaults.adaptive,
            },
            "plain": "LocalBackend.default(drafter=None)",
            "prompts": str(cc.DEFAULT_PROMPTS),
        },
        "machine": describe_machine(plain_backend.device),
        "results": [],
        "runs": [],
        "skipped": [],
        "complete": False,
    }
    methods = {
        (mode, kind): cc.OursMethod(f"{kind} {mode}", backend, temperature=temperature)
        for mode, temperature in modes.items()
        for kind, backend in (("plain", plain_backend), ("hybrid", hybrid_backend))
    }
    try:
        most = max(levels)
        config = cc.Settings(
            out=settings.out, streams=levels, new_tokens=new_tokens, device=settings.device
        )
        candidates = cc._candidates(
            config, plain_backend.tokenizer, plain_backend.verifier.max_length
        )
        chosen, reference, prepass = cc._choose_prompts(
            methods[("greedy", "plain")], candidates, most, new_tokens, _log
        )
        prompts = [(p.id, ids) for p, ids in chosen]
        result["prompts"] = [
            {
                "id": p.id,
                "kind": p.kind,
                "prompt_tokens": len(ids),
                "reference": len(reference[p.id]),
            }
            for p, ids in chosen
        ]
        result["prepass_seconds"] = prepass
        for method in methods.values():
            method.run(prompts[: min(4, most)], min(8, new_tokens))  # warm-up
        save(result)
        records: list[dict[str, Any]] = []
        for repeat in range(repeats):
            if repeat and time.monotonic() > deadline:
                result["skipped"].append(f"repeats {repeat + 1}-{repeats}: out of time")
                break
            for mode in modes:
                for level in levels:
                    order = ["plain", "hybrid"] if repeat % 2 == 0 else ["hybrid", "plain"]
                    for position, kind in enumerate(order):
                        gc.collect()
                        run = methods[(mode, kind)].run(prompts[:level], new_tokens)
                        record = cc._record(
                            run, level, repeat, position, reference if mode == "greedy" else {}
                        )
                        for stream in record["stream_results"]:
                            stream.pop("gaps_seconds", None)  # chunk_seconds give them
                            if mode != "greedy":
                                stream["identical"] = None
                        record.update(mode=mode, kind=kind)
                        records.append(record)
                    _log(
                        f"pair repeat {repeat + 1}, {mode}, {level} streams: "
                        + ", ".join(
                            f"{r['kind']} {r['tokens_per_second']:.0f}" for r in records[-2:]
                        )
                        + " tok/s"
                    )
            result["runs"] = records
            result["results"] = _pair_rows(records, modes, levels)
            save(result)
        result["complete"] = not result["skipped"]
        return result
    finally:
        hybrid_backend.close()
        plain_backend.close()


def _pair_rows(
    records: list[dict[str, Any]], modes: dict[str, float], levels: Sequence[int]
) -> list[dict[str, Any]]:
    from benchmarks.concurrency import _percentile

    rows = []
    for mode in modes:
        for level in levels:
            mine = [r for r in records if r["mode"] == mode and r["streams"] == level]
            by_kind = {k: [r for r in mine if r["kind"] == k] for k in ("plain", "hybrid")}
            if not by_kind["plain"] or not by_kind["hybrid"]:
                continue
            plain = {r["repeat"]: r["tokens_per_second"] for r in by_kind["plain"]}
            ratios = [
                r["tokens_per_second"] / plain[r["repeat"]]
                for r in by_kind["hybrid"]
                if plain.get(r["repeat"])
            ]
            row: dict[str, Any] = {
                "mode": mode,
                "streams": level,
                "hybrid_vs_plain": statistics.median(ratios) if ratios else None,
                "hybrid_vs_plain_runs": ratios,
            }
            for kind, runs in by_kind.items():
                streams = [s for r in runs for s in r["stream_results"]]
                times = [s["chunk_seconds"] for s in streams]
                gaps = [b - a for t in times for a, b in itertools.pairwise(t)]
                first = [s["first_chunk_seconds"] for s in streams if s["first_chunk_seconds"]]
                same = [s["identical"] for s in streams if s["identical"] is not None]
                tokens = sum(r["tokens"] for r in runs)
                forwards = sum(r["forwards"] for r in runs)
                p50, p95 = _percentile(gaps, 50), _percentile(gaps, 95)
                first50 = _percentile(first, 50)
                row[kind] = {
                    "tokens_per_second": statistics.median(r["tokens_per_second"] for r in runs),
                    "tokens_per_second_runs": [round(r["tokens_per_second"], 2) for r in runs],
                    "tokens_per_forward": tokens / forwards if forwards else None,
                    "gap_p50_ms": None if p50 is None else 1000 * p50,
                    "gap_p95_ms": None if p95 is None else 1000 * p95,
                    "first_chunk_p50_ms": None if first50 is None else 1000 * first50,
                    "identical": f"{sum(same)}/{len(same)}" if same else None,
                }
            rows.append(row)
    return rows


# -- phases 3 and 4: engine efficiency at real sizes ------------------------------------------


def _efficiency(
    settings: RunSettings, deadline: float, save: Callable[[dict[str, Any]], None], dflash: bool
) -> dict[str, Any]:
    from benchmarks import efficiency as eff
    from dg_stream.bench._machine import describe_machine

    if settings.smoke:
        config = eff.Settings(
            models=("toy",),
            ks=(2, 4, 8),
            prompt_tokens=16,
            new_tokens=24,
            repeats=1,
            bare_repeats=3,
            device=settings.device,
            dflash=dflash,
            static_k=None if dflash else 4,
            static_backend="eager",  # graph capture without code generation: seconds, not minutes
        )
    else:
        models = ("qwen3-8b",) if dflash else ("qwen3-0.6b", "qwen3-8b")
        ks = (4, 8, 15) if dflash else (4, 8, 16)
        # Static shapes are timed on the oracle phase only (its compile fits that budget).
        config = eff.Settings(
            models=models,
            ks=ks,
            device=settings.device,
            dflash=dflash,
            static_k=None if dflash else 8,
        )
    import torch

    result: dict[str, Any] = {
        "settings": asdict(config),
        "machine": describe_machine(torch.device(settings.device)),
        "models": [],
        "skipped": [],
        "complete": False,
    }
    save(result)
    for name in config.models:
        if result["models"] and time.monotonic() > deadline:
            result["skipped"].append(f"{name}: out of time")
            break
        index = len(result["models"])
        result["models"].append({"model": name, "complete": False})

        def keep(partial: dict[str, Any], index: int = index) -> None:
            result["models"][index] = partial
            save(result)

        eff.measure_model(name, config, deadline, keep, log=_log)
    result["complete"] = not result["skipped"] and all(m["complete"] for m in result["models"])
    return result


def phase_oracle(
    settings: RunSettings, deadline: float, save: Callable[[dict[str, Any]], None]
) -> dict[str, Any]:
    return _efficiency(settings, deadline, save, dflash=False)


def phase_dflash(
    settings: RunSettings, deadline: float, save: Callable[[dict[str, Any]], None]
) -> dict[str, Any]:
    return _efficiency(settings, deadline, save, dflash=True)


PHASE_FUNCTIONS = {
    "tests": phase_tests,
    "pair": phase_pair,
    "oracle": phase_oracle,
    "dflash": phase_dflash,
}


def _fault(name: str, save: Callable[[dict[str, Any]], None]) -> None:
    """Test hook: ``DG_STREAM_GPU_RUN_FAULT=pair:fail,oracle:hang`` makes those phases fail
    or hang after writing a partial result (tests/test_gpu_run.py checks that the others
    and the partial figures survive)."""
    faults = dict(
        item.split(":", 1)
        for item in os.environ.get("DG_STREAM_GPU_RUN_FAULT", "").split(",")
        if ":" in item
    )
    if name not in faults:
        return
    save({"partial": "written before the fault", "complete": False})
    if faults[name] == "hang":
        time.sleep(3600)
    raise RuntimeError(f"injected fault in phase {name}")


def run_phase(name: str, settings: RunSettings, seconds: float) -> int:
    """In the phase's own process: run it, writing ``<out>/<name>.json`` after every step
    and once more at the end, with the error if it failed."""
    started = time.monotonic()
    deadline = started + SOFT * seconds
    path = settings.out / f"{name}.json"
    state: dict[str, Any] = {}

    def save(data: dict[str, Any]) -> None:
        state["data"] = data
        _write_json(path, {"phase": name, "status": "running", **data})

    if settings.threads:
        import torch

        torch.set_num_threads(settings.threads)
    try:
        _fault(name, save)
        data = PHASE_FUNCTIONS[name](settings, deadline, save)
    except BaseException as exc:
        data = dict(state.get("data") or {})
        data["error"] = "".join(traceback.format_exception(exc))[-LOG_TAIL:]
        _write_json(
            path,
            {"phase": name, "status": "failed", "seconds": time.monotonic() - started, **data},
        )
        traceback.print_exc()
        return 1
    status = "ok" if data.get("complete", True) else "partial"
    if name == "tests" and not data.get("passed_all"):
        status = "failed"
    _write_json(
        path, {"phase": name, "status": status, "seconds": time.monotonic() - started, **data}
    )
    return 0


# -- the whole run ----------------------------------------------------------------------------


def _missing() -> dict[str, str]:
    """Packages the phases need that cannot be imported here, with the reason."""
    missing = {}
    for name in NEEDED:  # found, not imported: the phases import them in their own processes
        if importlib.util.find_spec(name) is None:
            missing[name] = "not installed"
    try:
        importlib.import_module("dg_stream")  # no torch: quick
    except Exception as exc:
        missing["dg_stream"] = f"{type(exc).__name__}: {exc}"
    with contextlib.suppress(Exception):
        from importlib.metadata import version

        major, minor = (int(x) for x in version("anyio").split(".")[:2])
        if (major, minor) < (4, 16):
            missing["anyio>=4.16"] = f"anyio {version('anyio')}: local streams would never wake"
    return missing


def _stop(child: subprocess.Popen[Any]) -> int:
    """SIGINT to the phase's process group (it writes what it has), SIGKILL 10 s later."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGINT)
    try:
        return child.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        return child.wait()


def _spawn(name: str, settings: RunSettings, seconds: float) -> dict[str, Any]:
    """One phase in a child process, stopped at ``seconds`` (SIGINT, then SIGKILL)."""
    command = [
        sys.executable,
        "-m",
        "benchmarks.gpu_run",
        "--phase",
        name,
        "--out",
        str(settings.out),
        "--device",
        settings.device,
        "--phase-seconds",
        f"{seconds:.1f}",
        *(["--smoke"] if settings.smoke else []),
        *(["--threads", str(settings.threads)] if settings.threads else []),
    ]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), str(ROOT / "src"), *filter(None, [env.get("PYTHONPATH")])]
    )
    env.setdefault("PYTHONUNBUFFERED", "1")
    # The log lives outside the output folder: only results go there.
    handle, log_name = tempfile.mkstemp(prefix=f"gpu_run-{name}-", suffix=".log")
    os.close(handle)
    log = Path(log_name)
    started = time.monotonic()
    with open(log, "w") as sink:
        child = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        status = None
        try:
            code = child.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            status = "timeout"
            code = _stop(child)
        except KeyboardInterrupt:  # the run itself is being stopped: keep what the phase wrote
            status = "interrupted"
            code = _stop(child)
    elapsed = time.monotonic() - started
    tail = log.read_text(errors="replace")[-LOG_TAIL:]
    log.unlink(missing_ok=True)
    path = settings.out / f"{name}.json"
    data: dict[str, Any] = {}
    if path.exists():
        with contextlib.suppress(ValueError):
            data = json.loads(path.read_text())
    if status is None:
        status = data.get("status") if code == 0 else "failed"
        status = status or "failed"
    if data.get("status") != status or not path.exists():
        data.update(phase=name, status=status, seconds=elapsed)
        if status == "timeout":
            data["error"] = f"stopped at its limit of {seconds:.0f}s; the figures are partial"
        elif status == "interrupted":
            data["error"] = "the run was interrupted; the figures are partial"
        _write_json(path, data)
    return {
        "status": status,
        "exit_code": code,
        "seconds": round(elapsed, 1),
        "limit_seconds": round(seconds, 1),
        "file": path.name,
        "log_tail": tail,
    }


def run_all(settings: RunSettings) -> dict[str, Any]:
    started = time.monotonic()
    end = started + settings.total
    settings.out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "mode": "smoke" if settings.smoke else "gpu",
        "device": settings.device,
        "total_limit_seconds": settings.total,
        "missing": _missing(),
        "phases": {},
    }
    if summary["missing"]:
        _log(f"missing packages: {', '.join(summary['missing'])} (pip install them)")
    for name in settings.phases:
        if any(p["status"] == "interrupted" for p in summary["phases"].values()):
            summary["phases"][name] = {"status": "skipped", "reason": "the run was interrupted"}
            continue
        left = end - time.monotonic() - RESERVE
        seconds = min(settings.budget[name], left)
        if seconds < 5:
            summary["phases"][name] = {"status": "skipped", "reason": "no time left"}
            _log(f"{name}: skipped, no time left")
            continue
        _log(f"{name}: starting (limit {seconds:.0f}s)")
        summary["phases"][name] = _spawn(name, settings, seconds)
        phase = summary["phases"][name]
        _log(f"{name}: {phase['status']} in {phase['seconds']:.0f}s")
    phases = {name: _read(settings.out / f"{name}.json") for name in PHASES}
    summary["machine"] = next((p["machine"] for p in phases.values() if p and "machine" in p), None)
    summary["headline"] = headline(phases)
    summary["files"] = [
        f"{name}.json" for name in settings.phases if (settings.out / f"{name}.json").exists()
    ]
    for draw, stem in ((plot_pair, "pair"), (plot_efficiency, "efficiency")):
        try:
            if draw(phases, settings.out / f"{stem}.png"):
                summary["files"].append(f"{stem}.png")
        except Exception as exc:  # a plot must not lose the figures
            summary.setdefault("plot_errors", {})[stem] = repr(exc)
    for stray in settings.out.glob("*.json.tmp"):  # a phase killed while writing
        stray.unlink(missing_ok=True)
    summary["seconds"] = round(time.monotonic() - started, 1)
    summary["files"].append("summary.json")
    _write_json(settings.out / "summary.json", summary)
    return summary


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# -- headline figures, Markdown and plots -----------------------------------------------------


def headline(phases: dict[str, dict[str, Any] | None]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    tests = phases.get("tests")
    if tests:
        out["tests"] = {"status": tests.get("status"), **tests.get("counts", {})}
        failed = [t["name"] for t in tests.get("tests", []) if t["outcome"] in ("failed", "error")]
        if failed:
            out["tests"]["failing"] = failed
    pair = phases.get("pair")
    if pair and pair.get("results"):
        out["pair"] = [
            {
                "mode": r["mode"],
                "streams": r["streams"],
                "plain_tps": round(r["plain"]["tokens_per_second"], 1),
                "hybrid_tps": round(r["hybrid"]["tokens_per_second"], 1),
                "hybrid_vs_plain": round(r["hybrid_vs_plain"], 3) if r["hybrid_vs_plain"] else None,
                "identical": r["hybrid"]["identical"],
            }
            for r in pair["results"]
        ]
    for name in ("oracle", "dflash"):
        phase = phases.get(name)
        if not phase:
            continue
        rows = []
        for model in phase.get("models", []):
            plain = model.get("plain") or {}
            for row in model.get("k", []):
                rows.append(
                    {
                        "model": model["model"],
                        "k": row["k"],
                        "plain_tps": _round(plain.get("tokens_per_second")),
                        "tps": _round(row["tokens_per_second"]),
                        "speedup": _round(row["speedup"], 2),
                        "ideal_speedup": _round(row["ideal_speedup"], 2),
                        "round_ms": _round(row["round_ms"], 2),
                        "verify_ms": _round(row["bare_verify_ms"], 2),
                        "draft_ms": _round(row["bare_draft_ms"], 2),
                        "overhead": _round(row["overhead"], 2),
                        "accepted_per_round": _round(row["accepted_per_round"], 2),
                        "acceptance": _round(row["acceptance"], 3),
                    }
                )
            static = model.get("static")
            if static:  # the same k on static, captured shapes (StaticShapes)
                rows.append(
                    {
                        "model": model["model"],
                        "k": f"{static['k']} static",
                        "plain_tps": _round(plain.get("tokens_per_second")),
                        "tps": _round(static["tokens_per_second"]),
                        "speedup": _round(static["speedup"], 2),
                        "ideal_speedup": None,
                        "round_ms": _round(static["round_ms"], 2),
                        "verify_ms": None,
                        "draft_ms": None,
                        "overhead": None,
                        "accepted_per_round": _round(static["accepted_per_round"], 2),
                        "acceptance": _round(static["acceptance"], 3),
                    }
                )
        out[name] = rows
    return out


def _round(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def markdown(summary: dict[str, Any]) -> str:
    lines = [f"gpu_run ({summary['mode']}, {summary['device']}): {summary['seconds']:.0f}s", ""]
    machine = summary.get("machine") or {}
    if machine:
        lines += [
            f"machine: {machine.get('gpu') or machine.get('cpu')}, torch {machine.get('torch')}, "
            f"transformers {machine.get('transformers')}",
            "",
        ]
    lines += ["| phase | status | seconds | limit |", "|---|---|---:|---:|"]
    for name, phase in summary["phases"].items():
        lines.append(
            f"| {name} | {phase['status']} | {phase.get('seconds', 0):.0f} | "
            f"{phase.get('limit_seconds', 0):.0f} |"
        )
    head = summary["headline"]
    if "tests" in head:
        t = head["tests"]
        lines += [
            "",
            f"tests: {t.get('passed', 0)} passed, {t.get('failed', 0)} failed, "
            f"{t.get('errors', 0)} errors, {t.get('skipped', 0)} skipped",
        ]
        if t.get("failing"):
            lines.append("failing: " + ", ".join(t["failing"]))
    if head.get("pair"):
        lines += [
            "",
            "| mode | streams | plain tok/s | hybrid tok/s | hybrid ÷ plain | identical |",
            "|---|---:|---:|---:|---:|---|",
        ]
        for r in head["pair"]:
            lines.append(
                f"| {r['mode']} | {r['streams']} | {r['plain_tps']} | {r['hybrid_tps']} | "
                f"{r['hybrid_vs_plain']} | {r['identical'] or 'n/a'} |"
            )
    for name in ("oracle", "dflash"):
        if head.get(name):
            drafter = "oracle drafter" if name == "oracle" else "DFlash forward, oracle's tokens"
            lines += [
                "",
                f"{name} ({drafter}; verify and draft ms: bare forwards):",
                "",
                "| model | k | plain tok/s | tok/s | × plain | ideal × | round ms | verify ms "
                "| draft ms | round ÷ (verify+draft) | accepted/round | acceptance |",
                "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            ]
            for r in head[name]:
                lines.append(
                    f"| {r['model']} | {r['k']} | {r['plain_tps']} | {r['tps']} | {r['speedup']} | "
                    f"{r['ideal_speedup']} | {r['round_ms']} | {r['verify_ms']} | "
                    f"{r['draft_ms']} | {r['overhead']} | {r['accepted_per_round']} | "
                    f"{r['acceptance']} |"
                )
    return "\n".join(lines) + "\n"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pair(phases: dict[str, dict[str, Any] | None], path: Path) -> bool:
    pair = phases.get("pair")
    rows = (pair or {}).get("results") or []
    if not rows:
        return False
    plt = _pyplot()
    modes = sorted({r["mode"] for r in rows}, key=["greedy", "sampled"].index)
    fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 4), squeeze=False)
    for axis, mode in zip(axes[0], modes, strict=True):
        mine = [r for r in rows if r["mode"] == mode]
        xs = range(len(mine))
        plain = [r["plain"]["tokens_per_second"] for r in mine]
        hybrid = [r["hybrid"]["tokens_per_second"] for r in mine]
        axis.bar([x - 0.2 for x in xs], plain, 0.4, label="plain", color="#7f7f7f")
        axis.bar([x + 0.2 for x in xs], hybrid, 0.4, label="hybrid", color="#1f77b4")
        for x, r, h in zip(xs, mine, hybrid, strict=True):
            if r["hybrid_vs_plain"]:
                axis.annotate(
                    f"{r['hybrid_vs_plain']:.2f}×", (x + 0.2, h), ha="center", va="bottom"
                )
        axis.set_xticks(list(xs), [f"{r['streams']} stream(s)" for r in mine])
        axis.set_ylabel("aggregate tokens/s (median)")
        axis.set_title(mode)
        axis.legend(fontsize=8)
    s = (pair or {}).get("settings", {})
    fig.suptitle(
        f"embedded pair, generate() defaults: {s.get('device')} {s.get('dtype')}, "
        f"{s.get('new_tokens')} tokens a stream",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_efficiency(phases: dict[str, dict[str, Any] | None], path: Path) -> bool:
    series = []
    for name in ("oracle", "dflash"):
        for model in (phases.get(name) or {}).get("models", []):
            if model.get("k"):
                series.append((name, model))
    if not series:
        return False
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, model in series:
        rows = model["k"]
        ks = [r["k"] for r in rows]
        label = f"{model['model']} {name}"
        style = "-" if name == "oracle" else "--"
        line = left.plot(ks, [r["speedup"] for r in rows], style, marker="o", label=label)[0]
        left.plot(
            ks,
            [r["ideal_speedup"] for r in rows],
            ":",
            color=line.get_color(),
            label=f"{label} ideal",
        )
        right.plot(ks, [r["overhead"] for r in rows], style, marker="o", label=label)
        plain = (model.get("plain") or {}).get("overhead")
        if plain:
            right.plot([0], [plain], marker="s", color=line.get_color())
    left.set_xlabel("k (drafts per round, all accepted)")
    left.set_ylabel("decode tokens/s ÷ plain decoding")
    left.grid(alpha=0.3)
    left.legend(fontsize=7)
    right.set_xlabel("k (0: plain decoding, round ÷ one-token forward)")
    right.set_ylabel("round wall time ÷ (verify + draft forward)")
    right.axhline(1.0, color="black", lw=0.8)
    right.set_ylim(bottom=0)
    right.grid(alpha=0.3)
    right.legend(fontsize=7)
    fig.suptitle("engine efficiency: oracle drafter (acceptance = k), random weights", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# -- command line -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_run",
        description="The prepared GPU run: GPU tests, the embedded pair, engine efficiency at "
        "real sizes (oracle and DFlash drafters), in at most 8 minutes and 8 files.",
    )
    p.add_argument("--out", type=Path, default=None, help="output folder (default: $OUT, else "
                   "benchmarks/results/gpu-run, or -smoke)")  # fmt: skip
    p.add_argument("--smoke", action="store_true", help="CPU, toy sizes, under a minute")
    p.add_argument("--device", default=None, help="cuda (default) or cpu (--smoke's default)")
    p.add_argument(
        "--phases", default=",".join(PHASES), help="comma-separated subset of " + ",".join(PHASES)
    )
    p.add_argument("--total-seconds", type=float, default=None, help="whole-run limit")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per phase")
    p.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    p.add_argument("--phase-seconds", type=float, default=60.0, help=argparse.SUPPRESS)
    return p


def settings_from_args(args: argparse.Namespace) -> RunSettings:
    out = args.out
    if out is None:
        env = os.environ.get("OUT")
        out = (
            Path(env)
            if env
            else ROOT / "benchmarks" / "results" / ("gpu-run-smoke" if args.smoke else "gpu-run")
        )
    phases = tuple(p for p in args.phases.split(",") if p)
    unknown = [p for p in phases if p not in PHASES]
    if unknown:
        raise SystemExit(f"gpu_run: unknown phase(s) {', '.join(unknown)}")
    device = args.device or ("cpu" if args.smoke else "cuda")
    total = args.total_seconds or (SMOKE_TOTAL if args.smoke else TOTAL)
    threads = args.threads if args.threads is not None else (1 if args.smoke else None)
    return RunSettings(
        out=out, smoke=args.smoke, device=device, phases=phases, total=total, threads=threads
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    settings = settings_from_args(args)
    if args.phase:
        return run_phase(args.phase, settings, args.phase_seconds)
    if settings.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print(
                "gpu_run: no CUDA device visible; --smoke runs the same phases on the CPU",
                file=sys.stderr,
            )
            return 2
    summary = run_all(replace(settings, out=settings.out.resolve()))
    print(markdown(summary))
    print(f"files in {settings.out}: {', '.join(summary['files'])}")
    failed = [n for n, p in summary["phases"].items() if p["status"] not in ("ok", "partial")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
