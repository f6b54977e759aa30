"""Terminal and JSON output of a stream: committed text as it arrives, the draft preview in dim
after it (measured in terminal cells), or one JSON event per line."""

from __future__ import annotations

import os
import shutil
import unicodedata
from typing import IO, Any

import msgspec
from wcwidth import wcswidth

from .._chunks import Chunk

__all__ = ["JsonRenderer", "TextRenderer", "cells"]


def cells(text: str, column: int = 0) -> int:
    """The column after writing ``text`` (no newlines) from ``column``: wcwidth's widths of
    whole strings, so an emoji ZWJ sequence (👨‍👩‍👧) takes the 2 cells terminals draw, as does
    an emoji with VS16 (❤️); combining marks take none, control characters none, tabs go to
    the next multiple of 8."""
    for i, piece in enumerate(text.split("\t")):
        if i:
            column += 8 - column % 8
        printable = "".join(ch for ch in piece if unicodedata.category(ch) != "Cc")
        column += max(wcswidth(printable), 0)
    return column


def _styling(stream: IO[str]) -> bool:
    if os.environ.get("NO_COLOR"):
        return False
    if os.environ.get("FORCE_COLOR"):
        return True
    return bool(getattr(stream, "isatty", lambda: False)())


class TextRenderer:
    """Writes committed text as it arrives; with ``preview``, the draft after it in dim.

    The draft is kept on the cursor's line (newlines shown as ⏎, cut to the space left) so
    that backspaces can take it back before the next committed text is written.
    """

    DIM, RESET, CLEAR = "\x1b[2m", "\x1b[0m", "\x1b[K"

    def __init__(self, out: IO[str], *, preview: bool) -> None:
        self.out = out
        self.preview = preview and _styling(out)
        self.column = 0
        self.draft_width = 0
        self.ends_with_newline = True
        # The cursor's line after its last space (text that later text may still join, as in a
        # ZWJ sequence written across chunks) and the column where that part starts.
        self._word, self._word_start = "", 0

    def _advance(self, text: str) -> None:
        cut = max(text.rfind("\n"), text.rfind("\r"))
        if cut >= 0:
            self._word, self._word_start, text = "", 0, text[cut + 1 :]
        self._word += text
        space = self._word.rfind(" ")
        if space >= 0:  # nothing joins a space: the text up to it is settled
            self._word_start = cells(self._word[: space + 1], self._word_start)
            self._word = self._word[space + 1 :]
        self.column = cells(self._word, self._word_start)

    def _erase_draft(self) -> str:
        if not self.draft_width:
            return ""
        erase = "\b" * self.draft_width + self.CLEAR
        self.draft_width = 0
        return erase

    def _draft(self, draft: str) -> str:
        columns = shutil.get_terminal_size((80, 24)).columns
        room = columns - self.column % columns - 1  # never touch the last column
        text = "".join(
            ch
            for ch in draft.replace("\n", "⏎").replace("\t", " ")
            if unicodedata.category(ch) != "Cc"
        )

        def width(end: int) -> int:  # measured after the line's text: a draft may join it
            return cells(self._word + text[:end], self._word_start) - self.column

        low, high = 0, len(text)  # the longest prefix that fits (binary search)
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if width(middle) <= room else (low, middle - 1)
        self.draft_width = max(width(low), 0)
        if not low or not self.draft_width:
            self.draft_width = 0
            return ""
        return f"{self.DIM}{text[:low]}{self.RESET}"

    def chunk(self, chunk: Chunk) -> None:
        parts = [self._erase_draft()] if self.preview else []
        parts.append(chunk.text)
        if chunk.text:
            self._advance(chunk.text)
            self.ends_with_newline = chunk.text.endswith("\n")
        if self.preview and chunk.draft and chunk.finish_reason is None:
            parts.append(self._draft(chunk.draft))
        self.out.write("".join(parts))
        self.out.flush()

    def end(self, *, newline: bool) -> None:
        tail = self._erase_draft() if self.preview else ""
        if newline and not self.ends_with_newline:
            tail += "\n"
            self.ends_with_newline = True
        if tail:
            self.out.write(tail)
            self.out.flush()


class JsonRenderer:
    """One JSON object per line: ``{"event": "chunk", ...Chunk fields}``."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self.encoder = msgspec.json.Encoder()

    def chunk(self, chunk: Chunk) -> None:
        self.emit({"event": "chunk", **msgspec.to_builtins(chunk)})

    def emit(self, obj: dict[str, Any]) -> None:
        self.out.write(self.encoder.encode(obj).decode() + "\n")
        self.out.flush()

    def end(self, *, newline: bool) -> None:
        return None
