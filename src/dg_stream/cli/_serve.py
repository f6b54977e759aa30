"""``dg-stream serve``: the HTTP server (``dg_stream.server``) over the command line's backend."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys

from .._errors import missing_extra
from ._backend import check_options, make_backend

__all__ = ["cmd_serve"]


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        server = importlib.import_module("dg_stream.server")
    except ImportError as exc:
        # Serving local models needs them too: one command installs both.
        extras = ("server",) if args.remote else ("local", "server")
        raise missing_extra("dg-stream serve", extras, exc) from None
    check_options(args)
    backend = make_backend(args)
    print(
        f"dg-stream: serving on http://{args.host}:{args.port} (chat page at /)",
        file=sys.stderr,
        flush=True,
    )
    # uvicorn re-raises the Ctrl-C it shut down on; for a server that is a normal stop.
    with contextlib.suppress(KeyboardInterrupt):
        server.serve(
            backend,
            host=args.host,
            port=args.port,
            api_key=args.api_key,
            max_concurrent=args.max_concurrent,
            model_name=args.served_model_name,
            shutdown_timeout=args.shutdown_timeout,
        )
    return 0
