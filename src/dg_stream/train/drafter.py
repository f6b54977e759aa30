"""Distil a block-diffusion drafter from a causal-LM verifier.

Acceptance is agreement with the verifier, so the drafter learns the verifier's own greedy
continuations, not the corpus: contexts from the corpus are continued greedily by the verifier,
and every position of a continuation is a training example (the rest of a greedy sequence is
the greedy continuation of its prefix). The drafter is a small BERT masked LM that reads the
last ``window`` tokens and fills a masked block (MDLM loss: cross-entropy on masked positions,
weighted by 1/t for mask ratio t; three quarters of the examples fully masked, as one-step
drafting sees them). With ``feature_layers`` it also reads the verifier's hidden states at those
layers, captured while the verifier writes the continuations (see ``FeatureConditionedMLM``).

``architecture="causal"`` distils a small Llama causal LM of the same width and depth from the
same continuations instead (next-token cross-entropy on the verifier-written positions): the
classic speculative-decoding assistant, trained the same way so that benchmarks compare
drafter designs rather than training recipes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch

from .._drafters.diffusion import place_features
from .._loading import load_feature_projection, save_feature_projection
from .._model_kinds import TRAINABLE, trainer
from ._loop import Checkpointer, TokenStream, autocast_dtype, optimize, pick_device
from .corpus import Corpus
from .distillation import (
    Distillation,
    DrafterTrainingConfig,
    distillation_data,
    greedy_continuations,
    load_distillation,
    save_distillation,
)

__all__ = [
    "ARCHITECTURES",
    "Distillation",
    "DrafterTrainingConfig",
    "FeatureConditionedMLM",
    "distillation_data",
    "greedy_continuations",
    "train_drafter",
    "train_token_drafter",
]


#: The architectures ``train_drafter`` makes (the kinds ``_model_kinds`` can train).
ARCHITECTURES = TRAINABLE


class Batch(NamedTuple):
    inputs: torch.Tensor  # (B, W+k) context ids then the block, masked where ``weights`` > 0
    targets: torch.Tensor  # (B, k)
    weights: torch.Tensor  # (B, k) MDLM weights, 0 on positions left unmasked
    features: torch.Tensor | None  # (B, m, F) verifier features of the m context tokens before
    # the newest, whose features the verifier has not computed when the drafter runs
    soft: tuple[torch.Tensor, torch.Tensor] | None = None  # (B, k, K) the verifier's most
    # likely ids at each block position and their probabilities


def _batch(
    data: Distillation, config: DrafterTrainingConfig, mask_id: int, generator: torch.Generator
) -> Batch:
    """One batch with a random block size k and (now and then) a shorter context."""
    n, length = data.ids.shape
    k = int(torch.randint(2, config.max_block + 1, (1,), generator=generator))
    window = config.window
    # Short contexts happen at the start of a generation; teach the drafter those too.
    if float(torch.rand(1, generator=generator)) < 0.1:
        window = int(torch.randint(1, config.window + 1, (1,), generator=generator))
    rows = torch.randint(0, n, (config.batch_size,), generator=generator)
    # Block starts inside the verifier-written part, so targets are always greedy continuations,
    # and late enough for a whole window to lie inside the row.
    first = length - config.continuation_tokens
    lowest = max(first, config.window)
    cut = torch.randint(lowest, length - k + 1, (config.batch_size,), generator=generator)
    span = torch.arange(-window, k)
    seq = data.ids[rows[:, None], cut[:, None] + span[None, :]]  # (B, W+k)
    targets = seq[:, window:].clone()
    # Mask ratio t per example: three quarters fully masked (one-step drafting, the default),
    # the rest t ~ U(0.1, 1) for multi-step denoising.
    t = torch.rand(config.batch_size, generator=generator) * 0.9 + 0.1
    t[: config.batch_size * 3 // 4] = 1.0
    masked = torch.rand(config.batch_size, k, generator=generator) < t[:, None]
    masked[
        torch.arange(config.batch_size),
        torch.randint(0, k, (config.batch_size,), generator=generator),
    ] = True
    inputs = seq.clone()
    inputs[:, window:] = torch.where(masked, torch.full_like(targets, mask_id), targets)
    weights = masked.float() / t[:, None] / k  # MDLM 1/t weighting, per-token normalised
    features = None
    if data.features is not None:
        # Positions cut-1-read .. cut-2: the context before its newest token (at cut-1).
        read = min(window - 1, config.features_read)
        # Stored features start `features_read` positions before the newest context token.
        index = torch.arange(-read - 1, -1)[None, :] - (first - 1 - config.features_read)
        features = data.features[rows[:, None], cut[:, None] + index].float()
    soft = None
    if data.soft is not None:  # the block's positions within the continuation
        where = cut[:, None] + torch.arange(k)[None, :] - first
        soft = (data.soft[0][rows[:, None], where], data.soft[1][rows[:, None], where].float())
    return Batch(inputs, targets, weights, features, soft)


class FeatureConditionedMLM(torch.nn.Module):
    """A BERT drafter plus the projection that adds verifier features to its token embeddings
    (only while training: they are saved apart, the BERT as a stock checkpoint)."""

    def __init__(self, mlm: Any, feature_size: int) -> None:
        super().__init__()
        self.mlm = mlm
        hidden = int(mlm.config.hidden_size)
        self.projection = torch.nn.Linear(feature_size, hidden, bias=False)
        # Zero: the drafter starts as it would read tokens alone (a warm start stays intact).
        torch.nn.init.zeros_(self.projection.weight)

    def load_projection(self, drafter_dir: str | Path, layers: Sequence[int]) -> None:
        """Take the projection of a drafter that read the same layers (else keep zeros)."""
        config = json.loads((Path(drafter_dir) / "config.json").read_text())
        weight = load_feature_projection(drafter_dir)
        same = list(config.get("dg_stream_feature_layers") or []) == list(layers)
        if weight is not None and same and weight.shape == self.projection.weight.shape:
            with torch.no_grad():
                self.projection.weight.copy_(weight.float())

    def hidden(self, inputs: torch.Tensor, features: torch.Tensor, context: int) -> torch.Tensor:
        """(B, T) ids whose first ``context`` are the context, and (B, m, F) features of the
        m context tokens before the newest."""
        embeds = self.mlm.bert.embeddings.word_embeddings(inputs)
        extra = place_features(self.projection(features), inputs.shape[1], context)
        return self.mlm.bert(inputs_embeds=embeds + extra).last_hidden_state


def ensure_mask_token(tokenizer: Any) -> tuple[Any, bool]:
    """Add a mask token when the tokenizer has none; returns (tokenizer, added)."""
    if tokenizer.mask_token_id is not None:
        return tokenizer, False
    tokenizer.add_special_tokens({"mask_token": "<|dg_mask|>"})
    return tokenizer, True


def causal_batch_rows(config: DrafterTrainingConfig, row_length: int) -> int:
    """Rows per causal batch: about the input tokens of a diffusion batch (same compute)."""
    diffusion_tokens = config.batch_size * (config.window + (config.max_block + 2) / 2)
    return max(1, round(diffusion_tokens / row_length))


def _diffusion_model(tokenizer: Any, config: DrafterTrainingConfig) -> Any:
    from transformers import BertConfig, BertForMaskedLM

    drafter_config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        intermediate_size=config.intermediate_size,
        max_position_embeddings=config.window + config.max_block,
        type_vocab_size=1,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
        # Extra config fields, saved with the checkpoint: where to find the mask, how much
        # context the drafter was trained to read.
        **{"mask_token_id": tokenizer.mask_token_id, "dg_stream_window": config.window},
    )
    return BertForMaskedLM(drafter_config)


def _warm_start(config: DrafterTrainingConfig, tokenizer: Any) -> tuple[Any, DrafterTrainingConfig]:
    """The drafter at ``config.init_from`` and the config with its window and block size."""
    from transformers import AutoModelForMaskedLM

    assert config.init_from is not None
    model = AutoModelForMaskedLM.from_pretrained(
        config.init_from, dtype=torch.float32, local_files_only=True
    )
    if int(model.config.vocab_size) != len(tokenizer):
        raise ValueError(
            f"{config.init_from} has a vocabulary of {model.config.vocab_size} ids, the "
            f"verifier's tokenizer {len(tokenizer)}"
        )
    window = int(getattr(model.config, "dg_stream_window", 0) or config.window)
    max_block = int(model.config.max_position_embeddings) - window
    # Recommendations measured for the old model, and what it read (set again below if this
    # run reads features too).
    for stale in (
        "dg_stream_block_size",
        "dg_stream_adaptive",
        "dg_stream_feature_layers",
        "dg_stream_feature_window",
    ):
        if hasattr(model.config, stale):
            delattr(model.config, stale)
    return model, replace(config, window=window, max_block=max_block)


def _causal_model(verifier: Any, config: DrafterTrainingConfig) -> Any:
    """A Llama of the diffusion drafter's width and depth, with the verifier's vocabulary."""
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    vc = verifier.config
    causal_config = LlamaConfig(
        vocab_size=int(vc.vocab_size),
        hidden_size=config.hidden_size,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        num_key_value_heads=config.heads,
        intermediate_size=config.intermediate_size,
        # An assistant reads the whole context, as long as the verifier's (RoPE is relative).
        max_position_embeddings=int(getattr(vc, "max_position_embeddings", 2048) or 2048),
        tie_word_embeddings=True,
        bos_token_id=vc.bos_token_id,
        eos_token_id=vc.eos_token_id,
        pad_token_id=vc.pad_token_id,
    )
    model = LlamaForCausalLM(causal_config)
    model.generation_config = copy.deepcopy(verifier.generation_config)
    return model


def _check_config(config: DrafterTrainingConfig, verifier: Any) -> None:
    """Refuse settings that would fail only after the (slow) continuations are written."""
    # A causal assistant learns whole continuations; only diffusion blocks must fit in one.
    if config.architecture == "diffusion" and config.max_block > config.continuation_tokens:
        raise ValueError(
            f"blocks of up to {config.max_block} tokens do not fit in continuations of "
            f"{config.continuation_tokens}: raise continuation_tokens"
        )
    if config.feature_window < 0:
        raise ValueError(f"feature_window must be 0 or more, got {config.feature_window}")
    layers = int(verifier.config.num_hidden_layers)
    wrong = [layer for layer in config.feature_layers if not 0 <= layer <= layers]
    if wrong:
        raise ValueError(
            f"feature layers {wrong} do not exist: the verifier has layers 0 (embeddings) "
            f"to {layers}"
        )


def train_drafter(
    corpus: Corpus,
    verifier_dir: str | Path,
    out_dir: str | Path,
    config: DrafterTrainingConfig = DrafterTrainingConfig(),  # noqa: B008 (frozen)
    device: str | None = None,
    log: Any = print,
) -> dict[str, object]:
    """Distil (or resume) a drafter for the verifier at ``verifier_dir``; returns metrics.
    ``config.architecture`` picks the trainer (see ``_model_kinds``)."""
    train = trainer(config.architecture)
    return train(corpus, verifier_dir, out_dir, config, device, log)


def train_token_drafter(
    corpus: Corpus,
    verifier_dir: str | Path,
    out_dir: str | Path,
    config: DrafterTrainingConfig,
    device: str | None = None,
    log: Any = print,
) -> dict[str, object]:
    """``train_drafter`` for a diffusion or a causal drafter (both read tokens, and verifier
    features where a diffusion drafter is given ``feature_layers``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if config.architecture not in ("diffusion", "causal"):
        raise ValueError(f"not a diffusion or causal drafter: {config.architecture!r}")
    causal = config.architecture == "causal"
    if causal and (config.feature_layers or config.init_from):
        raise ValueError("verifier features and warm starts are for diffusion drafters only")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = pick_device(device)
    tokenizer: Any = AutoTokenizer.from_pretrained(verifier_dir, local_files_only=True)
    added = False
    if not causal:  # a causal assistant needs no mask token: it keeps the verifier's vocabulary
        tokenizer, added = ensure_mask_token(tokenizer)
    if added:
        log(
            f"the verifier's tokenizer has no mask token: added {tokenizer.mask_token!r} "
            f"(id {tokenizer.mask_token_id}) for the drafter"
        )
    start: Any = None
    if config.init_from:
        start, config = _warm_start(config, tokenizer)
    verifier: Any = AutoModelForCausalLM.from_pretrained(
        verifier_dir, dtype=torch.float32, local_files_only=True
    )
    verifier = verifier.to(dev).eval()
    _check_config(config, verifier)
    generator = torch.Generator().manual_seed(config.seed)
    data_path = out / "distillation.pt"
    if data_path.exists():  # resuming: the verifier's continuations are the slow part
        data = load_distillation(data_path, config)
    else:
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        stream = TokenStream(corpus.train, tokenizer, eos)
        started = time.perf_counter()
        data = distillation_data(verifier, stream, config, generator, dev)
        seconds = time.perf_counter() - started
        log(f"verifier continuations: {data.ids.shape[0]} sequences in {seconds:.0f}s")
        save_distillation(data_path, data, config)
    torch.manual_seed(config.seed)
    model: Any
    if causal:
        model = _causal_model(verifier, config)
    else:
        model = start if start is not None else _diffusion_model(tokenizer, config)
    if config.feature_layers:
        # Saved with the checkpoint: which verifier layers it reads, and over how many tokens.
        model.config.dg_stream_feature_layers = list(config.feature_layers)
        model.config.dg_stream_feature_window = config.features_read
        feature_size = len(config.feature_layers) * int(verifier.config.hidden_size)
        model = FeatureConditionedMLM(model, feature_size)
        if start is not None:  # a drafter that read the same features keeps its projection
            model.load_projection(config.init_from, config.feature_layers)
    model = model.to(dev)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, betas=(0.9, 0.98), weight_decay=0.01
    )
    checkpoints = Checkpointer(out)
    resumed_from = checkpoints.load(model, optimizer, generator)
    amp = autocast_dtype(dev, config.cpu_bf16)
    started = time.perf_counter()

    def diffusion_loss() -> tuple[torch.Tensor, int]:
        batch = _batch(data, config, tokenizer.mask_token_id, generator)
        inputs, targets = batch.inputs.to(dev), batch.targets.to(dev)
        weights = batch.weights.to(dev)
        k = targets.shape[1]
        with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
            if batch.features is not None:
                features = batch.features.to(dev)
                hidden = model.hidden(inputs, features, inputs.shape[1] - k)[:, -k:]  # (B, k, H)
                logits = model.mlm.cls(hidden).float()
            else:
                hidden = model.bert(input_ids=inputs).last_hidden_state[:, -k:]
                logits = model.cls(hidden).float()  # only the block needs the vocabulary head
        ce = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), targets.flatten(), reduction="none"
        )
        return (ce.view_as(weights) * weights).sum(dim=1).mean(), inputs.numel()

    rows = causal_batch_rows(config, int(data.ids.shape[1]))

    def causal_loss() -> tuple[torch.Tensor, int]:
        # Whole (context + continuation) rows; the loss covers the positions whose target the
        # verifier wrote, exactly the tokens the diffusion drafter learns to fill.
        picked = torch.randint(0, data.ids.shape[0], (rows,), generator=generator)
        seq = data.ids[picked].to(dev)  # (B, C + N)
        c = int(data.ids.shape[1]) - config.continuation_tokens
        with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
            hidden = model.model(input_ids=seq[:, :-1]).last_hidden_state[:, c - 1 :]
            logits = model.lm_head(hidden).float()  # (B, N, V)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), seq[:, c:].flatten())
        return loss, seq.numel()

    steps = optimize(
        model,
        optimizer,
        start_step=resumed_from,
        steps=config.steps,
        peak_lr=config.lr,
        warmup=config.warmup,
        batch_loss=causal_loss if causal else diffusion_loss,
        checkpoints=checkpoints,
        generator=generator,
        checkpoint_every=config.checkpoint_every,
        desc="causal drafter" if causal else "drafter",
        time_budget=config.time_budget,
    )
    parameters = sum(p.numel() for p in model.parameters())
    if isinstance(model, FeatureConditionedMLM):
        save_feature_projection(out, model.projection.weight.detach().to(torch.float16))
        model = model.mlm
    model.to(torch.float16).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    metrics: dict[str, object] = {
        "architecture": config.architecture,
        "parameters": parameters,
        "distillation_sequences": int(data.ids.shape[0]),
        "steps": steps,
        "resumed_from_step": resumed_from,
        "wall_seconds_this_run": round(time.perf_counter() - started, 1),
        "device": str(dev),
        "added_mask_token": added,
        "config": asdict(config),
        "corpus": corpus.manifest,
    }
    (out / "training_metrics.json").write_text(json.dumps(metrics, indent=2))
    checkpoints.remove()
    if not config.keep_data:
        data_path.unlink(missing_ok=True)
    return metrics
