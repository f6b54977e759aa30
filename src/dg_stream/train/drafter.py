"""Distil a block-diffusion drafter from a causal-LM verifier.

Acceptance is agreement with the verifier, so the drafter learns the verifier's own greedy
continuations, not the corpus: contexts from the corpus are continued greedily by the verifier,
and every position of a continuation is a training example (the rest of a greedy sequence is
the greedy continuation of its prefix). The drafter is a small BERT masked LM that reads the
last ``window`` tokens and fills a masked block (MDLM loss: cross-entropy on masked positions,
weighted by 1/t for mask ratio t; half the examples fully masked, as one-step drafting sees).

``architecture="causal"`` distils a small Llama causal LM of the same width and depth from the
same continuations instead (next-token cross-entropy on the verifier-written positions): the
classic speculative-decoding assistant, trained the same way so that benchmarks compare
drafter designs rather than training recipes.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .._verifier import cache_keyword
from ._loop import Checkpointer, TokenStream, autocast_dtype, optimize, pick_device, progress
from .corpus import Corpus

__all__ = ["ARCHITECTURES", "DrafterTrainingConfig", "distillation_data", "train_drafter"]


ARCHITECTURES = ("diffusion", "causal")


@dataclass(frozen=True)
class DrafterTrainingConfig:
    architecture: str = "diffusion"
    hidden_size: int = 128
    layers: int = 2
    heads: int = 4
    intermediate_size: int = 384
    window: int = 32
    max_block: int = 16
    context_tokens: int = 48
    continuation_tokens: int = 80
    sequences: int = 12288
    generation_batch: int = 128
    batch_size: int = 256
    steps: int = 2000
    lr: float = 2e-3
    warmup: int = 100
    seed: int = 0
    checkpoint_every: int = 200
    time_budget: float | None = None  # seconds of optimisation; the schedule fits into them
    keep_data: bool = False  # keep distillation.pt, e.g. to train an assistant on the same data

    @property
    def context_length(self) -> int:
        """Corpus tokens before each continuation: at least a full drafter window, so every
        training window lies inside its row."""
        return max(self.context_tokens, self.window)


@torch.inference_mode()
def greedy_continuations(verifier: Any, contexts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """(N, C) contexts -> (N, C + new_tokens) with the verifier's greedy continuations."""
    from transformers import DynamicCache

    kw = {cache_keyword(verifier): DynamicCache(config=verifier.config)}
    logits = verifier(input_ids=contexts, use_cache=True, **kw).logits[:, -1]
    out = [contexts]
    for _ in range(new_tokens):
        token = logits.argmax(dim=-1, keepdim=True)  # (N, 1)
        out.append(token)
        logits = verifier(input_ids=token, use_cache=True, **kw).logits[:, -1]
    return torch.cat(out, dim=1)


def distillation_data(
    verifier: Any,
    stream: TokenStream,
    config: DrafterTrainingConfig,
    generator: torch.Generator,
    device: torch.device,
) -> torch.Tensor:
    """(sequences, context + continuation) ids: corpus contexts continued by the verifier."""
    rows = []
    bar = progress(config.sequences, 0, "verifier continuations")
    for start in range(0, config.sequences, config.generation_batch):
        n = min(config.generation_batch, config.sequences - start)
        contexts = stream.windows(n, config.context_length, generator).to(device)
        rows.append(greedy_continuations(verifier, contexts, config.continuation_tokens).cpu())
        bar.update(n)
    bar.close()
    return torch.cat(rows)


def _batch(
    data: torch.Tensor, config: DrafterTrainingConfig, mask_id: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs (B, W+k), targets (B, k), mask (B, k) for one batch with a random block size k."""
    n, length = data.shape
    k = int(torch.randint(2, config.max_block + 1, (1,), generator=generator))
    window = config.window
    # Short contexts happen at the start of a generation; teach the drafter those too.
    if float(torch.rand(1, generator=generator)) < 0.1:
        window = int(torch.randint(1, config.window + 1, (1,), generator=generator))
    rows = torch.randint(0, n, (config.batch_size,), generator=generator)
    # Block starts inside the verifier-written part, so targets are always greedy continuations.
    first = length - config.continuation_tokens
    cut = torch.randint(first, length - k + 1, (config.batch_size,), generator=generator)
    offsets = torch.arange(-window, k)
    seq = data[rows[:, None], cut[:, None] + offsets[None, :]]  # (B, W+k)
    targets = seq[:, window:].clone()
    # Mask ratio t per example: half fully masked (one-step drafting), half t ~ U(0.1, 1).
    t = torch.rand(config.batch_size, generator=generator) * 0.9 + 0.1
    t[: config.batch_size // 2] = 1.0
    masked = torch.rand(config.batch_size, k, generator=generator) < t[:, None]
    masked[
        torch.arange(config.batch_size),
        torch.randint(0, k, (config.batch_size,), generator=generator),
    ] = True
    inputs = seq.clone()
    inputs[:, window:] = torch.where(masked, torch.full_like(targets, mask_id), targets)
    weights = masked.float() / t[:, None] / k  # MDLM 1/t weighting, per-token normalised
    return inputs, targets, weights


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


def train_drafter(
    corpus: Corpus,
    verifier_dir: str | Path,
    out_dir: str | Path,
    config: DrafterTrainingConfig = DrafterTrainingConfig(),
    device: str | None = None,
    log: Any = print,
) -> dict[str, object]:
    """Distil (or resume) a drafter for the verifier at ``verifier_dir``; returns metrics."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if config.architecture not in ARCHITECTURES:
        raise ValueError(
            f"architecture must be one of {ARCHITECTURES}, not {config.architecture!r}"
        )
    causal = config.architecture == "causal"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = pick_device(device)
    tokenizer: Any = AutoTokenizer.from_pretrained(verifier_dir)
    added = False
    if not causal:  # a causal assistant needs no mask token: it keeps the verifier's vocabulary
        tokenizer, added = ensure_mask_token(tokenizer)
    if added:
        log(
            f"the verifier's tokenizer has no mask token: added {tokenizer.mask_token!r} "
            f"(id {tokenizer.mask_token_id}) for the drafter"
        )
    verifier: Any = AutoModelForCausalLM.from_pretrained(verifier_dir, dtype=torch.float32)
    verifier = verifier.to(dev).eval()
    generator = torch.Generator().manual_seed(config.seed)
    data_path = out / "distillation.pt"
    if data_path.exists():  # resuming: the verifier's continuations are the slow part
        saved = torch.load(data_path)
        data = saved["ids"]
        if saved["continuation_tokens"] != config.continuation_tokens:
            raise ValueError(
                f"{data_path} holds continuations of {saved['continuation_tokens']} tokens, "
                f"not {config.continuation_tokens}; delete it to generate new ones"
            )
    else:
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        stream = TokenStream(corpus.train, tokenizer, eos)
        started = time.perf_counter()
        data = distillation_data(verifier, stream, config, generator, dev)
        seconds = time.perf_counter() - started
        log(f"verifier continuations: {data.shape[0]} sequences in {seconds:.0f}s")
        # The layout travels with the ids: a resumed or reusing run must read it the same way.
        torch.save({"ids": data, "continuation_tokens": config.continuation_tokens}, data_path)
    if int(data.shape[1]) - config.continuation_tokens < config.window:
        raise ValueError(
            f"{data_path} holds contexts shorter than the drafter window ({config.window}); "
            "delete it to generate new continuations"
        )
    torch.manual_seed(config.seed)
    model: Any = (
        _causal_model(verifier, config) if causal else _diffusion_model(tokenizer, config)
    ).to(dev)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, betas=(0.9, 0.98), weight_decay=0.01
    )
    checkpoints = Checkpointer(out)
    resumed_from = checkpoints.load(model, optimizer, generator)
    amp = autocast_dtype(dev)
    started = time.perf_counter()

    def diffusion_loss() -> tuple[torch.Tensor, int]:
        inputs, targets, weights = _batch(data, config, tokenizer.mask_token_id, generator)
        inputs, targets, weights = inputs.to(dev), targets.to(dev), weights.to(dev)
        k = targets.shape[1]
        with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
            hidden = model.bert(input_ids=inputs).last_hidden_state[:, -k:]  # (B, k, H)
            logits = model.cls(hidden).float()  # only the block needs the vocabulary head
        ce = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), targets.flatten(), reduction="none"
        )
        return (ce.view_as(weights) * weights).sum(dim=1).mean(), inputs.numel()

    rows = causal_batch_rows(config, int(data.shape[1]))

    def causal_loss() -> tuple[torch.Tensor, int]:
        # Whole (context + continuation) rows; the loss covers the positions whose target the
        # verifier wrote, exactly the tokens the diffusion drafter learns to fill.
        picked = torch.randint(0, data.shape[0], (rows,), generator=generator)
        seq = data[picked].to(dev)  # (B, C + N)
        c = int(data.shape[1]) - config.continuation_tokens
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
    model.to(torch.float16).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    metrics: dict[str, object] = {
        "architecture": config.architecture,
        "parameters": sum(p.numel() for p in model.parameters()),
        "distillation_sequences": int(data.shape[0]),
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
