"""``dg-stream bench`` / ``python -m benchmarks.run``: options, setup, output files.

Modes: without a mode word, the speed-up benchmark (``_run``); ``dg-stream bench concurrency``
(or ``python -m benchmarks.concurrency``), concurrent streams (``_concurrency``); ``dg-stream
bench structured`` (or ``python -m benchmarks.structured``), structured output
(``_structured``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .._argtypes import OneLineErrorParser, int_list, non_negative_float, positive_int
from .._errors import missing_extra
from ._config import (
    DEFAULT_ASSISTANT,
    DEFAULT_PROMPTS,
    FULL,
    QUICK,
    RUNS_DIR,
    BenchConfig,
    default_models,
    fresh_out_dir,
)
from ._report import stderr_log

if TYPE_CHECKING:
    from ._concurrency import Settings
    from ._structured import Settings as StructuredSettings

__all__ = [
    "MODES",
    "build_parser",
    "concurrency_main",
    "concurrency_parser",
    "concurrency_settings",
    "config_from_args",
    "fresh_out_dir",
    "main",
    "structured_main",
    "structured_parser",
    "structured_settings",
]

#: The harness's other modes, each named by the first word of the arguments.
MODES = {
    "concurrency": "concurrent streams: aggregate tokens/s, first chunk and chunk gaps",
    "structured": "JSON schemas: the token mask's cost per token, constrained plain and hybrid "
    "tokens/s",
}


def build_parser(prog: str = "dg-stream bench") -> argparse.ArgumentParser:
    p = OneLineErrorParser(
        prog=prog,
        description="Speed-up of dg_stream's hybrid decoding over plain decoding and over "
        "transformers' generate, assisted generation and prompt lookup, on one verifier, "
        "interleaved, with medians over repeats. Writes <out>/<name>-<device>.json (every raw "
        "figure), PNG plots, and prints a Markdown table.",
        epilog="other modes: "
        + "; ".join(f"'{prog} {mode}': {what}" for mode, what in MODES.items())
        + " (each with its own --help)",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick",
        action="store_true",
        help="8 prompts, 64 tokens, 2 repeats, one denoising step (under 3 minutes on 2 cores)",
    )
    mode.add_argument(
        "--full",
        action="store_true",
        help="32 prompts, 128 tokens, 3 repeats, the whole grid (the default)",
    )
    models = p.add_argument_group("models")
    models.add_argument(
        "--verifier",
        type=Path,
        help="causal-LM checkpoint (default: the embedded default verifier)",
    )
    models.add_argument(
        "--drafter",
        help="diffusion drafter checkpoint (default: the embedded "
        "default drafter; 'none' to skip the hybrid methods)",
    )
    models.add_argument(
        "--dflash",
        type=Path,
        help="also benchmark this DFlash drafter checkpoint (its methods: 'dg_stream dflash')",
    )
    models.add_argument(
        "--assistant",
        type=Path,
        default=DEFAULT_ASSISTANT,
        help="small causal LM for transformers' assisted generation (default: %(default)s)",
    )
    models.add_argument(
        "--train-assistant",
        action="store_true",
        help="distil the assistant from the verifier first when it is missing (minutes on a CPU)",
    )
    work = p.add_argument_group("workload")
    work.add_argument(
        "--prompts",
        type=Path,
        default=DEFAULT_PROMPTS,
        help="prompts.jsonl or a folder of .txt files (default: %(default)s; "
        "built from the stdlib test suites when missing)",
    )
    work.add_argument(
        "--write-prompts",
        type=Path,
        metavar="FILE",
        help="write the standard prompt set to FILE and exit",
    )
    work.add_argument("--num-prompts", type=int)
    work.add_argument("--max-new-tokens", type=int)
    work.add_argument("--repeats", type=int)
    work.add_argument("--block-sizes", type=int_list(1, "4,8,16"), help="hybrid grid, e.g. 4,8,16")
    work.add_argument("--steps", type=int_list(1, "1,2"), help="denoising steps grid, e.g. 1,2")
    work.add_argument("--no-adaptive", action="store_true", help="skip the adaptive block size")
    work.add_argument(
        "--temperature",
        type=float,
        help="sampling phase temperature (default 0.8; 0 skips the phase)",
    )
    work.add_argument("--seed", type=int)
    work.add_argument(
        "--no-transformers",
        action="store_true",
        help="dg_stream methods only (no transformers generate/assisted/lookup)",
    )
    work.add_argument(
        "--max-seconds",
        type=float,
        help="time budget of the timed phases: fewer repeats when exceeded",
    )
    run = p.add_argument_group("machine")
    run.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    run.add_argument(
        "--dtype", help="float32, bfloat16, float16 (default: float32 on CPU, bfloat16 on CUDA)"
    )
    run.add_argument("--threads", type=int, help="torch CPU threads (default 2)")
    out = p.add_argument_group("output")
    out.add_argument(
        "--out",
        type=Path,
        help=f"output folder (default: a fresh one, {RUNS_DIR}/<date>-<time>; pass "
        "--out benchmarks/results to update the results kept in the repository)",
    )
    out.add_argument("--name", help="file name stem (default: quick or full)")
    out.add_argument("--no-profile", action="store_true")
    out.add_argument("--profile-repeats", type=int, help="repeats of the profiled generation")
    out.add_argument("--no-plots", action="store_true")
    return p


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    verifier_default, drafter_default = default_models()
    verifier = args.verifier or verifier_default
    if args.drafter is None:
        drafter: Path | None = drafter_default if args.verifier is None else None
        if drafter is None:
            raise SystemExit("dg-stream bench: with --verifier, give --drafter (or 'none')")
    else:
        drafter = None if args.drafter.lower() == "none" else Path(args.drafter)
    for what, path in (("verifier", verifier), ("drafter", drafter)):
        if path is not None and not Path(path).exists():
            raise SystemExit(f"dg-stream bench: no {what} at {path}")
    preset = dict(QUICK if args.quick else FULL)
    device = str(args.device)
    overrides = {
        "num_prompts": args.num_prompts,
        "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        "block_sizes": args.block_sizes,
        "steps": args.steps,
        "temperature": args.temperature,
        "seed": args.seed,
        "threads": args.threads,
        "dtype": args.dtype,
        "name": args.name,
        "max_seconds": args.max_seconds,
        "profile_repeats": args.profile_repeats,
    }
    preset.update({k: v for k, v in overrides.items() if v is not None})
    if device.startswith("cuda") and args.threads is None:
        preset["threads"] = None  # leave torch's default on GPU machines
    return BenchConfig(
        verifier=Path(verifier),
        drafter=drafter,
        dflash=args.dflash,
        assistant=args.assistant,
        prompts=args.prompts,
        out=args.out if args.out is not None else fresh_out_dir(),
        device=device,
        adaptive=not args.no_adaptive,
        transformers=not args.no_transformers,
        profile=not args.no_profile,
        plots=not args.no_plots,
        **preset,  # type: ignore[arg-type]
    )


_log = stderr_log("bench")


def _ensure_prompts(config: BenchConfig) -> BenchConfig:
    if config.prompts.exists():
        return config
    from ._prompts import make_prompts, write_prompts

    target = config.out / "tmp" / "prompts.jsonl"
    write_prompts(make_prompts(), target)
    _log(
        f"{config.prompts} not found: built the prompt set from this Python's test suites "
        f"into {target}"
    )
    return config.with_(prompts=target)


def _ensure_assistant(config: BenchConfig) -> None:
    from ..train.corpus import stdlib_corpus
    from ..train.drafter import DrafterTrainingConfig, train_drafter

    assert config.assistant is not None
    _log(f"training the assistant into {config.assistant} (distilled from {config.verifier})")
    train_drafter(
        stdlib_corpus(),
        config.verifier,
        config.assistant,
        DrafterTrainingConfig(architecture="causal"),
        device=config.device,
        log=_log,
    )


# -- the concurrency mode ----------------------------------------------------------------------


def concurrency_parser(prog: str = "dg-stream bench concurrency") -> argparse.ArgumentParser:
    """The concurrency mode's options (the presets are ``_concurrency.QUICK`` and ``FULL``)."""
    p = OneLineErrorParser(
        prog=prog,
        description="Aggregate tokens/s, time to first chunk and chunk gaps of C concurrent "
        "streams: batched hybrid, batched plain, one-at-a-time hybrid and transformers' "
        "continuous batching, on one verifier, greedy.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="streams 1,4,16, 32 new tokens, 1 repeat (a few minutes on 2 cores)",
    )
    p.add_argument("--streams", type=int_list(1, "1,4,16,32"), help="levels (default 1,4,16,32)")
    p.add_argument("--new-tokens", type=positive_int, help="max_new_tokens (default 128)")
    p.add_argument("--repeats", type=positive_int, help="repeats (default 3)")
    p.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads (2)")
    p.add_argument("--verifier", type=Path, help="causal-LM checkpoint (default: embedded)")
    p.add_argument("--drafter", type=Path, help="diffusion drafter checkpoint (default: embedded)")
    p.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS, help="default: %(default)s")
    p.add_argument(
        "--prompt-kind",
        default="mixed",
        help="'mixed' (kinds alternating; the default) or one kind of the prompt file, "
        "e.g. 'short'",
    )
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--no-transformers", action="store_true", help="skip transformers' method")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument(
        "--out", type=Path, help="output folder (default: a fresh runs/bench/<date>-<time>)"
    )
    p.add_argument("--name", help="file name part (default: quick or full)")
    return p


def concurrency_settings(args: argparse.Namespace) -> Settings:
    from ._concurrency import FULL as FULL_STREAMS
    from ._concurrency import QUICK as QUICK_STREAMS
    from ._concurrency import Settings

    if args.verifier is not None and args.drafter is None:
        raise SystemExit("concurrency: with --verifier, give --drafter too")
    preset = dict(QUICK_STREAMS if args.quick else FULL_STREAMS)
    for key in ("streams", "new_tokens", "repeats"):
        if getattr(args, key) is not None:
            preset[key] = getattr(args, key)
    return Settings(
        out=args.out if args.out is not None else fresh_out_dir(),
        threads=args.threads,
        verifier=args.verifier,
        drafter=args.drafter,
        prompts=args.prompts,
        prompt_kind=args.prompt_kind,
        device=args.device,
        name=args.name or ("quick" if args.quick else "full"),
        peer=not args.no_transformers,
        plots=not args.no_plots,
        streams=tuple(sorted(set(preset["streams"]))),
        new_tokens=preset["new_tokens"],
        repeats=preset["repeats"],
    )


def concurrency_main(
    argv: Sequence[str] | None = None, prog: str = "dg-stream bench concurrency"
) -> int:
    """Run the concurrency mode with ``argv`` (default: the command line)."""
    args = concurrency_parser(prog).parse_args(list(argv) if argv is not None else None)
    settings = concurrency_settings(args)
    from ._concurrency import run_concurrency
    from ._concurrency_report import markdown, plot
    from ._report import write_document

    log = stderr_log("concurrency")
    result = run_concurrency(settings, log=log)
    device = result["settings"]["device"].split(":")[0]
    stem = settings.out / f"concurrency-{settings.name}-{device}"
    files = [write_document(result, stem.with_suffix(".json"))]
    if settings.plots:
        files.append(plot(result, stem.with_suffix(".png")))
    print(markdown(result))
    print("files: " + ", ".join(str(f) for f in files))
    log(f"done in {result['wall_seconds']:.0f}s")
    return 0


# -- the structured mode -----------------------------------------------------------------------


def _parts(text: str) -> tuple[str, ...]:
    from ._structured import PARTS

    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    if not parts or set(parts) - set(PARTS):
        raise argparse.ArgumentTypeError(f"expected parts among {', '.join(PARTS)}, not {text!r}")
    return parts


def _vocabs(text: str) -> tuple[str | int, ...]:
    from ._structured import MIN_VOCAB

    out: list[str | int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if part == "verifier":
            out.append(part)
            continue
        try:
            size = int(part.lower().removesuffix("k")) * (1000 if part.lower().endswith("k") else 1)
        except ValueError:
            size = 0
        if size < MIN_VOCAB:
            raise argparse.ArgumentTypeError(
                f"expected 'verifier' or token counts of at least {MIN_VOCAB}, like "
                f"verifier,32000,150000; not {part!r}"
            )
        out.append(size)
    if not out:
        raise argparse.ArgumentTypeError("expected at least one vocabulary")
    return tuple(out)


def structured_parser(prog: str = "dg-stream bench structured") -> argparse.ArgumentParser:
    """The structured mode's options (the presets are ``_structured.QUICK`` and ``FULL``)."""
    from ._structured import CACHE_DIR, PARTS, RESULTS_DIR, TASKS

    p = OneLineErrorParser(
        prog=prog,
        description="Structured output (JSON schemas): the token mask's cost per token at "
        "several vocabulary sizes (llguidance, dg_stream's Constraint.masks, xgrammar when "
        "installed), and tokens/s of constrained plain and hybrid decoding against "
        "unconstrained plain decoding, greedy, interleaved, with medians over repeats.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="the verifier's and a 32k vocabulary, 1 mask repeat; 3 prompts × 32 tokens, "
        "1 repeat, no block-8 method; writes to a fresh runs/bench folder",
    )
    p.add_argument(
        "--parts", type=_parts, default=PARTS, help="mask, speed or both (default mask,speed)"
    )
    mask = p.add_argument_group("part 1: the mask per token")
    mask.add_argument(
        "--vocabs",
        type=_vocabs,
        help="'verifier' (its tokenizer) and BPE sizes to train (default verifier,32000,150000)",
    )
    mask.add_argument("--mask-repeats", type=positive_int, help="walks per way (default 5)")
    mask.add_argument(
        "--corpus-mb",
        type=non_negative_float,
        default=48.0,
        help="MB of site-packages Python to train the BPE tokenizers on (default 48)",
    )
    mask.add_argument(
        "--cache",
        type=Path,
        default=CACHE_DIR,
        help="where trained tokenizers are kept between runs (default %(default)s)",
    )
    mask.add_argument("--no-xgrammar", action="store_true", help="skip xgrammar's column")
    speed = p.add_argument_group("part 2: speed")
    speed.add_argument("--new-tokens", type=positive_int, help="max_new_tokens (default 128)")
    speed.add_argument("--repeats", type=positive_int, help="repeats (default 3)")
    speed.add_argument(
        "--tasks", type=positive_int, help=f"the first N schemas and prompts (of {len(TASKS)})"
    )
    speed.add_argument("--no-block8", action="store_true", help="skip hybrid k=8 non-adaptive")
    speed.add_argument("--verifier", type=Path, help="causal-LM checkpoint (default: embedded)")
    speed.add_argument("--drafter", type=Path, help="drafter checkpoint (default: embedded)")
    speed.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads (2)")
    mask.add_argument(
        "--mask-threads",
        type=int_list(1, "1,2"),
        help="torch CPU threads while timing the masks, each in turn (default: 1 and --threads; "
        "with --quick --threads alone)",
    )
    p.add_argument("--no-plots", action="store_true")
    p.add_argument(
        "--out",
        type=Path,
        help=f"output folder (default {RESULTS_DIR}; with --quick a fresh "
        f"{RUNS_DIR}/<date>-<time>)",
    )
    p.add_argument("--name", help="file name part (default structured, or structured-quick)")
    return p


def structured_settings(args: argparse.Namespace) -> StructuredSettings:
    from ._structured import FULL as FULL_STRUCTURED
    from ._structured import QUICK as QUICK_STRUCTURED
    from ._structured import RESULTS_DIR, TASKS
    from ._structured import Settings as StructuredSettings

    if args.verifier is not None and args.drafter is None:
        raise SystemExit("structured: with --verifier, give --drafter too")
    preset = dict(QUICK_STRUCTURED if args.quick else FULL_STRUCTURED)
    for key in ("vocabs", "mask_repeats", "new_tokens", "repeats", "tasks"):
        if getattr(args, key) is not None:
            preset[key] = getattr(args, key)
    if args.no_block8:
        preset["block8"] = False
    mask_threads = args.mask_threads
    if mask_threads is None:
        mask_threads = (args.threads,) if args.quick else tuple(sorted({1, args.threads}))
    out = args.out
    if out is None:
        out = fresh_out_dir() if args.quick else RESULTS_DIR
    return StructuredSettings(
        out=out,
        parts=args.parts,
        vocabs=tuple(preset["vocabs"]),
        corpus_mb=args.corpus_mb,
        cache=args.cache,
        mask_repeats=preset["mask_repeats"],
        xgrammar=not args.no_xgrammar,
        new_tokens=preset["new_tokens"],
        repeats=preset["repeats"],
        tasks=min(preset["tasks"], len(TASKS)),
        block8=preset["block8"],
        threads=args.threads,
        mask_threads=mask_threads,
        verifier=args.verifier,
        drafter=args.drafter,
        device=args.device,
        name=args.name or ("structured-quick" if args.quick else "structured"),
        plots=not args.no_plots,
    )


def structured_main(
    argv: Sequence[str] | None = None, prog: str = "dg-stream bench structured"
) -> int:
    """Run the structured mode with ``argv`` (default: the command line)."""
    args = structured_parser(prog).parse_args(list(argv) if argv is not None else None)
    settings = structured_settings(args)
    from ._report import write_document
    from ._structured import run_structured
    from ._structured_report import markdown, plot

    log = stderr_log("structured")
    result = run_structured(settings, log=log)
    stem = settings.out / f"{settings.name}-{settings.device.split(':')[0]}"
    files = [write_document(result, stem.with_suffix(".json"))]
    if settings.plots:
        files.append(plot(result, stem.with_suffix(".png")))
    print(markdown(result))
    print("files: " + ", ".join(str(f) for f in files))
    log(f"done in {result['wall_seconds']:.0f}s")
    return 0


# -- the harness ------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None, prog: str = "dg-stream bench") -> int:
    """Run the harness with ``argv``: a mode word of :data:`MODES` first picks that mode."""
    args_list = list(argv) if argv is not None else sys.argv[1:]
    if args_list[:1] == ["concurrency"]:
        return concurrency_main(args_list[1:], prog=f"{prog} concurrency")
    if args_list[:1] == ["structured"]:
        return structured_main(args_list[1:], prog=f"{prog} structured")
    args = build_parser(prog).parse_args(args_list)
    if args.write_prompts is not None:
        from ._prompts import make_prompts, write_prompts

        path = write_prompts(make_prompts(), args.write_prompts)
        print(f"wrote {path}")
        return 0
    config = config_from_args(args)
    if config.plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError as exc:  # said now, not after the whole run
            raise missing_extra("dg-stream bench's plots (or --no-plots)", ("bench",), exc) from exc
    config = _ensure_prompts(config)
    if args.train_assistant and config.assistant is not None and not config.assistant.exists():
        _ensure_assistant(config)

    from ._report import markdown, plot, write_json
    from ._run import run_benchmark

    result = run_benchmark(config, log=_log)
    device = config.device.split(":")[0]
    stem = config.out / f"{config.name}-{device}"
    json_path = write_json(result, stem.with_suffix(".json"))
    files = [json_path]
    if config.plots:
        files += plot(result, stem)
    print(markdown(result))
    print()
    print("files: " + ", ".join(str(f) for f in files))
    _log(f"done in {result['wall_seconds']:.0f}s")
    return 0
