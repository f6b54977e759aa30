"""Tool calls: OpenAI's ``tools`` and ``tool_choice`` as a constraint, and the calls read back.

A forced call (``tool_choice`` ``"required"`` or a named function) is constrained decoding:

- a named function: the reply is that function's arguments, a JSON object following its
  ``parameters`` schema;
- ``"required"``: the reply is a JSON array of ``{"name": ..., "arguments": {...}}``, one item
  per call (at most one when ``parallel_tool_calls`` is false), each item following one tool's
  schema.

Both are ``ResponseFormat``s, so the round masks, cuts and forces them like any schema, and the
calls are read back from the text (``ToolCallReader``, as it streams). ``"auto"`` leaves the
model free to answer or call: the chat template shows it the tools, and the tokenizer's
``response_template`` (transformers' ``parse_response``) reads its calls back; a tokenizer
without one cannot do ``"auto"``, and says so. ``"none"`` is text.

Pure: no torch, no I/O.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from typing import Any, Literal

import msgspec

from ._config import JsonSchemaFormat, ResponseFormat
from ._errors import InvalidRequestError

__all__ = [
    "FunctionTool",
    "ToolCall",
    "ToolCallReader",
    "ToolChoice",
    "call_format",
    "parse_auto_reply",
    "supports_auto",
    "template_tools",
    "tool_call_format",
    "tool_choice_from",
    "tools_from",
]

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


class FunctionTool(msgspec.Struct, frozen=True, kw_only=True):
    """One function the model may call: its name, what it does, its arguments' schema."""

    name: str
    description: str | None = None
    parameters: dict[str, Any] = msgspec.field(default_factory=lambda: dict(_NO_PARAMETERS))

    def openai(self) -> dict[str, Any]:
        """OpenAI's shape, which chat templates read too."""
        function: dict[str, Any] = {"name": self.name, "parameters": self.parameters}
        if self.description:
            function["description"] = self.description
        return {"type": "function", "function": function}


class ToolChoice(msgspec.Struct, frozen=True):
    """``"none"``, ``"auto"``, ``"required"``, or ``"function"`` with the function's name."""

    mode: Literal["none", "auto", "required", "function"]
    name: str | None = None

    @property
    def forced(self) -> bool:
        return self.mode in ("required", "function")


class ToolCall(msgspec.Struct, frozen=True, kw_only=True):
    """A call the model made: ``arguments`` is JSON text, as OpenAI sends it."""

    id: str
    name: str
    arguments: str


def tools_from(value: Any, param: str = "tools") -> tuple[FunctionTool, ...]:
    """Tools in OpenAI's shape (``{"type": "function", "function": {...}}``) or flat
    (``{"name", "description", "parameters"}``); raises InvalidRequestError."""
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)):
        raise InvalidRequestError(f"{param} must be a list of tools", param=param)
    tools: list[FunctionTool] = []
    for i, item in enumerate(value):
        where = f"{param}[{i}]"
        if not isinstance(item, dict):
            raise InvalidRequestError(f"{where} must be an object", param=where)
        if "function" in item or "type" in item:
            if item.get("type", "function") != "function":
                raise InvalidRequestError(
                    f"{where}.type must be 'function', got {item.get('type')!r}", param=where
                )
            item = item.get("function")
            if not isinstance(item, dict):
                raise InvalidRequestError(f"{where}.function must be an object", param=where)
        name = item.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise InvalidRequestError(
                f"{where}: a function name is 1-64 letters, digits, '_' or '-', got {name!r}",
                param=where,
            )
        parameters = item.get("parameters")
        if parameters is None:
            parameters = dict(_NO_PARAMETERS)
        if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
            raise InvalidRequestError(
                f"{where}: the parameters of {name!r} must be a JSON schema of an object",
                param=where,
            )
        description = item.get("description")
        if description is not None and not isinstance(description, str):
            raise InvalidRequestError(f"{where}: description must be a string", param=where)
        tools.append(FunctionTool(name=name, description=description, parameters=parameters))
    names = [t.name for t in tools]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate is not None:
        raise InvalidRequestError(f"{param} names {duplicate!r} twice", param=param)
    return tuple(tools)


def template_tools(value: Any, param: str = "tools") -> list[dict[str, Any]] | None:
    """Tools as a chat template reads them (OpenAI's shape), validated; None for none."""
    return [tool.openai() for tool in tools_from(value, param)] or None


def tool_choice_from(
    value: Any, tools: Sequence[FunctionTool], param: str = "tool_choice"
) -> ToolChoice:
    """OpenAI's ``tool_choice``: ``None`` (``"auto"`` with tools, else ``"none"``), a mode,
    or ``{"type": "function", "function": {"name": ...}}``; LangChain's ``"any"`` means
    ``"required"`` and a bare name a function. Raises InvalidRequestError."""
    if value is None:
        return ToolChoice("auto" if tools else "none")
    if isinstance(value, dict):
        function = value.get("function")
        name = function.get("name") if isinstance(function, dict) else value.get("name")
        if value.get("type", "function") != "function" or not isinstance(name, str):
            raise InvalidRequestError(
                f"{param} must be 'none', 'auto', 'required' or "
                "{'type': 'function', 'function': {'name': ...}}",
                param=param,
            )
        value = name
    elif not isinstance(value, str):
        raise InvalidRequestError(f"{param} must be a string or an object", param=param)
    elif value in ("none", "auto", "required", "any"):
        if value != "none" and not tools:
            raise InvalidRequestError(f"{param} {value!r} needs tools", param=param)
        return ToolChoice("required" if value == "any" else value)  # type: ignore[arg-type]
    if value not in {t.name for t in tools}:
        known = ", ".join(repr(t.name) for t in tools) or "none"
        raise InvalidRequestError(
            f"{param} names the function {value!r}, which is not among the tools ({known})",
            param=param,
        )
    return ToolChoice("function", value)


def call_format(
    tools: Sequence[FunctionTool], choice: ToolChoice, parallel: bool = True
) -> ResponseFormat | None:
    """The constraint of a forced call (None when the choice forces none)."""
    if choice.mode == "function":
        tool = next(t for t in tools if t.name == choice.name)
        return ResponseFormat(
            type="json_schema",
            json_schema=JsonSchemaFormat(name=tool.name, schema=tool.parameters, strict=True),
        )
    if choice.mode != "required":
        return None
    items = [
        {
            "type": "object",
            "properties": {"name": {"const": t.name}, "arguments": t.parameters},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    schema: dict[str, Any] = {
        "type": "array",
        "items": items[0] if len(items) == 1 else {"anyOf": items},
        "minItems": 1,
    }
    if not parallel:
        schema["maxItems"] = 1
    return ResponseFormat(
        type="json_schema",
        json_schema=JsonSchemaFormat(name="tool_calls", schema=schema, strict=True),
    )


def tool_call_format(
    tools: Any, tool_choice: Any = "required", parallel_tool_calls: bool = True
) -> ResponseFormat | None:
    """The ``response_format`` that makes a reply a call of ``tools`` (OpenAI's shapes):
    ``tool_choice`` ``"required"`` (the reply is ``[{"name", "arguments"}, ...]``) or a
    function's name (the reply is its arguments); None for ``"none"`` and ``"auto"``. Read
    the calls back with ``ToolCallReader``."""
    parsed = tools_from(tools)
    return call_format(parsed, tool_choice_from(tool_choice, parsed), parallel_tool_calls)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolCallReader:
    """Reads a forced call's calls from its text as it streams.

    ``feed`` returns OpenAI-shaped deltas ``(index, id, name, arguments)``: a named function's
    arguments stream as they come (id and name on the first); a ``"required"`` reply's calls
    come whole, each as soon as its item closes. ``calls`` holds every call read so far."""

    def __init__(self, choice: ToolChoice) -> None:
        if not choice.forced:
            raise ValueError("only a forced tool choice is read back here")
        self.choice = choice
        self.calls: list[ToolCall] = []
        self._text = ""
        self._scanned = 0  # where the next array item starts (a "required" reply)
        self._decoder = json.JSONDecoder()

    @property
    def text(self) -> str:
        return self._text

    def feed(self, text: str) -> list[tuple[int, str | None, str | None, str]]:
        if not text:
            return []
        self._text += text
        if self.choice.mode == "function":
            assert self.choice.name is not None
            if not self.calls:
                call = ToolCall(id=new_call_id(), name=self.choice.name, arguments=self._text)
                self.calls.append(call)
                return [(0, call.id, call.name, text)]
            self.calls[0] = msgspec.structs.replace(self.calls[0], arguments=self._text)
            return [(0, None, None, text)]
        deltas: list[tuple[int, str | None, str | None, str]] = []
        while True:
            start = self._scanned
            while start < len(self._text) and self._text[start] in "[, \n\t":
                start += 1
            if start >= len(self._text) or self._text[start] != "{":
                return deltas
            try:
                item, end = self._decoder.raw_decode(self._text, start)
            except json.JSONDecodeError:
                return deltas  # the item is still being written
            self._scanned = end
            call = ToolCall(
                id=new_call_id(),
                name=str(item["name"]),
                arguments=json.dumps(item["arguments"], ensure_ascii=False, separators=(",", ":")),
            )
            deltas.append((len(self.calls), call.id, call.name, call.arguments))
            self.calls.append(call)

    def complete(self) -> bool:
        """Whether the whole reply parses (a reply cut by the token limit does not)."""
        try:
            json.loads(self._text)
        except json.JSONDecodeError:
            return False
        return True


def parse_auto_reply(
    tokenizer: Any, text: str, prefix: str, tools: Sequence[FunctionTool]
) -> tuple[str, list[ToolCall]]:
    """An ``"auto"`` reply's text and calls, read by the tokenizer's ``response_template``
    (transformers' ``parse_response``)."""
    message = tokenizer.parse_response(text, prefix=prefix, tools=[t.openai() for t in tools])
    calls = []
    for raw in message.get("tool_calls") or []:
        function = raw.get("function", raw)
        arguments = function.get("arguments", {})
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False, separators=(",", ":"))
        calls.append(
            ToolCall(
                id=raw.get("id") or new_call_id(),
                name=str(function.get("name")),
                arguments=arguments,
            )
        )
    content = message.get("content") or ""
    return (content if isinstance(content, str) else json.dumps(content)), calls


def supports_auto(tokenizer: Any) -> bool:
    """Whether ``"auto"`` can be served: a chat template to show the tools and a
    ``response_template`` to read calls back."""
    return bool(
        getattr(tokenizer, "chat_template", None)
        and getattr(tokenizer, "response_template", None)
        and hasattr(tokenizer, "parse_response")
    )
