"""The autoregressive verifier: any transformers causal LM, scored a block at a time.

A generation's row of the KV cache (``BatchCache``) holds every committed token except the
newest one. Each call feeds, for every row of a batch, that newest token followed by the row's
draft block, giving logits for the k draft positions plus one bonus position; afterwards each
row's length is set back to exactly what was kept.

Verifiers whose layers keep a recurrent state (Mamba, Falcon-H1, Qwen3-Next, Jamba,
RecurrentGemma), or whose forward cannot read the batched cache's masks, keep a
per-generation ``StateCache`` instead and take turns (``_state_cache`` says how a recurrent
state is rolled back to the accepted prefix).

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
from ._config import StaticShapes
from ._state_cache import StateCache, has_recurrent_layers, recurrent_cache_problem
from ._static_shapes import StaticForward

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
        # Why this verifier cannot share the batched cache (None: it can).
        self.turns_reason = self._needs_own_caches(model.config)
        if self.turns_reason is None:
            self._check_attention(model)
            _adapt_alibi(model)
        else:
            logger.info(
                "each generation keeps its own cache and takes turns: %s", self.turns_reason
            )
        # Rotary scalings that pick their frequencies from the largest position in a forward
        # ("dynamic", "longrope"): a row's numbers would depend on its batch-mates and on how
        # its prompt was split, so such a verifier decodes one generation per forward and
        # reads a prompt at once.
        text = model.config.get_text_config()
        rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None)
        rope_type = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else None
        self.batchable = rope_type not in ("dynamic", "longrope") and self.turns_reason is None
        self._keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        pad = getattr(model.config, "pad_token_id", None)
        # The id fed where a row has nothing to feed (its output is never read).
        self.pad_id = int(pad) if isinstance(pad, int) and 0 <= pad < self.vocab_size else 0
        self.static: StaticForward | None = None

    def use_static_shapes(self, shapes: StaticShapes, width: int) -> None:
        """Run decode rounds on bucketed shapes (``_static_shapes``), ``width`` tokens a row;
        a verifier whose generations take turns keeps its dynamic forward."""
        if self.turns_reason is not None or not self.batchable:
            logger.info("static shapes are off: this verifier's generations take turns")
            return
        self.static = StaticForward(self.model, shapes, width, self.pad_id)

    @staticmethod
    def _needs_own_caches(config: Any) -> str | None:
        """Why the batched cache cannot serve this model, or None."""
        text = config.get_text_config()
        kinds = set(getattr(text, "layer_types", None) or ()) - {
            "full_attention",
            "sliding_attention",
        }
        if kinds or has_recurrent_layers(config):
            problem = recurrent_cache_problem()
            if problem is not None:
                from ._errors import ModelLoadError

                raise ModelLoadError(problem)
            named = ", ".join(sorted(kinds)) or "recurrent"
            return f"its {named} layers keep a state that a shared attention cache cannot hold"
        if getattr(text, "alibi", False):  # Falcon builds ALiBi from a 2-D mask only
            return "its ALiBi biases are built from a 2-D attention mask"
        return None

    @staticmethod
    def _check_attention(model: Any) -> None:
        """The batched cache passes 4-D masks, which sdpa and eager attention read; any other
        implementation is switched to sdpa. Eager attention stays eager (Gemma 2's
        soft-capping exists there only). Grouped-query sdpa attention is switched to
        ``packed_gqa_sdpa`` (see ``_attention``), which reads a verified block without copying
        the cache."""
        from ._attention import PACKED_GQA, use_packed_gqa

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

    def new_cache(self, max_positions: int | None = None) -> BatchCache | StateCache:
        """An empty cache; ``max_positions`` bounds a batched cache's allocation."""
        if self.turns_reason is not None:
            return StateCache(self.model.config)
        return BatchCache(self.model.config, max_positions)

    @torch.inference_mode()
    def forward(
        self,
        ids: torch.Tensor,
        cache: BatchCache | StateCache,
        start: int = 0,
        feature_layers: Sequence[int] = (),
        raw_features: bool = False,
        *,
        prefill: bool = False,
        feature_rows: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Feed ``ids`` ((B, T)) to cache rows ``[start, start + B)`` at their lengths.

        Returns the next-token logits (B, T, V) in the model's dtype (judging turns the rows
        it samples to float32; a bf16 batch is not copied whole) and, with
        ``feature_layers``, each row's features (B, T, F) (``verifier_features``; the caller
        picks the rows it needs).
        Lengths are not advanced: the caller sets what each row keeps. A ``prefill`` needs
        no logits (only the last position's are made), and features only for its last
        ``feature_rows`` positions.
        """
        rows, fed = ids.shape
        limit = self.max_length
        hidden: Sequence[torch.Tensor] | None
        if isinstance(cache, StateCache):
            logits, hidden = cache.forward(
                self.model,
                self._cache_keyword,
                ids.to(self.device),
                start,
                hidden_states=bool(feature_layers),
                keep_logits=(1 if prefill else fed) if self._keeps_logits else None,
                max_length=limit,
                prefill=prefill,
            )
        elif (
            self.static is not None and not prefill and self.static.serves(cache, start, rows, fed)
        ):
            logits, hidden = self.static(
                ids,
                cache,
                config=self.config,
                max_length=limit,
                cache_keyword=self._cache_keyword,
                hidden_states=bool(feature_layers),
            )
        else:
            positions = cache.prepare(start, rows, fed, self.device)
            masks = attention_masks(
                self.config, positions, cache.span, self.model.dtype, self.device
            )
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
            logits, hidden = out.logits, out.hidden_states
        features = None
        if feature_layers:
            assert hidden is not None
            if feature_rows is not None:
                hidden = [h[:, max(0, fed - feature_rows) :] for h in hidden]
            features = verifier_features(hidden, feature_layers, raw_features)
        return logits, features


def _adapt_alibi(model: Any) -> None:
    """BLOOM builds its ALiBi biases from a 2-D padding mask; given the batched cache's 4-D
    mask it fails. A row of that cache holds position ``j`` at index ``j``, so the biases of
    an all-ones mask over the span are each row's own (softmax ignores the constant shift of
    ALiBi, and the additive mask hides the stale slots)."""
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    build = getattr(base, "build_alibi_tensor", None)
    if base is None or build is None:
        return

    def build_over_span(attention_mask: torch.Tensor, num_heads: int, dtype: torch.dtype) -> Any:
        if attention_mask.dim() == 4:
            batch, span = attention_mask.shape[0], attention_mask.shape[-1]
            attention_mask = attention_mask.new_ones((batch, span), dtype=torch.long)
        return build(attention_mask, num_heads, dtype)

    base.build_alibi_tensor = build_over_span
