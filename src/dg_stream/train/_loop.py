"""Pieces shared by the training commands: token streams, checkpoints, progress, devices."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "Checkpointer",
    "TokenStream",
    "cosine_lr",
    "optimize",
    "pick_device",
    "progress",
]


def pick_device(device: str | None) -> torch.device:
    """CUDA when available and not overridden, else CPU."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast_dtype(device: torch.device, cpu_bf16: bool = False) -> torch.dtype | None:
    """bf16 autocast on GPUs that support it; on CPU only when asked (CPUs with bf16 matrix
    units train about twice as fast with it, others slower)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device.type == "cpu" and cpu_bf16:
        return torch.bfloat16
    return None


class TokenStream:
    """Documents tokenized and joined with EOS into one id tensor; samples random windows."""

    def __init__(self, docs: Sequence[str], tokenizer: Any, eos_id: int) -> None:
        ids: list[int] = []
        # Batched encoding is several times faster than one call per document.
        for start in range(0, len(docs), 256):
            for row in tokenizer(list(docs[start : start + 256]), add_special_tokens=False)[
                "input_ids"
            ]:
                ids.extend(row)
                ids.append(eos_id)
        self.ids = torch.tensor(ids, dtype=torch.long)

    def __len__(self) -> int:
        return int(self.ids.numel())

    def windows(self, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
        """``(batch, length)`` windows at random offsets."""
        high = len(self) - length
        if high <= 0:
            raise ValueError(f"corpus of {len(self)} tokens is shorter than a window of {length}")
        starts = torch.randint(0, high, (batch,), generator=generator)
        offsets = torch.arange(length)
        return self.ids[starts[:, None] + offsets[None, :]]

    def sequential_windows(self, length: int, limit: int | None = None) -> Iterator[torch.Tensor]:
        """Non-overlapping ``(length,)`` windows from the start, for evaluation."""
        count = len(self) // length
        if limit is not None:
            count = min(count, limit)
        for i in range(count):
            yield self.ids[i * length : (i + 1) * length]


def cosine_lr(step: int, progress: float, peak: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to a tenth of the peak as
    ``progress`` (the fraction of training done, 0..1) goes to 1."""
    decayed = peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))
    # The smaller of the two: a budget that ends during warm-up still ends annealed.
    return min(peak * (step + 1) / warmup, decayed) if step < warmup else decayed


class Checkpointer:
    """Periodic training checkpoints in ``out_dir/checkpoint.pt``; resumes from the last one.

    A checkpoint holds everything a continued run needs to take the same steps an
    uninterrupted one would: weights, optimizer moments, the data generator, and torch's and
    Python's global random states (dropout draws from torch's). Only tensors and plain Python
    values, so it loads with ``weights_only=True`` (no code runs on load).
    """

    def __init__(self, out_dir: Path) -> None:
        self.path = Path(out_dir) / "checkpoint.pt"
        self.extra: dict[str, Any] = {}  # what the last loaded checkpoint carried beside weights

    def save(
        self,
        step: int,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        generator: torch.Generator,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "step": step,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "generator": generator.get_state(),
            "torch_random": torch.get_rng_state(),
            "python_random": random.getstate(),
            "extra": extra or {},
        }
        tmp = self.path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.path)  # atomic: an interruption never leaves a torn checkpoint

    def load(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator
    ) -> int:
        """Restore the last checkpoint, returning its step (0 when there is none)."""
        if not self.path.exists():
            return 0
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        if "torch_random" in state:  # checkpoints written before it was kept lack it
            torch.set_rng_state(state["torch_random"])
        random.setstate(_as_random_state(state["python_random"]))
        self.extra = dict(state.get("extra") or {})
        return int(state["step"])

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def _as_random_state(state: Any) -> tuple[Any, ...]:
    """``random.setstate`` wants tuples; a checkpoint may hand back lists."""
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def progress(total: int, initial: int, desc: str) -> Any:
    """A tqdm bar (tqdm comes with the train extra)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, mininterval=2.0)


class Throughput:
    """Tokens per second over the run so far."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.tokens = 0

    def add(self, n: int) -> float:
        self.tokens += n
        return self.tokens / max(1e-9, time.perf_counter() - self.start)


def optimize(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    start_step: int,
    steps: int,
    peak_lr: float,
    warmup: int,
    batch_loss: Callable[[], tuple[torch.Tensor, int]],
    checkpoints: Checkpointer,
    generator: torch.Generator,
    checkpoint_every: int,
    desc: str,
    time_budget: float | None = None,
    stop_after: float | None = None,
    stop_at: int | None = None,
    checkpoint_seconds: float | None = None,
    extra_state: Callable[[], dict[str, Any]] | None = None,
    on_checkpoint: Callable[[int], None] | None = None,
) -> int:
    """The optimisation loop both models share: cosine schedule, clipping, progress, checkpoints.

    ``batch_loss()`` draws a batch and returns (loss, tokens in the batch). With
    ``time_budget`` (seconds), training ends after ``steps`` or the budget, whichever comes
    first, and the learning-rate schedule follows whichever is further along, so it has fully
    decayed either way (a run is never cut off at a high learning rate). Returns the number
    of steps done.

    For runs that span sessions the schedule must depend on the step alone, or a resumed run
    would not take the steps an uninterrupted one takes: ``stop_after`` (seconds of this
    call) or ``stop_at`` (a step) ends the call without touching the schedule, and the next
    call resumes from the checkpoint written on the way out. ``checkpoint_seconds`` also
    checkpoints on the clock, ``extra_state()`` adds to what a checkpoint carries (e.g.
    examples seen), and ``on_checkpoint(step)`` runs after each checkpoint but the last (e.g.
    an evaluation).
    """
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    if time_budget is not None and time_budget <= 0:
        raise ValueError(f"time_budget must be positive seconds, got {time_budget}")
    bar = progress(steps, start_step, desc)
    rate = Throughput()
    model.train()
    step = start_step
    # Seconds spent by earlier runs of a resumed job count against the budget too.
    spent_before = float(checkpoints.extra.get("seconds", 0.0))
    started = time.perf_counter()

    def seconds() -> float:
        return spent_before + time.perf_counter() - started

    def done() -> float:
        fraction = step / steps
        if time_budget is not None:
            fraction = max(fraction, seconds() / time_budget)
        return fraction

    def stopped() -> bool:
        if stop_at is not None and step >= stop_at:
            return True
        return stop_after is not None and time.perf_counter() - started >= stop_after

    def save() -> None:
        state = {"seconds": seconds(), **(extra_state() if extra_state else {})}
        checkpoints.save(step, model, optimizer, generator, state)

    last_save = time.perf_counter()
    while (progress_ := done()) < 1.0 and not stopped():
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, progress_, peak_lr, warmup)
        loss, tokens = batch_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{rate.add(tokens):,.0f}")
        due = step % checkpoint_every == 0 or (
            checkpoint_seconds is not None and time.perf_counter() - last_save >= checkpoint_seconds
        )
        if due and done() < 1.0 and not stopped():
            save()
            if on_checkpoint is not None:
                model.eval()
                on_checkpoint(step)
                model.train()
            last_save = time.perf_counter()
    if step > start_step:
        save()
    if stopped() and done() < 1.0:
        bar.write(f"{desc}: stopped after {step} of {steps} steps; resumable")
    elif step < steps:
        bar.write(f"{desc}: time budget of {time_budget:.0f}s spent after {step} steps")
    bar.close()
    model.eval()
    return step
