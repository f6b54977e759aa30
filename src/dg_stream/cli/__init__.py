"""The ``dg-stream`` command: generate, chat, serve, bench and train.

Exit codes: 0 success, 1 a runtime failure (model loading, the server, the generation), 2 a
usage error or an invalid request, 130 interrupted by Ctrl-C, 141 the output pipe was closed.
Errors are one line on stderr (``DG_STREAM_DEBUG=1`` adds the traceback).

A module per command (``_generate`` with ``_compare``, ``_chat_loop``, ``_serve``, ``_bench``;
``train`` comes from ``dg_stream.train.commands``), and what they share: the parser
(``_parser``), the backend and generation options (``_backend``), the output (``_render``,
``_summary``), text repair (``_text``), the usage error (``_usage``) and ``main`` (``_main``).
"""

from __future__ import annotations

from ._chat_loop import ChatLoop
from ._main import main
from ._parser import build_parser
from ._render import JsonRenderer, TextRenderer
from ._summary import Summary

__all__ = ["ChatLoop", "JsonRenderer", "Summary", "TextRenderer", "build_parser", "main"]

# Two helpers under the names they had when the command was one module (tests reach them).
from ._backend import make_backend as _make_backend  # noqa: F401
from ._render import cells as _cells  # noqa: F401
