"""The autoregressive verifier: any transformers causal LM, scored a block at a time.

A generation's KV cache holds every committed token except the newest one. Each call feeds
that newest token followed by the draft block, giving logits for the k draft positions plus
one bonus position; afterwards the cache is cropped back to exactly what was kept.

A call can also return the verifier's hidden states at chosen layers (``verifier_features``):
a feature-conditioned drafter reads them, as DFlash and EAGLE drafters read their target's.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

__all__ = ["Scores", "Verifier", "VerifierCache", "cache_keyword", "verifier_features"]


def cache_keyword(model: Any) -> str:
    """The forward() keyword for a KV cache: ``cache`` in newer transformers, else the old name."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def verifier_features(
    hidden_states: Sequence[torch.Tensor], layers: Sequence[int], raw: bool = False
) -> torch.Tensor:
    """The chosen layers' hidden states (``hidden_states[i]`` is the output of layer i, 0 the
    embeddings), concatenated: (..., T, len(layers) * hidden).

    Each is scaled to unit RMS unless ``raw``: the residual stream grows by an order of
    magnitude through the layers, and unit RMS keeps every layer's share of a token drafter's
    input comparable. A DFlash drafter normalises after its own projection and reads them raw.
    """
    if raw:
        return torch.cat([hidden_states[layer] for layer in layers], dim=-1)
    parts = []
    for layer in layers:
        h = hidden_states[layer].float()
        parts.append(h * torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + 1e-6))
    return torch.cat(parts, dim=-1)


class Scores(NamedTuple):
    """One verifier call: next-token logits (T, V), and features (T, F) when asked for."""

    logits: torch.Tensor
    features: torch.Tensor | None = None


class VerifierCache:
    """One generation's KV cache and the number of tokens it holds."""

    def __init__(self, model: Any) -> None:
        from transformers import DynamicCache

        self.kv: Any = DynamicCache(config=model.config)
        # Sliding-window layers drop old states unless told to keep them for a rollback.
        self.kv.activate_past_recording()
        self.length = 0

    def release(self) -> None:
        """Drop the tensors now rather than when the session is garbage-collected."""
        self.kv = None
        self.length = 0

    def rollback(self, length: int) -> None:
        """Forget everything after the first ``length`` tokens."""
        if length < self.length:
            self.kv.crop(length - self.length)  # a negative count removes that many tokens
            self.length = length


class Verifier:
    """Wraps a causal LM: its device, end-of-sequence ids, context limit and forward pass."""

    def __init__(self, model: Any, tokenizer: Any = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = model.config
        self.device = next(model.parameters()).device
        head = model.get_output_embeddings()
        # The logits' width: the output layer may be padded beyond the tokenizer's vocabulary.
        self.vocab_size = int(head.weight.shape[0] if head is not None else model.config.vocab_size)
        self.eos_ids = self._eos_ids(model, tokenizer)
        self.max_length = self._max_length(model.config)
        self._cache_keyword = cache_keyword(model)

    @staticmethod
    def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
        ids: set[int] = set()
        generation = getattr(model, "generation_config", None)
        eos = getattr(generation, "eos_token_id", None)
        if eos is None:
            eos = getattr(model.config, "eos_token_id", None)
        if eos is None and tokenizer is not None:
            eos = tokenizer.eos_token_id
        if isinstance(eos, int):
            ids.add(eos)
        elif eos is not None:
            ids.update(int(e) for e in eos)
        return frozenset(ids)

    @staticmethod
    def _max_length(config: Any) -> int | None:
        for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            value = getattr(config, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    def new_cache(self) -> VerifierCache:
        return VerifierCache(self.model)

    @torch.inference_mode()
    def forward(
        self,
        ids: torch.Tensor,
        cache: VerifierCache,
        feature_layers: Sequence[int] = (),
        feature_rows: int | None = None,
        raw_features: bool = False,
    ) -> Scores:
        """Append ``ids`` ((T,)) to the cache; their next-token logits (T, V), and with
        ``feature_layers`` the hidden-state features of each position, or of the last
        ``feature_rows`` (a long prompt's prefill needs only those); ``raw_features`` as in
        ``verifier_features``."""
        start = cache.length
        positions = torch.arange(start, start + ids.shape[0], device=self.device)
        out = self.model(
            input_ids=ids.to(self.device)[None],
            use_cache=True,
            position_ids=positions[None],
            output_hidden_states=bool(feature_layers),
            **{self._cache_keyword: cache.kv},
        )
        cache.length = start + ids.shape[0]
        features = None
        if feature_layers:
            rows = ids.shape[0] if feature_rows is None else min(feature_rows, ids.shape[0])
            hidden = [h[0, ids.shape[0] - rows :] for h in out.hidden_states]
            features = verifier_features(hidden, feature_layers, raw_features)
        return Scores(out.logits[0].float(), features)
