"""Two diffusion drafters for one verifier, measured side by side: accepted per call and speed.

Usage: python scripts/compare_drafters.py DRAFTER_A DRAFTER_B [--out FILE] [--threads N]

Greedy, fixed block (8 by default), on three held-out prompt sets the drafters never trained
on: the bench's prompts (``benchmarks/prompts/prompts.jsonl``), prompts cut from the stdlib
test suites (``held_out_prompts``, as the training curve uses) and prompts cut from code that
is not the standard library at all (installed pure-Python packages: anyio, click, h11, httpx),
which says whether a drafter generalises beyond its corpus. Each prompt runs under both
drafters back to back, in alternating order, in one process, so that a noisy machine slows
both alike; the wall time of the engine's sync loop gives tokens/s alongside acceptance.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from dg_stream import LocalBackend
from dg_stream.train.corpus import stdlib_corpus
from dg_stream.train.evaluate import acceptance, held_out_prompts

ROOT = Path(__file__).resolve().parent.parent
VERIFIER = ROOT / "src" / "dg_stream" / "default_model" / "verifier"
OTHER_PACKAGES = ("anyio", "click", "h11", "httpx")


def bench_prompts() -> list[str]:
    lines = (ROOT / "benchmarks" / "prompts" / "prompts.jsonl").read_text().splitlines()
    return [json.loads(line)["text"] for line in lines if line.strip()]


def other_code_prompts(count: int) -> list[str]:
    """Prompts from installed packages' sources (never training text), an even stride over
    their sorted non-test files."""
    site = Path(torch.__file__).resolve().parent.parent
    files = sorted(
        p
        for name in OTHER_PACKAGES
        for p in (site / name).rglob("*.py")
        if "test" not in p.name and p.stat().st_size > 2000
    )
    docs = [p.read_text(encoding="utf-8", errors="replace") for p in files]
    stride = max(1, len(docs) // (2 * count))
    return held_out_prompts(docs[::stride], count=count)


def measure(backend: LocalBackend, prompt: str, block: int, tokens: int) -> dict[str, Any]:
    started = time.perf_counter()
    result = acceptance(backend, [prompt], block, max_new_tokens=tokens)
    result["seconds"] = time.perf_counter() - started
    return result


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    calls = sum(r["verifier_calls"] for r in runs)
    accepted = sum(r["accepted_tokens"] for r in runs)
    committed = sum(r["committed_tokens"] for r in runs)
    seconds = sum(r["seconds"] for r in runs)
    return {
        "prompts": len(runs),
        "mean_accepted_per_call": round(accepted / max(1, calls), 3),
        "tokens_per_second": round(committed / seconds, 1),
        "per_prompt": [round(r["accepted_tokens"] / max(1, r["verifier_calls"]), 2) for r in runs],
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("drafters", nargs=2, metavar="DRAFTER")
    parser.add_argument("--verifier", default=str(VERIFIER))
    parser.add_argument("--block", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--per-set", type=int, default=16, help="prompts per set")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sets = {
        "bench": bench_prompts()[: args.per_set * 2],
        "stdlib_held_out": held_out_prompts(stdlib_corpus().held_out, count=args.per_set),
        "other_code": other_code_prompts(args.per_set),
    }
    backends = [LocalBackend(args.verifier, d, device="cpu") for d in args.drafters]
    runs: dict[str, list[list[dict[str, Any]]]] = {name: [[], []] for name in sets}
    for name, prompts in sets.items():
        for i, prompt in enumerate(prompts):
            order = (0, 1) if i % 2 == 0 else (1, 0)
            for which in order:
                runs[name][which].append(measure(backends[which], prompt, args.block, args.tokens))
    report = {
        "block": args.block,
        "new_tokens": args.tokens,
        "threads": args.threads,
        "drafters": args.drafters,
        "sets": {
            name: {d: summarise(r) for d, r in zip(args.drafters, pair, strict=True)}
            for name, pair in runs.items()
        },
    }
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
