"""``dg-stream train tokenizer|verifier|drafter``: argparse wiring for the training modules."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from .._argtypes import int_list
from .._model_kinds import TRAINABLE
from ._distil_cli import add_distil_command

__all__ = ["add_parser"]

RUNS = Path("runs")

#: The embedded verifier, where ``LocalBackend.default()`` loads it from (found here without
#: importing the backend, so that ``--help`` needs no torch).
DEFAULT_VERIFIER = Path(__file__).resolve().parent.parent / "default_model" / "verifier"


def _require_extra() -> None:
    """Training needs torch and transformers: without them, say which extra to install."""
    from .._loading import require_local_extra

    require_local_extra("training", ("train",))


def _local(path: str, what: str) -> str:
    """``path`` when it exists, else the one-line ModelLoadError that loading a model gives:
    transformers would take a missing path for a hub id and try to download it."""
    from .._loading import _check_path

    return str(_check_path(path, what))


def _corpus(args: argparse.Namespace) -> Any:
    from .corpus import file_corpus, stdlib_corpus

    if args.corpus and args.stdlib:
        raise SystemExit("error: --corpus and --stdlib are alternatives; give one")
    return file_corpus(args.corpus) if args.corpus else stdlib_corpus(args.stdlib)


def _threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def _tokenizer(args: argparse.Namespace) -> int:
    _require_extra()
    from .tokenizer import train_tokenizer

    started = time.perf_counter()
    corpus = _corpus(args)
    out = train_tokenizer(corpus.train, args.out, vocab_size=args.vocab_size)
    print(
        f"tokenizer ({args.vocab_size} ids) saved to {out} in {time.perf_counter() - started:.1f}s"
    )
    return 0


def _verifier(args: argparse.Namespace) -> int:
    _require_extra()
    tokenizer = _local(args.tokenizer, "tokenizer")
    from .verifier import VerifierTrainingConfig, train_verifier

    _threads(args.threads)
    config = VerifierTrainingConfig(
        hidden_size=args.hidden_size,
        layers=args.layers,
        heads=args.heads,
        kv_heads=args.kv_heads,
        intermediate_size=args.intermediate_size,
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        seed=args.seed,
        time_budget=args.time_budget,
    )
    metrics = train_verifier(_corpus(args), tokenizer, args.out, config, args.device)
    print(json.dumps(metrics, indent=2))
    return 0


def _drafter(args: argparse.Namespace) -> int:
    _require_extra()
    verifier = _local(args.verifier, "verifier")
    init_from = _local(args.init_from, "drafter") if args.init_from else None
    from .corpus import Corpus
    from .drafter import DrafterTrainingConfig, train_drafter
    from .evaluate import evaluate_pair, held_out_prompts

    _threads(args.threads)
    config = DrafterTrainingConfig(
        architecture=args.architecture,
        hidden_size=args.hidden_size,
        layers=args.layers,
        heads=args.heads,
        intermediate_size=args.intermediate_size or 3 * args.hidden_size,
        window=args.window,
        steps=args.steps,
        sequences=args.sequences,
        batch_size=args.batch_size,
        generation_batch=args.generation_batch,
        lr=args.lr,
        seed=args.seed,
        time_budget=args.time_budget,
        keep_data=args.keep_data,
        continuation_tokens=args.continuation_tokens,
        feature_layers=tuple(args.feature_layers),
        cpu_bf16=args.cpu_bf16,
        feature_window=args.feature_window,
        init_from=init_from,
        context_tokens=args.context_tokens,
        blocks_per_row=args.blocks_per_row,
        max_block=(args.block_size or (16 if args.architecture == "dflash" else 17)) - 1,
    )
    corpus: Corpus = _corpus(args)
    metrics = train_drafter(corpus, verifier, args.out, config, args.device)
    if args.eval_prompts:
        prompts = held_out_prompts(corpus.held_out, count=args.eval_prompts)
        metrics["acceptance"] = evaluate_pair(verifier, args.out, prompts)
        (Path(args.out) / "training_metrics.json").write_text(json.dumps(metrics, indent=2))
    print(json.dumps(metrics, indent=2))
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``train`` and its three commands on an argparse subparsers object."""
    train = subparsers.add_parser(
        "train",
        help="train a tokenizer, a verifier or a drafter",
        description="Train the default pair, or a drafter for any local "
        "causal LM. CPU by default; CUDA (bf16) when available.",
    )
    commands = train.add_subparsers(dest="train_command", required=True)

    def common(p: argparse.ArgumentParser, steps: int, lr: float) -> None:
        p.add_argument(
            "--corpus",
            nargs="+",
            metavar="FILE",
            help="text files or folders (default: this Python's standard library)",
        )
        p.add_argument(
            "--steps", type=int, default=steps, help="optimizer steps (default %(default)s)"
        )
        p.add_argument(
            "--lr", type=float, default=lr, help="peak learning rate (default %(default)s)"
        )
        p.add_argument(
            "--stdlib",
            metavar="DIR",
            help="build the standard-library corpus from this Lib folder instead of this "
            "Python's (e.g. the interpreter the shipped pair was trained with)",
        )
        p.add_argument(
            "--time-budget",
            type=float,
            metavar="SECONDS",
            help="fit the whole schedule into this many seconds of optimisation (fewer steps)",
        )
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
        p.add_argument("--threads", type=int, default=None, help="torch CPU threads")

    tok = commands.add_parser(
        "tokenizer", help="byte-level BPE with eos, pad, mask and a chat template"
    )
    tok.add_argument("--corpus", nargs="+", metavar="FILE")
    tok.add_argument("--stdlib", metavar="DIR", help="build the corpus from this Lib folder")
    tok.add_argument("--vocab-size", type=int, default=4096)
    tok.add_argument("--out", default=str(RUNS / "tokenizer"))
    tok.set_defaults(func=_tokenizer)

    ver = commands.add_parser("verifier", help="a small Llama-architecture causal LM")
    common(ver, steps=1600, lr=3e-3)
    ver.add_argument(
        "--tokenizer",
        default=str(RUNS / "tokenizer"),
        metavar="PATH",
        help="a tokenizer folder, as 'train tokenizer' writes (default %(default)s)",
    )
    ver.add_argument("--out", default=str(RUNS / "verifier"))
    ver.add_argument("--hidden-size", type=int, default=256)
    ver.add_argument("--layers", type=int, default=6)
    ver.add_argument("--heads", type=int, default=8)
    ver.add_argument("--kv-heads", type=int, default=4)
    ver.add_argument("--intermediate-size", type=int, default=704)
    ver.add_argument("--batch-size", type=int, default=16)
    ver.add_argument("--seq-len", type=int, default=256)
    ver.set_defaults(func=_verifier)

    dra = commands.add_parser(
        "drafter", help="distil a diffusion (or small causal) drafter from any local causal LM"
    )
    common(dra, steps=2000, lr=2e-3)
    dra.add_argument(
        "--verifier",
        default=str(DEFAULT_VERIFIER),
        metavar="PATH",
        help="local causal-LM checkpoint (with its tokenizer) to distil from (default: the "
        "embedded verifier)",
    )
    dra.add_argument("--out", default=str(RUNS / "drafter"))
    dra.add_argument(
        "--architecture",
        choices=list(TRAINABLE),
        default="diffusion",
        help="diffusion: a BERT masked-LM drafter (default); causal: a small Llama of the same "
        "size distilled from the same continuations, e.g. an assistant for benchmarks; "
        "dflash: DFlash-format layers of the verifier's width that read its hidden states "
        "(--feature-layers, default spread over its depth) through its own embeddings and head",
    )
    dra.add_argument(
        "--block-size",
        type=int,
        default=None,
        help="dflash: the block written to the checkpoint, the newest token included "
        "(default 16, i.e. 15 drafted); diffusion: one more than the largest block trained",
    )
    dra.add_argument(
        "--blocks-per-row",
        type=int,
        default=8,
        help="dflash: blocks (random anchors) read from each sequence in one pass",
    )
    dra.add_argument(
        "--context-tokens",
        type=int,
        default=48,
        help="corpus tokens before each verifier continuation",
    )
    dra.add_argument("--hidden-size", type=int, default=128)
    dra.add_argument("--layers", type=int, default=2)
    dra.add_argument("--heads", type=int, default=4)
    dra.add_argument(
        "--intermediate-size",
        type=int,
        default=None,
        help="feed-forward width (default: 3 x hidden size)",
    )
    dra.add_argument("--window", type=int, default=32, help="context tokens the drafter reads")
    dra.add_argument(
        "--continuation-tokens",
        type=int,
        default=80,
        help="tokens the verifier writes after each corpus context",
    )
    dra.add_argument(
        "--feature-window",
        type=int,
        default=0,
        metavar="N",
        help="read features for the N positions before the newest token only "
        "(default: all in the window)",
    )
    dra.add_argument(
        "--init-from",
        metavar="PATH",
        help="start from this diffusion drafter (e.g. teach a token-only drafter to read "
        "verifier features); its window and block size are kept",
    )
    dra.add_argument(
        "--cpu-bf16",
        action="store_true",
        help="bf16 autocast on CPU as well (about 2x faster on CPUs with bf16 matrix units)",
    )
    dra.add_argument(
        "--feature-layers",
        type=int_list(0, "2,5,8"),
        default=(),
        metavar="I,J,...",
        help="also read the verifier's hidden states at these layers (0: embeddings; e.g. "
        "2,5,8): a drafter for this verifier only, and a much better one",
    )
    dra.add_argument(
        "--sequences", type=int, default=12288, help="verifier continuations to distil from"
    )
    dra.add_argument("--batch-size", type=int, default=256)
    dra.add_argument(
        "--generation-batch",
        type=int,
        default=128,
        help="continuations generated together (larger on a GPU)",
    )
    dra.add_argument(
        "--keep-data",
        action="store_true",
        help="keep the verifier's continuations (distillation.pt) after training, so a "
        "second drafter (e.g. --architecture causal) can reuse them",
    )
    dra.add_argument(
        "--eval-prompts",
        type=int,
        default=16,
        help="held-out prompts for the final acceptance evaluation (0: skip)",
    )
    dra.set_defaults(func=_drafter)
    add_distil_command(commands)
    return train
