"""Quickstart: stream a completion, then look at how it went.

    python examples/quickstart.py ["your prompt"]

Runs the embedded model pair in this process. DG_STREAM_VERIFIER / DG_STREAM_DRAFTER point it
at other local checkpoints and DG_STREAM_MAX_NEW_TOKENS caps the length (CI uses tiny models).
"""

from __future__ import annotations

import os
import sys

import anyio

import dg_stream


def local_backend() -> dg_stream.LocalBackend | None:
    """Checkpoints named in the environment, or None for the embedded default pair."""
    verifier = os.environ.get("DG_STREAM_VERIFIER")
    if not verifier:
        return None
    return dg_stream.LocalBackend(verifier, os.environ.get("DG_STREAM_DRAFTER"))


async def main() -> None:
    prompt = sys.argv[1] if len(sys.argv) > 1 else "def fibonacci(n):"
    max_new_tokens = int(os.environ.get("DG_STREAM_MAX_NEW_TOKENS", "96"))

    # The stream is an async iterator and a context manager: leaving the block, breaking out
    # of the loop or an exception stops the model work.
    async with dg_stream.generate(
        prompt, backend=local_backend(), max_new_tokens=max_new_tokens
    ) as stream:
        print(prompt, end="")
        async for chunk in stream:
            print(chunk.text, end="", flush=True)
    print()

    # After the stream ends it describes the whole generation.
    stats, usage = stream.stats, stream.usage
    assert stats is not None and usage is not None
    print(
        f"\n[{usage.completion_tokens} tokens, finish={stream.finish_reason}, "
        f"{stats.tokens_per_call:.2f} tokens per verifier call, "
        f"{usage.completion_tokens / stats.total_seconds:.1f} tokens/s]"
    )


if __name__ == "__main__":
    anyio.run(main)
