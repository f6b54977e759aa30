"""Incremental, UTF-8-safe detokenization.

Decoding token by token breaks multi-byte characters (byte-level BPE splits them across
tokens) and loses context-dependent spaces (SentencePiece). We decode a short window that
starts a few tokens back and emit only the new suffix, holding back text that ends in an
incomplete character (U+FFFD) until a later token completes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["IncrementalDetokenizer"]

_REPLACEMENT = "\ufffd"
# Prompt tokens kept as decode context, so the first generated token gets its leading space.
_CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    """``feed(ids) -> new text``; ``flush() -> held-back text``; ``peek(ids)`` previews.

    With ``tokenizer=None`` (generation from token ids alone) every text is empty.
    """

    def __init__(self, tokenizer: Any, context_ids: Sequence[int] = ()) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = list(context_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0  # decode window starts here
        self._read_offset = len(self._ids)  # text of ids before here has been emitted

    def _decode(self, ids: Sequence[int]) -> str:
        if self._tokenizer is None:
            return ""  # token-id-only generation: no text
        return str(
            self._tokenizer.decode(
                ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
            )
        )

    def _window(self, extra: Sequence[int] = ()) -> tuple[str, str]:
        """(text already emitted from the window, text of the window plus ``extra``)."""
        emitted = self._decode(self._ids[self._prefix_offset : self._read_offset])
        return emitted, self._decode([*self._ids[self._prefix_offset :], *extra])

    def feed(self, ids: Sequence[int]) -> str:
        """Add committed ids; return the text that is now certain."""
        self._ids.extend(ids)
        emitted, full = self._window()
        if len(full) <= len(emitted) or full.endswith(_REPLACEMENT):
            return ""  # nothing new yet, or a character still waits for its last bytes
        # The next window starts at this feed's first token: enough context for merges/spaces.
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return full[len(emitted) :]

    def flush(self) -> str:
        """Everything still held back (a character that never completed becomes U+FFFD)."""
        emitted, full = self._window()
        self._prefix_offset = self._read_offset = len(self._ids)
        return full[len(emitted) :]

    def peek(self, ids: Sequence[int]) -> str:
        """Text that held-back ids plus ``ids`` would add, without committing them."""
        emitted, full = self._window(ids)
        return full[len(emitted) :].rstrip(_REPLACEMENT)
