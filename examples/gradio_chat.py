"""A Gradio chat app streaming from a dg_stream backend, with draft previews.

    pip install '.[local]' 'gradio>=6'   # in a dg_stream checkout (not on PyPI)
    python examples/gradio_chat.py            # then open http://127.0.0.1:7860

Committed text is shown as it is verified; the drafter's provisional continuation follows it
in grey italics and is replaced at every step. Gradio's Stop button cancels the handler, which
closes the stream and stops the model work. The backend is the embedded pair in this process
(DG_STREAM_VERIFIER / DG_STREAM_DRAFTER / DG_STREAM_MAX_NEW_TOKENS as in quickstart.py), or
``dg-stream serve`` when DG_STREAM_URL is set.
"""

from __future__ import annotations

import html
import os
from collections.abc import AsyncIterator
from typing import Any

import gradio as gr

import dg_stream

SYSTEM = "You are a helpful assistant."


def make_backend() -> dg_stream.Backend | None:
    """A server from DG_STREAM_URL, local checkpoints from DG_STREAM_VERIFIER, else None."""
    if os.environ.get("DG_STREAM_URL"):
        return dg_stream.RemoteBackend(os.environ["DG_STREAM_URL"])
    verifier = os.environ.get("DG_STREAM_VERIFIER")
    if not verifier:
        return None  # the embedded default pair
    return dg_stream.LocalBackend(verifier, os.environ.get("DG_STREAM_DRAFTER"))


def text_of(content: Any) -> str:
    """A Gradio message's text (a string, or a list of content blocks)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", ""))
    if isinstance(content, (list, tuple)):
        return "".join(text_of(part) for part in content)
    return ""


def with_draft(text: str, draft: str) -> str:
    """The committed text, then the draft in grey italics (escaped: it is not markdown yet)."""
    if not draft:
        return text
    return f'{text}<span style="color: #999"><em>{html.escape(draft)}</em></span>'


def make_respond(backend: dg_stream.Backend | None, max_new_tokens: int) -> Any:
    async def respond(message: str, history: list[dict[str, Any]]) -> AsyncIterator[str]:
        messages = [{"role": "system", "content": SYSTEM}]
        messages += [{"role": m["role"], "content": text_of(m["content"])} for m in history]
        messages.append({"role": "user", "content": message})
        stream = dg_stream.generate(
            messages, backend=backend, max_new_tokens=max_new_tokens, draft_preview=True
        )
        async with stream:  # closed when Gradio cancels this handler (Stop)
            async for chunk in stream:
                yield with_draft(stream.text, chunk.draft)
        yield stream.text

    return respond


def build() -> gr.ChatInterface:
    """The app (not launched)."""
    max_new_tokens = int(os.environ.get("DG_STREAM_MAX_NEW_TOKENS", "256"))
    return gr.ChatInterface(
        make_respond(make_backend(), max_new_tokens),
        title="dg_stream chat",
        description="Committed text as it is verified; the draft preview in grey italics.",
    )


if __name__ == "__main__":
    build().launch()
