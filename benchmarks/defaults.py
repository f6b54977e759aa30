"""What ``generate()``'s default options deliver against plain decoding, by mode and precision.

    python -m benchmarks.defaults [--prompts 4] [--new-tokens 128] [--repeats 3]
                                  [--dtypes float32,bfloat16] [--threads 2] [--out DIR]

The embedded pair, one stream, held-out prompts (the training corpus's held-out files). For
each dtype, plain decoding (no drafter) and the default (the shipped drafter, default options)
run each mode, interleaved and as medians over repeats:

- ``greedy``: temperature 0 (the default must be identical to plain decoding);
- ``sampled``: temperature 1, unseeded (adaptive block sizes);
- ``seeded``: temperature 1 with a seed (a fixed block, switched off by the row's own
  acceptance so that the seed keeps its text).

Prints a Markdown table (tokens/s, default ÷ plain, accepted drafts per call, and for greedy
whether the default wrote plain decoding's tokens) and writes ``<out>/defaults-<name>.json``
and ``.png``. The issue this serves: the default never below plain decoding, in any mode.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch

from dg_stream._argtypes import OneLineErrorParser, positive_int
from dg_stream.bench._report import markdown_table, save_figure, write_document

MODES = {
    "greedy": {"temperature": 0.0},
    "sampled": {"temperature": 1.0},
    "seeded": {"temperature": 1.0, "seed": 0},
}


def run_once(backend: Any, prompts: list[str], new_tokens: int, options: dict[str, Any]) -> Any:
    """Tokens/s over the prompts, accepted drafts per call, and the token ids written."""
    import anyio

    import dg_stream

    async def main() -> tuple[float, float, list[tuple[int, ...]]]:
        tokens, calls, accepted, ids = 0, 0, 0, []
        started = time.perf_counter()
        for i, prompt in enumerate(prompts):
            mine = dict(options)
            if "seed" in mine:
                mine["seed"] = i
            done = await dg_stream.generate(
                prompt, backend=backend, max_new_tokens=new_tokens, **mine
            ).collect()
            tokens += len(done.token_ids)
            if done.stats is not None:
                calls += done.stats.verifier_calls
                accepted += done.stats.accepted_tokens
            ids.append(done.token_ids)
        seconds = time.perf_counter() - started
        return tokens / seconds, accepted / max(calls, 1), ids

    return anyio.run(main)


def measure(
    dtypes: list[str], prompts: list[str], new_tokens: int, repeats: int
) -> list[dict[str, Any]]:
    from dg_stream import LocalBackend

    backends: dict[tuple[str, str], Any] = {}
    for dtype in dtypes:
        backends[(dtype, "plain")] = LocalBackend.default(drafter=None, dtype=dtype)
        backends[(dtype, "default")] = LocalBackend.default(dtype=dtype)
    for backend in backends.values():  # warm: allocations, measured costs
        run_once(backend, prompts[:1], 16, MODES["greedy"])
    speeds: dict[tuple[str, str, str], list[float]] = {}
    accepted: dict[tuple[str, str, str], float] = {}
    written: dict[tuple[str, str, str], Any] = {}
    for repeat in range(repeats):
        for mode, options in MODES.items():
            order = list(backends.items())
            order = order[repeat % len(order) :] + order[: repeat % len(order)]
            for (dtype, kind), backend in order:
                tps, per_call, ids = run_once(backend, prompts, new_tokens, options)
                key = (dtype, mode, kind)
                speeds.setdefault(key, []).append(tps)
                accepted[key] = per_call
                written[key] = ids
    rows = []
    for dtype in dtypes:
        for mode in MODES:
            plain = statistics.median(speeds[(dtype, mode, "plain")])
            default = statistics.median(speeds[(dtype, mode, "default")])
            same = None
            if mode == "greedy":
                same = written[(dtype, mode, "default")] == written[(dtype, mode, "plain")]
            rows.append(
                {
                    "dtype": dtype,
                    "mode": mode,
                    "plain_tokens_per_second": round(plain, 1),
                    "default_tokens_per_second": round(default, 1),
                    "ratio": round(default / plain, 3),
                    "accepted_per_call": round(accepted[(dtype, mode, "default")], 2),
                    "identical": same,
                    "plain_runs": [round(v, 1) for v in speeds[(dtype, mode, "plain")]],
                    "default_runs": [round(v, 1) for v in speeds[(dtype, mode, "default")]],
                }
            )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    header = (
        "dtype", "mode", "plain tok/s", "default tok/s", "default ÷ plain", "accepted/call",
        "identical",
    )  # fmt: skip
    cells = [
        (
            r["dtype"],
            r["mode"],
            r["plain_tokens_per_second"],
            r["default_tokens_per_second"],
            f"{r['ratio']:.2f}×",
            f"{r['accepted_per_call']:.2f}",
            "—" if r["identical"] is None else ("yes" if r["identical"] else "NO"),
        )
        for r in rows
    ]
    return "\n".join(markdown_table(header, "llrrrrl", cells))


def figure(rows: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    labels = [f"{r['mode']}\n{r['dtype']}" for r in rows]
    ax.bar(range(len(rows)), [r["ratio"] for r in rows], color="#4c72b0")
    ax.axhline(1.0, color="#c44e52", linewidth=1, label="plain decoding")
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    ax.set_ylabel("default ÷ plain (tokens/s)")
    ax.set_title("generate() defaults against plain decoding, one stream")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = OneLineErrorParser(prog="python -m benchmarks.defaults", description=__doc__)
    parser.add_argument("--prompts", type=positive_int, default=4)
    parser.add_argument("--new-tokens", type=positive_int, default=128)
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--name", default="cpu")
    args = parser.parse_args(argv)
    from dg_stream.train.corpus import stdlib_corpus
    from dg_stream.train.evaluate import held_out_prompts

    torch.set_num_threads(args.threads)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    prompts = held_out_prompts(stdlib_corpus(max_held_out_files=40).held_out, count=args.prompts)
    started = time.perf_counter()
    rows = measure(dtypes, prompts, args.new_tokens, args.repeats)
    text = table(rows)
    print(
        f"{len(prompts)} held-out prompts × {args.new_tokens} tokens, one stream, "
        f"{args.repeats} interleaved repeats (medians), {args.threads} threads\n\n{text}"
    )
    stem = args.out / f"defaults-{args.name}"
    document = {
        "what": "generate() default options ÷ plain decoding, one stream, by mode and dtype",
        "prompts": len(prompts),
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "threads": args.threads,
        "torch": torch.__version__,
        "seconds": round(time.perf_counter() - started, 1),
        "rows": rows,
    }
    write_document(document, stem.with_suffix(".json"))
    figure(rows, stem.with_suffix(".png"))
    print(f"\nfiles: {stem}.json, {stem}.png")


if __name__ == "__main__":
    main()
