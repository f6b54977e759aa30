"""The ``dg-stream`` argument parser: the commands, their options and the handler each runs."""

from __future__ import annotations

import argparse
import importlib
import os
from typing import Any

from .._argtypes import OneLineErrorParser, non_negative_float, positive_int
from .._errors import install_hint
from ._chat_loop import cmd_chat
from ._generate import cmd_generate
from ._serve import cmd_serve
from ._usage import PROG, missing

__all__ = ["build_parser"]

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
    group.add_argument(
        "--json-schema",
        type=_json_schema_file,
        metavar="FILE",
        help="reply with JSON that follows this JSON schema (exactly, drafts included)",
    )
    spec = _speculative_options(parser, "speculative decoding")
    spec.add_argument(
        "--confidence",
        type=float,
        help="unmask every draft position above this probability in one step",
    )


def _json_schema_file(path: str) -> dict[str, Any]:
    """``--json-schema FILE``: the response format of the schema in FILE (read once, here)."""
    import json
    from pathlib import Path

    try:
        schema = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"cannot read a JSON schema from {path}: {exc}") from None
    if not isinstance(schema, dict):
        raise argparse.ArgumentTypeError(f"{path} holds JSON but not a schema (an object)")
    name = Path(path).stem or "response"
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


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
    from .. import __version__

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
    gen.set_defaults(func=cmd_generate)

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
    chat.set_defaults(func=cmd_chat)

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
    serve.set_defaults(func=cmd_serve)

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
            func=missing("training", "dg_stream.train.commands", install_hint("train"))
        )
    else:
        train_commands.add_parser(commands)
    return parser
