"""Packed grouped-query attention computes what transformers' sdpa attention computes."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _models import tiny_causal_lm
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from dg_stream._attention import PACKED_GQA, packed_gqa_sdpa
from dg_stream._verifier import Verifier


class _Layer(torch.nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


@settings(max_examples=40, deadline=None)
@given(
    kv_heads=st.integers(1, 3),
    groups=st.integers(1, 4),
    tokens=st.integers(1, 9),
    span_extra=st.integers(0, 40),
    batch=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_packed_equals_transformers_sdpa(
    kv_heads: int, groups: int, tokens: int, span_extra: int, batch: int, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    dim, span = 8, tokens + span_extra
    query = torch.randn(batch, kv_heads * groups, tokens, dim, generator=g)
    key = torch.randn(batch, kv_heads, span, dim, generator=g)
    value = torch.randn(batch, kv_heads, span, dim, generator=g)
    # Each row sees a random prefix of the span, as rows of different lengths do.
    lengths = torch.randint(1, span + 1, (batch, 1, tokens, 1), generator=g)
    allowed = torch.arange(span)[None, None, None, :] < lengths
    mask = torch.zeros(batch, 1, tokens, span).masked_fill(~allowed, torch.finfo(torch.float32).min)
    layer = _Layer(groups)
    want, _ = sdpa_attention_forward(layer, query, key, value, mask, scaling=dim**-0.5)
    got, _ = packed_gqa_sdpa(layer, query, key, value, mask, scaling=dim**-0.5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_verifiers_with_shared_key_value_heads_use_it(tiny_tok: Any) -> None:
    model = tiny_causal_lm("llama", len(tiny_tok))  # 4 query heads over 2 key/value heads
    model.set_attn_implementation("sdpa")
    Verifier(model)
    assert model.config._attn_implementation == PACKED_GQA
    Verifier(model)  # a second wrapper of the same model keeps it
    assert model.config._attn_implementation == PACKED_GQA


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_transformers_own_forwards_are_unchanged(tiny_tok: Any, arch: str) -> None:
    """Its name gets sdpa's masks too (a sliding window included), so a plain forward of the
    switched model gives what sdpa gave."""
    model = tiny_causal_lm(arch, len(tiny_tok))
    ids = torch.randint(5, len(tiny_tok) - 5, (2, 40))  # past mistral's window of 24
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        want = model(input_ids=ids).logits
    model.set_attn_implementation(PACKED_GQA)
    with torch.no_grad():
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("implementation", ["eager"])
def test_other_attention_is_left_alone(tiny_tok: Any, implementation: str) -> None:
    model = tiny_causal_lm("llama", len(tiny_tok))
    model.set_attn_implementation(implementation)
    Verifier(model)
    assert model.config._attn_implementation == implementation
