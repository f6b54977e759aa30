"""The engine's paths, one stream: the synchronous loop against the stream users read.

    python -m benchmarks.paths [--prompts 5] [--new-tokens 128] [--repeats 3] [--threads 2]
                               [--out DIR] [--name NAME]

On held-out prompts (``benchmarks/prompts``, greedy, the embedded pair), five ways to generate
the same text, interleaved (every repeat runs each path once over all prompts, the order
rotating) in one process, medians over repeats:

- ``sync plain`` / ``sync hybrid k=8``: ``session.step()`` in a loop, the engine alone, run on
  the backend's model thread (``ModelThread.call``) where the stream's rounds run too;
- ``stream plain`` / ``stream hybrid k=8``: ``dg_stream.generate()`` read to the end;
- ``stream default``: ``generate()`` with the backend's default options: what users run.

Each hybrid path's ratio is to the plain path of the same kind. Every path's tokens are
checked against ``sync plain`` (greedy decoding is lossless). Writes
``<out>/paths-<name>.json`` and ``.png`` and prints a Markdown table. Tokens per second is
generated tokens over wall time, prompt reading included.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dg_stream._argtypes import OneLineErrorParser, positive_int

DEFAULT_PROMPTS = Path(__file__).resolve().parent / "prompts" / "prompts.jsonl"
#: Each hybrid path's ratio is to the plain path of its kind.
PLAIN = {
    "sync hybrid k=8": "sync plain",
    "stream hybrid k=8": "stream plain",
    "stream default": "stream plain",
}


def _sync(backend: Any, prompt: list[int], new: int, options: dict[str, Any]) -> Any:
    from dg_stream._generate import request_for

    request = request_for(prompt, max_new_tokens=new, **options)  # what generate() would make

    def loop() -> tuple[list[int], int, int]:
        session = backend.engine.session(request)
        ids: list[int] = []
        while (chunk := session.step()) is not None:
            ids.extend(chunk.token_ids)
            if chunk.finish_reason is not None:
                break
        return ids, session.stats.verifier_calls, session.stats.accepted_tokens

    thread = getattr(backend, "model_thread", None)  # absent before the model thread existed
    return thread.call(loop) if thread is not None else loop()


def _stream(backend: Any, prompt: list[int], new: int, options: dict[str, Any]) -> Any:
    import anyio

    import dg_stream

    async def read() -> tuple[list[int], int, int]:
        async with dg_stream.generate(prompt, backend=backend, max_new_tokens=new, **options) as s:
            ids = [t async for chunk in s for t in chunk.token_ids]
        assert s.stats is not None
        return ids, s.stats.verifier_calls, s.stats.accepted_tokens

    return anyio.run(read)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from dg_stream import LocalBackend

    torch.set_num_threads(args.threads)
    rows = [json.loads(line) for line in args.prompts_file.read_text().splitlines() if line]
    hybrid, plain = LocalBackend.default(), LocalBackend.default(drafter=None)
    prompts = [list(hybrid.tokenizer.encode(r["text"])) for r in rows[: args.prompts]]
    k8 = {"block_size": 8, "adaptive": False}
    paths: dict[str, tuple[Callable[..., Any], Any, dict[str, Any]]] = {
        "sync plain": (_sync, plain, {}),
        "sync hybrid k=8": (_sync, hybrid, k8),
        "stream plain": (_stream, plain, {}),
        "stream hybrid k=8": (_stream, hybrid, k8),
        "stream default": (_stream, hybrid, {}),
    }
    names = list(paths)
    for name in names:  # warm-up: allocations, kernel choice, the adaptive policy's costs
        fn, backend, options = paths[name]
        fn(backend, prompts[0], 16, options)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    outputs: dict[str, list[list[int]]] = {name: [] for name in names}
    for repeat in range(args.repeats):
        for j in range(len(names)):
            name = names[(repeat + j) % len(names)]
            fn, backend, options = paths[name]
            tokens = calls = accepted = 0
            started = time.perf_counter()
            for prompt in prompts:
                ids, c, a = fn(backend, prompt, args.new_tokens, options)
                tokens, calls, accepted = tokens + len(ids), calls + c, accepted + a
                outputs[name].append(ids)
            seconds = time.perf_counter() - started
            runs[name].append(
                {"tokens_per_second": tokens / seconds, "accepted_per_call": accepted / calls}
            )
    reference = outputs["sync plain"][: len(prompts)]
    identical = {
        name: sum(ids == reference[i % len(prompts)] for i, ids in enumerate(outputs[name]))
        for name in names
    }
    table = []
    for name in names:
        rate = statistics.median(r["tokens_per_second"] for r in runs[name])
        base = PLAIN.get(name)
        ratio = None
        if base is not None:  # the median of per-repeat ratios
            ratio = statistics.median(
                r["tokens_per_second"] / b["tokens_per_second"]
                for r, b in zip(runs[name], runs[base], strict=True)
            )
        table.append(
            {
                "path": name,
                "tokens_per_second": rate,
                "ratio_to_its_plain": ratio,
                "accepted_per_call": statistics.median(r["accepted_per_call"] for r in runs[name]),
                "identical": f"{identical[name]}/{args.repeats * len(prompts)}",
                "runs": runs[name],
            }
        )
    sync_k8 = statistics.median(r["tokens_per_second"] for r in runs["sync hybrid k=8"])
    stream_k8 = statistics.median(r["tokens_per_second"] for r in runs["stream hybrid k=8"])
    return {
        "name": args.name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": {
            "prompts": [r["id"] for r in rows[: args.prompts]],
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
            "threads": args.threads,
            "torch": torch.__version__,
        },
        "paths": table,
        "stream_over_sync_k8": stream_k8 / sync_k8,
    }


def markdown(result: dict[str, Any]) -> str:
    settings = result["settings"]
    lines = [
        f"{len(settings['prompts'])} held-out prompts × {settings['new_tokens']} tokens, greedy, "
        f"{settings['threads']} threads, medians of {settings['repeats']} interleaved repeats",
        "",
        "| path | tokens/s | ÷ its plain | accepted/call | identical |",
        "|---|---:|---:|---:|---|",
    ]
    for row in result["paths"]:
        ratio = row["ratio_to_its_plain"]
        lines.append(
            f"| {row['path']} | {row['tokens_per_second']:.1f} | "
            f"{'1' if ratio is None else f'{ratio:.2f}×'} | {row['accepted_per_call']:.2f} | "
            f"{row['identical']} |"
        )
    lines += ["", f"stream ÷ sync, hybrid k=8: {result['stream_over_sync_k8']:.2f}"]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["paths"]
    fig, axis = plt.subplots(figsize=(7, 3.5))
    names = [r["path"] for r in rows]
    axis.barh(names, [r["tokens_per_second"] for r in rows], color="#4c72b0")
    for i, row in enumerate(rows):
        ratio = row["ratio_to_its_plain"]
        label = f"{row['tokens_per_second']:.0f}" + (f" ({ratio:.2f}×)" if ratio else "")
        axis.annotate(label, (row["tokens_per_second"], i), xytext=(3, 0),
                      textcoords="offset points", va="center", fontsize=8)  # fmt: skip
    axis.invert_yaxis()
    axis.set_xlabel("tokens/s (median)")
    axis.set_title(f"dg_stream paths, {result['name']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineErrorParser(prog="python -m benchmarks.paths", description=__doc__)
    parser.add_argument("--prompts", type=positive_int, default=5, help="held-out prompts (5)")
    parser.add_argument("--prompts-file", type=Path, default=DEFAULT_PROMPTS)
    parser.add_argument("--new-tokens", type=positive_int, default=128, help="default 128")
    parser.add_argument("--repeats", type=positive_int, default=3, help="default 3")
    parser.add_argument("--threads", type=positive_int, default=2, help="torch threads (2)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--name", default="cpu", help="file name part (default: cpu)")
    args = parser.parse_args(argv)
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"paths-{args.name}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, stem.with_suffix(".png"))
    print(markdown(result))
    print(f"\nwrote {stem}.json and {stem}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
