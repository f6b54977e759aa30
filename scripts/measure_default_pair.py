"""Numbers for the default pair's MODEL_CARD.md: load time, first chunk, acceptance, samples.

Usage: python scripts/measure_default_pair.py [VERIFIER DRAFTER]  (default: the shipped pair)
Prints JSON. Speed ratios here are a quick check; the benchmark harness is the reference.
"""

from __future__ import annotations

import json
import sys
import time

import anyio
import torch

from dg_stream import GenerationRequest, LocalBackend, SpeculativeConfig, generate
from dg_stream.train.corpus import stdlib_corpus
from dg_stream.train.evaluate import acceptance, held_out_prompts


def timed_run(
    backend: LocalBackend, prompts: list[str], block_size: int
) -> tuple[float, list[list[int]]]:
    started, outputs = time.perf_counter(), []
    for prompt in prompts:
        request = GenerationRequest(
            prompt=prompt,
            max_new_tokens=96,
            speculative=SpeculativeConfig(block_size=block_size, adaptive=False),
        )
        session = backend.engine.session(request)
        ids: list[int] = []
        while (chunk := session.step()) is not None:
            ids.extend(chunk.token_ids)
        outputs.append(ids)
    return time.perf_counter() - started, outputs


def main() -> None:
    torch.set_num_threads(2)
    paths = sys.argv[1:3]
    started = time.perf_counter()
    backend = LocalBackend(*paths) if paths else LocalBackend.default()
    load_seconds = time.perf_counter() - started
    plain = LocalBackend(paths[0], None) if paths else LocalBackend.default(drafter=None)

    async def first_chunk() -> float:
        t = time.perf_counter()
        async with generate("def fibonacci(n):", backend=backend, max_new_tokens=64) as stream:
            async for _ in stream:
                return time.perf_counter() - t
        return float("nan")

    first = anyio.run(first_chunk)
    prompts = held_out_prompts(stdlib_corpus().held_out, count=16)
    result: dict[str, object] = {
        "load_seconds": round(load_seconds, 2),
        "first_chunk_seconds": round(first, 3),
    }
    result["acceptance"] = [acceptance(backend, prompts, k) for k in (4, 8, 12, 16)]
    result["acceptance_steps_2"] = acceptance(backend, prompts, 8, steps=2)
    for k in (8, 12):
        t_plain, ref = timed_run(plain, prompts[:8], k)
        t_hybrid, out = timed_run(backend, prompts[:8], k)
        result[f"greedy_speedup_block_{k}"] = round(t_plain / t_hybrid, 2)
        result[f"identical_block_{k}"] = out == ref
    samples = {}
    for prompt in ["def fibonacci(n):", "class Stack:", "def read_lines(path):"]:
        samples[prompt] = anyio.run(
            lambda p=prompt: generate(p, backend=backend, max_new_tokens=80).collect()
        ).text
    result["samples"] = samples
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
