"""Request and option types: frozen, keyword-only, validated on construction."""

from __future__ import annotations

import math
from typing import Any

import msgspec

from ._errors import InvalidRequestError

__all__ = ["GenerationRequest", "Message", "SamplingParams", "SpeculativeConfig"]


def _check(condition: bool, message: str, param: str) -> None:
    if not condition:
        raise InvalidRequestError(message, param=param)


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How the verifier's next-token distribution is shaped; ``temperature=0`` is greedy."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        _check(
            math.isfinite(self.temperature) and self.temperature >= 0,
            f"temperature must be a finite number >= 0, got {self.temperature}",
            "temperature",
        )
        _check(
            self.top_k is None or self.top_k >= 1, f"top_k must be >= 1, got {self.top_k}", "top_k"
        )
        _check(
            self.top_p is None or (math.isfinite(self.top_p) and 0 < self.top_p <= 1),
            f"top_p must be in (0, 1], got {self.top_p}",
            "top_p",
        )
        _check(
            self.repetition_penalty is None
            or (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0),
            f"repetition_penalty must be > 0, got {self.repetition_penalty}",
            "repetition_penalty",
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class SpeculativeConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Drafting options; ``None`` fields take the backend's defaults.

    ``block_size`` is the number of tokens drafted per verifier call, ``steps`` the number of
    denoising steps of a diffusion drafter, ``adaptive`` chooses each call's block size (up to
    4 x ``block_size``, 0 included: plain decoding when drafting does not pay) from the measured
    acceptance and the measured cost of verifier and drafter calls, ``confidence`` unmasks
    every position whose drafter probability exceeds it in one step (at least one per step).
    """

    block_size: int | None = None
    steps: int | None = None
    adaptive: bool | None = None
    confidence: float | None = None

    def __post_init__(self) -> None:
        _check(
            self.block_size is None or 1 <= self.block_size <= 64,
            f"block_size must be in [1, 64], got {self.block_size}",
            "block_size",
        )
        _check(
            self.steps is None or self.steps >= 1, f"steps must be >= 1, got {self.steps}", "steps"
        )
        _check(
            self.confidence is None or 0 < self.confidence <= 1,
            f"confidence must be in (0, 1], got {self.confidence}",
            "confidence",
        )


class Message(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    """One chat message."""

    role: str
    content: str


class GenerationRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Everything one generation needs; exactly one of ``prompt`` and ``messages`` is set."""

    prompt: str | list[int] | None = None
    messages: list[Message] | None = None
    max_new_tokens: int = 256
    sampling: SamplingParams = SamplingParams()
    speculative: SpeculativeConfig = SpeculativeConfig()
    stop: tuple[str, ...] = ()
    draft_preview: bool = False

    def __post_init__(self) -> None:
        _check(
            (self.prompt is None) != (self.messages is None),
            "give exactly one of a prompt and a list of messages",
            "prompt",
        )
        if isinstance(self.prompt, str):
            _check(self.prompt != "", "the prompt is empty", "prompt")
        elif isinstance(self.prompt, list):
            _check(len(self.prompt) > 0, "the prompt is empty", "prompt")
            _check(
                all(isinstance(t, int) and t >= 0 for t in self.prompt),
                "token ids must be non-negative integers",
                "prompt",
            )
        if self.messages is not None:
            _check(len(self.messages) > 0, "the message list is empty", "messages")
        _check(
            self.max_new_tokens >= 1,
            f"max_new_tokens must be >= 1, got {self.max_new_tokens}",
            "max_new_tokens",
        )
        _check(
            all(isinstance(s, str) and s for s in self.stop),
            "stop strings must be non-empty",
            "stop",
        )


def build_request(
    prompt: Any,
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    repetition_penalty: float | None,
    seed: int | None,
    stop: str | list[str] | tuple[str, ...] | None,
    draft_preview: bool,
    speculative_options: dict[str, Any],
) -> GenerationRequest:
    """Turn ``generate()``'s arguments into a validated request (raises InvalidRequestError)."""
    unknown = set(speculative_options) - set(SpeculativeConfig.__struct_fields__)
    if unknown:
        raise InvalidRequestError(
            f"unknown option(s) {sorted(unknown)}; speculative options are "
            f"{list(SpeculativeConfig.__struct_fields__)}",
            param=sorted(unknown)[0],
        )
    if isinstance(stop, str):
        stop = (stop,)
    messages: list[Message] | None = None
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
        try:
            messages = [Message(role=m["role"], content=m["content"]) for m in prompt]
        except KeyError as exc:
            raise InvalidRequestError(
                f"each message needs 'role' and 'content' ({exc} missing)", param="prompt"
            ) from None
        prompt = None
    elif not isinstance(prompt, (str, list)):
        raise InvalidRequestError(
            f"prompt must be a string, a list of token ids or a list of messages, got "
            f"{type(prompt).__name__}",
            param="prompt",
        )
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
        raise InvalidRequestError("max_new_tokens must be an integer", param="max_new_tokens")
    return GenerationRequest(
        prompt=prompt,
        messages=messages,
        max_new_tokens=max_new_tokens,
        sampling=SamplingParams(
            temperature=float(temperature),
            top_k=top_k,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            seed=seed,
        ),
        speculative=SpeculativeConfig(**speculative_options),
        stop=tuple(stop or ()),
        draft_preview=draft_preview,
    )
