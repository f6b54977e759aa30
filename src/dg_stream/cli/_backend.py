"""The backend a command runs on (local models or ``--remote``) and the generation options it
sends, both from the parsed command line."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ._usage import UsageError

__all__ = ["check_options", "generation_options", "make_backend"]


def make_backend(args: argparse.Namespace, *, quiet: bool = False) -> Any:
    """A ``RemoteBackend`` for ``--remote``, else a ``LocalBackend`` (the embedded pair unless
    ``--verifier``); "loading models…" shows on a terminal while it loads."""
    if args.remote:
        if args.verifier or args.drafter or args.tokenizer:
            raise UsageError("--remote cannot be combined with --verifier/--drafter/--tokenizer")
        from .._backends.remote import RemoteBackend

        return RemoteBackend(args.remote, args.model, api=args.api, timeout=args.timeout)
    from .._backends.local import LocalBackend

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


def generation_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of ``generate()`` that the command line sets."""
    options: dict[str, Any] = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "repetition_penalty": args.repetition_penalty,
        "seed": args.seed,
        "stop": args.stop,
    }
    if getattr(args, "json_schema", None) is not None:
        options["response_format"] = args.json_schema
    for name in ("block_size", "steps", "adaptive", "confidence"):
        if getattr(args, name, None) is not None:
            options[name] = getattr(args, name)
    return options


def check_options(args: argparse.Namespace, prompt: Any = "x") -> None:
    """Validate the request options before any model loads (raises InvalidRequestError)."""
    from .._config import SpeculativeConfig, build_request

    if not hasattr(args, "temperature"):  # serve: the speculative defaults only
        SpeculativeConfig(block_size=args.block_size, steps=args.steps, adaptive=args.adaptive)
        return
    options = generation_options(args)
    speculative = {
        name: options.pop(name) for name in SpeculativeConfig.__struct_fields__ if name in options
    }
    if getattr(args, "system", None) is not None and isinstance(prompt, str):
        prompt = [{"role": "system", "content": args.system}, {"role": "user", "content": prompt}]
    build_request(prompt, **options, draft_preview=False, speculative_options=speculative)
