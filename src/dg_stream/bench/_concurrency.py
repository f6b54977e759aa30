"""The harness's concurrency mode: aggregate tokens/s, time to first chunk and chunk gaps, 1 to
32 concurrent streams.

    dg-stream bench concurrency [--quick] [--out DIR] [--streams 1,4,16,32]
                                [--new-tokens N] [--repeats R] [--threads 2]

(``python -m benchmarks.concurrency`` in a checkout: the same options and outputs.) This module
holds the methods and the runs; the options are in ``_cli``, the report in
``_concurrency_report``.

At each concurrency level C, C streams start at once, each on its own held-out prompt
(``benchmarks/prompts``), greedy, all with the same ``max_new_tokens``. Four methods run in the
same process on the same checkpoints (by default the embedded pair):

- ``batched hybrid``: ``LocalBackend.default()``: each verifier call scores the next block of
  every running stream;
- ``batched plain``: ``LocalBackend.default(drafter=None)``: plain decoding, batched too;
- ``one-at-a-time hybrid``: ``LocalBackend.default(max_batch=1)``: streams take turns, one
  verifier call each; the baseline of every ratio;
- ``transformers generate_batch``: transformers' own continuous batching (the manager behind
  ``model.generate_batch``, kept alive between runs and fed with ``add_requests(streaming=True)``
  so that each token's arrival can be timed) on ``AutoModelForCausalLM.from_pretrained`` of the
  same verifier, in the same dtype.

Measures per method and C: aggregate tokens/s (every stream's generated tokens over the wall
time from the start to the last stream's end), time to first chunk (p50, p95 over streams and
repeats), the gap between consecutive chunks of a stream (p50, p95 over all gaps), the mean
number of generations sharing a verifier call (``chunk.step.rows``; each call counted once)
and generated tokens per verifier forward. Each repeat runs every C once per method, the order
of methods rotating; tokens/s is the median over repeats and each ratio the median of the
per-repeat ratios to one-at-a-time hybrid in the same repeat.

Prompts: the held-out set, kinds alternating (short, long, …; ``--prompt-kind`` for one kind),
preferring prompts whose greedy continuation runs the whole ``max_new_tokens``: a pre-pass with
batched plain decoding finds them (some prompts end at once with end-of-sequence, which would
leave a level with fewer streams than it names) and gives the reference tokens every method
must reproduce (greedy decoding is lossless; the ``identical`` column counts the streams that
do). Each method is warmed up once before timing.

Writes ``<out>/concurrency-<name>-<device>.json`` (settings, machine, every raw chunk time) and
a PNG plot, and prints a Markdown table with the issue's targets, PASS or FAIL. ``<out>`` is a
fresh ``runs/bench/<date>-<time>`` folder unless ``--out`` names one.
"""

from __future__ import annotations

import copy
import gc
import itertools
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ._config import DEFAULT_PROMPTS, default_models
from ._report import percentile, stderr_log

__all__ = [
    "BASELINE",
    "DEFAULT_PROMPTS",
    "DESCRIPTIONS",
    "FULL",
    "METHODS",
    "PEER",
    "PLAIN",
    "QUICK",
    "SUBJECT",
    "Method",
    "OursMethod",
    "PeerMethod",
    "Run",
    "Settings",
    "Stream",
    "candidates",
    "choose_prompts",
    "record",
    "run_concurrency",
    "targets",
]

SUBJECT = "batched hybrid"
PLAIN = "batched plain"
BASELINE = "one-at-a-time hybrid"
PEER = "transformers generate_batch"
METHODS = (SUBJECT, PLAIN, BASELINE, PEER)
DESCRIPTIONS = {
    SUBJECT: "LocalBackend.default(): batched rounds, diffusion drafter",
    PLAIN: "LocalBackend.default(drafter=None): batched plain decoding",
    BASELINE: "LocalBackend.default(max_batch=1): generations take turns, one call each",
    PEER: "transformers continuous batching (init_continuous_batching + add_requests, "
    "streaming) on AutoModelForCausalLM.from_pretrained(verifier)",
}
#: Presets; options given on the command line override them.
QUICK: dict[str, Any] = {"streams": (1, 4, 16), "new_tokens": 32, "repeats": 1}
FULL: dict[str, Any] = {"streams": (1, 4, 16, 32), "new_tokens": 128, "repeats": 3}
WARMUP_STREAMS = 4
WARMUP_TOKENS = 8
#: The issue's targets.
TARGET_STREAMS = 16
TARGET_SPEEDUP = 4.0
TARGET_GAP_FACTOR = 4.0
#: Why a figure is missing for transformers' continuous batching (null in the JSON).
PEER_UNAVAILABLE = {
    "rows_per_call": "transformers' continuous batching reports no per-forward batch size to its "
    "caller (tokens_per_forward, from a forward hook, is the comparable figure)",
}


@dataclass(frozen=True)
class Settings:
    """What one run measures."""

    out: Path
    streams: tuple[int, ...] = FULL["streams"]
    new_tokens: int = FULL["new_tokens"]
    repeats: int = FULL["repeats"]
    threads: int | None = 2
    verifier: Path | None = None  # None: the embedded default verifier
    drafter: Path | None = None  # None: the embedded default drafter (with the default verifier)
    prompts: Path = DEFAULT_PROMPTS
    prompt_kind: str = "mixed"  # "mixed" (alternating kinds) or one kind, e.g. "short"
    device: str = "cpu"
    name: str = "full"
    peer: bool = True
    plots: bool = True


@dataclass
class Stream:
    """One stream of one run; times in seconds from the run's start."""

    prompt: str
    tokens: list[int]
    end: float
    chunk_times: list[float] = field(default_factory=list)  # chunks that carried tokens
    chunk_tokens: list[int] = field(default_factory=list)
    rows: list[int] | None = None  # generations sharing each chunk's verifier call

    @property
    def first_chunk(self) -> float | None:
        return self.chunk_times[0] if self.chunk_times else None

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in itertools.pairwise(self.chunk_times)]


@dataclass
class Run:
    """Every stream of one method at one concurrency level in one repeat."""

    method: str
    streams: list[Stream]
    wall: float
    forwards: int  # verifier forward passes during the run


_log = stderr_log("concurrency")


# -- the methods ------------------------------------------------------------------------------


class _Forwards:
    """Counts a model's forward passes (a pre-hook)."""

    def __init__(self, model: Any) -> None:
        self.count = 0
        model.register_forward_pre_hook(self._hook)

    def _hook(self, module: Any, args: Any) -> None:
        self.count += 1


class OursMethod:
    """A ``LocalBackend``; a run is C ``dg_stream.generate`` streams in one event loop.

    ``temperature``: 0 (the default) is greedy; above it, unseeded sampling (seeded requests
    would turn the backend's adaptive default off, see ``GenerationSession``)."""

    def __init__(self, name: str, backend: Any, temperature: float = 0.0) -> None:
        self.name = name
        self.backend = backend
        self.temperature = temperature
        self.forwards = _Forwards(backend.verifier.model)

    def run(self, prompts: Sequence[tuple[str, list[int]]], new_tokens: int) -> Run:
        import anyio

        self.forwards.count = 0
        streams, wall = anyio.run(self._streams, prompts, new_tokens)
        return Run(self.name, streams, wall, self.forwards.count)

    async def _streams(
        self, prompts: Sequence[tuple[str, list[int]]], new_tokens: int
    ) -> tuple[list[Stream], float]:
        import anyio

        import dg_stream

        results: list[Stream | None] = [None] * len(prompts)
        started = time.perf_counter()

        async def one(index: int, prompt_id: str, ids: list[int]) -> None:
            stream = Stream(prompt_id, [], 0.0, rows=[])
            generation = dg_stream.generate(
                ids, backend=self.backend, max_new_tokens=new_tokens, temperature=self.temperature
            )
            async with generation as chunks:
                async for chunk in chunks:
                    now = time.perf_counter() - started
                    if not chunk.token_ids:
                        continue
                    stream.chunk_times.append(now)
                    stream.chunk_tokens.append(len(chunk.token_ids))
                    stream.tokens.extend(chunk.token_ids)
                    if chunk.step is not None and stream.rows is not None:
                        stream.rows.append(chunk.step.rows)
            stream.end = time.perf_counter() - started
            results[index] = stream

        async with anyio.create_task_group() as group:
            for index, (prompt_id, ids) in enumerate(prompts):
                group.start_soon(one, index, prompt_id, ids)
        done = [s for s in results if s is not None]
        return done, max(s.end for s in done)

    def close(self) -> None:
        return None


class _Collect(logging.Handler):
    """Keeps the messages of transformers' continuous-batching logger (it prints its own)."""

    def __init__(self, messages: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.messages = messages

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.levelname}: {record.getMessage()}")


class PeerMethod:
    """transformers' continuous batching, one manager for the whole benchmark.

    The manager is what ``model.generate_batch`` creates and tears down on each call; kept
    alive here, like our backends, and fed with ``add_requests(streaming=True)`` so that every
    token's arrival at the caller is timed (``generate_batch`` returns only finished requests).
    The cache is sized for the largest level (without psutil transformers would size it from
    the machine's whole memory on a CPU), prefix sharing is off (the repeats reuse the prompts;
    our backend keeps no prefix cache either), and a forward carries at most the prefill budget
    of our backend plus one token per stream.
    """

    name = PEER

    def __init__(
        self,
        verifier: Path,
        device: Any,
        dtype: Any,
        prompts: Sequence[list[int]],
        new_tokens: int,
        prefill_chunk: int,
    ) -> None:
        from transformers.generation.continuous_batching import utils as cb_utils

        self.messages: list[str] = []
        self._logger = cb_utils.logger
        self._saved = (list(self._logger.handlers), self._logger.level)
        for handler in self._saved[0]:
            self._logger.removeHandler(handler)
        self._logger.addHandler(_Collect(self.messages))
        self._logger.setLevel(logging.WARNING)
        try:
            self._start(verifier, device, dtype, prompts, new_tokens, prefill_chunk)
        except BaseException:
            self._restore_logger()
            raise

    def _start(
        self,
        verifier: Path,
        device: Any,
        dtype: Any,
        prompts: Sequence[list[int]],
        new_tokens: int,
        prefill_chunk: int,
    ) -> None:
        from transformers import ContinuousBatchingConfig

        from dg_stream._loading import load_causal_lm

        self.model = load_causal_lm(verifier, device, dtype)  # AutoModelForCausalLM
        self.forwards = _Forwards(self.model)
        generation = copy.deepcopy(self.model.generation_config)
        generation.do_sample = False
        generation.max_new_tokens = new_tokens
        page_size = 256
        blocks = sum(math.ceil((len(ids) + new_tokens) / page_size) for ids in prompts)
        self.config = ContinuousBatchingConfig(
            page_size=page_size,
            num_blocks=blocks + len(prompts) + 1,
            max_batch_tokens=prefill_chunk + len(prompts),
            allow_block_sharing=False,
        )
        self.manager = self.model.init_continuous_batching(
            generation_config=generation, continuous_batching_config=self.config
        )
        self.manager.start()
        self.attn_implementation = str(self.model.config._attn_implementation)

    def settings(self) -> dict[str, Any]:
        return {
            "page_size": self.config.page_size,
            "num_blocks": self.config.num_blocks,
            "max_batch_tokens": self.config.max_batch_tokens,
            "allow_block_sharing": self.config.allow_block_sharing,
            "attn_implementation": self.attn_implementation,
        }

    def run(self, prompts: Sequence[tuple[str, list[int]]], new_tokens: int) -> Run:
        self.forwards.count = 0
        started = time.perf_counter()
        ids = self.manager.add_requests(
            inputs=[list(p) for _, p in prompts], max_new_tokens=new_tokens, streaming=True
        )
        streams = {rid: Stream(pid, [], 0.0) for rid, (pid, _) in zip(ids, prompts, strict=True)}
        pending = set(ids)
        quiet_since = time.perf_counter()
        while pending:
            output = self.manager.get_result(timeout=0.5)
            now = time.perf_counter()
            if output is None:
                if not self.manager.is_running() or now - quiet_since > 600:
                    raise RuntimeError(
                        "transformers' continuous batching stopped answering: "
                        + "; ".join(self.messages[-3:])
                    )
                continue
            quiet_since = now
            if output.error is not None:
                raise RuntimeError(f"transformers' continuous batching failed: {output.error}")
            stream = streams[output.request_id]
            new = len(output.generated_tokens) - len(stream.tokens)
            if new > 0:
                stream.chunk_times.append(now - started)
                stream.chunk_tokens.append(new)
                stream.tokens = list(output.generated_tokens)
            if output.is_finished():
                stream.end = now - started
                pending.discard(output.request_id)
        done = [streams[rid] for rid in ids]
        return Run(self.name, done, max(s.end for s in done), self.forwards.count)

    def close(self) -> None:
        try:
            self.manager.stop(block=True, timeout=60)
            self.manager.destroy()
        finally:
            self._restore_logger()

    def _restore_logger(self) -> None:
        for handler in list(self._logger.handlers):
            self._logger.removeHandler(handler)
        for handler in self._saved[0]:
            self._logger.addHandler(handler)
        self._logger.setLevel(self._saved[1])


Method = OursMethod | PeerMethod


# -- prompts ----------------------------------------------------------------------------------


def candidates(
    settings: Settings, tokenizer: Any, limit: int | None
) -> list[tuple[Any, list[int]]]:
    """The prompts of the chosen kind(s), kinds alternating, with their token ids."""
    from ._prompts import load_prompts

    prompts = load_prompts(settings.prompts)
    kinds: dict[str, list[Any]] = {}
    for prompt in prompts:
        if settings.prompt_kind in ("mixed", prompt.kind):
            kinds.setdefault(prompt.kind, []).append(prompt)
    if not kinds:
        raise SystemExit(f"concurrency: no {settings.prompt_kind!r} prompts in {settings.prompts}")
    # The kind of the shortest prompts first: a single stream is then mostly decoding.
    queues = sorted(kinds.values(), key=lambda queue: min(len(p.text) for p in queue))
    ordered = []
    for i in range(max(len(queue) for queue in queues)):
        ordered += [queue[i] for queue in queues if i < len(queue)]
    out = []
    for prompt in ordered:
        ids = list(tokenizer(prompt.text)["input_ids"])
        if limit is not None and len(ids) + settings.new_tokens > limit:
            ids = ids[-(limit - settings.new_tokens) :]  # keep the end: it leads into the body
        out.append((prompt, ids))
    return out


def choose_prompts(
    plain: OursMethod,
    pool: list[tuple[Any, list[int]]],
    count: int,
    new_tokens: int,
    log: Callable[[str], None],
) -> tuple[list[tuple[Any, list[int]]], dict[str, list[int]], float]:
    """``count`` prompts, those whose greedy continuation runs ``new_tokens`` first, and the
    reference tokens of every prompt tried (batched plain decoding, ``count`` at a time)."""
    reference: dict[str, list[int]] = {}
    started = time.perf_counter()
    pending = list(pool)
    full: list[tuple[Any, list[int]]] = []
    while len(full) < count and pending:
        batch, pending = pending[:count], pending[count:]
        run = plain.run([(p.id, ids) for p, ids in batch], new_tokens)
        for (prompt, ids), stream in zip(batch, run.streams, strict=True):
            reference[prompt.id] = stream.tokens
            if len(stream.tokens) >= new_tokens:
                full.append((prompt, ids))
    shorter = sorted(
        (c for c in pool if c[0].id in reference and c not in full),
        key=lambda c: -len(reference[c[0].id]),
    )
    chosen = (full + shorter)[:count]
    seconds = time.perf_counter() - started
    log(
        f"pre-pass: {len(reference)} prompts tried, {len(full)} run the whole {new_tokens} "
        f"tokens ({seconds:.0f}s)"
    )
    return chosen, reference, seconds


# -- aggregation ------------------------------------------------------------------------------


def _ms(value: float | None) -> float | None:
    return None if value is None else 1000.0 * value


def _aggregate(records: list[dict[str, Any]], settings: Settings) -> list[dict[str, Any]]:
    rows = []
    for level in settings.streams:
        at_level = [r for r in records if r["streams"] == level]
        base = {r["repeat"]: r["tokens_per_second"] for r in at_level if r["method"] == BASELINE}
        for method in METHODS:
            mine = [r for r in at_level if r["method"] == method]
            if not mine:
                continue
            streams = [s for r in mine for s in r["stream_results"]]
            first = [
                s["first_chunk_seconds"] for s in streams if s["first_chunk_seconds"] is not None
            ]
            gaps = [g for s in streams for g in s["gaps_seconds"]]
            rows_seen = [n for s in streams for n in (s["rows"] or [])]
            rates = [r["tokens_per_second"] for r in mine]
            ratios = [
                r["tokens_per_second"] / base[r["repeat"]] for r in mine if r["repeat"] in base
            ]
            tokens = sum(r["tokens"] for r in mine)
            forwards = sum(r["forwards"] for r in mine)
            row: dict[str, Any] = {
                "streams": level,
                "method": method,
                "tokens_per_second": statistics.median(rates),
                "tokens_per_second_runs": rates,
                "vs_one_at_a_time": statistics.median(ratios) if ratios else None,
                "vs_one_at_a_time_runs": ratios,
                "first_chunk_p50_ms": _ms(percentile(first, 50)),
                "first_chunk_p95_ms": _ms(percentile(first, 95)),
                "gap_p50_ms": _ms(percentile(gaps, 50)),
                "gap_p95_ms": _ms(percentile(gaps, 95)),
                "gaps": len(gaps),
                # Each call counted once: a call shared by n streams reaches n chunks.
                "rows_per_call": (
                    len(rows_seen) / sum(1.0 / n for n in rows_seen) if rows_seen else None
                ),
                "tokens_per_forward": tokens / forwards if forwards else None,
                "generated_tokens": tokens,
                "generations": len(streams),
                "identical": sum(s["identical"] for s in streams),
                "unavailable": {},
            }
            if method == PEER:
                row["unavailable"] = dict(PEER_UNAVAILABLE)
            rows.append(row)
    return rows


def _row(rows: list[dict[str, Any]], level: int, method: str) -> dict[str, Any] | None:
    return next((r for r in rows if r["streams"] == level and r["method"] == method), None)


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, each PASS, FAIL, or not measured (its level was not run)."""
    out: list[dict[str, Any]] = []

    def add(target: str, measured: str | None, met: bool | None) -> None:
        status = "not measured" if met is None else ("PASS" if met else "FAIL")
        out.append({"target": target, "measured": measured, "met": met, "status": status})

    many = _row(rows, TARGET_STREAMS, SUBJECT)
    ratio = many["vs_one_at_a_time"] if many else None
    add(
        f"{TARGET_STREAMS} streams: batched hybrid ≥ {TARGET_SPEEDUP:g}× the aggregate tokens/s "
        "of one-at-a-time hybrid",
        None if ratio is None else f"{ratio:.2f}×",
        None if ratio is None else ratio >= TARGET_SPEEDUP,
    )
    one = _row(rows, 1, SUBJECT)
    ratio = one["vs_one_at_a_time"] if one else None
    add(
        "1 stream: batched hybrid no slower than one-at-a-time hybrid (ratio ≥ 1)",
        None if ratio is None else f"{ratio:.2f}×",
        None if ratio is None else ratio >= 1.0,
    )
    alone = one["gap_p50_ms"] if one else None
    busy = many["gap_p95_ms"] if many else None
    if alone is None or busy is None:
        add(
            f"{TARGET_STREAMS} streams: batched hybrid p95 gap < {TARGET_GAP_FACTOR:g}× the "
            "single-stream gap",
            None,
            None,
        )
    else:
        assert one is not None and many is not None
        p95_alone = one["gap_p95_ms"]
        add(
            f"{TARGET_STREAMS} streams: batched hybrid p95 gap < {TARGET_GAP_FACTOR:g}× the "
            "single-stream gap (its p50)",
            f"{busy:.1f} ms vs {alone:.1f} ms = {busy / alone:.2f}×"
            + (
                f" (vs the single-stream p95 {p95_alone:.1f} ms: {busy / p95_alone:.2f}×)"
                if p95_alone
                else ""
            ),
            busy < TARGET_GAP_FACTOR * alone,
        )
    return out


# -- the run ----------------------------------------------------------------------------------


def record(
    run: Run, level: int, repeat: int, position: int, reference: dict[str, list[int]]
) -> dict[str, Any]:
    tokens = sum(len(s.tokens) for s in run.streams)
    return {
        "method": run.method,
        "streams": level,
        "repeat": repeat,
        "position": position,  # place in this repeat's order of methods
        "wall_seconds": run.wall,
        "tokens": tokens,
        "tokens_per_second": tokens / run.wall if run.wall > 0 else 0.0,
        "forwards": run.forwards,
        "stream_results": [
            {
                "prompt": s.prompt,
                "new_tokens": len(s.tokens),
                "identical": s.tokens == reference.get(s.prompt),
                "first_chunk_seconds": s.first_chunk,
                "end_seconds": s.end,
                "chunk_seconds": [round(t, 6) for t in s.chunk_times],
                "chunk_tokens": s.chunk_tokens,
                "gaps_seconds": [round(g, 6) for g in s.gaps],
                "rows": s.rows,
            }
            for s in run.streams
        ],
    }


def run_concurrency(settings: Settings, log: Callable[[str], None] = _log) -> dict[str, Any]:
    """Every level, method and repeat; returns the result document (what the JSON holds)."""
    import torch

    threads = torch.get_num_threads()
    try:
        return _run(settings, log)
    finally:
        torch.set_num_threads(threads)  # leave torch as it was found when run in-process


def _run(settings: Settings, log: Callable[[str], None]) -> dict[str, Any]:
    import torch
    from transformers.utils import logging as hf_logging

    from .. import LocalBackend
    from ._machine import describe_machine

    started = time.perf_counter()
    load_at_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    if settings.threads:
        torch.set_num_threads(settings.threads)
    hf_logging.set_verbosity_error()  # a benchmark's output is its table
    verifier_default, drafter_default = default_models()
    verifier = settings.verifier or verifier_default
    drafter = settings.drafter or drafter_default

    def backend(hybrid: bool, **options: Any) -> Any:
        # What LocalBackend.default(...) builds, with the paths given (by default the same).
        return LocalBackend(
            verifier, drafter if hybrid else None, device=settings.device, **options
        )

    methods: dict[str, Method] = {
        SUBJECT: OursMethod(SUBJECT, backend(True)),
        PLAIN: OursMethod(PLAIN, backend(False)),
        BASELINE: OursMethod(BASELINE, backend(True, max_batch=1)),
    }
    subject = methods[SUBJECT]
    plain = methods[PLAIN]
    assert isinstance(subject, OursMethod) and isinstance(plain, OursMethod)
    most = max(settings.streams)
    found = candidates(settings, plain.backend.tokenizer, plain.backend.verifier.max_length)
    if most > len(found):
        raise SystemExit(
            f"concurrency: {most} streams need {most} different prompts; {settings.prompts} has "
            f"{len(found)} ({settings.prompt_kind})"
        )
    log(
        f"{', '.join(map(str, settings.streams))} streams × {settings.new_tokens} tokens, "
        f"{settings.repeats} repeat(s), {torch.get_num_threads()} threads, device "
        f"{plain.backend.device}"
    )
    chosen, reference, prepass_seconds = choose_prompts(
        plain, found, most, settings.new_tokens, log
    )
    prompts = [(p.id, ids) for p, ids in chosen]
    notes: list[str] = []
    peer: PeerMethod | None = None
    if settings.peer:
        peer = PeerMethod(
            verifier,
            plain.backend.device,
            plain.backend.dtype,
            [ids for _, ids in prompts],
            settings.new_tokens,
            prefill_chunk=plain.backend.engine.core.prefill_chunk,
        )
        methods[PEER] = peer
    else:
        notes.append("transformers generate_batch skipped (--no-transformers)")
    records: list[dict[str, Any]] = []
    try:
        warm = prompts[: min(WARMUP_STREAMS, most)]
        for method in methods.values():  # first calls pay for allocations, thread pools, …
            method.run(warm, min(WARMUP_TOKENS, settings.new_tokens))
        log(f"warmed up {len(methods)} methods")
        order = list(methods.values())
        for repeat in range(settings.repeats):
            for index, level in enumerate(settings.streams):
                shift = (repeat + index) % len(order)
                for position, method in enumerate([*order[shift:], *order[:shift]]):
                    gc.collect()
                    run = method.run(prompts[:level], settings.new_tokens)
                    records.append(record(run, level, repeat, position, reference))
                rates = ", ".join(
                    f"{r['method']} {r['tokens_per_second']:.0f}" for r in records[-len(order) :]
                )
                log(f"repeat {repeat + 1}/{settings.repeats}, {level} streams: {rates} tok/s")
    finally:
        if peer is not None:
            peer.close()
    rows = _aggregate(records, settings)
    for row in rows:
        if row["identical"] < row["generations"]:
            notes.append(
                f"{row['method']} at {row['streams']} streams: {row['identical']} of "
                f"{row['generations']} streams gave the reference tokens (greedy should match)"
            )
    machine = describe_machine(plain.backend.device)
    machine["load_average_at_start"] = load_at_start
    defaults = subject.backend.defaults
    ratios = {
        str(level): r["vs_one_at_a_time"]
        for level in settings.streams
        if (r := _row(rows, level, SUBJECT)) is not None
    }
    return {
        "name": settings.name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine,
        "settings": {
            "streams": list(settings.streams),
            "new_tokens": settings.new_tokens,
            "repeats": settings.repeats,
            "threads": torch.get_num_threads(),
            "device": str(plain.backend.device),
            "dtype": str(plain.backend.dtype),
            "verifier": str(verifier),
            "drafter": str(drafter),
            "prompts_file": str(settings.prompts),
            "prompt_kind": settings.prompt_kind,
            "greedy": True,
            "hybrid": {
                "block_size": defaults.block_size,
                "steps": defaults.steps,
                "adaptive": defaults.adaptive,
            },
            "batching": asdict(subject.backend.limits),
            "prefill_chunk": plain.backend.engine.core.prefill_chunk,
            "transformers_continuous_batching": peer.settings() if peer else None,
            "warmup": {"streams": min(WARMUP_STREAMS, most), "tokens": WARMUP_TOKENS},
        },
        "methods": {name: DESCRIPTIONS[name] for name in methods},
        "baseline": BASELINE,
        "prompts": [
            {
                "id": p.id,
                "kind": p.kind,
                "source": p.source,
                "prompt_tokens": len(ids),
                "reference_tokens": len(reference[p.id]),
            }
            for p, ids in chosen
        ],
        "prepass": {
            "method": PLAIN,
            "seconds": prepass_seconds,
            "tried": {pid: len(tokens) for pid, tokens in reference.items()},
        },
        "results": rows,
        "batched_vs_one_at_a_time": ratios,
        "targets": targets(rows),
        "unavailable": {PEER: PEER_UNAVAILABLE} if peer else {},
        "transformers_log": sorted(set(peer.messages)) if peer else [],
        "notes": notes,
        "runs": records,
        "reference": reference,
        "wall_seconds": time.perf_counter() - started,
    }
