"""The lean BERT forward reproduces transformers' forward, or is not used."""

from __future__ import annotations

from typing import Any

import torch
from _models import tiny_masked_lm

from dg_stream._drafters import DiffusionDrafter
from dg_stream._drafters.lean_bert import maybe_lean


def test_lean_forward_matches_transformers(tiny_tok: Any) -> None:
    model = tiny_masked_lm(len(tiny_tok), tiny_tok.mask_token_id)
    lean = maybe_lean(model)
    assert lean is not None
    ids = torch.randint(0, len(tiny_tok), (30,))
    with torch.inference_mode():
        expected = model(input_ids=ids[None]).logits[0, -7:]
        assert torch.allclose(lean(ids, 7), expected, atol=1e-4, rtol=1e-4)


def test_unsupported_variants_fall_back(tiny_tok: Any) -> None:
    model = tiny_masked_lm(len(tiny_tok), tiny_tok.mask_token_id)
    model.config.hidden_act = "relu"  # the lean path implements exact GELU only
    assert maybe_lean(model) is None
    drafter = DiffusionDrafter(model, mask_token_id=tiny_tok.mask_token_id)
    assert drafter._lean is None  # still drafts, through transformers' own forward
