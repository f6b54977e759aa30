"""A client of a running ``dg-stream serve``, over the native event stream.

    dg-stream serve --port 8000 &
    python examples/client_serve.py

DG_STREAM_URL names the server (default http://127.0.0.1:8000). Nothing here imports torch:
``RemoteBackend`` needs only httpx.
"""

from __future__ import annotations

import os

import anyio

import dg_stream


async def main() -> None:
    url = os.environ.get("DG_STREAM_URL", "http://127.0.0.1:8000")
    n = int(os.environ.get("DG_STREAM_MAX_NEW_TOKENS", "64"))
    async with dg_stream.RemoteBackend(url, api="dg", timeout=60) as backend:
        # Draft previews come over the wire too: committed text plus the provisional rest.
        stream = dg_stream.generate(
            "def fibonacci(n):", backend=backend, max_new_tokens=n, draft_preview=True
        )
        drafts = 0
        async with stream:
            async for chunk in stream:
                print(chunk.text, end="", flush=True)
                drafts += bool(chunk.draft)
        stats = stream.stats
        print(
            f"\n[{len(stream.token_ids)} tokens; {drafts} chunks carried a draft; "
            f"{stats.mean_accepted if stats else 0:.2f} accepted per verifier call]"
        )

        # Operators and chat sessions work the same on remote streams. (A prompt that ends
        # mid-line: after "class Stack:" the model's first line would be the empty rest of it.)
        first_line = await dg_stream.generate(
            "class Stack:\n    def", backend=backend, max_new_tokens=n
        ).pipe(dg_stream.stop_at("\n"), dg_stream.collect())
        print(f"first line: {first_line.text!r} ({first_line.finish_reason})")

        chat = dg_stream.ChatSession(backend, system="Be brief.", max_new_tokens=n)
        reply = await chat.ask("Say hello.")
        print(f"chat reply: {reply!r}; history has {len(chat.history)} messages")


if __name__ == "__main__":
    anyio.run(main)
