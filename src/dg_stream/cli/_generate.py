"""``dg-stream generate``: one prompt (or stdin) streamed to stdout, as text or JSON events."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import msgspec

from ._backend import check_options, generation_options, make_backend
from ._compare import compare, warm_up
from ._render import JsonRenderer, TextRenderer
from ._summary import summarize, timed
from ._text import repair_text_options, valid_text
from ._usage import UsageError

__all__ = ["cmd_generate"]


def _read_stdin() -> str:
    buffer = getattr(sys.stdin, "buffer", None)
    if buffer is None:  # a text stream without bytes underneath (tests, embedding)
        return sys.stdin.read()
    return buffer.read().decode("utf-8", "surrogateescape")


def _read_prompt(args: argparse.Namespace) -> Any:
    prompt = _read_stdin() if args.prompt == "-" else args.prompt
    prompt = valid_text(prompt, "the prompt")
    if not prompt.strip():
        raise UsageError(
            "the prompt is empty" + (" (nothing on stdin)" if args.prompt == "-" else "")
        )
    if args.chat or args.system:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        return [*messages, {"role": "user", "content": prompt}]
    return prompt


def cmd_generate(args: argparse.Namespace) -> int:
    import anyio

    repair_text_options(args)
    prompt = _read_prompt(args)
    if args.compare and args.remote:
        raise UsageError("--compare needs local models (it decodes again without a drafter)")
    check_options(args, prompt)
    backend = make_backend(args)
    out = sys.stdout
    renderer: TextRenderer | JsonRenderer = (
        JsonRenderer(out) if args.json else TextRenderer(out, preview=args.preview)
    )
    options = generation_options(args)

    async def run() -> int:
        from .._generate import generate

        try:
            if args.compare:  # first calls pay one-off costs: warm both paths up
                await warm_up(prompt, backend, options)
            stream = generate(
                prompt, backend=backend, draft_preview=args.preview or args.json, **options
            )
            try:
                stream, seconds = await timed(stream, renderer.chunk)
            finally:
                renderer.end(newline=out.isatty())
            summary = summarize(stream, seconds)
            if args.compare:
                await compare(prompt, backend, options, stream, summary)
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
