"""A terminal chatbot on ChatSession: history, streamed replies, trimmed context.

    python examples/chatbot.py

Type a message; an empty line or Ctrl-D ends the chat. (``dg-stream chat`` is the full version,
with Ctrl-C to stop a reply.) DG_STREAM_VERIFIER / DG_STREAM_DRAFTER / DG_STREAM_MAX_NEW_TOKENS
as in quickstart.py.
"""

from __future__ import annotations

import os
import sys

import anyio
import anyio.to_thread

import dg_stream


def local_backend() -> dg_stream.LocalBackend:
    verifier = os.environ.get("DG_STREAM_VERIFIER")
    if verifier:
        return dg_stream.LocalBackend(verifier, os.environ.get("DG_STREAM_DRAFTER"))
    return dg_stream.LocalBackend.default()


def read_line() -> str | None:
    if sys.stdin.isatty():
        try:
            return input("you> ")
        except EOFError:
            return None
    line = sys.stdin.readline()
    return line.rstrip("\n") if line else None


async def main() -> None:
    chat = dg_stream.ChatSession(
        local_backend(),
        system="You are a helpful assistant.",
        max_new_tokens=int(os.environ.get("DG_STREAM_MAX_NEW_TOKENS", "128")),
    )
    while True:
        # input() blocks: run it on a worker thread so the event loop stays free.
        line = await anyio.to_thread.run_sync(read_line)
        if not line:
            break
        print("bot> ", end="", flush=True)
        async for chunk in chat.send(line):
            print(chunk.text, end="", flush=True)
        print()
    turns = len(chat.history) // 2
    print(f"({turns} turns kept in the history, {chat.trimmed_turns} trimmed)")


if __name__ == "__main__":
    anyio.run(main)
