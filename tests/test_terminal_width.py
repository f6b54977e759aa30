"""The draft preview measures text in terminal cells with wcwidth: the backspaces that take a
draft back match the cells it took, also for emoji ZWJ sequences (👨‍👩‍👧, 2 cells, not 6) and
emoji with variation selector 16 (❤️, 2 cells, not 1), so the erase neither eats committed
text nor leaves pieces of the draft behind."""

from __future__ import annotations

import io

import pytest

from dg_stream._chunks import Chunk
from dg_stream.cli import TextRenderer, _cells

FAMILY = "\U0001f468\u200d\U0001f469\u200d\U0001f467"  # man ZWJ woman ZWJ girl
HEART = "\u2764\ufe0f"  # heavy black heart + VS16


@pytest.mark.parametrize(
    ("text", "cells"),
    [
        (FAMILY, 2),
        (HEART, 2),
        ("\u2764", 1),  # without VS16: text presentation, one cell
        ("\U0001f44d\U0001f3fd", 2),  # thumbs up + skin tone modifier
        ("\U0001f1eb\U0001f1f7", 2),  # a flag: two regional indicators
        ("中文", 4),
        ("e\u0301", 1),  # combining accent
        ("a\x07b", 2),  # a control character takes no cell
        ("ab\tc", 9),
    ],
)
def test_cells(text: str, cells: int) -> None:
    assert _cells(text) == cells


def _renderer(
    monkeypatch: pytest.MonkeyPatch, columns: int = 80
) -> tuple[TextRenderer, io.StringIO]:
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("COLUMNS", str(columns))
    out = io.StringIO()
    return TextRenderer(out, preview=True), out


def _erase(cells: int) -> str:
    return "\b" * cells + TextRenderer.CLEAR


@pytest.mark.parametrize("draft", [f"{FAMILY} {HEART} done", f"{HEART}{HEART}", FAMILY * 3])
def test_the_erase_takes_back_exactly_the_cells_the_draft_took(
    monkeypatch: pytest.MonkeyPatch, draft: str
) -> None:
    renderer, out = _renderer(monkeypatch)
    renderer.chunk(Chunk(text="family: ", draft=draft))
    assert renderer.column == 8
    assert out.getvalue() == f"family: {TextRenderer.DIM}{draft}{TextRenderer.RESET}"
    start = len(out.getvalue())
    renderer.chunk(Chunk(text=FAMILY))
    assert out.getvalue()[start:] == _erase(_cells(draft)) + FAMILY
    assert renderer.column == 10


def test_a_sequence_split_across_chunks_is_measured_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    renderer, _ = _renderer(monkeypatch)
    renderer.chunk(Chunk(text="x = '\U0001f468\u200d"))
    renderer.chunk(Chunk(text="\U0001f469\u200d\U0001f467"))
    renderer.chunk(Chunk(text="\u2764"))
    assert renderer.column == 5 + 2 + 1
    renderer.chunk(Chunk(text="\ufe0f' "))  # VS16 arrives later: the heart widens
    assert renderer.column == 5 + 2 + 2 + 2  # the heart, a quote and a space
    renderer.chunk(Chunk(text="\nab"))
    assert renderer.column == 2


def test_the_draft_is_cut_to_the_cells_left_on_the_line(monkeypatch: pytest.MonkeyPatch) -> None:
    renderer, out = _renderer(monkeypatch, columns=12)
    renderer.chunk(Chunk(text="abcdefgh", draft=FAMILY * 3))  # 3 cells usable (never the last)
    assert out.getvalue() == f"abcdefgh{TextRenderer.DIM}{FAMILY}{TextRenderer.RESET}"
    assert renderer.draft_width == 2
    renderer.end(newline=True)
    assert out.getvalue().endswith(_erase(2) + "\n")
