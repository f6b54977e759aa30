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


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPUs that support it; full precision on CPU."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
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


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress_ = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_)))


class Checkpointer:
    """Periodic training checkpoints in ``out_dir/checkpoint.pt``; resumes from the last one."""

    def __init__(self, out_dir: Path) -> None:
        self.path = Path(out_dir) / "checkpoint.pt"

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
        state = torch.load(self.path, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        random.setstate(state["python_random"])
        return int(state["step"])

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def progress(total: int, initial: int, desc: str) -> Any:
    """A tqdm bar (or a silent stand-in when tqdm is not installed)."""
    total_ = total
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with the train extra

        class _Silent:
            total = total_

            def write(self, message: str) -> None:
                print(message)

            def update(self, n: int = 1) -> None: ...
            def set_postfix(self, **kwargs: Any) -> None: ...
            def close(self) -> None: ...

        return _Silent()
    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, mininterval=2.0)


# A time budget fixes the step count from the speed of _CALIBRATION_STEPS steps, timed after
# _WARMUP_STEPS whose first-call costs (allocations, kernel selection) would skew it.
_WARMUP_STEPS = 5
_CALIBRATION_STEPS = 20


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
) -> int:
    """The optimisation loop both models share: cosine schedule, clipping, progress, checkpoints.

    ``batch_loss()`` draws a batch and returns (loss, tokens in the batch). With
    ``time_budget`` (seconds), the step count is cut once the speed is known (after
    ``_CALIBRATION_STEPS``) so that the whole schedule, decay included, ends within the budget
    rather than being stopped halfway at a high learning rate. Returns the final step count.
    """
    bar = progress(steps, start_step, desc)
    rate = Throughput()
    model.train()
    step = start_step
    started = time.perf_counter()
    timed_from = started
    while step < steps:
        if time_budget is not None and step == start_step + _WARMUP_STEPS:
            timed_from = time.perf_counter()
        if time_budget is not None and step == start_step + _WARMUP_STEPS + _CALIBRATION_STEPS:
            now = time.perf_counter()
            per_step = (now - timed_from) / _CALIBRATION_STEPS
            affordable = step + int((time_budget - (now - started)) / per_step)
            if affordable < steps:
                steps = max(step + 1, affordable)
                bar.total = steps
                bar.write(f"{desc}: {per_step * 1000:.1f} ms/step, {steps} steps fit the budget")
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, peak_lr, warmup)
        loss, tokens = batch_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{rate.add(tokens):,.0f}")
        if step % checkpoint_every == 0 or step == steps:
            checkpoints.save(step, model, optimizer, generator)
    bar.close()
    model.eval()
    return step
