"""Drafting for several generations at once: one batched call against one row at a time.

    python -m benchmarks.drafters [--rows 1,4,16] [--block 8] [--rounds 10] [--repeats 3]
                                  [--threads 2] [--out DIR] [--name cpu]

For each drafter kind, R generations draft a block each round, their contexts growing by a
few committed tokens between rounds (as in decoding), either through the drafter's
``propose_batch`` (what a batched round calls where ``traits.batched``) or through each
generation's own session, one after the other (what it called before). Both ways run in the
same process, interleaved, fresh sessions each repeat; the figure is the median milliseconds
of a round's drafting.

- ``diffusion``: the embedded drafter (a lean BERT, one step);
- ``dflash``: a DFlash network of the embedded verifier's width (2 layers, block 9, random
  weights: the cost, not the drafts);
- ``causal``: a 4-layer causal LM (width 256, random weights), drafting token by token.

Greedy drafts; contexts of 200 + 17 i tokens for row i. Prints a Markdown table and writes
``<out>/drafters-<name>.json`` and ``.png``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dg_stream._argtypes import OneLineErrorParser, int_list, positive_int
from dg_stream.bench._report import markdown_table, save_figure, write_document


def drafters(verifier: Any) -> dict[str, Any]:
    """The drafter kinds, built beside the embedded verifier."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from dg_stream import LocalBackend
    from dg_stream._drafters import CausalDrafter, DFlashDrafter
    from dg_stream._drafters.dflash_model import DFlashModel, dflash_config

    diffusion = LocalBackend.default().drafter
    vocab = int(verifier.config.vocab_size)
    torch.manual_seed(0)
    network = DFlashModel(
        dflash_config(
            verifier.config, layers=2, mask_token_id=2, block_size=9, target_layer_ids=[1, 4, 7]
        )
    ).eval()
    causal = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab,
            hidden_size=256,
            intermediate_size=704,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
        )
    ).eval()
    return {
        "diffusion": diffusion,
        "dflash": DFlashDrafter(network, verifier),
        "causal": CausalDrafter(causal),
    }


def time_rounds(drafter: Any, rows: int, block: int, rounds: int, batched: bool) -> float:
    """Median seconds of a round's drafting for ``rows`` fresh generations."""
    from dg_stream import SamplingParams
    from dg_stream._drafters.base import DraftRequest

    generator = torch.Generator().manual_seed(rows)
    width = drafter.traits.feature_size or 0
    vocab = int(drafter.traits.vocab_size or 4096)
    sessions = [drafter.session() for _ in range(rows)]
    contexts = [torch.randint(5, vocab, (200 + 17 * i,), generator=generator) for i in range(rows)]
    handed = [0] * rows
    greedy = SamplingParams()

    def requests() -> list[Any]:
        out = []
        for i, context in enumerate(contexts):
            features = None
            if drafter.traits.feature_layers:
                newest = context.shape[0] - 1
                rows_new = newest - handed[i] if drafter.traits.feature_stream else newest
                features = torch.randn(max(1, rows_new), width, generator=generator)
                handed[i] = newest
            out.append(DraftRequest(context, block, greedy, None, features=features))
        return out

    def draft(batch: list[Any]) -> None:
        if batched and rows > 1:
            drafter.propose_batch(sessions, batch)
        else:
            for session, request in zip(sessions, batch, strict=True):
                session.propose(request)

    seconds = []
    with torch.inference_mode():
        draft(requests())  # the first round reads whole contexts: not a decoding round
        for _ in range(rounds):
            contexts = [
                torch.cat([c, torch.randint(5, vocab, (1 + i % 3,), generator=generator)])
                for i, c in enumerate(contexts)
            ]
            batch = requests()
            started = time.perf_counter()
            draft(batch)
            seconds.append(time.perf_counter() - started)
    for session in sessions:
        session.close()
    return statistics.median(seconds)


def measure(
    kinds: dict[str, Any], rows: list[int], block: int, rounds: int, repeats: int
) -> list[dict[str, Any]]:
    results = []
    for kind, drafter in kinds.items():
        for count in rows:
            times: dict[bool, list[float]] = {False: [], True: []}
            for repeat in range(repeats):
                for batched in (repeat % 2 == 0, repeat % 2 == 1):  # alternate the order
                    times[batched].append(time_rounds(drafter, count, block, rounds, batched))
            alone, together = statistics.median(times[False]), statistics.median(times[True])
            results.append(
                {
                    "drafter": kind,
                    "rows": count,
                    "batched_trait": bool(drafter.traits.batched),
                    "one_at_a_time_ms": round(alone * 1e3, 2),
                    "batched_ms": round(together * 1e3, 2),
                    "speedup": round(alone / together, 2),
                }
            )
    return results


def table(rows: list[dict[str, Any]]) -> str:
    header = ("drafter", "rows", "one at a time ms", "one call ms", "speed-up")
    cells = [
        (r["drafter"], r["rows"], r["one_at_a_time_ms"], r["batched_ms"], f"{r['speedup']:.2f}×")
        for r in rows
    ]
    return "\n".join(markdown_table(header, "lrrrr", cells))


def figure(rows: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for kind in dict.fromkeys(r["drafter"] for r in rows):
        mine = [r for r in rows if r["drafter"] == kind]
        ax.plot([r["rows"] for r in mine], [r["speedup"] for r in mine], marker="o", label=kind)
    ax.axhline(1.0, color="#888", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("generations drafting in the round")
    ax.set_ylabel("one at a time ÷ one call (time)")
    ax.set_title("drafting several generations in one call")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def main(argv: list[str] | None = None, build: Callable[[Any], dict[str, Any]] = drafters) -> None:
    parser = OneLineErrorParser(prog="python -m benchmarks.drafters", description=__doc__)
    parser.add_argument("--rows", type=int_list(1, "1,4,16"), default=[1, 4, 16])
    parser.add_argument("--block", type=positive_int, default=8)
    parser.add_argument("--rounds", type=positive_int, default=10)
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--name", default="cpu")
    args = parser.parse_args(argv)
    from dg_stream import LocalBackend

    torch.set_num_threads(args.threads)
    verifier = LocalBackend.default(drafter=None).verifier.model
    started = time.perf_counter()
    rows = measure(build(verifier), args.rows, args.block, args.rounds, args.repeats)
    print(
        f"block {args.block}, {args.rounds} rounds per run, {args.repeats} interleaved repeats "
        f"(medians), {args.threads} threads\n\n{table(rows)}"
    )
    stem = args.out / f"drafters-{args.name}"
    document = {
        "what": "a round's drafting for R generations: propose_batch against each session alone",
        "block": args.block,
        "rounds": args.rounds,
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
