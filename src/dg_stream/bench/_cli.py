"""``dg-stream bench`` / ``python -m benchmarks.run``: options, setup, output files."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .._argtypes import OneLineErrorParser, int_list
from .._errors import missing_extra
from ._config import FULL, QUICK, BenchConfig

__all__ = ["build_parser", "config_from_args", "fresh_out_dir", "main"]

DEFAULT_PROMPTS = Path("benchmarks/prompts/prompts.jsonl")
DEFAULT_ASSISTANT = Path("benchmarks/assistant")
#: Runs write to a fresh folder under here unless ``--out`` names one; the results kept in the
#: repository (``benchmarks/results``) change only when a run is pointed there on purpose.
RUNS_DIR = Path("runs/bench")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(
        prog="dg-stream bench",
        description="Speed-up of dg_stream's hybrid decoding over plain decoding and over "
        "transformers' generate, assisted generation and prompt lookup, on one verifier, "
        "interleaved, with medians over repeats. Writes <out>/<name>-<device>.json (every raw "
        "figure), PNG plots, and prints a Markdown table.",
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


def _default_models() -> tuple[Path, Path]:
    from .._backends.local import default_model_dir

    root = default_model_dir()
    return root / "verifier", root / "drafter"


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    verifier_default, drafter_default = _default_models()
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


def fresh_out_dir(root: Path = RUNS_DIR) -> Path:
    """A folder under ``root`` named for the time now, that does not exist yet."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate, n = root / stamp, 1
    while candidate.exists():
        n += 1
        candidate = root / f"{stamp}-{n}"
    return candidate


def _log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(argv) if argv is not None else None)
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
