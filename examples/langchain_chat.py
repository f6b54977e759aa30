"""LangChain: a prompt-template chain over ChatDGStream, streamed as it is verified.

    pip install '.[local,langchain]'   # in a dg_stream checkout (not on PyPI)
    python examples/langchain_chat.py ["your question"]

``ChatDGStream`` is a LangChain chat model over any dg_stream backend: here the embedded model
pair in this process (DG_STREAM_VERIFIER / DG_STREAM_DRAFTER name other checkpoints,
DG_STREAM_MAX_NEW_TOKENS caps the reply); ``ChatDGStream(base_url="http://127.0.0.1:8000")``
would stream from ``dg-stream serve`` instead.
"""

from __future__ import annotations

import os
import sys

import anyio
from langchain_core.messages import AIMessageChunk
from langchain_core.prompts import ChatPromptTemplate

import dg_stream
from dg_stream.integrations.langchain import ChatDGStream


def local_backend() -> dg_stream.LocalBackend | None:
    """Checkpoints named in the environment, or None for the embedded default pair."""
    verifier = os.environ.get("DG_STREAM_VERIFIER")
    if not verifier:
        return None
    return dg_stream.LocalBackend(verifier, os.environ.get("DG_STREAM_DRAFTER"))


async def main() -> None:
    question = sys.argv[1] if len(sys.argv) > 1 else "Write a function that reverses a list."
    model = ChatDGStream(
        backend=local_backend(),
        max_tokens=int(os.environ.get("DG_STREAM_MAX_NEW_TOKENS", "128")),
    )
    prompt = ChatPromptTemplate.from_messages(
        [("system", "You are a helpful assistant."), ("human", "{question}")]
    )
    chain = prompt | model

    # Each chunk is the text dg_stream committed in one step; leaving the loop early (or
    # cancelling the task) stops the model work.
    reply: AIMessageChunk | None = None
    async for chunk in chain.astream({"question": question}):
        print(chunk.content, end="", flush=True)
        reply = chunk if reply is None else reply + chunk
    print()

    # The merged reply carries LangChain's usage and dg_stream's own statistics.
    assert reply is not None and reply.usage_metadata is not None
    stats = reply.response_metadata["stats"]
    print(
        f"[{reply.usage_metadata['output_tokens']} tokens, "
        f"finish={reply.response_metadata['finish_reason']}, "
        f"{stats['accepted_per_call']:.2f} drafts accepted per verifier call, "
        f"model {reply.response_metadata['model_name']}]"
    )


if __name__ == "__main__":
    anyio.run(main)
