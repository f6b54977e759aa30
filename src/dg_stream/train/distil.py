"""A long, resumable distillation run for the diffusion (BERT) drafter: ``dg-stream train
distil``.

The drafter the package ships was trained once on a GPU; a CPU has to spread the same work
over many sessions, each of which may be stopped at any moment. So one run folder holds
everything, and calling the command again on it continues where it stopped:

1. **data**: the verifier's greedy continuations of long corpus contexts, written shard by
   shard (``distill_data``); a stopped run resumes at the first missing shard;
2. **training**: a warm start from an existing drafter, with checkpoints on the clock that
   carry the weights, the optimizer, the batch generator and the global random states, so a
   resumed run takes the very steps an uninterrupted one would (the learning-rate schedule
   follows the step count, never the clock);
3. **a learning curve**: at every checkpoint the drafter is exported as a stock checkpoint
   (``drafter/``) and measured by what it is for, accepted drafts per verifier call at a
   fixed block (greedy, held-out prompts), against examples seen and CPU-seconds, in
   ``curve.json``.

The evaluation runs on the side: its random draws are fenced off, and its CPU time is counted
apart from training's.
"""

from __future__ import annotations

import copy
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ._loop import Checkpointer, TokenStream, autocast_dtype, optimize, pick_device
from .corpus import Corpus
from .distill_data import (
    ShardLayout,
    generate_shards,
    load_shards,
    load_soft_targets,
    shard_path,
)
from .distillation import Distillation, DrafterTrainingConfig
from .drafter import _batch, _warm_start, ensure_mask_token

__all__ = ["DistilRunConfig", "diffusion_loss", "run_distillation"]


@dataclass(frozen=True)
class DistilRunConfig:
    """One run folder's settings. ``steps`` is the schedule's length across all sessions;
    ``time_budget`` and ``stop_at`` bound this session only."""

    layout: ShardLayout = field(default_factory=ShardLayout)
    shards: int = 24
    # The verifier's precision while it writes the continuations. bf16 is 3x faster on CPUs
    # with bf16 units; its greedy choice differs from fp32's only at near-ties, where either
    # token is as good a target for a drafter.
    generation_dtype: str = "bfloat16"
    batch_size: int = 128
    steps: int = 20000
    lr: float = 6e-4
    warmup: int = 100
    seed: int = 0
    cpu_bf16: bool = True
    checkpoint_minutes: float = 5.0
    checkpoint_every: int = 1_000_000  # steps; the clock (checkpoint_minutes) usually rules
    eval_prompts: int = 16
    eval_tokens: int = 96
    eval_block: int = 8
    time_budget: float | None = None  # seconds of this session, data and training together
    stop_at: int | None = None  # end this session at this step (tests, fixed-size sessions)
    # The share of the loss that matches the verifier's distribution (its ``layout.top_k``
    # most likely ids, renormalised) rather than its greedy token alone; 0 without top_k.
    soft_weight: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.soft_weight <= 1.0:
            raise ValueError(f"soft_weight must be within [0, 1], got {self.soft_weight}")
        if self.layout.top_k < 0:
            raise ValueError(f"top_k must be 0 or more, got {self.layout.top_k}")


def diffusion_loss(
    model: Any,
    data: Distillation,
    config: DrafterTrainingConfig,
    mask_id: int,
    generator: torch.Generator,
    device: torch.device,
    amp: torch.dtype | None,
    soft_weight: float = 0.0,
) -> tuple[torch.Tensor, int]:
    """The MDLM loss of one batch of a token-only BERT drafter, and the batch's input tokens.
    Only the block's positions go through the vocabulary head. Where the data holds the
    verifier's distribution, ``soft_weight`` of each position's loss is the cross-entropy
    against it (its top ids, renormalised): what sampled drafts are accepted by."""
    batch = _batch(data, config, mask_id, generator)
    inputs, targets = batch.inputs.to(device), batch.targets.to(device)
    weights = batch.weights.to(device)
    k = targets.shape[1]
    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        hidden = model.bert(input_ids=inputs).last_hidden_state[:, -k:]  # (B, k, H)
        logits = model.cls(hidden).float()  # (B, k, V)
    loss = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), targets.flatten(), reduction="none"
    ).view_as(weights)
    if batch.soft is not None and soft_weight > 0:
        ids, probs = batch.soft[0].to(device), batch.soft[1].to(device)
        probs = probs / probs.sum(dim=-1, keepdim=True).clamp_min(1e-6)
        soft = -(probs * logits.log_softmax(dim=-1).gather(-1, ids)).sum(dim=-1)  # (B, k)
        loss = (1 - soft_weight) * loss + soft_weight * soft
    return (loss * weights).sum(dim=1).mean(), inputs.numel()


def _export(model: Any, tokenizer: Any, folder: Path) -> None:
    """The drafter as a stock fp16 checkpoint with its tokenizer (what the package loads)."""
    half = copy.deepcopy(model).to(torch.float16)
    half.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def _measure(
    verifier_dir: str | Path,
    drafter_dir: Path,
    prompts: Sequence[str],
    config: DistilRunConfig,
    device: torch.device,
) -> dict[str, Any]:
    """Accepted per verifier call at ``eval_block``, greedy, on ``prompts``; random states
    untouched (loading models draws from torch's), so training goes on as if it never ran."""
    from .._backends.local import LocalBackend
    from .evaluate import acceptance

    python_state = random.getstate()
    devices = [torch.cuda.current_device()] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            backend = LocalBackend(str(verifier_dir), str(drafter_dir), device=str(device))
            return acceptance(
                backend, prompts, config.eval_block, max_new_tokens=config.eval_tokens
            )
    finally:
        random.setstate(python_state)


class _Curve:
    """``curve.json``: one point per evaluation, kept consistent with the checkpoint (points
    past the step a run resumes from are dropped: that run will measure them again)."""

    def __init__(self, path: Path, resumed_step: int) -> None:
        self.path = path
        points = json.loads(path.read_text())["points"] if path.exists() else []
        self.points: list[dict[str, Any]] = [p for p in points if p["step"] <= resumed_step]

    def add(self, point: dict[str, Any], meta: dict[str, Any]) -> None:
        self.points.append(point)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**meta, "points": self.points}, indent=1))
        tmp.replace(self.path)


def _load_verifier(verifier_dir: str | Path, dtype: torch.dtype, dev: torch.device) -> Any:
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):  # loading draws; the run's draws start later
        verifier: Any = AutoModelForCausalLM.from_pretrained(
            str(verifier_dir), dtype=dtype, local_files_only=True
        )
    return verifier.to(dev).eval()


def _load_drafter(init_from: str | Path, tokenizer: Any) -> tuple[Any, DrafterTrainingConfig]:
    """The drafter to start from, and the training config its window and block size call
    for."""
    with torch.random.fork_rng(devices=[]):
        return _warm_start(DrafterTrainingConfig(init_from=str(init_from)), tokenizer)


def run_distillation(
    corpus: Corpus,
    verifier_dir: str | Path,
    init_from: str | Path,
    out_dir: str | Path,
    config: DistilRunConfig = DistilRunConfig(),
    device: str | None = None,
    log: Callable[[str], None] = print,
    prompts: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Run (or continue) the distillation in ``out_dir``; returns a summary of this session.

    ``prompts`` are the held-out evaluation prompts (default: from ``corpus.held_out``); an
    empty list skips the learning curve.
    """
    from .evaluate import held_out_prompts

    session_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = out / "settings.json"
    if settings.exists():  # a run continues on the settings it began with
        saved = json.loads(settings.read_text())
        if ShardLayout.from_saved(saved["layout"]) != config.layout:
            raise ValueError(f"{out} holds data of layout {saved['layout']}; use a new folder")
    settings.write_text(json.dumps({**asdict(config), "init_from": str(init_from)}, indent=1))
    from transformers import AutoTokenizer

    dev = pick_device(device)
    tokenizer, _ = ensure_mask_token(
        AutoTokenizer.from_pretrained(str(verifier_dir), local_files_only=True)
    )

    # 1. Data: shards the run does not have yet, in the generation precision.
    missing = [i for i in range(config.shards) if not shard_path(out / "data", i).exists()]
    summary: dict[str, Any] = {}
    data_cpu = 0.0
    if missing:
        cpu0 = time.process_time()
        verifier = _load_verifier(verifier_dir, getattr(torch, config.generation_dtype), dev)
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        summary["data"] = generate_shards(
            verifier,
            TokenStream(corpus.train, tokenizer, eos),
            out / "data",
            config.layout,
            config.shards,
            stop_after=config.time_budget,
            log=log,
            verifier_name=Path(verifier_dir).name,
        )
        del verifier
        data_cpu = time.process_time() - cpu0
        log(f"data: {json.dumps(summary['data'])}")
        if any(not shard_path(out / "data", i).exists() for i in missing):
            log("data: time budget spent before the last shard; run again to continue")
            return summary
    model, base = _load_drafter(init_from, tokenizer)
    model = model.to(dev)

    # 2. Training on every shard, warm-started, resumable to the step.
    ids = load_shards(out / "data", config.shards, config.layout)
    data = Distillation(ids, soft=load_soft_targets(out / "data", config.shards, config.layout))
    train_config = replace(
        base,
        batch_size=config.batch_size,
        continuation_tokens=config.layout.continuation_tokens,
        context_tokens=config.layout.context_tokens,
        seed=config.seed,
    )
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, betas=(0.9, 0.98), weight_decay=0.01
    )
    checkpoints = Checkpointer(out)
    resumed = checkpoints.load(model, optimizer, generator)
    spent = dict(checkpoints.extra)
    train_cpu_before = float(spent.get("train_cpu_seconds", 0.0))
    eval_cpu = float(spent.get("eval_cpu_seconds", 0.0))
    data_cpu += float(spent.get("data_cpu_seconds", 0.0))
    amp = autocast_dtype(dev, config.cpu_bf16)
    if prompts is None:
        prompts = held_out_prompts(corpus.held_out, count=config.eval_prompts)
    curve = _Curve(out / "curve.json", resumed)
    meta = {
        "what": "accepted drafts per verifier call, greedy, held-out prompts",
        "block": config.eval_block,
        "prompts": len(prompts),
        "new_tokens": config.eval_tokens,
        "batch_size": config.batch_size,
        "sequences": int(ids.shape[0]),
        "layout": asdict(config.layout),
        "init_from": str(init_from),
    }
    losses: list[float] = []
    train_cpu_start = time.process_time()
    eval_cpu_now = eval_wall_now = 0.0

    def train_cpu() -> float:
        return train_cpu_before + time.process_time() - train_cpu_start - eval_cpu_now

    def extra_state() -> dict[str, Any]:
        return {
            "train_cpu_seconds": train_cpu(),
            "eval_cpu_seconds": eval_cpu + eval_cpu_now,
            "data_cpu_seconds": data_cpu,
        }

    def evaluate(step: int) -> None:
        nonlocal eval_cpu_now, eval_wall_now
        if not prompts:
            return
        tick, wall_tick = time.process_time(), time.perf_counter()
        _export(model, tokenizer, out / "drafter")
        try:
            measured: dict[str, Any] = _measure(verifier_dir, out / "drafter", prompts, config, dev)
        except Exception as error:  # a broken evaluation must not end training
            measured = {"error": f"{type(error).__name__}: {error}"}
        eval_cpu_now += time.process_time() - tick
        eval_wall_now += time.perf_counter() - wall_tick
        recent = losses[-200:]
        point = {
            "step": step,
            "examples": step * config.batch_size,
            "train_cpu_seconds": round(train_cpu(), 1),
            "loss": round(sum(recent) / len(recent), 4) if recent else None,
            **measured,
        }
        curve.add(point, meta)
        log(f"curve: {json.dumps(point)}")

    def batch_loss() -> tuple[torch.Tensor, int]:
        loss, tokens = diffusion_loss(
            model,
            data,
            train_config,
            tokenizer.mask_token_id,
            generator,
            dev,
            amp,
            soft_weight=config.soft_weight,
        )
        losses.append(float(loss.detach()))
        return loss, tokens

    if resumed == 0 and not curve.points:
        evaluate(0)  # the starting drafter, measured the same way
    remaining = None
    if config.time_budget is not None:
        remaining = max(1.0, config.time_budget - (time.perf_counter() - session_start))
    cpu_tick = time.process_time()
    wall_tick = time.perf_counter()
    step = optimize(
        model,
        optimizer,
        start_step=resumed,
        steps=config.steps,
        peak_lr=config.lr,
        warmup=config.warmup,
        batch_loss=batch_loss,
        checkpoints=checkpoints,
        generator=generator,
        checkpoint_every=config.checkpoint_every,
        desc="distil",
        stop_after=remaining,
        stop_at=config.stop_at,
        checkpoint_seconds=config.checkpoint_minutes * 60,
        extra_state=extra_state,
        on_checkpoint=evaluate,
    )
    wall = time.perf_counter() - wall_tick
    cpu = time.process_time() - cpu_tick - eval_cpu_now
    if step > resumed and (not curve.points or curve.points[-1]["step"] != step):
        evaluate(step)
    examples = (step - resumed) * config.batch_size
    summary["training"] = {
        "steps": step,
        "of_steps": config.steps,
        "resumed_from": resumed,
        "examples_this_session": examples,
        "examples_per_second": round(examples / max(1e-9, wall - eval_wall_now), 1),
        "examples_per_cpu_second": round(examples / max(1e-9, cpu), 1),
        "finished": step >= config.steps,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
