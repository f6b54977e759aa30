"""The autoregressive verifier: any transformers causal LM, scored a block at a time.

A generation's row of the KV cache (``BatchCache``) holds every committed token except the
newest one. Each call feeds, for every row of a batch, that newest token followed by the row's
draft block, giving logits for the k draft positions plus one bonus position; afterwards each
row's length is set back to exactly what was kept.

A call can also return the verifier's hidden states at chosen layers (``verifier_features``):
a feature-conditioned drafter reads them, as DFlash and EAGLE drafters read their target's.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from typing import Any

import torch

from ._batch_cache import BatchCache, attention_masks

__all__ = ["Verifier", "cache_keyword", "verifier_features"]

logger = logging.getLogger("dg_stream.verifier")


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
        self._check_attention(model)
        # Rotary scalings that pick their frequencies from the largest position in a forward
        # ("dynamic", "longrope"): a row's numbers would depend on its batch-mates and on how
        # its prompt was split, so such a verifier decodes one generation per forward and
        # reads a prompt at once.
        text = model.config.get_text_config()
        rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None)
        rope_type = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else None
        self.batchable = rope_type not in ("dynamic", "longrope")
        self._keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters

    @staticmethod
    def _check_attention(model: Any) -> None:
        """The batched cache passes 4-D masks, which sdpa and eager attention read; any other
        implementation is switched to sdpa, and attention layers other than full and
        sliding-window ones are refused. Grouped-query sdpa attention is switched to
        ``packed_gqa_sdpa`` (see ``_attention``), which reads a verified block without copying
        the cache."""
        from ._attention import PACKED_GQA, use_packed_gqa
        from ._errors import ModelLoadError

        text = model.config.get_text_config()
        kinds = set(getattr(text, "layer_types", None) or ())
        unsupported = kinds - {"full_attention", "sliding_attention"}
        if unsupported:
            raise ModelLoadError(
                f"the verifier has {', '.join(sorted(unsupported))} layers; dg_stream's cache "
                "serves full and sliding-window attention only"
            )
        implementation = getattr(model.config, "_attn_implementation", None)
        if implementation not in (None, "sdpa", "eager", PACKED_GQA):
            logger.info("switching the verifier from %s to sdpa attention", implementation)
            model.set_attn_implementation("sdpa")
        use_packed_gqa(model)

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

    def new_cache(self) -> BatchCache:
        return BatchCache(self.model.config)

    @torch.inference_mode()
    def forward(
        self,
        ids: torch.Tensor,
        cache: BatchCache,
        start: int = 0,
        feature_layers: Sequence[int] = (),
        raw_features: bool = False,
        *,
        prefill: bool = False,
        feature_rows: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Feed ``ids`` ((B, T)) to cache rows ``[start, start + B)`` at their lengths.

        Returns the next-token logits (B, T, V) in float32 and, with ``feature_layers``, each
        row's features (B, T, F) (``verifier_features``; the caller picks the rows it needs).
        Lengths are not advanced: the caller sets what each row keeps. A ``prefill`` needs
        no logits (only the last position's are made), and features only for its last
        ``feature_rows`` positions.
        """
        rows, fed = ids.shape
        positions = cache.prepare(start, rows, fed, self.device)
        masks = attention_masks(self.config, positions, cache.span, self.model.dtype, self.device)
        limit = self.max_length
        if limit is not None:  # padding slots may run past the table; their output is unused
            positions = positions.clamp_max(limit - 1)
        out = self.model(
            input_ids=ids.to(self.device),
            attention_mask=masks,
            position_ids=positions.to(self.device),
            use_cache=True,
            output_hidden_states=bool(feature_layers),
            **({"logits_to_keep": 1} if prefill and self._keeps_logits else {}),
            **{self._cache_keyword: cache},
        )
        features = None
        if feature_layers:
            hidden = out.hidden_states
            if feature_rows is not None:
                hidden = [h[:, max(0, fed - feature_rows) :] for h in hidden]
            features = verifier_features(hidden, feature_layers, raw_features)
        return out.logits.float(), features
