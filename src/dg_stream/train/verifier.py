"""Train the default verifier: a small Llama-architecture causal LM on the corpus."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ._loop import Checkpointer, TokenStream, autocast_dtype, optimize, pick_device
from .corpus import Corpus
from .tokenizer import END

__all__ = ["VerifierTrainingConfig", "evaluate_loss", "train_verifier"]


@dataclass(frozen=True)
class VerifierTrainingConfig:
    hidden_size: int = 256
    layers: int = 6
    heads: int = 8
    kv_heads: int = 4
    intermediate_size: int = 704
    max_positions: int = 2048
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 2000
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.05
    seed: int = 0
    checkpoint_every: int = 100
    time_budget: float | None = None  # seconds of optimisation; the schedule fits into them


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module, stream: TokenStream, seq_len: int, windows: int, device: torch.device
) -> float:
    """Mean next-token cross-entropy (nats/token) over the first ``windows`` windows."""
    model.eval()
    total, count = 0.0, 0
    for window in stream.sequential_windows(seq_len, limit=windows):
        ids = window[None].to(device)
        logits = model(input_ids=ids).logits.float()  # (1, T, V)
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
        total += float(loss)
        count += ids.shape[1] - 1
    model.train()
    return total / max(1, count)


def train_verifier(
    corpus: Corpus,
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    config: VerifierTrainingConfig = VerifierTrainingConfig(),
    device: str | None = None,
) -> dict[str, object]:
    """Train (or resume) the verifier; saves a transformers checkpoint and returns metrics."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    dev = pick_device(device)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    torch.manual_seed(config.seed)
    model_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        num_key_value_heads=config.kv_heads,
        max_position_embeddings=config.max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model: Any = LlamaForCausalLM(model_config).to(dev)  # type: ignore[arg-type]
    # A chat reply ends at the end-of-turn token as well as at end of text.
    end_of_turn = tokenizer.convert_tokens_to_ids(END)
    if isinstance(end_of_turn, int) and end_of_turn != tokenizer.unk_token_id:
        model.generation_config.eos_token_id = [tokenizer.eos_token_id, end_of_turn]
    train_stream = TokenStream(corpus.train, tokenizer, tokenizer.eos_token_id)
    held_stream = TokenStream(corpus.held_out, tokenizer, tokenizer.eos_token_id)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, betas=(0.9, 0.95), weight_decay=config.weight_decay
    )
    generator = torch.Generator().manual_seed(config.seed)
    checkpoints = Checkpointer(out)
    resumed_from = checkpoints.load(model, optimizer, generator)
    amp = autocast_dtype(dev)
    started = time.perf_counter()

    def batch_loss() -> tuple[torch.Tensor, int]:
        batch = train_stream.windows(config.batch_size, config.seq_len + 1, generator).to(dev)
        with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
            logits = model(input_ids=batch[:, :-1]).logits  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(
            logits.float().flatten(0, 1), batch[:, 1:].flatten()
        )
        return loss, batch.numel()

    steps = optimize(
        model,
        optimizer,
        start_step=resumed_from,
        steps=config.steps,
        peak_lr=config.lr,
        warmup=config.warmup,
        batch_loss=batch_loss,
        checkpoints=checkpoints,
        generator=generator,
        checkpoint_every=config.checkpoint_every,
        desc="verifier",
        time_budget=config.time_budget,
    )
    held_loss = evaluate_loss(model, held_stream, config.seq_len, windows=64, device=dev)
    model.to(torch.float16).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    metrics: dict[str, object] = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": steps,
        "train_tokens_seen": steps * config.batch_size * config.seq_len,
        "corpus_tokens": len(train_stream),
        "held_out_loss_nats_per_token": round(held_loss, 4),
        "held_out_perplexity": round(math.exp(held_loss), 2),
        "resumed_from_step": resumed_from,
        "wall_seconds_this_run": round(time.perf_counter() - started, 1),
        "device": str(dev),
        "config": config.__dict__,
        "corpus": corpus.manifest,
    }
    (out / "training_metrics.json").write_text(json.dumps(metrics, indent=2))
    checkpoints.remove()
    return metrics
