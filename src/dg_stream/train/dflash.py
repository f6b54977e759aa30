"""Train a DFlash drafter for any local causal LM (``dg-stream train drafter --architecture
dflash``).

The data are the verifier's own greedy continuations of corpus contexts, with its raw hidden
states at the target layers captured while it writes them (no second forward). Each step
reads many blocks per sequence in one pass: random anchors in the verifier-written part, each
block [anchor token, mask, ...] attending to the features before its anchor and to itself
(``block_attention_mask``). The loss is cross-entropy through the verifier's frozen LM head on
the drafted slots, weighted ``exp(-(i - 1) / gamma)`` for slot i: an early miss ends the
accepted run, so early slots matter most. The output is a checkpoint in the published layout.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from .._drafters.dflash_model import (
    DFlashModel,
    block_attention_mask,
    default_target_layers,
    dflash_config,
    load_dflash,
    save_dflash,
)
from ._loop import Checkpointer, TokenStream, autocast_dtype, optimize, pick_device
from .corpus import Corpus
from .distillation import (
    Distillation,
    DrafterTrainingConfig,
    distillation_data,
    load_distillation,
    save_distillation,
)

__all__ = ["DFlashBatch", "dflash_batch", "slot_weights", "train_dflash"]


def slot_weights(drafted: int, gamma: float) -> torch.Tensor:
    """(drafted,) loss weights exp(-(i-1)/gamma) for slots i = 1..drafted, summing to 1."""
    w = torch.exp(-torch.arange(drafted, dtype=torch.float32) / gamma)
    return w / w.sum()


class DFlashBatch:
    """Rows of continuations with their features, and the anchored blocks to fill."""

    def __init__(
        self, ids: torch.Tensor, features: torch.Tensor, anchors: torch.Tensor, block_size: int
    ) -> None:
        self.ids = ids  # (B, T) context + continuation
        self.features = features  # (B, T-1, F) raw features of every position but the last
        self.anchors = anchors  # (B, N) each block's clean first token
        self.block_size = block_size

    def slots(self) -> torch.Tensor:
        """(B, N, bs) position of every block slot."""
        return self.anchors[:, :, None] + torch.arange(self.block_size)

    def targets(self) -> torch.Tensor:
        """(B, N, bs-1) the verifier's tokens at the drafted slots."""
        slots = self.slots()[:, :, 1:]
        return self.ids.gather(1, slots.flatten(1)).view_as(slots)


def dflash_batch(
    data: Distillation,
    rows: int,
    blocks: int,
    block_size: int,
    continuation_tokens: int,
    generator: torch.Generator,
) -> DFlashBatch:
    """``rows`` random rows with ``blocks`` distinct random anchors each. Anchors run from the
    last context token (the first drafted slot is then the first verifier-written token) to
    the last position a whole block fits after, so every target is the verifier's own."""
    assert data.features is not None
    n, length = data.ids.shape
    picked = torch.randint(0, n, (rows,), generator=generator)
    low, high = length - continuation_tokens - 1, length - block_size  # inclusive
    choices = high - low + 1
    order = torch.rand(rows, choices, generator=generator).argsort(dim=1)[:, :blocks]
    anchors = (low + order).sort(dim=1).values
    return DFlashBatch(data.ids[picked], data.features[picked], anchors, block_size)


def _mask_token_id(tokenizer: Any, rows: int, log: Any) -> int:
    """The verifier's mask token, else an embedding row no token uses (tables are often
    padded past the tokenizer), else a pad token that is not also end-of-sequence. Its
    embedding is only the drafter's "unknown" input; it must never be a token the verifier
    writes, or a block anchored on it would look masked."""
    if isinstance(tokenizer.mask_token_id, int) and 0 <= tokenizer.mask_token_id < rows:
        return int(tokenizer.mask_token_id)
    if len(tokenizer) < rows:
        log(f"the verifier's tokenizer has no mask token: using unused embedding row {rows - 1}")
        return rows - 1
    pad = tokenizer.pad_token_id
    if isinstance(pad, int) and pad != tokenizer.eos_token_id and 0 <= pad < rows:
        log(f"the verifier's tokenizer has no mask token: using its pad token {pad}")
        return int(pad)
    raise ValueError(
        "the verifier's tokenizer has no mask token, no unused embedding row and no pad token "
        "apart from end-of-sequence: add a mask token to the verifier's tokenizer and embeddings"
    )


def train_dflash(
    corpus: Corpus,
    verifier_dir: str | Path,
    out_dir: str | Path,
    config: DrafterTrainingConfig,
    device: str | None = None,
    log: Any = print,
) -> dict[str, object]:
    """Distil (or resume) a DFlash drafter for the verifier at ``verifier_dir``.

    ``config.layers`` drafter layers of the verifier's width; ``config.max_block + 1`` is the
    block size (the newest token included); ``config.feature_layers`` are hidden-state indices
    (layer i of the published format is index i + 1), by default spread over the depth;
    ``config.init_from`` continues from an existing DFlash checkpoint.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = pick_device(device)
    tokenizer: Any = AutoTokenizer.from_pretrained(verifier_dir, local_files_only=True)
    verifier: Any = AutoModelForCausalLM.from_pretrained(
        verifier_dir, dtype=torch.float32, local_files_only=True
    )
    verifier = verifier.to(dev).eval().requires_grad_(False)
    depth = int(verifier.config.num_hidden_layers)
    block_size = config.max_block + 1
    start: DFlashModel | None = None
    if config.init_from:
        start = load_dflash(config.init_from, "cpu", torch.float32)
        targets = list(start.spec.target_layer_ids)
        block_size = start.spec.block_size
    elif config.feature_layers:
        if min(config.feature_layers) < 1 or max(config.feature_layers) > depth:
            raise ValueError(
                f"feature layers {list(config.feature_layers)}: a DFlash drafter reads layer "
                f"outputs 1 to {depth} (0, the embeddings, is not one)"
            )
        targets = [i - 1 for i in config.feature_layers]
    else:
        targets = default_target_layers(depth, max(3, config.layers))
    # Continuations kept with every position's features (all but the final token).
    config = replace(
        config,
        max_block=block_size - 1,
        feature_layers=tuple(i + 1 for i in targets),
        window=config.context_tokens,
        feature_window=0,
    )
    if block_size > config.continuation_tokens:
        raise ValueError(
            f"blocks of {block_size} tokens do not fit in continuations of "
            f"{config.continuation_tokens}: raise continuation_tokens"
        )
    generator = torch.Generator().manual_seed(config.seed)
    data_path = out / "distillation.pt"
    if data_path.exists():
        data = load_distillation(data_path, config)
    else:
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        stream = TokenStream(corpus.train, tokenizer, eos)
        started = time.perf_counter()
        data = distillation_data(verifier, stream, config, generator, dev)
        log(f"verifier continuations: {data.ids.shape[0]} in {time.perf_counter() - started:.0f}s")
        save_distillation(data_path, data, config)
    if data.features is None or data.features.shape[1] != data.ids.shape[1] - 1:
        raise ValueError(
            f"{data_path} does not hold features for every position of its rows (kept for "
            "other --context-tokens?); delete it to generate new continuations"
        )
    embed = verifier.get_input_embeddings()
    head = verifier.get_output_embeddings()
    mask_id = _mask_token_id(tokenizer, int(embed.weight.shape[0]), log)
    torch.manual_seed(config.seed)
    if start is not None:
        model = start
    else:
        drafter_config = dflash_config(
            verifier.config,
            layers=config.layers,
            mask_token_id=mask_id,
            block_size=block_size,
            target_layer_ids=targets,
        )
        model = DFlashModel(drafter_config)
    model = model.to(dev)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, betas=(0.9, 0.95), weight_decay=0.01
    )
    checkpoints = Checkpointer(out)
    resumed_from = checkpoints.load(model, optimizer, generator)
    amp = autocast_dtype(dev, config.cpu_bf16)
    weights = slot_weights(block_size - 1, gamma=max(1.0, (block_size - 1) / 2)).to(dev)
    blocks = max(1, min(config.blocks_per_row, config.continuation_tokens - block_size + 2))
    positions = torch.arange(int(data.ids.shape[1]) - 1, device=dev)[None]
    started = time.perf_counter()

    def loss() -> tuple[torch.Tensor, int]:
        batch = dflash_batch(
            data, config.batch_size, blocks, block_size, config.continuation_tokens, generator
        )
        ids = batch.ids.to(dev)
        slots = batch.slots().to(dev)  # (B, N, bs)
        block_ids = torch.full_like(slots, mask_id)
        block_ids[:, :, 0] = ids.gather(1, slots[:, :, 0])
        with torch.no_grad():
            noise = embed(block_ids.flatten(1))  # (B, N*bs, H)
        features = batch.features.to(dev)
        mask = block_attention_mask(batch.anchors.to(dev), block_size, features.shape[1])
        with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
            hidden = model(
                noise,
                slots.flatten(1),
                features,
                positions.expand(ids.shape[0], -1),
                mask=mask,
            )
            hidden = hidden.view(*slots.shape, -1)[:, :, 1:]  # the drafted slots
            logits = model.logits(hidden, head).float()  # (B, N, bs-1, V)
        ce = torch.nn.functional.cross_entropy(
            logits.flatten(0, 2), batch.targets().to(dev).flatten(), reduction="none"
        )
        return (ce.view(*logits.shape[:3]) * weights).sum(-1).mean(), int(slots.numel())

    steps = optimize(
        model,
        optimizer,
        start_step=resumed_from,
        steps=config.steps,
        peak_lr=config.lr,
        warmup=config.warmup,
        batch_loss=loss,
        checkpoints=checkpoints,
        generator=generator,
        checkpoint_every=config.checkpoint_every,
        desc="dflash drafter",
        time_budget=config.time_budget,
    )
    save_dflash(model, out, verifier_layers=depth)
    tokenizer.save_pretrained(out)
    metrics: dict[str, object] = {
        "architecture": "dflash",
        "parameters": sum(p.numel() for p in model.parameters()),
        "target_layer_ids": targets,
        "block_size": block_size,
        "distillation_sequences": int(data.ids.shape[0]),
        "steps": steps,
        "blocks_seen": steps * config.batch_size * blocks,
        "resumed_from_step": resumed_from,
        "wall_seconds_this_run": round(time.perf_counter() - started, 1),
        "device": str(dev),
        "config": asdict(config),
        "corpus": corpus.manifest,
    }
    (out / "training_metrics.json").write_text(json.dumps(metrics, indent=2))
    checkpoints.remove()
    if not config.keep_data:
        data_path.unlink(missing_ok=True)
    return metrics
