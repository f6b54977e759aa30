"""``dg-stream train distil``: argparse wiring for the resumable distillation run.

Kept apart from ``distil`` so that ``dg-stream --help`` imports neither torch nor
transformers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

__all__ = ["add_distil_command"]

_DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "default_model"


def _distil(args: argparse.Namespace) -> int:
    import torch

    from .corpus import file_corpus, stdlib_corpus
    from .distil import DistilRunConfig, run_distillation
    from .distill_data import ShardLayout

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.corpus and args.stdlib:
        raise SystemExit("error: --corpus and --stdlib are alternatives; give one")
    corpus = file_corpus(args.corpus) if args.corpus else stdlib_corpus(args.stdlib)
    config = DistilRunConfig(
        layout=ShardLayout(
            rows=args.shard_rows,
            context_tokens=args.context_tokens,
            continuation_tokens=args.continuation_tokens,
            seed=args.seed,
            top_k=args.soft_top_k,
        ),
        shards=args.shards,
        generation_dtype=args.generation_dtype,
        batch_size=args.batch_size,
        steps=args.steps,
        lr=args.lr,
        seed=args.seed,
        cpu_bf16=not args.fp32,
        checkpoint_minutes=args.checkpoint_minutes,
        eval_prompts=args.eval_prompts,
        eval_block=args.eval_block,
        time_budget=args.time_budget,
        stop_at=args.stop_at,
        soft_weight=args.soft_weight,
    )
    summary = run_distillation(
        corpus, args.verifier, args.init_from, args.out, config, device=args.device
    )
    print(json.dumps(summary, indent=2))
    return 0


def add_distil_command(commands: Any) -> argparse.ArgumentParser:
    """Register ``distil`` on the ``train`` subparsers."""
    p = commands.add_parser(
        "distil",
        help="a long, resumable distillation of the diffusion drafter (data, training, curve)",
        description="Generate the verifier's greedy continuations in shards, then train a "
        "diffusion drafter warm-started from --init-from, checkpointing every few minutes and "
        "logging accepted drafts per verifier call to OUT/curve.json. Run the same command "
        "again to continue a stopped run exactly where it stopped.",
    )
    p.add_argument("--out", required=True, help="run folder (created; reused to resume)")
    p.add_argument("--verifier", default=str(_DEFAULT_MODEL / "verifier"), metavar="PATH")
    p.add_argument(
        "--init-from",
        default=str(_DEFAULT_MODEL / "drafter"),
        metavar="PATH",
        help="diffusion drafter to start from (default: the shipped one)",
    )
    p.add_argument("--corpus", nargs="+", metavar="FILE", help="default: the stdlib corpus")
    p.add_argument("--stdlib", metavar="DIR", help="build the corpus from this Lib folder")
    p.add_argument("--shards", type=int, default=24, help="data shards (default %(default)s)")
    p.add_argument("--shard-rows", type=int, default=256, help="continuations per shard")
    p.add_argument("--context-tokens", type=int, default=128)
    p.add_argument("--continuation-tokens", type=int, default=192)
    p.add_argument(
        "--generation-dtype",
        choices=["float32", "bfloat16"],
        default="bfloat16",
        help="verifier precision while writing the data (default %(default)s)",
    )
    p.add_argument(
        "--soft-top-k",
        type=int,
        default=0,
        metavar="K",
        help="keep the verifier's K most likely ids per generated token and train against "
        "that distribution too (default 0: its greedy token only)",
    )
    p.add_argument(
        "--soft-weight",
        type=float,
        default=0.5,
        help="share of the loss on the verifier's distribution (default %(default)s)",
    )
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=20000, help="schedule length over all sessions")
    p.add_argument("--lr", type=float, default=6e-4, help="peak learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast while training")
    p.add_argument("--checkpoint-minutes", type=float, default=5.0)
    p.add_argument("--eval-prompts", type=int, default=16, help="held-out prompts (0: none)")
    p.add_argument("--eval-block", type=int, default=8)
    p.add_argument(
        "--time-budget",
        type=float,
        metavar="SECONDS",
        help="end this session (resumably) after this many seconds",
    )
    p.add_argument("--stop-at", type=int, metavar="STEP", help="end this session at this step")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.set_defaults(func=_distil)
    return p
