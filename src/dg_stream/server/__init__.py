"""``dg-stream serve``: an OpenAI-compatible HTTP server with dg_stream's native event stream.

Needs the ``server`` extra (``pip install '.[server]'`` in a dg_stream checkout: starlette and
uvicorn; ``'.[local,server]'`` to serve local models)::

    from dg_stream import LocalBackend
    from dg_stream.server import serve

    serve(LocalBackend("path/to/verifier", "path/to/drafter"), host="127.0.0.1", port=8000)

or build the ASGI app yourself with ``create_app(backend)`` and run it under any ASGI server.
"""

from __future__ import annotations

from typing import Any

from .._errors import missing_extra

try:
    import starlette  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise missing_extra("the server", ("server",), exc) from exc

from .._backends.base import Backend
from .app import create_app

__all__ = ["create_app", "serve"]


def serve(
    backend: Backend,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    model_name: str | None = None,
    max_concurrent: int = 64,
    keepalive_seconds: float = 15.0,
    api_key: str | None = None,
    log_level: str = "info",
    **uvicorn_options: Any,
) -> None:
    """Serve ``backend`` over HTTP until interrupted (Ctrl-C or SIGTERM); blocks.

    ``host``/``port``: where to listen (``port=0`` picks a free port). ``model_name``: the
    model id clients see (default: the checkpoint folder's name). ``max_concurrent``:
    generations at once; more get 503 with ``Retry-After``. ``keepalive_seconds``: SSE
    keep-alive interval.
    ``api_key``: require ``Authorization: Bearer <key>`` on ``/v1/*``. ``log_level``: uvicorn's.
    Other keyword arguments go to ``uvicorn.Config`` (e.g. ``ssl_certfile``). The backend is
    closed when the server stops.
    """
    import uvicorn

    app = create_app(
        backend,
        model_name=model_name,
        max_concurrent=max_concurrent,
        keepalive_seconds=keepalive_seconds,
        api_key=api_key,
        close_backend=True,
    )
    options: dict[str, Any] = {"timeout_graceful_shutdown": 10, **uvicorn_options}
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, **options)
    uvicorn.Server(config).run()
