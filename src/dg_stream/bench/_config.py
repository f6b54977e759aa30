"""What one benchmark run measures: models, prompts, methods, repeats, device; and where the
harness's modes find their inputs and put their outputs by default."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

__all__ = [
    "DEFAULT_ASSISTANT",
    "DEFAULT_PROMPTS",
    "FULL",
    "QUICK",
    "RUNS_DIR",
    "BenchConfig",
    "default_models",
    "fresh_out_dir",
]

DEFAULT_PROMPTS = Path("benchmarks/prompts/prompts.jsonl")
DEFAULT_ASSISTANT = Path("benchmarks/assistant")
#: Runs write to a fresh folder under here unless ``--out`` names one; the results kept in the
#: repository (``benchmarks/results``) change only when a run is pointed there on purpose.
RUNS_DIR = Path("runs/bench")


def default_models() -> tuple[Path, Path]:
    """The embedded default verifier and drafter."""
    from .._backends.local import default_model_dir

    root = default_model_dir()
    return root / "verifier", root / "drafter"


def fresh_out_dir(root: Path = RUNS_DIR) -> Path:
    """A folder under ``root`` named for the time now, that does not exist yet."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate, n = root / stamp, 1
    while candidate.exists():
        n += 1
        candidate = root / f"{stamp}-{n}"
    return candidate


@dataclass(frozen=True)
class BenchConfig:
    verifier: Path
    drafter: Path | None
    assistant: Path | None
    prompts: Path
    out: Path
    dflash: Path | None = None  # a DFlash drafter checkpoint, benchmarked beside the drafter
    name: str = "bench"
    num_prompts: int = 32
    max_new_tokens: int = 128
    repeats: int = 3
    block_sizes: tuple[int, ...] = (2, 4, 6, 8, 12, 16)
    steps: tuple[int, ...] = (1, 2)
    adaptive: bool = True
    ngram_block_size: int = 8
    temperature: float = 0.8  # the sampling phase; 0 skips it
    seed: int = 1234
    device: str = "cpu"
    dtype: str | None = None  # float32 on CPU, bfloat16 on CUDA
    threads: int | None = 2
    transformers: bool = True  # transformers' generate, assisted generation, prompt lookup
    assisted_settings: tuple[str, ...] = ("default", "heuristic-8")
    profile: bool = True
    profile_repeats: int = 5
    plots: bool = True
    max_seconds: float | None = None  # time budget for the timed phases (whole repeats)
    warmup: bool = True
    extra: dict[str, str] = field(default_factory=dict)

    def with_(self, **changes: object) -> BenchConfig:
        return replace(self, **changes)  # type: ignore[arg-type]


# Presets: overrides applied on top of the defaults above.
QUICK: dict[str, object] = dict(
    name="quick",
    num_prompts=8,
    max_new_tokens=64,
    repeats=2,
    block_sizes=(4, 8, 16),
    steps=(1,),  # the full grid adds the second denoising step
    assisted_settings=("default",),
    profile_repeats=3,
    max_seconds=150.0,
)
FULL: dict[str, object] = dict(name="full")
