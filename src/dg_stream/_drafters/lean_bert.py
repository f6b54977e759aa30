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
    """``(T,) ids -> (last, V) logits`` with BERT weights, no dropout; rows of different
    lengths batch through ``encode_batch`` and ``head``."""

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
        x = self._encode(ids[None], None if extra is None else extra[None], None)[0]  # (T, H)
        return self.head(x[ids.shape[0] - last :])  # only the drafted positions need the head

    def encode_batch(
        self, ids: torch.Tensor, lengths: torch.Tensor, extra: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Rows of different lengths, right-padded: ids (B, T), lengths (B,) -> hidden states
        (B, T, H); each row's positions attend to that row's first ``lengths`` only, so a row
        reads as it does alone."""
        keys = torch.arange(ids.shape[1], device=ids.device)[None, :] < lengths[:, None]
        return self._encode(ids, extra, keys)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Hidden states (..., H) -> vocabulary logits (..., V)."""
        y = self._norm(F.gelu(F.linear(x, *self.head_dense)), self.head_norm)
        return F.linear(y, *self.decoder)

    def _encode(
        self, ids: torch.Tensor, extra: torch.Tensor | None, keys: torch.Tensor | None
    ) -> torch.Tensor:
        """(B, T) ids -> (B, T, H); ``keys`` (B, T) marks the positions a row may attend to."""
        b, t = ids.shape
        embeds = self.word[ids] if extra is None else self.word[ids] + extra
        x = self._norm(embeds + self.position[:t], self.emb_norm)  # (B, T, H)
        h = self.heads
        bias = None
        if keys is not None:  # (B, 1, 1, T): padding is never attended to
            bias = torch.zeros(keys.shape, dtype=x.dtype, device=x.device)
            bias = bias.masked_fill(~keys, torch.finfo(x.dtype).min)[:, None, None, :]
        for qkv_w, qkv_b, o_w, o_b, norm1, i_w, i_b, f_w, f_b, norm2 in self.layers:
            qkv = F.linear(x, qkv_w, qkv_b).view(b, t, 3, h, -1).permute(2, 0, 3, 1, 4)
            q, k, v = qkv  # (B, h, T, d) each
            # Plain attention (bidirectional): at this size SDPA's checks cost more than the
            # arithmetic.
            scores = (q @ k.transpose(-1, -2)) * self.scale  # (B, h, T, T)
            if bias is not None:
                scores = scores + bias
            attn = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(b, t, -1)
            x = self._norm(x + F.linear(attn, o_w, o_b), norm1)
            x = self._norm(x + F.linear(F.gelu(F.linear(x, i_w, i_b)), f_w, f_b), norm2)
        return x


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
