"""``dg-stream generate --compare``: the same prompt decoded again without a drafter, for the
speed-up and (greedy) the check that the outputs are identical."""

from __future__ import annotations

from typing import Any

from ._summary import Summary, summarize, timed

__all__ = ["compare", "plain_twin", "warm_up"]


async def warm_up(prompt: Any, backend: Any, options: dict[str, Any]) -> None:
    """First calls pay one-off costs: a two-token generation before the timed one."""
    from .._generate import generate

    await generate(prompt, backend=backend, **{**options, "max_new_tokens": 2}).collect()


async def compare(
    prompt: Any, backend: Any, options: dict[str, Any], stream: Any, summary: Summary
) -> None:
    """Decode ``prompt`` with ``backend``'s verifier alone and add the plain speed, the speed-up
    and, when greedy, whether the output is ``stream``'s, to ``summary``."""
    from .._generate import generate

    plain_backend = plain_twin(backend)
    await warm_up(prompt, plain_backend, options)
    plain, plain_seconds = await timed(generate(prompt, backend=plain_backend, **options), None)
    plain_summary = summarize(plain, plain_seconds)
    summary.plain_tokens_per_second = plain_summary.tokens_per_second
    summary.speedup = (
        summary.tokens_per_second / plain_summary.tokens_per_second
        if plain_summary.tokens_per_second
        else None
    )
    if options["temperature"] == 0:  # lossless: greedy output must match exactly
        summary.identical = plain.token_ids == stream.token_ids


def plain_twin(backend: Any) -> Any:
    """The same verifier without a drafter: the plain-decoding baseline."""
    from .._backends.local import LocalBackend

    verifier = backend.verifier
    return LocalBackend(verifier.model, None, tokenizer=backend.tokenizer)
