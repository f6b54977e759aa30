"""Where one hybrid generation spends its time, and what the async layer adds.

The breakdown instruments one engine session and, while it runs, the engine's round core
(instance attributes, removed afterwards): the prompt's prefill, the drafter's proposals, the
verifier's forward passes, the acceptance rule, the commit (cache lengths, ids, features) and
detokenization (the incremental detokenizer and the stop-string matcher); what is left of
each step is the engine's own bookkeeping. On CUDA
every timed piece ends with a device synchronisation, so GPU work is charged to the piece
that launched it.

The async layer is measured as the difference between the same generation driven
synchronously (``session.step()`` in a loop, on dg_stream's torch thread where the stream's
rounds run too) and through the public ``dg_stream.generate()`` stream (hand-offs to and from
that thread, the stream object), interleaved and repeated, medians compared. Engine
efficiency is the verifier's and drafter's forwards over the decode time, in both.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

from .._config import GenerationRequest, SamplingParams, SpeculativeConfig

__all__ = ["profile_generation"]

PARTS = (
    "prefill",
    "drafting",
    "verification",
    "acceptance",
    "commit",
    "detokenization",
    "engine bookkeeping",
)


def _request(
    prompt_ids: list[int], max_new_tokens: int, spec: SpeculativeConfig, seed: int
) -> GenerationRequest:
    return GenerationRequest(
        prompt=list(prompt_ids),
        max_new_tokens=max_new_tokens,
        sampling=SamplingParams(temperature=0.0, seed=seed),
        speculative=spec,
    )


def _breakdown(backend: Any, request: GenerationRequest) -> tuple[dict[str, float], int]:
    """Seconds per part for one generation (and ``calls``: verifier calls), and its tokens."""
    session = backend.engine.session(request)
    verifier = backend.verifier
    device = verifier.device
    seconds: dict[str, float] = defaultdict(float)

    def timed(part: str | Callable[[], str], fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            name = part() if callable(part) else part
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds[name] += time.perf_counter() - t0

        return wrapper

    core = backend.engine.core
    prefilling = [False]
    prefill = core._prefill

    def timed_prefill(*args: Any, **kwargs: Any) -> Any:
        prefilling[0] = True
        try:
            return timed("prefill", prefill)(*args, **kwargs)
        finally:
            prefilling[0] = False

    forward = verifier.forward
    verifier.forward = lambda *a, **k: (
        forward(*a, **k) if prefilling[0] else timed("verification", forward)(*a, **k)
    )
    core._prefill = timed_prefill
    core._propose = timed("drafting", core._propose)
    core._judge_all = timed("acceptance", core._judge_all)
    core._commit = timed("commit", core._commit)
    for obj in (session.detok, session.stops):
        obj.feed = timed("detokenization", obj.feed)
        obj.flush = timed("detokenization", obj.flush)
    tokens = 0
    total = 0.0
    try:
        while True:
            t0 = time.perf_counter()
            chunk = session.step()
            total += time.perf_counter() - t0
            if chunk is None:
                break
            tokens += len(chunk.token_ids)
            if chunk.finish_reason is not None:
                break
    finally:
        # The instance attributes shadowed the methods; drop them.
        del verifier.forward, core._prefill, core._propose, core._judge_all, core._commit
        session.close()
    seconds["engine bookkeeping"] = max(0.0, total - sum(seconds.values()))
    seconds["total"] = total
    seconds["calls"] = float(session.stats.verifier_calls)
    return dict(seconds), tokens


def _sync_seconds(backend: Any, request: GenerationRequest) -> float:
    device = backend.verifier.device
    started = time.perf_counter()
    session = backend.engine.session(request)
    try:
        while (chunk := session.step()) is not None and chunk.finish_reason is None:
            pass
    finally:
        session.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def _async_seconds(backend: Any, prompt_ids: list[int], max_new_tokens: int, spec: Any) -> float:
    import anyio

    from .._generate import generate

    device = backend.verifier.device

    async def consume() -> float:
        started = time.perf_counter()
        stream = generate(
            list(prompt_ids),
            backend=backend,
            max_new_tokens=max_new_tokens,
            temperature=0.0,
            seed=0,
            block_size=spec.block_size,
            steps=spec.steps,
            adaptive=spec.adaptive,
        )
        async with stream:
            async for _chunk in stream:
                pass
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - started

    return float(anyio.run(consume))


def _economics(hybrid: dict[str, float], plain: dict[str, float], tokens: int) -> dict[str, float]:
    """Drafter economics in units of one plain decoding step (prefill excluded):
    speed-up ≈ tokens per call ÷ (verify + draft + overhead per call)."""
    step = (plain["total"] - plain["prefill"]) / max(1.0, plain["calls"])
    calls = max(1.0, hybrid["calls"])
    overhead = sum(
        hybrid[p] for p in ("acceptance", "commit", "detokenization", "engine bookkeeping")
    )
    plain_overhead = sum(
        plain[p] for p in ("acceptance", "commit", "detokenization", "engine bookkeeping")
    )
    out = {
        "plain_step_ms": 1000 * step,
        "plain_forward_ms": 1000 * plain["verification"] / max(1.0, plain["calls"]),
        "plain_overhead_ms": 1000 * plain_overhead / max(1.0, plain["calls"]),
        "tokens_per_call": tokens / calls,
        "verify_cost_steps": hybrid["verification"] / calls / step,
        "draft_cost_steps": hybrid["drafting"] / calls / step,
        "overhead_cost_steps": overhead / calls / step,
    }
    cost = out["verify_cost_steps"] + out["draft_cost_steps"] + out["overhead_cost_steps"]
    out["predicted_speedup"] = out["tokens_per_call"] / cost
    return out


def profile_generation(
    backend: Any,
    spec: SpeculativeConfig,
    prompt_ids: list[int],
    max_new_tokens: int,
    repeats: int = 5,
    plain_backend: Any = None,
) -> dict[str, Any]:
    """The time breakdown of one hybrid generation and the async layer's overhead; with
    ``plain_backend``, the drafter economics in units of a plain decoding step."""
    # Every synchronous measurement runs on the backend's model thread, where the stream's
    # rounds run: the same thread for both, so no second OpenMP team skews the comparison.
    on_model_thread = backend.model_thread.call
    request = _request(prompt_ids, max_new_tokens, spec, seed=0)
    on_model_thread(_sync_seconds, backend, request)  # warm-up
    _async_seconds(backend, prompt_ids, max_new_tokens, spec)
    runs = []
    tokens = 0
    for _ in range(repeats):
        parts, tokens = on_model_thread(_breakdown, backend, request)
        runs.append(parts)
    keys = (*PARTS, "total", "calls")
    median = {p: statistics.median(r.get(p, 0.0) for r in runs) for p in keys}
    economics = None
    if plain_backend is not None:
        plain_request = _request(prompt_ids, max_new_tokens, SpeculativeConfig(), seed=0)
        plain_runs = [
            plain_backend.model_thread.call(_breakdown, plain_backend, plain_request)[0]
            for _ in range(repeats)
        ]
        plain = {p: statistics.median(r.get(p, 0.0) for r in plain_runs) for p in keys}
        economics = _economics(median, plain, tokens)
    sync_times: list[float] = []
    async_times: list[float] = []
    # The synchronous loop on the torch thread (the engine's own speed) and the stream,
    # interleaved. (Never the loop on this thread: a second thread running torch would slow
    # every later measurement of the process, see _model_thread.)
    for i in range(repeats * 2):
        for j in range(2):
            if (i + j) % 2 == 0:
                sync_times.append(on_model_thread(_sync_seconds, backend, request))
            else:
                async_times.append(_async_seconds(backend, prompt_ids, max_new_tokens, spec))
    sync_s, async_s = statistics.median(sync_times), statistics.median(async_times)
    async_layer = max(0.0, async_s - sync_s)
    # Shares of the async generation's wall time: the async layer's own cost, and the rest
    # split as the engine's parts split (medians of each part, so normalised by their sum;
    # an async run faster than the synchronous one, by noise, leaves the layer at zero).
    layer_share = async_layer / async_s
    parts_total = sum(median[p] for p in PARTS) or 1e-12
    shares = {p: median[p] / parts_total * (1.0 - layer_share) for p in PARTS}
    shares["async layer"] = layer_share
    # Engine efficiency: the models' own work (verifier and drafter forwards) over the decode
    # wall time, in the synchronous loop and through the stream.
    models = median["verification"] + median["drafting"]
    decode = median["total"] - median["prefill"]
    stream_decode = async_s - median["prefill"]
    return {
        "engine_efficiency": models / decode if decode > 0 else None,
        "stream_efficiency": models / stream_decode if stream_decode > 0 else None,
        "config": {
            "block_size": spec.block_size,
            "steps": spec.steps,
            "adaptive": bool(spec.adaptive),
            "prompt_tokens": len(prompt_ids),
            "max_new_tokens": max_new_tokens,
            "generated_tokens": tokens,
            "repeats": repeats,
        },
        "seconds": {p: median[p] for p in (*PARTS, "total")},
        "verifier_calls": median["calls"],
        "economics": economics,
        "shares": shares,
        "sync_seconds": sync_s,
        "async_seconds": async_s,
        "sync_runs": sync_times,
        "async_runs": async_times,
        # Everything the stream adds over the synchronous engine on the torch thread.
        "async_overhead": (async_s - sync_s) / sync_s,
        "async_overhead_target": 0.05,
        "async_overhead_met": (async_s - sync_s) / sync_s < 0.05,
        "breakdown_runs": runs,
    }
