"""Incremental detokenization: exact, UTF-8 safe, at every split."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from _models import TEXT
from hypothesis import given, settings
from hypothesis import strategies as st

from dg_stream._detokenize import IncrementalDetokenizer

SAMPLES = [TEXT[:120], "naïve café — 日本語のテキスト 🙂🙃 ✓✓", "x = 'é'\n" * 3, "🙂"]


def _stream(tokenizer: Any, ids: list[int], cuts: list[int], context: list[int] = ()) -> str:  # type: ignore[assignment]
    detok = IncrementalDetokenizer(tokenizer, context)
    bounds = sorted({0, len(ids), *[c for c in cuts if c <= len(ids)]})
    out = ""
    for a, b in itertools.pairwise(bounds):
        piece = detok.feed(ids[a:b])
        if a != bounds[-2]:  # a piece may never end in a broken character mid-stream
            assert not piece.endswith("\ufffd")
        out += piece
    return out + detok.flush()


@pytest.mark.parametrize("text", SAMPLES)
def test_every_single_split(tiny_tok: Any, text: str) -> None:
    ids = tiny_tok(text)["input_ids"]
    assert _stream(tiny_tok, ids, list(range(len(ids)))) == tiny_tok.decode(ids)
    for cut in range(len(ids) + 1):
        assert _stream(tiny_tok, ids, [cut]) == tiny_tok.decode(ids)


def test_multibyte_characters_split_across_tokens_never_emit_replacement(tiny_tok: Any) -> None:
    text = "🙂日本"
    ids = tiny_tok(text)["input_ids"]
    assert len(ids) > 3  # byte-level BPE with a 300-token vocabulary splits these characters
    detok = IncrementalDetokenizer(tiny_tok)
    pieces = [detok.feed([i]) for i in ids] + [detok.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


@settings(max_examples=60, deadline=None)
@given(text=st.text(min_size=1, max_size=30), cuts=st.lists(st.integers(0, 120), max_size=10))
def test_any_text_any_chunking(tiny_tok: Any, text: str, cuts: list[int]) -> None:
    ids = tiny_tok(text)["input_ids"]
    assert _stream(tiny_tok, ids, cuts) == tiny_tok.decode(ids)


def test_context_gives_sentencepiece_style_leading_spaces(tmp_path: Any) -> None:
    """With a Metaspace (SentencePiece-like) tokenizer, text continues the prompt exactly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    prompt, completion = fast("def add(a,")["input_ids"], fast(" b): return a")["input_ids"]
    full = fast.decode(prompt + completion)
    for cut in range(len(completion) + 1):
        text = _stream(fast, completion, [cut], context=prompt)
        assert fast.decode(prompt) + text == full


def test_peek_previews_without_committing(tiny_tok: Any) -> None:
    ids = tiny_tok("hello world")["input_ids"]
    detok = IncrementalDetokenizer(tiny_tok)
    first = detok.feed(ids[:2])
    preview = detok.peek(ids[2:])
    assert first + preview == "hello world"
    assert first + detok.feed(ids[2:]) + detok.flush() == "hello world"
