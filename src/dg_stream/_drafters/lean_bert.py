"""A lean inference forward for BERT masked LMs, the default drafter's architecture.

A drafter must cost a small fraction of a verifier step. transformers' BERT forward spends most
of a tiny model's time in Python and module overhead; this forward reads the same weights with
fused projections and computes the vocabulary head only for the positions being drafted. It is
used only after matching the original forward on a probe input (see ``maybe_lean``).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["LeanBertMLM", "maybe_lean"]

logger = logging.getLogger("dg_stream.drafters")

#: How far the lean forward's logits may stray from transformers' on the probe, as a fraction
#: of the largest logit, by the model's dtype: reduced precision rounds the two differently
#: ordered computations apart (measured on the embedded drafter, CPU: 1.2% in bfloat16, 0.15%
#: in float16); a wrong forward is off by the size of the logits themselves.
TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}


class LeanBertMLM:
    """``(T,) ids -> (last, V) logits`` with BERT weights, no dropout, no masks."""

    def __init__(self, model: Any) -> None:
        bert, head = model.bert, model.cls.predictions
        emb = bert.embeddings
        self.word = emb.word_embeddings.weight
        # Position and token-type embeddings fold into one table: types are always 0 here.
        self.position = emb.position_embeddings.weight + emb.token_type_embeddings.weight[0]
        self.emb_norm = (emb.LayerNorm.weight, emb.LayerNorm.bias, emb.LayerNorm.eps)
        self.heads = model.config.num_attention_heads
        self.scale = (model.config.hidden_size // self.heads) ** -0.5
        self.layers = []
        for layer in bert.encoder.layer:
            att = layer.attention
            qkv_w = torch.cat([att.self.query.weight, att.self.key.weight, att.self.value.weight])
            qkv_b = torch.cat([att.self.query.bias, att.self.key.bias, att.self.value.bias])
            out, ffn_out = att.output, layer.output
            self.layers.append((
                qkv_w, qkv_b,
                out.dense.weight, out.dense.bias,
                (out.LayerNorm.weight, out.LayerNorm.bias, out.LayerNorm.eps),
                layer.intermediate.dense.weight, layer.intermediate.dense.bias,
                ffn_out.dense.weight, ffn_out.dense.bias,
                (ffn_out.LayerNorm.weight, ffn_out.LayerNorm.bias, ffn_out.LayerNorm.eps),
            ))  # fmt: skip
        transform = head.transform
        self.head_dense = (transform.dense.weight, transform.dense.bias)
        self.head_norm = (
            transform.LayerNorm.weight,
            transform.LayerNorm.bias,
            transform.LayerNorm.eps,
        )
        self.decoder = (head.decoder.weight, head.decoder.bias)

    @staticmethod
    def _norm(x: torch.Tensor, params: tuple[torch.Tensor, torch.Tensor, float]) -> torch.Tensor:
        weight, bias, eps = params
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)

    def __call__(
        self, ids: torch.Tensor, last: int, extra: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``extra`` ((T, H)) is added to the token embeddings (projected verifier features)."""
        t = ids.shape[0]
        embeds = self.word[ids] if extra is None else self.word[ids] + extra
        x = self._norm(embeds + self.position[:t], self.emb_norm)  # (T, H)
        h = self.heads
        for qkv_w, qkv_b, o_w, o_b, norm1, i_w, i_b, f_w, f_b, norm2 in self.layers:
            q, k, v = F.linear(x, qkv_w, qkv_b).view(t, 3, h, -1).permute(1, 2, 0, 3)  # (h, T, d)
            # Plain attention (bidirectional, no mask): at this size SDPA's checks cost more
            # than the arithmetic.
            weights = torch.softmax((q @ k.transpose(1, 2)) * self.scale, dim=-1)  # (h, T, T)
            attn = (weights @ v).transpose(0, 1).reshape(t, -1)  # (T, H)
            x = self._norm(x + F.linear(attn, o_w, o_b), norm1)
            x = self._norm(x + F.linear(F.gelu(F.linear(x, i_w, i_b)), f_w, f_b), norm2)
        y = x[t - last :]  # only the drafted positions need the vocabulary head
        y = self._norm(F.gelu(F.linear(y, *self.head_dense)), self.head_norm)
        return F.linear(y, *self.decoder)  # (last, V)


def maybe_lean(model: Any) -> LeanBertMLM | None:
    """A lean forward for a standard BERT masked LM that reproduces it, else ``None``.

    A BERT masked LM left on transformers' slower forward is logged (``dg_stream.drafters``,
    warning), with the reason.
    """
    if type(model).__name__ != "BertForMaskedLM":
        return None
    lean = _checked_lean(model)
    if isinstance(lean, str):
        logger.warning("the drafter's lean BERT forward is off: %s; drafting is slower", lean)
        return None
    return lean


def _checked_lean(model: Any) -> LeanBertMLM | str:
    """The lean forward if it reproduces ``model`` on a probe, else why not."""
    config = model.config
    if getattr(config, "hidden_act", None) != "gelu":
        return f"hidden_act is {getattr(config, 'hidden_act', None)!r}, not 'gelu'"
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        return f"position_embedding_type is {config.position_embedding_type!r}"
    parameter = next(model.parameters())
    try:
        lean = LeanBertMLM(model)
        probe = torch.randint(0, config.vocab_size, (min(12, config.max_position_embeddings),))
        probe = probe.to(parameter.device)
        with torch.inference_mode():
            expected = model(input_ids=probe[None]).logits[0, -4:].float()
            got = lean(probe, 4).float()
    except (AttributeError, RuntimeError, ValueError) as exc:
        return f"the probe forward failed ({type(exc).__name__}: {exc})"
    tolerance = TOLERANCE.get(parameter.dtype, TOLERANCE[torch.bfloat16])
    error = float((got - expected).abs().max())
    scale = max(1.0, float(expected.abs().max()))
    if not error <= tolerance * scale:  # NaNs fail too
        return (
            f"its logits differ from transformers' by up to {error:.3g} of at most {scale:.3g} "
            f"in {parameter.dtype} (tolerance {tolerance:g} of the largest)"
        )
    return lean
