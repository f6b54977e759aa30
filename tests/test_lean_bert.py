"""The lean BERT forward reproduces transformers' forward, or is not used."""

from __future__ import annotations

import logging
from typing import Any

import pytest
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reduced_precision_keeps_the_lean_forward(dtype: torch.dtype, tiny_tok: Any) -> None:
    """bfloat16 (CUDA's default) and float16 round apart from transformers, within tolerance."""
    from transformers import AutoModelForMaskedLM

    from dg_stream._backends.local import default_model_dir

    for model in (
        tiny_masked_lm(len(tiny_tok), tiny_tok.mask_token_id),
        # The embedded drafter: larger logits, larger rounding.
        AutoModelForMaskedLM.from_pretrained(default_model_dir() / "drafter"),
    ):
        model = model.to(dtype)
        for seed in range(5):  # each call probes with fresh random ids
            torch.manual_seed(seed)
            assert maybe_lean(model) is not None, (dtype, seed)


def test_the_lean_forward_being_off_is_logged(
    tiny_tok: Any, caplog: pytest.LogCaptureFixture
) -> None:
    model = tiny_masked_lm(len(tiny_tok), tiny_tok.mask_token_id)
    with caplog.at_level(logging.WARNING, logger="dg_stream.drafters"):
        assert maybe_lean(model) is not None
        assert caplog.records == []
        model.config.hidden_act = "relu"
        assert maybe_lean(model) is None
        assert "lean BERT forward is off: hidden_act is 'relu'" in caplog.text
        model.config.hidden_act = "gelu"
        model.train()  # dropout: transformers' forward is one the lean one does not reproduce
        assert maybe_lean(model) is None
    assert "its logits differ from transformers'" in caplog.text
