"""``dg-stream serve``: an OpenAI-compatible HTTP server with dg_stream's native event stream.

Needs the ``server`` extra (``pip install '.[server]'`` in a dg_stream checkout: starlette and
uvicorn; ``'.[local,server]'`` to serve local models)::

    from dg_stream import LocalBackend
    from dg_stream.server import serve

    serve(LocalBackend("path/to/verifier", "path/to/drafter"), host="127.0.0.1", port=8000)

or build the ASGI app yourself with ``create_app(backend)`` and run it under any ASGI server.
"""

from __future__ import annotations

import socket
from typing import Any

from .._errors import missing_extra

try:
    import starlette  # noqa: F401
    import uvicorn
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise missing_extra("the server", ("server",), exc) from exc

from .._backends.base import Backend
from .app import create_app

__all__ = ["create_app", "create_server", "serve"]

#: After the generations have ended, what uvicorn may still wait for (other responses)
#: before it cancels them.
_UVICORN_GRACE_SECONDS = 5.0


class _Server(uvicorn.Server):
    """uvicorn's server, which ends the app's generations itself when it shuts down.

    uvicorn alone waits for every response to complete, then cancels what is left with a
    traceback, and the clients' streams are cut without a word.
    """

    def __init__(self, config: uvicorn.Config, app: Any, shutdown_timeout: float) -> None:
        super().__init__(config)
        self.app_server = app.state.server
        self.shutdown_timeout = shutdown_timeout

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()  # no new connections while the generations end
        await self.app_server.shutdown(self.shutdown_timeout, force=lambda: self.force_exit)
        await super().shutdown(sockets)


def create_server(
    backend: Backend,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    model_name: str | None = None,
    max_concurrent: int = 64,
    keepalive_seconds: float = 15.0,
    api_key: str | None = None,
    log_level: str = "info",
    shutdown_timeout: float = 5.0,
    **uvicorn_options: Any,
) -> uvicorn.Server:
    """The uvicorn server that ``serve`` runs (same arguments), for running it yourself:
    ``create_server(backend).run()``, or ``await ....serve()`` on an event loop you own."""
    if shutdown_timeout < 0:
        raise ValueError("shutdown_timeout must be >= 0")
    app = create_app(
        backend,
        model_name=model_name,
        max_concurrent=max_concurrent,
        keepalive_seconds=keepalive_seconds,
        api_key=api_key,
        close_backend=True,
    )
    options: dict[str, Any] = {"timeout_graceful_shutdown": _UVICORN_GRACE_SECONDS}
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, **{**options, **uvicorn_options}
    )
    return _Server(config, app, shutdown_timeout)


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
    shutdown_timeout: float = 5.0,
    **uvicorn_options: Any,
) -> None:
    """Serve ``backend`` over HTTP until interrupted (Ctrl-C or SIGTERM); blocks.

    ``host``/``port``: where to listen (``port=0`` picks a free port). ``model_name``: the
    model id clients see (default: the checkpoint folder's name). ``max_concurrent``:
    generations at once; more get 503 with ``Retry-After``. ``keepalive_seconds``: SSE
    keep-alive interval.
    ``api_key``: require ``Authorization: Bearer <key>`` on ``/v1/*``. ``log_level``: uvicorn's.
    ``shutdown_timeout``: when interrupted, the server stops accepting connections, lets the
    running generations finish for up to this many seconds (a second Ctrl-C: at once), then
    ends the rest with a final error event (``code: "server_shutting_down"``; a 503 where
    nothing was sent yet), which the ``openai`` client raises as ``APIError`` and
    ``RemoteBackend`` as ``StreamInterruptedError``, and exits.
    Other keyword arguments go to ``uvicorn.Config`` (e.g. ``ssl_certfile``). The backend is
    closed when the server stops.
    """
    create_server(
        backend,
        host,
        port,
        model_name=model_name,
        max_concurrent=max_concurrent,
        keepalive_seconds=keepalive_seconds,
        api_key=api_key,
        log_level=log_level,
        shutdown_timeout=shutdown_timeout,
        **uvicorn_options,
    ).run()
