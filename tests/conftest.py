"""Shared fixtures: a tiny tokenizer and tiny random-init models (no downloads)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from _models import tiny_causal_lm, tiny_masked_lm, tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_tok(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A 300-token byte-level BPE tokenizer with eos (0), pad (1) and mask (2)."""
    return tiny_tokenizer(str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="session")
def tiny_verifier(tiny_tok: Any) -> Any:
    return tiny_causal_lm("llama", len(tiny_tok))


@pytest.fixture(scope="session")
def tiny_drafter(tiny_tok: Any) -> Any:
    return tiny_masked_lm(len(tiny_tok), tiny_tok.mask_token_id)


@pytest.fixture(scope="session")
def tiny_backend(tiny_verifier: Any, tiny_drafter: Any, tiny_tok: Any) -> Any:
    """A LocalBackend over the tiny Llama verifier and tiny BERT diffusion drafter."""
    from dg_stream import LocalBackend

    return LocalBackend(tiny_verifier, tiny_drafter, tokenizer=tiny_tok, block_size=4)


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> None:
    """Tiny models gain nothing from threads; one keeps the suite steady on small machines."""
    import torch

    torch.set_num_threads(1)
