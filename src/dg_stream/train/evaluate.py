"""Evaluation of a verifier/drafter pair: mean accepted tokens per verifier call."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["acceptance", "held_out_prompts"]


def held_out_prompts(docs: Sequence[str], count: int = 16, max_chars: int = 400) -> list[str]:
    """Deterministic prompts from held-out code: text up to a function header, when possible."""
    prompts: list[str] = []
    for doc in docs:
        match = re.search(r"^[ \t]*def [^\n]*:\n", doc[200:], flags=re.MULTILINE)
        end = 200 + match.end() if match else min(len(doc), max_chars)
        prompt = doc[max(0, end - max_chars) : end]
        if prompt.strip():
            prompts.append(prompt)
        if len(prompts) == count:
            break
    return prompts


def acceptance(
    backend: Any, prompts: Sequence[str], block_size: int, steps: int = 1, max_new_tokens: int = 96
) -> dict[str, Any]:
    """Greedy generations on ``backend``; totals over all prompts (synchronous, no async)."""
    from .._config import GenerationRequest, SpeculativeConfig

    calls = accepted = committed = 0
    # reached[i]: calls whose block had slot i+1; kept[i]: of those, calls that kept it.
    reached = [0] * block_size
    kept = [0] * block_size
    for prompt in prompts:
        request = GenerationRequest(
            prompt=prompt,
            max_new_tokens=max_new_tokens,
            # A fixed block: the figure is acceptance at this block size.
            speculative=SpeculativeConfig(block_size=block_size, steps=steps, adaptive=False),
        )
        session = backend.engine.session(request)
        while (chunk := session.step()) is not None:
            if chunk.step is None:
                continue
            for i in range(min(chunk.step.drafted, block_size)):
                reached[i] += 1
                kept[i] += int(chunk.step.accepted > i)
        calls += session.stats.verifier_calls
        accepted += session.stats.accepted_tokens
        committed += session.stats.committed_tokens
    return {
        "block_size": block_size,
        "steps": steps,
        # The totals too, so that results over several prompt sets can be summed exactly.
        "verifier_calls": calls,
        "accepted_tokens": accepted,
        "committed_tokens": committed,
        "mean_accepted_per_call": round(accepted / max(1, calls), 3),
        "tokens_per_call": round(committed / max(1, calls), 3),
        # Share of calls that kept slot i given they drafted it: slot 1 is the drafter's
        # agreement with the verifier's next token.
        "accepted_by_position": [
            round(k / r, 3) if r else 0.0 for k, r in zip(kept, reached, strict=True)
        ],
    }


def evaluate_pair(
    verifier_dir: str | Path,
    drafter_dir: str | Path,
    prompts: Sequence[str],
    block_sizes: Sequence[int] = (4, 8, 16),
    max_new_tokens: int = 96,
) -> list[dict[str, Any]]:
    from .._backends.local import LocalBackend

    backend = LocalBackend(verifier_dir, drafter_dir, device="cpu")
    return [acceptance(backend, prompts, k, max_new_tokens=max_new_tokens) for k in block_sizes]
