"""Request and option types: frozen, keyword-only, validated on construction."""

from __future__ import annotations

import contextlib
import json
import math
import numbers
from typing import Any

import msgspec

from ._errors import InvalidRequestError

__all__ = [
    "ROLES",
    "GenerationRequest",
    "JsonSchemaFormat",
    "Message",
    "ResponseFormat",
    "SamplingParams",
    "SpeculativeConfig",
    "StaticShapes",
    "response_format_from",
]

#: The roles a chat message may have. Chat templates and the plain format know these three;
#: any other (a typo, "wizard") would reach the model as text it was never trained on.
ROLES = ("system", "user", "assistant", "tool")


def _check(condition: bool, message: str, param: str) -> None:
    if not condition:
        raise InvalidRequestError(message, param=param)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    """A finite int or float (bools are not numbers here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _as_int(value: Any) -> Any:
    """A plain int for any integral number (numpy's included); other values pass through."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    return value


def _as_float(value: Any) -> Any:
    """A plain float for any real number (numpy's included); other values pass through."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # an int too large for a float
            return math.inf
    return value


def check_text(value: object, what: str, param: str) -> None:
    """Refuse a non-string, or a string that is not valid Unicode text (lone surrogates).

    Lone surrogates are what Python's ``surrogateescape`` makes of invalid UTF-8 bytes (in
    ``sys.argv`` or ``sys.stdin``); no tokenizer or JSON encoder accepts them.
    """
    _check(isinstance(value, str), f"{what} must be a string, got {type(value).__name__}", param)
    assert isinstance(value, str)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = value[exc.start]
        raise InvalidRequestError(
            f"{what} is not valid UTF-8 text: it holds the lone surrogate {bad!r} at index "
            f"{exc.start} (decode bytes with errors='replace')",
            param=param,
        ) from None


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How the verifier's next-token distribution is shaped; ``temperature=0`` is greedy."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        _check(
            _is_number(self.temperature) and self.temperature >= 0,
            f"temperature must be a finite number >= 0, got {self.temperature!r}",
            "temperature",
        )
        _check(
            self.top_k is None or (_is_int(self.top_k) and self.top_k >= 1),
            f"top_k must be an integer >= 1, got {self.top_k!r}",
            "top_k",
        )
        _check(
            self.top_p is None or (_is_number(self.top_p) and 0 < self.top_p <= 1),
            f"top_p must be a number in (0, 1], got {self.top_p!r}",
            "top_p",
        )
        _check(
            self.repetition_penalty is None
            or (_is_number(self.repetition_penalty) and self.repetition_penalty > 0),
            f"repetition_penalty must be a number > 0, got {self.repetition_penalty!r}",
            "repetition_penalty",
        )
        _check(
            self.seed is None or (_is_int(self.seed) and -(2**63) <= self.seed < 2**64),
            f"seed must be an integer in [-2**63, 2**64), got {self.seed!r}",
            "seed",
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
            self.block_size is None or (_is_int(self.block_size) and 1 <= self.block_size <= 64),
            f"block_size must be an integer in [1, 64], got {self.block_size!r}",
            "block_size",
        )
        _check(
            self.steps is None or (_is_int(self.steps) and self.steps >= 1),
            f"steps must be an integer >= 1, got {self.steps!r}",
            "steps",
        )
        _check(
            self.adaptive is None or isinstance(self.adaptive, bool),
            f"adaptive must be True or False, got {self.adaptive!r}",
            "adaptive",
        )
        _check(
            self.confidence is None or (_is_number(self.confidence) and 0 < self.confidence <= 1),
            f"confidence must be a number in (0, 1], got {self.confidence!r}",
            "confidence",
        )


class Message(msgspec.Struct, frozen=True, forbid_unknown_fields=False, omit_defaults=True):
    """One chat message. An assistant's may carry the ``tool_calls`` it made (OpenAI's
    shape: ``{"id", "type": "function", "function": {"name", "arguments"}}``); a ``tool``
    message answers one of them (``tool_call_id``, and the function's ``name``)."""

    role: str
    content: str
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        check_text(self.role, "a message's role", "messages")
        _check(
            self.role in ROLES,
            f"a message's role must be one of {', '.join(map(repr, ROLES))}, got {self.role!r}",
            "messages",
        )
        check_text(self.content, "a message's content", "messages")
        _check(
            self.tool_calls is None or self.role == "assistant",
            "only an assistant message carries tool_calls",
            "messages",
        )

    def template_dict(self) -> dict[str, Any]:
        """The message as chat templates read it (the fields it sets)."""
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls is not None:
            # Templates index the arguments as a mapping; OpenAI sends them as JSON text.
            out["tool_calls"] = [_template_call(call) for call in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            out["name"] = self.name
        return out


def _template_call(call: dict[str, Any]) -> dict[str, Any]:
    function = dict(call.get("function", call))
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        with contextlib.suppress(ValueError):
            function["arguments"] = json.loads(arguments)
    return {**call, "type": "function", "function": function}


def message_from(value: Any, param: str = "prompt") -> Message:
    """A ``Message`` from a mapping (``role``, ``content``, and the tool fields)."""
    if isinstance(value, Message):
        return value
    if not isinstance(value, dict) or ("content" not in value and not value.get("tool_calls")):
        raise InvalidRequestError(
            "each message needs 'role' and 'content' (an assistant's calls may stand for its "
            "content)",
            param=param,
        )
    try:
        return Message(
            role=value["role"],
            content=value.get("content") or "",
            tool_calls=value.get("tool_calls"),
            tool_call_id=value.get("tool_call_id"),
            name=value.get("name"),
        )
    except KeyError as exc:
        raise InvalidRequestError(
            f"each message needs a 'role' ({exc} missing)", param=param
        ) from None


class JsonSchemaFormat(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=False):
    """OpenAI's ``json_schema`` member: a name, the schema, and ``strict`` (always enforced
    here: the grammar admits only what the schema describes)."""

    name: str = "response"
    schema: dict[str, Any] = msgspec.field(default_factory=dict)
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What shape a reply must take: OpenAI's ``{"type": "text" | "json_object" |
    "json_schema", "json_schema": {...}}``, or dg_stream's ``{"type": "regex", "pattern"}``
    and ``{"type": "choice", "choices": [...]}``. ``response_format_from`` also takes a
    Pydantic model or msgspec Struct type (their JSON schema)."""

    type: str = "text"
    json_schema: JsonSchemaFormat | None = None
    pattern: str | None = None
    choices: list[str] | None = None

    def __post_init__(self) -> None:
        kinds = ("text", "json_object", "json_schema", "regex", "choice")
        _check(
            self.type in kinds,
            f"response_format type must be one of {', '.join(kinds)}, got {self.type!r}",
            "response_format",
        )
        if self.type == "json_schema":
            _check(
                self.json_schema is not None and isinstance(self.json_schema.schema, dict),
                "response_format json_schema needs a 'json_schema' object with a 'schema'",
                "response_format",
            )
        if self.type == "regex":
            _check(
                isinstance(self.pattern, str) and self.pattern != "",
                "response_format regex needs a non-empty 'pattern'",
                "response_format",
            )
        if self.type == "choice":
            _check(
                isinstance(self.choices, list)
                and len(self.choices) > 0
                and all(isinstance(c, str) and c for c in self.choices),
                "response_format choice needs 'choices', a list of non-empty strings",
                "response_format",
            )

    @property
    def constrains(self) -> bool:
        return self.type != "text"

    def cache_key(self) -> str:
        """The same text for the same format (compiled grammars are cached by it)."""
        return json.dumps(msgspec.to_builtins(self), sort_keys=True)


def response_format_from(value: Any) -> ResponseFormat | None:
    """A ``ResponseFormat`` from what ``generate(response_format=...)`` takes: a mapping in
    OpenAI's shape (or dg_stream's regex/choice), a Pydantic model or msgspec Struct type, a
    ``ResponseFormat``, or None (raises InvalidRequestError)."""
    if value is None or isinstance(value, ResponseFormat):
        return value
    if isinstance(value, type):
        if hasattr(value, "model_json_schema"):  # a Pydantic model
            schema = value.model_json_schema()
        elif issubclass(value, msgspec.Struct):
            schema = msgspec.json.schema(value)
        else:
            raise InvalidRequestError(
                f"response_format type {value.__name__} is neither a Pydantic model nor a "
                "msgspec Struct",
                param="response_format",
            )
        return ResponseFormat(
            type="json_schema",
            json_schema=JsonSchemaFormat(name=value.__name__, schema=schema, strict=True),
        )
    try:
        return msgspec.convert(value, ResponseFormat)
    except msgspec.ValidationError as exc:
        raise InvalidRequestError(
            f"response_format is not understood: {exc}", param="response_format"
        ) from None


class GenerationRequest(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True
):
    """Everything one generation needs; exactly one of ``prompt`` and ``messages`` is set.

    ``fit_max_new_tokens``: ``max_new_tokens`` is a cap that shrinks to the room the prompt
    leaves in the backend's context (OpenAI's chat default: "what fits"); the request is
    refused only when the prompt leaves no room. Otherwise a prompt plus ``max_new_tokens``
    beyond the context is refused.

    On the wire (``POST /v1/dg/generate``) fields at their defaults are left out, so a server
    that predates a field still takes a request that does not use it."""

    prompt: str | list[int] | None = None
    messages: list[Message] | None = None
    max_new_tokens: int = 256
    sampling: SamplingParams = SamplingParams()
    speculative: SpeculativeConfig = SpeculativeConfig()
    stop: tuple[str, ...] = ()
    draft_preview: bool = False
    fit_max_new_tokens: bool = False
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None  # shown to the model by the chat template

    def __post_init__(self) -> None:
        _check(
            (self.prompt is None) != (self.messages is None),
            "give exactly one of a prompt and a list of messages",
            "prompt",
        )
        _check(
            self.tools is None or self.messages is not None,
            "tools are shown to the model with chat messages: give messages, not a prompt",
            "tools",
        )
        if isinstance(self.prompt, list):
            _check(len(self.prompt) > 0, "the prompt is empty", "prompt")
            _check(
                all(_is_int(t) and t >= 0 for t in self.prompt),
                "token ids must be non-negative integers",
                "prompt",
            )
        elif self.prompt is not None:
            check_text(self.prompt, "the prompt", "prompt")
            _check(self.prompt != "", "the prompt is empty", "prompt")
        if self.messages is not None:
            _check(
                isinstance(self.messages, list) and len(self.messages) > 0,
                "the message list is empty",
                "messages",
            )
            _check(
                all(isinstance(m, Message) for m in self.messages),
                "messages must be Message values",
                "messages",
            )
        _check(
            _is_int(self.max_new_tokens) and self.max_new_tokens >= 1,
            f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}",
            "max_new_tokens",
        )
        _check(isinstance(self.stop, tuple), "stop must be a string or a list of strings", "stop")
        for stop in self.stop:
            check_text(stop, "a stop string", "stop")
            _check(stop != "", "stop strings must be non-empty", "stop")
        _check(
            isinstance(self.draft_preview, bool),
            f"draft_preview must be True or False, got {self.draft_preview!r}",
            "draft_preview",
        )
        _check(
            isinstance(self.fit_max_new_tokens, bool),
            f"fit_max_new_tokens must be True or False, got {self.fit_max_new_tokens!r}",
            "fit_max_new_tokens",
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
    response_format: Any = None,
    tools: list[dict[str, Any]] | None = None,
) -> GenerationRequest:
    """Turn ``generate()``'s arguments into a validated request (raises InvalidRequestError);
    ``tools`` as ``_tools.template_tools`` gives them."""
    unknown = set(speculative_options) - set(SpeculativeConfig.__struct_fields__)
    if unknown:
        raise InvalidRequestError(
            f"unknown option(s) {sorted(unknown)}; speculative options are "
            f"{list(SpeculativeConfig.__struct_fields__)}",
            param=sorted(unknown)[0],
        )
    if isinstance(stop, str):
        stop = (stop,)
    elif stop is None:
        stop = ()
    elif isinstance(stop, (list, tuple)):
        stop = tuple(stop)
    else:
        raise InvalidRequestError(
            f"stop must be a string or a list of strings, got {type(stop).__name__}", param="stop"
        )
    messages: list[Message] | None = None
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
        messages = [message_from(m) for m in prompt]
        prompt = None
    elif not isinstance(prompt, (str, list)):
        raise InvalidRequestError(
            f"prompt must be a string, a list of token ids or a list of messages, got "
            f"{type(prompt).__name__}",
            param="prompt",
        )
    return GenerationRequest(
        prompt=prompt,
        messages=messages,
        max_new_tokens=_as_int(max_new_tokens),
        sampling=SamplingParams(
            temperature=_as_float(temperature),
            top_k=_as_int(top_k),
            top_p=_as_float(top_p),
            repetition_penalty=_as_float(repetition_penalty),
            seed=_as_int(seed),
        ),
        speculative=SpeculativeConfig(
            **{
                name: _as_float(value) if name == "confidence" else _as_int(value)
                for name, value in speculative_options.items()
            }
        ),
        stop=stop,
        draft_preview=draft_preview,
        response_format=response_format_from(response_format),
        tools=tools,
    )


class StaticShapes(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How a ``LocalBackend`` fixes the decode round's shapes (``static_shapes=``).

    ``width``: tokens fed per row each round (the newest one and up to ``width - 1`` drafts;
    default: the backend's block size + 1). ``compile``: capture the forward with
    ``torch.compile`` (``mode`` defaults to ``"reduce-overhead"`` on CUDA, which records CUDA
    graphs); ``backend`` is torch.compile's (``"eager"`` checks capture without generating
    code)."""

    width: int | None = None
    compile: bool = True
    backend: str = "inductor"
    mode: str | None = None

    def __post_init__(self) -> None:
        if self.width is not None and (not isinstance(self.width, int) or self.width < 1):
            raise ValueError(f"width must be a positive integer, got {self.width!r}")
