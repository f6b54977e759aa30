"""``dg-stream chat``: an interactive chat with history, a reply streamed per line read."""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import sys
import threading
from typing import IO, Any

from .._errors import DGStreamError
from ._backend import check_options, generation_options, make_backend
from ._render import TextRenderer
from ._summary import summarize, timed
from ._text import repair_text_options, valid_text
from ._usage import PROG

__all__ = ["ChatLoop", "cmd_chat"]


def _enable_line_editing() -> None:
    """Arrow keys, editing and history for ``input()`` where Python has ``readline`` (GNU
    readline or libedit; not on Windows): importing the module is what turns it on."""
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401


class ChatLoop:
    """The interactive loop of ``dg-stream chat``.

    Replies stream on an event loop in a helper thread (one loop for the whole session, so
    connection pools and limiters stay valid) while the main thread reads input. Ctrl-C in the
    main thread cancels only the reply in flight; Ctrl-D at the prompt ends the loop.
    """

    def __init__(
        self,
        session: Any,
        *,
        stdin: IO[str],
        stdout: IO[str],
        stderr: IO[str],
        preview: bool = False,
        stats: bool = False,
    ) -> None:
        self.session = session
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr
        self.preview, self.stats = preview, stats
        self.interactive = stdin.isatty() and stdout.isatty()
        if self.interactive:
            _enable_line_editing()

    def read(self) -> str | None:
        """One line of input, or None at end of input."""
        if self.interactive:
            try:
                return valid_text(input("> "), "the input")
            except EOFError:
                return None
        line = self.stdin.readline()
        return None if line == "" else valid_text(line.rstrip("\n"), "the input")

    async def reply(self, text: str, done: threading.Event) -> None:
        try:
            renderer = TextRenderer(self.stdout, preview=self.preview)
            stream = self.session.send(text, draft_preview=self.preview)
            try:
                stream, seconds = await timed(stream, renderer.chunk)
            finally:
                renderer.end(newline=True)
            if self.stats:
                for line in summarize(stream, seconds).lines():
                    print(line, file=self.stderr, flush=True)
        finally:
            done.set()

    def run(self, portal: Any) -> int:
        if self.interactive:
            print("Chat: Ctrl-C stops a reply, Ctrl-D leaves, /reset forgets.", file=self.stderr)
        while True:
            try:
                line = self.read()
            except KeyboardInterrupt:
                print(file=self.stdout)  # a fresh prompt, as in a shell
                continue
            if line is None or line.strip() == "/exit":
                if self.interactive:
                    print(file=self.stdout)
                return 0
            if not line.strip():
                continue
            if line.strip() == "/reset":
                self.session.reset()
                print("(conversation forgotten)", file=self.stderr, flush=True)
                continue
            done = threading.Event()
            future = portal.start_task_soon(self.reply, line, done)
            try:
                future.result()
            except KeyboardInterrupt:
                future.cancel()
                # The reply is closed (and kept out of the history) before the next prompt.
                done.wait(timeout=60)
                print("\n[reply stopped]", file=self.stderr, flush=True)
            except concurrent.futures.CancelledError:
                pass
            except DGStreamError as exc:  # a failed reply; the conversation goes on
                print(f"{PROG}: error: {exc}", file=self.stderr, flush=True)


def cmd_chat(args: argparse.Namespace) -> int:
    from anyio.from_thread import start_blocking_portal

    from .._chat import ChatSession

    repair_text_options(args)
    check_options(args)
    backend = make_backend(args)
    options = generation_options(args)
    options.pop("max_new_tokens")
    session = ChatSession(
        backend,
        system=args.system,
        max_new_tokens=args.max_new_tokens,
        max_context_tokens=args.max_context_tokens,
        **options,
    )
    loop = ChatLoop(
        session,
        stdin=sys.stdin,
        stdout=sys.stdout,
        stderr=sys.stderr,
        preview=args.preview,
        stats=args.stats,
    )
    with start_blocking_portal() as portal:
        try:
            return loop.run(portal)
        finally:
            portal.call(backend.aclose)
