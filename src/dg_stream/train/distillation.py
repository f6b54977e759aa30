"""What every drafter trainer shares: the training config and the distillation data.

``DrafterTrainingConfig`` describes a drafter run of any architecture, and ``Distillation`` the
verifier's greedy continuations (with its hidden states for a drafter that reads them) that
every architecture learns from: written once by ``distillation_data``, kept between runs by
``save_distillation`` / ``load_distillation``. ``train.drafter`` (diffusion and causal drafters)
and ``train.dflash`` both build on this module and neither imports the other. (``distill_data``
is the sharded, batch-speed form that ``dg-stream train distil`` streams from.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from .._verifier import cache_keyword, verifier_features
from ._loop import TokenStream, progress

__all__ = [
    "Distillation",
    "DrafterTrainingConfig",
    "distillation_data",
    "greedy_continuations",
    "load_distillation",
    "save_distillation",
]


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
    # Verifier layers whose hidden states the drafter reads beside the tokens (DFlash-style
    # conditioning; 0 is the embeddings); empty for a drafter that reads tokens alone.
    feature_layers: tuple[int, ...] = ()
    # How many context positions before the newest token get their features (the newest has
    # none yet); 0: every one in the window.
    feature_window: int = 0
    cpu_bf16: bool = False  # bf16 autocast when training on CPU too
    # A diffusion drafter to start from (same tokenizer), e.g. a token-only drafter that
    # learns to read verifier features; its window and block size are kept.
    init_from: str | None = None
    # DFlash: blocks read from each sequence in one pass.
    blocks_per_row: int = 8

    @property
    def context_length(self) -> int:
        """Corpus tokens before each continuation: at least a full drafter window, so every
        training window lies inside its row."""
        return max(self.context_tokens, self.window)

    @property
    def features_read(self) -> int:
        """Rows of features a drafter input holds (see ``feature_window``)."""
        return min(self.feature_window or self.window - 1, self.window - 1)

    @property
    def feature_positions(self) -> int:
        """Positions whose verifier features are kept: ``features_read`` before the newest
        context token, and the newest and every continuation position but the last."""
        return self.features_read + self.continuation_tokens


class Distillation(NamedTuple):
    """Corpus contexts continued by the verifier.

    ids: (N, C + continuation) tokens. features: (N, P, F) float16 verifier features of the
    last P positions that have them (every position but the final token), for a
    feature-conditioned drafter; ``None`` otherwise. soft: the verifier's most likely ids and
    their probabilities at each continuation position, (N, continuation, K) each (int64,
    float16), or ``None``.
    """

    ids: torch.Tensor
    features: torch.Tensor | None = None
    soft: tuple[torch.Tensor, torch.Tensor] | None = None


@torch.inference_mode()
def greedy_continuations(
    verifier: Any,
    contexts: torch.Tensor,
    new_tokens: int,
    feature_layers: Sequence[int] = (),
    feature_positions: int = 0,
    raw_features: bool = False,
) -> Distillation:
    """(N, C) contexts continued greedily by ``new_tokens``; with ``feature_layers``, the
    features of the last ``feature_positions`` positions that have them (all but the final
    token), raw or at unit RMS as ``verifier_features`` says."""
    from transformers import DynamicCache

    kw = {
        cache_keyword(verifier): DynamicCache(config=verifier.config),
        "use_cache": True,
        "output_hidden_states": bool(feature_layers),
    }
    out = verifier(input_ids=contexts, **kw)
    ids, features = [contexts], []
    for i in range(new_tokens):
        if feature_layers:  # only the positions that are kept
            states = [h[:, max(0, h.shape[1] - feature_positions) :] for h in out.hidden_states]
            features.append(verifier_features(states, feature_layers, raw_features).half())
        token = out.logits[:, -1].argmax(dim=-1, keepdim=True)  # (N, 1)
        ids.append(token)
        if i < new_tokens - 1:  # the final token's own forward would be wasted
            out = verifier(input_ids=token, **kw)
    if not feature_layers:
        return Distillation(torch.cat(ids, dim=1))
    kept = torch.cat(features, dim=1)
    return Distillation(torch.cat(ids, dim=1), kept[:, kept.shape[1] - feature_positions :])


def distillation_data(
    verifier: Any,
    stream: TokenStream,
    config: DrafterTrainingConfig,
    generator: torch.Generator,
    device: torch.device,
) -> Distillation:
    """``config.sequences`` corpus contexts continued by the verifier (features included
    when the drafter reads them)."""
    ids, features = [], []
    bar = progress(config.sequences, 0, "verifier continuations")
    for start in range(0, config.sequences, config.generation_batch):
        n = min(config.generation_batch, config.sequences - start)
        contexts = stream.windows(n, config.context_length, generator).to(device)
        batch = greedy_continuations(
            verifier,
            contexts,
            config.continuation_tokens,
            config.feature_layers,
            config.feature_positions,
            raw_features=config.architecture == "dflash",
        )
        ids.append(batch.ids.cpu())
        if batch.features is not None:
            features.append(batch.features.cpu())
        bar.update(n)
    bar.close()
    return Distillation(torch.cat(ids), torch.cat(features) if features else None)


def save_distillation(path: Path, data: Distillation, config: DrafterTrainingConfig) -> None:
    # The layout travels with the ids: a resumed or reusing run must read it the same way.
    torch.save(
        {
            "ids": data.ids,
            "continuation_tokens": config.continuation_tokens,
            "features": data.features,
            "feature_layers": list(config.feature_layers),
            "raw_features": config.architecture == "dflash",
        },
        path,
    )


def load_distillation(path: Path, config: DrafterTrainingConfig) -> Distillation:
    """Kept continuations, refused with a clear error when this run would read them wrongly."""
    saved = torch.load(path, weights_only=True)  # tensors and plain values: no code runs
    # A drafter that reads tokens only can learn from any continuations (features dropped);
    # stored features end at the same position whatever window they were kept for, so a
    # smaller window takes their tail.
    features = saved.get("features") if config.feature_layers else None
    if features is not None and features.shape[1] >= config.feature_positions:
        features = features[:, features.shape[1] - config.feature_positions :]
    data = Distillation(saved["ids"], features)
    problem = None
    if saved["continuation_tokens"] != config.continuation_tokens:
        problem = (
            f"holds continuations of {saved['continuation_tokens']} tokens, "
            f"not {config.continuation_tokens}"
        )
    elif int(data.ids.shape[1]) - config.max_block < config.window:
        problem = f"holds rows too short for the drafter window ({config.window}) and a block"
    elif config.feature_layers and tuple(saved.get("feature_layers") or ()) != tuple(
        config.feature_layers
    ):
        problem = (
            f"holds features of verifier layers {saved.get('feature_layers') or []}, "
            f"not {list(config.feature_layers)}"
        )
    elif data.features is not None and bool(saved.get("raw_features")) != (
        config.architecture == "dflash"
    ):
        problem = "holds features scaled for another drafter architecture"
    elif data.features is not None and data.features.shape[1] < config.feature_positions:
        problem = f"holds features for fewer than {config.features_read} context positions"
    elif config.feature_layers and data.features is None:
        problem = "holds no verifier features"
    if problem:
        raise ValueError(f"{path} {problem}; delete it to generate new continuations")
    return data
