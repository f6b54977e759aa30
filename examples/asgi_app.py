"""dg_stream inside an existing ASGI (Starlette) app: your own streaming endpoint, plus the
whole dg-stream API mounted under a prefix.

    python examples/asgi_app.py            # then: curl -N localhost:8000/story?topic=cats
    PORT=9000 python examples/asgi_app.py

Routes: ``GET /`` (the app's own page), ``GET /story?topic=...`` (plain-text stream, one sentence
per write), ``/llm/...`` (dg-stream's OpenAI-compatible and native endpoints and chat page).
DG_STREAM_VERIFIER / DG_STREAM_DRAFTER / DG_STREAM_MAX_NEW_TOKENS as in quickstart.py.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.routing import Mount, Route

import dg_stream
from dg_stream.server import create_app


def local_backend() -> dg_stream.LocalBackend:
    verifier = os.environ.get("DG_STREAM_VERIFIER")
    if verifier:
        return dg_stream.LocalBackend(verifier, os.environ.get("DG_STREAM_DRAFTER"))
    return dg_stream.LocalBackend.default()


backend = local_backend()
MAX_NEW_TOKENS = int(os.environ.get("DG_STREAM_MAX_NEW_TOKENS", "128"))


async def home(request: Request) -> PlainTextResponse:
    return PlainTextResponse("my app: try /story?topic=cats or /llm/\n")


async def story(request: Request) -> StreamingResponse:
    topic = request.query_params.get("topic", "a lighthouse keeper")
    stream = dg_stream.generate(
        f"A short story about {topic}.\n\n", backend=backend, max_new_tokens=MAX_NEW_TOKENS
    ).pipe(dg_stream.by_sentences())

    async def body() -> AsyncIterator[str]:
        # Starlette closes this generator when the client disconnects; ``async with`` then
        # closes the stream, which stops the model work.
        async with stream:
            async for sentence in stream:
                yield sentence.text

    return StreamingResponse(body(), media_type="text/plain; charset=utf-8")


app = Starlette(
    routes=[
        Route("/", home),
        Route("/story", story),
        Mount("/llm", app=create_app(backend)),
    ]
)


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))
