"""The ``dg-stream`` command: generate, chat, serve, bench and train.

Exit codes: 0 success, 1 a runtime failure (model loading, the server, the generation), 2 a
usage error or an invalid request, 130 interrupted by Ctrl-C, 141 the output pipe was closed.
Errors are one line on stderr (``DG_STREAM_DEBUG=1`` adds the traceback).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import importlib
import os
import shutil
import sys
import threading
import time
import traceback
import unicodedata
from collections.abc import Callable, Sequence
from typing import IO, Any

import msgspec
from wcwidth import wcswidth

from ._argtypes import OneLineErrorParser, non_negative_float, positive_int
from ._chunks import Chunk
from ._errors import DGStreamError, InvalidRequestError, install_hint, missing_extra

__all__ = ["main"]

PROG = "dg-stream"

EPILOG_GENERATE = """\
examples:
  dg-stream generate "def fibonacci(n):" --max-new-tokens 64
  echo "Once upon a time" | dg-stream generate - --preview --stats
  dg-stream generate "Hello" --compare          # speed-up over plain decoding
  dg-stream generate "Hello" --json | jq .text  # one JSON event per line
  dg-stream generate "Hi" --remote http://127.0.0.1:8000
"""

EPILOG_CHAT = """\
In the chat: Ctrl-C stops the current reply, Ctrl-D (or /exit) leaves,
/reset forgets the conversation.

examples:
  dg-stream chat --system "You answer in one sentence."
  dg-stream chat --remote http://127.0.0.1:8000 --preview
"""


# -- argument parsing ---------------------------------------------------------------------------


def _backend_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model (default: the embedded model pair, in process)")
    group.add_argument(
        "--remote",
        metavar="URL",
        help="use a server instead of local models: dg-stream serve or any "
        "OpenAI-compatible server (vLLM, TGI, llama.cpp, Ollama)",
    )
    group.add_argument(
        "--api",
        choices=["auto", "dg", "openai"],
        default="auto",
        help="protocol for --remote (default: auto, native when offered)",
    )
    group.add_argument("--model", help="model name to request from --remote")
    group.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="connect/first-chunk/idle time limit for --remote",
    )
    group.add_argument(
        "--verifier",
        metavar="PATH",
        help="a local transformers causal-LM checkpoint to verify with",
    )
    group.add_argument(
        "--drafter",
        metavar="PATH|ngram|none",
        help="a diffusion (masked-LM) or small causal-LM checkpoint, 'ngram' for "
        "prompt lookup, or 'none' for plain decoding (default: the embedded "
        "drafter with the embedded verifier, else ngram)",
    )
    group.add_argument(
        "--tokenizer", metavar="PATH", help="tokenizer path (default: the verifier's)"
    )
    group.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: cuda when available)")
    group.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="model dtype (default: bfloat16 on cuda, float32 on cpu)",
    )


def _sampling_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("generation")
    group.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=256,
        metavar="N",
        help="most tokens to generate (default %(default)s)",
    )
    group.add_argument(
        "--temperature", type=float, default=0.0, help="0 is greedy (default %(default)s)"
    )
    group.add_argument("--top-k", type=positive_int)
    group.add_argument("--top-p", type=float)
    group.add_argument("--repetition-penalty", type=float)
    group.add_argument("--seed", type=int, help="seed for sampling (reproducible output)")
    group.add_argument(
        "--stop",
        action="append",
        metavar="TEXT",
        help="end at this text (repeatable; the text is not printed)",
    )
    spec = _speculative_options(parser, "speculative decoding")
    spec.add_argument(
        "--confidence",
        type=float,
        help="unmask every draft position above this probability in one step",
    )


def _speculative_options(parser: argparse.ArgumentParser, title: str) -> Any:
    spec = parser.add_argument_group(title)
    spec.add_argument(
        "--block-size",
        type=positive_int,
        metavar="K",
        help="tokens drafted per verifier call (default: the backend's)",
    )
    spec.add_argument("--steps", type=positive_int, help="denoising steps of a diffusion drafter")
    spec.add_argument(
        "--adaptive",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="choose each call's block size from measured acceptance and costs",
    )
    return spec


def _display_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output")
    group.add_argument(
        "--preview",
        action="store_true",
        help="show the draft as dim provisional text, replaced as it is "
        "verified (terminals only; FORCE_COLOR=1 forces it)",
    )
    group.add_argument(
        "--stats",
        action="store_true",
        help="print tokens/s and mean tokens accepted per verifier call (to stderr)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (exposed for documentation and tests)."""
    from . import __version__

    parser = OneLineErrorParser(
        prog=PROG,
        description="Lossless speculative decoding with a diffusion drafter, streamed. "
        "Every command runs the embedded model pair unless given --verifier or "
        "--remote.",
        epilog="Run 'dg-stream COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    gen = commands.add_parser(
        "generate",
        help="stream a completion to the terminal",
        description="Stream a completion of PROMPT to stdout as it is generated.",
        epilog=EPILOG_GENERATE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    gen.add_argument("prompt", metavar="PROMPT", help="the prompt; '-' reads it from stdin")
    gen.add_argument(
        "--chat",
        action="store_true",
        help="send the prompt as a user message (rendered with the chat template)",
    )
    gen.add_argument("--system", metavar="TEXT", help="system message (implies --chat)")
    _sampling_options(gen)
    _display_options(gen)
    gen.add_argument(
        "--compare",
        action="store_true",
        help="also decode without a drafter and report the speed-up and whether "
        "the outputs are identical (local models; implies --stats)",
    )
    gen.add_argument(
        "--json",
        action="store_true",
        help='print one JSON event per line: {"event": "chunk", ...} for each '
        'chunk, then {"event": "summary", ...} with --stats/--compare',
    )
    _backend_options(gen)
    gen.set_defaults(func=_cmd_generate)

    chat = commands.add_parser(
        "chat",
        help="interactive chat with history",
        description="An interactive chat: type a message, watch the reply stream in.",
        epilog=EPILOG_CHAT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    chat.add_argument("--system", metavar="TEXT", help="system message")
    chat.add_argument(
        "--max-context-tokens",
        type=positive_int,
        metavar="N",
        help="drop the oldest turns to keep the prompt plus reply under N tokens "
        "(default: the model's context)",
    )
    _sampling_options(chat)
    _display_options(chat)
    _backend_options(chat)
    chat.set_defaults(func=_cmd_chat)

    serve = commands.add_parser(
        "serve",
        help="serve OpenAI-compatible and native streaming endpoints and a chat page",
        description="Serve /v1/completions, /v1/chat/completions, /v1/models, the native "
        "event stream POST /v1/dg/generate, and a live chat page at /.",
    )
    serve.add_argument("--host", default="127.0.0.1", help="default %(default)s")
    serve.add_argument("--port", type=int, default=8000, help="default %(default)s")
    serve.add_argument(
        "--api-key",
        default=os.environ.get("DG_STREAM_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1/* "
        "(default: $DG_STREAM_API_KEY; none: open)",
    )
    serve.add_argument(
        "--max-concurrent",
        type=positive_int,
        default=64,
        metavar="N",
        help="generations at once; more are answered 503 with Retry-After (default %(default)s)",
    )
    serve.add_argument(
        "--max-batch",
        type=positive_int,
        default=32,
        metavar="N",
        help="generations batched into one verifier call (local models; "
        "1: they take turns; default %(default)s)",
    )
    serve.add_argument(
        "--max-cached-tokens",
        type=positive_int,
        metavar="N",
        help="tokens the batched generations may reserve (prompt plus "
        "max_tokens each); later requests wait (default: no bound)",
    )
    serve.add_argument(
        "--shutdown-timeout",
        type=non_negative_float,
        default=5.0,
        metavar="SECONDS",
        help="on Ctrl-C or SIGTERM, let running generations finish for this long, then end "
        "them with an error event that says the server is shutting down (default "
        "%(default)s; a second Ctrl-C: at once)",
    )
    serve.add_argument(
        "--served-model-name",
        metavar="NAME",
        help="the model id clients see (default: the verifier folder's name; "
        "dg-stream-default for the embedded pair)",
    )
    _speculative_options(serve, "speculative decoding defaults")
    _backend_options(serve)
    serve.set_defaults(func=_cmd_serve)

    commands.add_parser(
        "bench",
        help="benchmarks: speed-up, acceptance and quality against plain decoding",
        description="Runs dg_stream.bench; 'dg-stream bench --help' lists its options.",
        add_help=False,
    )

    try:
        train_commands = importlib.import_module("dg_stream.train.commands")
    except ImportError:
        train = commands.add_parser("train", help="train a tokenizer, a verifier or a drafter")
        train.set_defaults(
            func=_missing("training", "dg_stream.train.commands", install_hint("train"))
        )
    else:
        train_commands.add_parser(commands)
    return parser


def _missing(what: str, module: str, hint: str) -> Callable[[argparse.Namespace], int]:
    def fail(args: argparse.Namespace) -> int:
        raise _UsageError(
            f"{what} is not available in this installation ({module} cannot be imported; {hint})",
            code=1,
        )

    return fail


class _UsageError(Exception):
    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


# -- backends -------------------------------------------------------------------------------------


def _make_backend(args: argparse.Namespace, *, quiet: bool = False) -> Any:
    if args.remote:
        if args.verifier or args.drafter or args.tokenizer:
            raise _UsageError("--remote cannot be combined with --verifier/--drafter/--tokenizer")
        from ._backends.remote import RemoteBackend

        return RemoteBackend(args.remote, args.model, api=args.api, timeout=args.timeout)
    from ._backends.local import LocalBackend

    drafter: Any
    if args.drafter is None:
        drafter = "ngram" if args.verifier else None
    elif args.drafter.lower() == "none":
        drafter = None
    else:
        drafter = args.drafter
    options: dict[str, Any] = {"device": args.device, "dtype": args.dtype}
    for name in ("block_size", "steps", "adaptive", "max_batch", "max_cached_tokens"):
        if getattr(args, name, None) is not None:
            options[name] = getattr(args, name)
    show = not quiet and sys.stderr.isatty()
    if show:
        print("loading models…", file=sys.stderr, end="", flush=True)
    try:
        if args.verifier:
            return LocalBackend(args.verifier, drafter, tokenizer=args.tokenizer, **options)
        if args.drafter is None:
            return LocalBackend.default(tokenizer=args.tokenizer, **options)
        return LocalBackend.default(drafter=drafter, tokenizer=args.tokenizer, **options)
    finally:
        if show:
            print("\r\x1b[K", file=sys.stderr, end="", flush=True)


def _generation_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "repetition_penalty": args.repetition_penalty,
        "seed": args.seed,
        "stop": args.stop,
    }
    for name in ("block_size", "steps", "adaptive", "confidence"):
        if getattr(args, name, None) is not None:
            options[name] = getattr(args, name)
    return options


def _check_options(args: argparse.Namespace, prompt: Any = "x") -> None:
    """Validate the request options before any model loads (raises InvalidRequestError)."""
    from ._config import SpeculativeConfig, build_request

    if not hasattr(args, "temperature"):  # serve: the speculative defaults only
        SpeculativeConfig(block_size=args.block_size, steps=args.steps, adaptive=args.adaptive)
        return
    options = _generation_options(args)
    speculative = {
        name: options.pop(name) for name in SpeculativeConfig.__struct_fields__ if name in options
    }
    if getattr(args, "system", None) is not None and isinstance(prompt, str):
        prompt = [{"role": "system", "content": args.system}, {"role": "user", "content": prompt}]
    build_request(prompt, **options, draft_preview=False, speculative_options=speculative)


# -- rendering --------------------------------------------------------------------------------


def _cells(text: str, column: int = 0) -> int:
    """The column after writing ``text`` (no newlines) from ``column``: wcwidth's widths of
    whole strings, so an emoji ZWJ sequence (👨‍👩‍👧) takes the 2 cells terminals draw, as does
    an emoji with VS16 (❤️); combining marks take none, control characters none, tabs go to
    the next multiple of 8."""
    for i, piece in enumerate(text.split("\t")):
        if i:
            column += 8 - column % 8
        printable = "".join(ch for ch in piece if unicodedata.category(ch) != "Cc")
        column += max(wcswidth(printable), 0)
    return column


def _styling(stream: IO[str]) -> bool:
    if os.environ.get("NO_COLOR"):
        return False
    if os.environ.get("FORCE_COLOR"):
        return True
    return bool(getattr(stream, "isatty", lambda: False)())


class TextRenderer:
    """Writes committed text as it arrives; with ``preview``, the draft after it in dim.

    The draft is kept on the cursor's line (newlines shown as ⏎, cut to the space left) so
    that backspaces can take it back before the next committed text is written.
    """

    DIM, RESET, CLEAR = "\x1b[2m", "\x1b[0m", "\x1b[K"

    def __init__(self, out: IO[str], *, preview: bool) -> None:
        self.out = out
        self.preview = preview and _styling(out)
        self.column = 0
        self.draft_width = 0
        self.ends_with_newline = True
        # The cursor's line after its last space (text that later text may still join, as in a
        # ZWJ sequence written across chunks) and the column where that part starts.
        self._word, self._word_start = "", 0

    def _advance(self, text: str) -> None:
        cut = max(text.rfind("\n"), text.rfind("\r"))
        if cut >= 0:
            self._word, self._word_start, text = "", 0, text[cut + 1 :]
        self._word += text
        space = self._word.rfind(" ")
        if space >= 0:  # nothing joins a space: the text up to it is settled
            self._word_start = _cells(self._word[: space + 1], self._word_start)
            self._word = self._word[space + 1 :]
        self.column = _cells(self._word, self._word_start)

    def _erase_draft(self) -> str:
        if not self.draft_width:
            return ""
        erase = "\b" * self.draft_width + self.CLEAR
        self.draft_width = 0
        return erase

    def _draft(self, draft: str) -> str:
        columns = shutil.get_terminal_size((80, 24)).columns
        room = columns - self.column % columns - 1  # never touch the last column
        text = "".join(
            ch
            for ch in draft.replace("\n", "⏎").replace("\t", " ")
            if unicodedata.category(ch) != "Cc"
        )

        def width(end: int) -> int:  # measured after the line's text: a draft may join it
            return _cells(self._word + text[:end], self._word_start) - self.column

        low, high = 0, len(text)  # the longest prefix that fits (binary search)
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if width(middle) <= room else (low, middle - 1)
        self.draft_width = max(width(low), 0)
        if not low or not self.draft_width:
            self.draft_width = 0
            return ""
        return f"{self.DIM}{text[:low]}{self.RESET}"

    def chunk(self, chunk: Chunk) -> None:
        parts = [self._erase_draft()] if self.preview else []
        parts.append(chunk.text)
        if chunk.text:
            self._advance(chunk.text)
            self.ends_with_newline = chunk.text.endswith("\n")
        if self.preview and chunk.draft and chunk.finish_reason is None:
            parts.append(self._draft(chunk.draft))
        self.out.write("".join(parts))
        self.out.flush()

    def end(self, *, newline: bool) -> None:
        tail = self._erase_draft() if self.preview else ""
        if newline and not self.ends_with_newline:
            tail += "\n"
            self.ends_with_newline = True
        if tail:
            self.out.write(tail)
            self.out.flush()


class JsonRenderer:
    """One JSON object per line: ``{"event": "chunk", ...Chunk fields}``."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self.encoder = msgspec.json.Encoder()

    def chunk(self, chunk: Chunk) -> None:
        self.emit({"event": "chunk", **msgspec.to_builtins(chunk)})

    def emit(self, obj: dict[str, Any]) -> None:
        self.out.write(self.encoder.encode(obj).decode() + "\n")
        self.out.flush()

    def end(self, *, newline: bool) -> None:
        return None


class Summary(msgspec.Struct, kw_only=True):
    """What ``--stats`` and ``--compare`` report about one generation."""

    tokens: int
    seconds: float
    tokens_per_second: float
    verifier_calls: int | None = None
    tokens_per_call: float | None = None
    mean_accepted: float | None = None
    acceptance_rate: float | None = None
    plain_tokens_per_second: float | None = None
    speedup: float | None = None
    identical: bool | None = None

    def lines(self) -> list[str]:
        text = [
            f"{self.tokens} tokens in {self.seconds:.2f} s: {self.tokens_per_second:.1f} tokens/s"
        ]
        if self.verifier_calls:
            text.append(
                f"{self.verifier_calls} verifier calls: {self.tokens_per_call:.2f} "
                f"tokens per call, {self.mean_accepted:.2f} drafts accepted per call "
                f"({100 * (self.acceptance_rate or 0):.0f}% of drafted)"
            )
        if self.speedup is not None:
            same = {True: "identical output", False: "outputs differ", None: ""}[self.identical]
            text.append(
                f"plain decoding: {self.plain_tokens_per_second:.1f} tokens/s; "
                f"speed-up {self.speedup:.2f}x" + (f"; {same}" if same else "")
            )
        return text


async def _timed(stream: Any, render: Callable[[Chunk], None] | None) -> tuple[Any, float]:
    started = time.perf_counter()
    async with stream:
        async for chunk in stream:
            if render is not None:
                render(chunk)
    return stream, time.perf_counter() - started


def _summary(stream: Any, seconds: float) -> Summary:
    usage, stats = stream.usage, stream.stats
    tokens = usage.completion_tokens if usage is not None else len(stream.token_ids)
    summary = Summary(
        tokens=tokens, seconds=seconds, tokens_per_second=tokens / seconds if seconds > 0 else 0.0
    )
    if stats is not None and stats.verifier_calls:
        summary.verifier_calls = stats.verifier_calls
        summary.tokens_per_call = stats.tokens_per_call
        summary.mean_accepted = stats.mean_accepted
        summary.acceptance_rate = stats.acceptance_rate
    return summary


# -- commands ---------------------------------------------------------------------------------


def _valid_text(text: str, what: str) -> str:
    """``text`` with invalid UTF-8 replaced by U+FFFD, and a warning on stderr when it had any.

    Python hands undecodable bytes of the command line and of stdin over as lone surrogates
    (``surrogateescape``); no tokenizer takes those.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        print(
            f"{PROG}: warning: {what} is not valid UTF-8; invalid bytes were replaced with U+FFFD",
            file=sys.stderr,
            flush=True,
        )
    return text


def _repair_text_options(args: argparse.Namespace) -> None:
    """``--system`` and ``--stop`` texts with invalid UTF-8 replaced (see ``_valid_text``)."""
    if args.system is not None:
        args.system = _valid_text(args.system, "--system")
    if args.stop:
        args.stop = [_valid_text(text, "--stop") for text in args.stop]


def _read_stdin() -> str:
    buffer = getattr(sys.stdin, "buffer", None)
    if buffer is None:  # a text stream without bytes underneath (tests, embedding)
        return sys.stdin.read()
    return buffer.read().decode("utf-8", "surrogateescape")


def _read_prompt(args: argparse.Namespace) -> Any:
    prompt = _read_stdin() if args.prompt == "-" else args.prompt
    prompt = _valid_text(prompt, "the prompt")
    if not prompt.strip():
        raise _UsageError(
            "the prompt is empty" + (" (nothing on stdin)" if args.prompt == "-" else "")
        )
    if args.chat or args.system:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        return [*messages, {"role": "user", "content": prompt}]
    return prompt


def _cmd_generate(args: argparse.Namespace) -> int:
    import anyio

    _repair_text_options(args)
    prompt = _read_prompt(args)
    if args.compare and args.remote:
        raise _UsageError("--compare needs local models (it decodes again without a drafter)")
    _check_options(args, prompt)
    backend = _make_backend(args)
    out = sys.stdout
    renderer: TextRenderer | JsonRenderer = (
        JsonRenderer(out) if args.json else TextRenderer(out, preview=args.preview)
    )
    options = _generation_options(args)

    async def run() -> int:
        from ._generate import generate

        try:
            if args.compare:  # first calls pay one-off costs: warm both paths up
                await generate(
                    prompt, backend=backend, **{**options, "max_new_tokens": 2}
                ).collect()
            stream = generate(
                prompt, backend=backend, draft_preview=args.preview or args.json, **options
            )
            try:
                stream, seconds = await _timed(stream, renderer.chunk)
            finally:
                renderer.end(newline=out.isatty())
            summary = _summary(stream, seconds)
            if args.compare:
                plain_backend = _plain_twin(backend)
                await generate(
                    prompt, backend=plain_backend, **{**options, "max_new_tokens": 2}
                ).collect()
                plain, plain_seconds = await _timed(
                    generate(prompt, backend=plain_backend, **options), None
                )
                plain_summary = _summary(plain, plain_seconds)
                summary.plain_tokens_per_second = plain_summary.tokens_per_second
                summary.speedup = (
                    summary.tokens_per_second / plain_summary.tokens_per_second
                    if plain_summary.tokens_per_second
                    else None
                )
                if args.temperature == 0:  # lossless: greedy output must match exactly
                    summary.identical = plain.token_ids == stream.token_ids
            if args.stats or args.compare:
                if isinstance(renderer, JsonRenderer):
                    renderer.emit({"event": "summary", **msgspec.to_builtins(summary)})
                else:
                    for line in summary.lines():
                        print(line, file=sys.stderr)
        finally:
            await backend.aclose()
        return 0

    return int(anyio.run(run))


def _plain_twin(backend: Any) -> Any:
    """The same verifier without a drafter: the plain-decoding baseline."""
    from ._backends.local import LocalBackend

    verifier = backend.verifier
    return LocalBackend(verifier.model, None, tokenizer=backend.tokenizer)


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        server = importlib.import_module("dg_stream.server")
    except ImportError as exc:
        # Serving local models needs them too: one command installs both.
        extras = ("server",) if args.remote else ("local", "server")
        raise missing_extra("dg-stream serve", extras, exc) from None
    _check_options(args)
    backend = _make_backend(args)
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


def _cmd_bench(argv: Sequence[str]) -> int:
    try:
        bench = importlib.import_module("dg_stream.bench")
    except ImportError as exc:
        if getattr(exc, "name", None) not in ("dg_stream.bench", None):
            raise missing_extra("dg-stream bench", ("bench",), exc) from None
        raise _UsageError(
            "benchmarks are not available in this installation (dg_stream.bench is missing)", code=1
        ) from None
    return int(bench.main(list(argv)) or 0)


# -- chat -------------------------------------------------------------------------------------


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
                return _valid_text(input("> "), "the input")
            except EOFError:
                return None
        line = self.stdin.readline()
        return None if line == "" else _valid_text(line.rstrip("\n"), "the input")

    async def reply(self, text: str, done: threading.Event) -> None:
        try:
            renderer = TextRenderer(self.stdout, preview=self.preview)
            stream = self.session.send(text, draft_preview=self.preview)
            try:
                stream, seconds = await _timed(stream, renderer.chunk)
            finally:
                renderer.end(newline=True)
            if self.stats:
                for line in _summary(stream, seconds).lines():
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


def _cmd_chat(args: argparse.Namespace) -> int:
    from anyio.from_thread import start_blocking_portal

    from ._chat import ChatSession

    _repair_text_options(args)
    _check_options(args)
    backend = _make_backend(args)
    options = _generation_options(args)
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


# -- entry point ------------------------------------------------------------------------------


def _error(message: str) -> None:
    first = message.strip().splitlines()[0] if message.strip() else "unknown error"
    print(f"{PROG}: error: {first}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``dg-stream`` with ``argv`` (default: the command line); returns the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    debug = bool(os.environ.get("DG_STREAM_DEBUG"))
    try:
        try:
            if args_list[:1] == ["bench"]:  # bench parses its own options
                return _cmd_bench(args_list[1:])
            args = build_parser().parse_args(args_list)
        except SystemExit as exc:  # --help, --version, or a usage error (already printed)
            return int(exc.code or 0) if isinstance(exc.code, int) else 2
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (``| head``): say nothing more, and do not let the interpreter
        # complain about the unflushable stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except _UsageError as exc:
        _error(str(exc))
        return exc.code
    except InvalidRequestError as exc:
        _error(f"invalid request: {exc}")
        return 2
    except DGStreamError as exc:
        if debug:
            traceback.print_exc()
        _error(str(exc))
        return 1
    except Exception as exc:  # a bug: still one line, with a way to get the details
        if debug:
            traceback.print_exc()
        _error(
            f"internal error: {type(exc).__name__}: {exc} (set DG_STREAM_DEBUG=1 for the traceback)"
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
