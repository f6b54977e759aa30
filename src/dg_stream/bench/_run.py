"""The benchmark run: load once, build the methods, time them interleaved, aggregate.

Timing protocol: for every repeat and every prompt, each method generates once, the order of
methods rotating from prompt to prompt (A B C, B C A, …) so that drift of the machine and
order effects spread evenly. A method's tokens/s in a repeat is its completion tokens over its
wall time summed over the prompts; its speed-up is that divided by the baseline's in the same
repeat; the table reports medians over repeats.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .._backends._model_thread import run_on_torch_thread
from .._config import SpeculativeConfig
from ._config import BenchConfig
from ._machine import current_rss_mib, describe_machine, peak_rss_mib, reset_peak_rss
from ._methods import DgMethod, Generation, HFMethod, Method, Sampling
from ._prompts import Prompt, load_prompts
from ._report import DEFAULT_METHOD, DRAFTING

__all__ = ["BASELINE", "run_benchmark"]

BASELINE = "dg_stream plain"

# Assisted-generation settings: transformers' defaults, and the adaptive block of our engine.
ASSISTED: dict[str, dict[str, Any]] = {
    "default": {},
    "heuristic-8": {"num_assistant_tokens": 8, "num_assistant_tokens_schedule": "heuristic"},
}


def _model_bytes(model: Any) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _pick_prompts(prompts: Sequence[Prompt], count: int) -> list[Prompt]:
    """``count`` prompts, alternating between kinds (short, long, …) in file order."""
    kinds: dict[str, list[Prompt]] = {}
    for prompt in prompts:
        kinds.setdefault(prompt.kind, []).append(prompt)
    picked: list[Prompt] = []
    queues = list(kinds.values())
    while len(picked) < count and any(queues):
        for queue in queues:
            if queue and len(picked) < count:
                picked.append(queue.pop(0))
    return picked


class _Setup:
    """Models and methods, loaded once."""

    def __init__(self, config: BenchConfig, log: Callable[[str], None]) -> None:
        from .._backends.local import LocalBackend
        from .._loading import load_causal_lm, load_tokenizer, resolve_device_dtype

        self.config = config
        self.device, self.dtype = resolve_device_dtype(config.device, config.dtype)
        started = time.perf_counter()
        from transformers.utils import logging as hf_logging

        # transformers logs advice about its own internal calls (assisted generation passes
        # a generation config and arguments together); a benchmark's output is its table.
        hf_logging.set_verbosity_error()
        self.tokenizer = load_tokenizer(config.verifier)
        # Loaded on dg_stream's torch thread, where every method runs (see _model_thread).
        self.verifier = run_on_torch_thread(
            load_causal_lm, config.verifier, self.device, self.dtype
        )
        verifier_bytes = _model_bytes(self.verifier)

        def backend(drafter: Any) -> Any:
            return LocalBackend(
                self.verifier,
                drafter,
                tokenizer=self.tokenizer,
                device=self.device,
                dtype=self.dtype,
            )

        self.plain = backend(None)
        self.methods: list[Method] = [
            DgMethod(
                self.plain,
                SpeculativeConfig(),
                name=BASELINE,
                family="baseline",
                description="dg_stream's own loop with KV cache, no drafter",
                model_bytes=verifier_bytes,
            )
        ]
        self.hybrid: Any = None
        if config.drafter is not None:
            self.hybrid = backend(config.drafter)
            drafter_bytes = _model_bytes(self.hybrid.drafter.model)
            for steps in config.steps:
                for k in config.block_sizes:
                    if steps > k:
                        continue
                    self.methods.append(
                        self._hybrid(k, steps, False, verifier_bytes + drafter_bytes)
                    )
            if config.adaptive:  # block sizes chosen from measured acceptance and costs
                self.methods.append(self._hybrid(8, 1, True, verifier_bytes + drafter_bytes))
            defaults = self.hybrid.defaults
            self.methods.append(  # the headline: what a user gets from generate()
                DgMethod(
                    self.hybrid,
                    SpeculativeConfig(),
                    name=DEFAULT_METHOD,
                    family="hybrid",
                    block_size=defaults.block_size,
                    steps=defaults.steps,
                    adaptive=bool(defaults.adaptive),
                    description="generate() with the backend's default options",
                    model_bytes=verifier_bytes + drafter_bytes,
                )
            )
        self.dflash: Any = None
        if config.dflash is not None:
            self.dflash = backend(config.dflash)
            total = verifier_bytes + _model_bytes(self.dflash.drafter.model)
            largest = self.dflash.drafter.traits.max_block_size
            for k in sorted({min(k, largest) for k in config.block_sizes}):
                self.methods.append(self._dflash(k, False, total))
            if config.adaptive:
                self.methods.append(self._dflash(min(8, largest), True, total))
        self.ngram = backend("ngram")
        self.methods.append(
            DgMethod(
                self.ngram,
                SpeculativeConfig(block_size=config.ngram_block_size),
                name=f"dg_stream ngram k={config.ngram_block_size}",
                family="ngram",
                block_size=config.ngram_block_size,
                description="prompt lookup (n-gram) drafter in dg_stream's engine",
                model_bytes=verifier_bytes,
            )
        )
        self.notes: list[str] = []
        if config.assistant is not None and config.assistant.exists():
            # The same small causal model in dg_stream's engine: separates what the drafter
            # design buys from what the engine buys.
            self.causal = backend(config.assistant)
            self.methods.append(
                DgMethod(
                    self.causal,
                    SpeculativeConfig(block_size=8, adaptive=True),
                    name="dg_stream causal k=8 adaptive",
                    family="causal",
                    block_size=8,
                    steps=None,
                    adaptive=True,
                    description="the transformers assistant as dg_stream's causal drafter",
                    model_bytes=verifier_bytes + _model_bytes(self.causal.drafter.model),
                )
            )
        if config.transformers:
            self._transformers_methods(verifier_bytes, log)
        log(
            f"loaded verifier ({verifier_bytes / 2**20:.1f} MiB), "
            f"{len(self.methods)} methods in {time.perf_counter() - started:.1f}s"
        )

    def _hybrid(self, k: int, steps: int, adaptive: bool, model_bytes: int) -> DgMethod:
        label = f"dg_stream hybrid k={k} s={steps}" + (" adaptive" if adaptive else "")
        return DgMethod(
            self.hybrid,
            SpeculativeConfig(block_size=k, steps=steps, adaptive=adaptive),
            name=label,
            family="hybrid",
            block_size=k,
            steps=steps,
            adaptive=adaptive,
            description="diffusion drafter, lossless verification",
            model_bytes=model_bytes,
        )

    def _dflash(self, k: int, adaptive: bool, model_bytes: int) -> DgMethod:
        return DgMethod(
            self.dflash,
            SpeculativeConfig(block_size=k, adaptive=adaptive),
            name=f"dg_stream dflash k={k}" + (" adaptive" if adaptive else ""),
            family="dflash",
            block_size=k,
            steps=1,
            adaptive=adaptive,
            description="DFlash drafter reading the verifier's hidden states, lossless",
            model_bytes=model_bytes,
        )

    def _transformers_methods(self, verifier_bytes: int, log: Callable[[str], None]) -> None:
        from .._loading import load_causal_lm

        config = self.config
        self.methods.append(
            HFMethod(
                self.verifier,
                {},
                name="transformers generate",
                family="transformers",
                description="model.generate, plain decoding",
                model_bytes=verifier_bytes,
            )
        )
        if config.assistant is not None and config.assistant.exists():
            assistant = run_on_torch_thread(
                load_causal_lm, config.assistant, self.device, self.dtype, "assistant"
            )
            base = dict(assistant.generation_config.to_dict())
            assistant_bytes = _model_bytes(assistant)
            for setting in config.assisted_settings:
                kwargs = ASSISTED[setting]
                # Settings live on the assistant's generation config in transformers.
                self.methods.append(
                    _AssistedMethod(
                        self.verifier,
                        assistant,
                        base,
                        kwargs,
                        name=f"transformers assisted ({setting})",
                        family="transformers",
                        block_size=kwargs.get("num_assistant_tokens"),
                        description=f"assisted generation, {assistant_bytes / 2**20:.1f} MiB "
                        "causal assistant distilled like the drafter",
                        model_bytes=verifier_bytes + assistant_bytes,
                    )
                )
        else:
            note = (
                f"no assistant checkpoint at {config.assistant}: transformers assisted "
                "generation skipped (train one with 'dg-stream train drafter --architecture "
                "causal' or pass --assistant)"
            )
            self.notes.append(note)
            log(note)
        self.methods.append(
            HFMethod(
                self.verifier,
                {"prompt_lookup_num_tokens": 10},
                name="transformers prompt lookup",
                family="transformers",
                block_size=10,
                description="model.generate(prompt_lookup_num_tokens=10)",
                model_bytes=verifier_bytes,
            )
        )


class _AssistedMethod(HFMethod):
    """Assisted generation; the assistant's generation config is restored around each call
    (transformers adapts ``num_assistant_tokens`` in place during a generation)."""

    def __init__(
        self,
        model: Any,
        assistant: Any,
        base: dict[str, Any],
        settings: dict[str, Any],
        **fields: Any,
    ) -> None:
        super().__init__(model, {}, assistant=assistant, **fields)
        self.base = base
        self.settings = settings

    def generate(
        self, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling, seed: int
    ) -> Generation:
        from transformers import GenerationConfig

        config = GenerationConfig.from_dict({**self.base, **self.settings})
        self.assistant.generation_config = config
        return super().generate(prompt_ids, max_new_tokens, sampling, seed)


def _encode(setup: _Setup, prompts: Sequence[Prompt], max_new_tokens: int) -> list[list[int]]:
    limit = setup.plain.verifier.max_length
    encoded = []
    for prompt in prompts:
        ids = list(setup.tokenizer(prompt.text)["input_ids"])
        if limit is not None and len(ids) + max_new_tokens > limit:
            ids = ids[-(limit - max_new_tokens) :]  # keep the end: it leads into the function
        encoded.append(ids)
    return encoded


def _timed_phase(
    methods: Sequence[Method],
    prompts: Sequence[Prompt],
    prompt_ids: Sequence[list[int]],
    config: BenchConfig,
    sampling: Sampling,
    budget: float | None,
    log: Callable[[str], None],
) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    started = time.perf_counter()
    for repeat in range(config.repeats):
        if (
            repeat
            and budget is not None
            and time.perf_counter() - started > budget * repeat / (repeat + 1)
        ):
            log(f"  {sampling.mode}: time budget reached after {repeat} repeat(s)")
            break
        baseline_tokens: dict[int, list[int]] = {}
        for p, (prompt, ids) in enumerate(zip(prompts, prompt_ids, strict=True)):
            shift = (p + repeat) % len(methods)
            order = [*methods[shift:], *methods[:shift]]
            seed = config.seed + p
            results: dict[str, Generation] = {}
            for method in order:
                results[method.name] = method.generate(ids, config.max_new_tokens, sampling, seed)
            baseline_tokens[p] = results[BASELINE].tokens
            for method in methods:
                g = results[method.name]
                records.append(
                    {
                        "mode": sampling.mode,
                        "method": method.name,
                        "repeat": repeat,
                        "prompt": prompt.id,
                        "kind": prompt.kind,
                        "prompt_tokens": len(ids),
                        "new_tokens": len(g.tokens),
                        "seconds": g.seconds,
                        "first_chunk_seconds": g.first_chunk_seconds,
                        "verifier_calls": g.verifier_calls,
                        "accepted": g.accepted,
                        "identical": g.tokens == baseline_tokens[p],
                    }
                )
        log(
            f"  {sampling.mode}: repeat {repeat + 1}/{config.repeats} done "
            f"({time.perf_counter() - started:.0f}s)"
        )
    return records


def _aggregate(
    records: Sequence[dict[str, Any]], methods: Sequence[Method]
) -> list[dict[str, Any]]:
    rows = []
    repeats = sorted({r["repeat"] for r in records})
    baseline = {(r["prompt"], r["repeat"]): r for r in records if r["method"] == BASELINE}
    base_rate = {}
    for repeat in repeats:
        mine = [r for r in records if r["method"] == BASELINE and r["repeat"] == repeat]
        base_rate[repeat] = sum(r["new_tokens"] for r in mine) / sum(r["seconds"] for r in mine)
    for method in methods:
        mine = [r for r in records if r["method"] == method.name]
        if not mine:
            continue
        rates, ratios = [], []
        for repeat in repeats:
            rows_r = [r for r in mine if r["repeat"] == repeat]
            rate = sum(r["new_tokens"] for r in rows_r) / sum(r["seconds"] for r in rows_r)
            rates.append(rate)
            ratios.append(rate / base_rate[repeat])
        # Robust to a stall of the machine during one generation (other work on a shared
        # host): the median over (prompt, repeat) of the per-generation tokens/s ratios.
        per_prompt = [
            (r["new_tokens"] / r["seconds"]) / (b["new_tokens"] / b["seconds"])
            for r in mine
            for b in [baseline[(r["prompt"], r["repeat"])]]
        ]
        calls = sum(r["verifier_calls"] for r in mine)
        rows.append(
            {
                "method": method.name,
                "family": method.family,
                "block_size": method.block_size,
                "steps": method.steps,
                "adaptive": method.adaptive,
                "description": method.description,
                "tokens_per_second": statistics.median(rates),
                "tokens_per_second_runs": rates,
                "speedup": statistics.median(ratios),
                "speedup_runs": ratios,
                "speedup_per_prompt_median": statistics.median(per_prompt),
                "mean_accepted_per_call": sum(r["accepted"] for r in mine) / max(1, calls),
                "tokens_per_call": sum(r["new_tokens"] for r in mine) / max(1, calls),
                "first_chunk_ms": 1000 * statistics.median(r["first_chunk_seconds"] for r in mine),
                "new_tokens": sum(r["new_tokens"] for r in mine),
                "generations": len(mine),
                "identical": sum(r["identical"] for r in mine),
                "model_mib": method.model_bytes / 2**20,
            }
        )
    return rows


def _memory_pass(
    methods: Sequence[Method], ids: list[int], config: BenchConfig, device: Any
) -> dict[str, dict[str, float]]:
    """Peak memory of one generation per method on the longest prompt (not timed)."""
    out: dict[str, dict[str, float]] = {}
    for method in methods:
        reset = reset_peak_rss()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        before = current_rss_mib()
        method.generate(ids, config.max_new_tokens, Sampling(), config.seed)
        peak = peak_rss_mib()
        entry = {
            "peak_rss_mib": peak,
            "generation_rss_mib": max(0.0, peak - before),  # above the resident models
            "peak_rss_is_per_method": float(reset),
        }
        if device.type == "cuda":
            entry["peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        out[method.name] = entry
    return out


def run_benchmark(config: BenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every phase; returns the result document (what the JSON file holds)."""
    threads = torch.get_num_threads()
    try:
        return _run_benchmark(config, log)
    finally:
        torch.set_num_threads(threads)  # a benchmark run in-process leaves torch as it found it


def _run_benchmark(config: BenchConfig, log: Callable[[str], None]) -> dict[str, Any]:
    started = time.perf_counter()
    load_at_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    if config.threads:
        torch.set_num_threads(config.threads)
    setup = _Setup(config, log)
    prompts = _pick_prompts(load_prompts(config.prompts), config.num_prompts)
    prompt_ids = _encode(setup, prompts, config.max_new_tokens)
    log(
        f"{len(prompts)} prompts ({min(map(len, prompt_ids))}-{max(map(len, prompt_ids))} "
        f"tokens), {config.max_new_tokens} new tokens, {config.repeats} repeats, "
        f"device {setup.device}, {torch.get_num_threads()} threads"
    )
    methods = setup.methods
    if config.warmup:
        for method in methods:
            for sampling in (Sampling(), Sampling(config.temperature or 0.0)):
                method.generate(prompt_ids[0], 8, sampling, config.seed)
    phases = 2 if config.temperature else 1
    budget = config.max_seconds / phases if config.max_seconds else None
    greedy = Sampling()
    records = _timed_phase(methods, prompts, prompt_ids, config, greedy, budget, log)
    greedy_rows = _aggregate(records, methods)
    hybrids = [r for r in greedy_rows if r["family"] in DRAFTING]
    best = max(hybrids, key=lambda r: r["speedup"]) if hybrids else None
    results: dict[str, Any] = {"greedy": greedy_rows}
    repeats_run = {"greedy": len({r["repeat"] for r in records})}
    if config.temperature:
        keep = {BASELINE, "transformers generate", DEFAULT_METHOD}
        keep |= {m.name for m in methods if m.family in ("ngram", "causal", "transformers")}
        keep |= {
            m.name
            for m in methods
            if m.family in DRAFTING and (m.adaptive or (m.block_size == 8 and m.steps == 1))
        }
        if best is not None:
            keep.add(best["method"])
        sampled_methods = [m for m in methods if m.name in keep]
        sampling = Sampling(config.temperature)
        more = _timed_phase(sampled_methods, prompts, prompt_ids, config, sampling, budget, log)
        records += more
        results["sampling"] = _aggregate(more, sampled_methods)
        repeats_run["sampling"] = len({r["repeat"] for r in more})
    longest = max(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    memory = _memory_pass(methods, prompt_ids[longest], config, setup.device)
    for rows in results.values():
        for row in rows:
            row.update(memory.get(row["method"], {}))
    profile = None
    # The profiled generation starts from the prompt of median length, typical rather than
    # extreme, among those the baseline continued longest (a reply that stops after a few
    # tokens profiles the prefill, not decoding).
    produced: dict[str, int] = {}
    for r in records:
        if r["method"] == BASELINE and r["mode"] == greedy.mode:
            produced[r["prompt"]] = max(produced.get(r["prompt"], 0), r["new_tokens"])
    most = max(produced.values(), default=0)
    candidates = [i for i, p in enumerate(prompts) if produced.get(p.id, most) == most]
    by_length = sorted(candidates, key=lambda i: len(prompt_ids[i]))
    typical = by_length[len(by_length) // 2]
    if config.profile and setup.hybrid is not None and best is not None:
        from ._profile import profile_generation

        # The headline's options (the backend's defaults), what users run.
        spec = SpeculativeConfig()
        profile = profile_generation(
            setup.hybrid,
            spec,
            prompt_ids[typical],
            config.max_new_tokens,
            config.profile_repeats,
            plain_backend=setup.plain,
        )
    machine = describe_machine(setup.device)
    machine["load_average_at_start"] = load_at_start
    default_rows = [r for r in greedy_rows if r["method"] == DEFAULT_METHOD]
    return {
        "name": config.name,
        "headline": {
            "method": DEFAULT_METHOD,
            "greedy_speedup": default_rows[0]["speedup"] if default_rows else None,
            "sampled_speedup": next(
                (
                    r["speedup"]
                    for r in results.get("sampling", [])
                    if r["method"] == DEFAULT_METHOD
                ),
                None,
            ),
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine,
        "config": {
            "verifier": str(config.verifier),
            "drafter": str(config.drafter) if config.drafter else None,
            "dflash": str(config.dflash) if config.dflash else None,
            "assistant": str(config.assistant) if config.assistant else None,
            "prompts_file": str(config.prompts),
            "prompts": [p.id for p in prompts],
            "prompt_tokens": [len(ids) for ids in prompt_ids],
            "num_prompts": len(prompts),
            "max_new_tokens": config.max_new_tokens,
            "repeats": config.repeats,
            # What ran: the time budget may stop a phase before all the repeats asked for.
            "repeats_run": repeats_run,
            "block_sizes": list(config.block_sizes),
            "steps": list(config.steps),
            "temperature": config.temperature,
            "seed": config.seed,
            "dtype": str(setup.dtype),
            "threads": torch.get_num_threads(),
            "max_seconds": config.max_seconds,
        },
        "baseline": BASELINE,
        "best_hybrid": best["method"] if best else None,
        "results": results,
        "profile": profile,
        "notes": setup.notes,
        "records": records,
        "wall_seconds": time.perf_counter() - started,
    }
