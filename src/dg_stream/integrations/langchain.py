"""``ChatDGStream``: a LangChain chat model over any dg_stream backend, local or remote.

Needs the ``langchain`` extra (``pip install '.[langchain]'`` in a dg_stream checkout:
langchain-core only)::

    from dg_stream import LocalBackend
    from dg_stream.integrations.langchain import ChatDGStream

    model = ChatDGStream(backend=LocalBackend("path/to/verifier", "path/to/drafter"),
                         max_tokens=256)
    async for chunk in model.astream("Write a haiku about diffusion."):
        print(chunk.content, end="", flush=True)

Each ``AIMessageChunk`` carries the text dg_stream committed in one step; the last one has
``chunk_position="last"``, ``usage_metadata`` and ``response_metadata`` (``finish_reason``,
``model_name`` and dg_stream's ``stats``). Draft previews are never part of ``content`` (nor of
any field that LangChain merges across chunks): pass ``on_draft=callback``, to the model or to
one call, and ``callback(text, draft)`` gets the text committed so far and the provisional
continuation after every step.

Tools and structured output are constrained decoding: ``bind_tools(tools, tool_choice="any")``
(or a tool's name) makes the reply a call that follows the tools' schemas exactly, speculation
included, and ``with_structured_output(Schema)`` a JSON reply that follows ``Schema``::

    weather = model.bind_tools([get_weather], tool_choice="get_weather")
    weather.invoke("Weather in Oslo?").tool_calls   # [{"name": "get_weather", "args": {...}}]
    model.with_structured_output(Joke).invoke("Tell me a joke.")   # Joke(setup=..., ...)

``tool_choice="auto"`` (LangChain's default) leaves the model free to answer or call; that
needs a tokenizer whose ``response_template`` reads its calls back, and a model without one
is refused with what to pass instead.
"""

from __future__ import annotations

import inspect
import json
import re
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from functools import partial
from operator import itemgetter
from pathlib import Path
from typing import Any, Literal

import anyio
import msgspec
from anyio.from_thread import BlockingPortal

from .._backends.base import Backend
from .._chunks import Chunk, Stats
from .._errors import InvalidRequestError, missing_extra
from .._generate import _get_default_backend, generate, request_for
from .._prompt import plain_chat_stops, render_chat
from .._stream import GenerationStream
from .._tools import (
    FunctionTool,
    ToolCallReader,
    ToolChoice,
    call_format,
    parse_auto_reply,
    supports_auto,
    tool_choice_from,
    tools_from,
)

try:
    from langchain_core.callbacks import (
        AsyncCallbackManagerForLLMRun,
        CallbackManagerForLLMRun,
    )
    from langchain_core.language_models import BaseChatModel, LangSmithParams, LanguageModelInput
    from langchain_core.language_models.chat_models import generate_from_stream
    from langchain_core.messages import (
        AIMessage,
        AIMessageChunk,
        BaseMessage,
        ChatMessage,
        HumanMessage,
        InvalidToolCall,
        SystemMessage,
        ToolMessage,
        UsageMetadata,
    )
    from langchain_core.messages.tool import invalid_tool_call, tool_call_chunk
    from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
    from langchain_core.output_parsers.openai_tools import (
        JsonOutputKeyToolsParser,
        PydanticToolsParser,
    )
    from langchain_core.outputs import ChatGenerationChunk, ChatResult
    from langchain_core.runnables import Runnable, RunnableLambda, RunnableMap, RunnablePassthrough
    from langchain_core.tools import BaseTool
    from langchain_core.utils import from_env, secret_from_env
    from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
    from langchain_core.utils.pydantic import is_basemodel_subclass
    from pydantic import ConfigDict, Field, SecretStr
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise missing_extra("the LangChain chat model", ("langchain",), exc) from exc

__all__ = ["ChatDGStream", "DraftCallback", "to_dg_messages"]

#: ``on_draft(text, draft)``: the text committed so far and the provisional continuation (empty
#: when there is none). In async calls an awaitable it returns is awaited.
DraftCallback = Callable[[str, str], Any]

#: Options that ``invoke(..., name=value)`` / ``bind(name=value)`` may set for one call.
CALL_OPTIONS = (
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "seed",
    "on_draft",
    "block_size",
    "steps",
    "adaptive",
    "confidence",
)
#: Options a call takes that the model has no field for: ``bind_tools`` and
#: ``with_structured_output`` bind them, and ``bind(response_format=...)`` may too.
REPLY_OPTIONS = ("tools", "tool_choice", "parallel_tool_calls", "response_format")
_SPECULATIVE = ("block_size", "steps", "adaptive", "confidence")
_ROLES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "ai": "assistant",
}
#: Content blocks of an AI message that stand for its tool calls (sent as ``tool_calls``).
_CALL_BLOCKS = frozenset({"tool_use", "tool_call", "tool_call_chunk", "function_call"})
_DEFAULT_MODEL_NAME = "dg-stream-default"


def _text_of(message: BaseMessage) -> str:
    """A message's text; content blocks other than text are refused (an AI message's
    tool-call blocks are skipped: its ``tool_calls`` carry them)."""
    content = message.content
    if isinstance(content, str):
        return content
    parts: list[str] = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") == "text":
            parts.append(str(block.get("text", "")))
        elif (
            isinstance(message, AIMessage)
            and isinstance(block, dict)
            and block.get("type") in _CALL_BLOCKS
        ):
            continue
        else:
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise InvalidRequestError(
                f"ChatDGStream takes text only: a {message.type} message has a {kind!r} "
                "content block",
                param="messages",
                code="unsupported_parameter",
            )
    return "".join(parts)


def _openai_calls(message: AIMessage) -> list[dict[str, Any]]:
    """An AI message's tool calls in OpenAI's shape (arguments as JSON text); invalid ones
    go as the model wrote them, as ChatOpenAI sends them."""
    calls: list[dict[str, Any]] = []
    for call in message.tool_calls:
        arguments = json.dumps(call["args"], ensure_ascii=False)
        calls.append(_openai_call(call.get("id"), call["name"], arguments))
    for bad in message.invalid_tool_calls:
        calls.append(_openai_call(bad.get("id"), bad.get("name") or "", bad.get("args") or ""))
    return calls


def _openai_call(call_id: str | None, name: str, arguments: str) -> dict[str, Any]:
    call: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": arguments}}
    if call_id is not None:
        call["id"] = call_id
    return call


def to_dg_messages(messages: Sequence[BaseMessage]) -> list[dict[str, Any]]:
    """LangChain messages as dg_stream chat messages (``{"role", "content", ...}``).

    System, human and AI messages (and ``ChatMessage`` with one of those roles) map to
    ``system``, ``user`` and ``assistant``; an AI message's tool calls go as OpenAI's
    ``tool_calls`` (arguments as JSON text) and a ``ToolMessage`` as a ``tool`` message with
    its ``tool_call_id`` and ``name``. The backend renders them with its chat template.
    Function messages, other roles and non-text content are refused with
    ``InvalidRequestError``.
    """
    out: list[dict[str, Any]] = []
    for message in messages:
        extra: dict[str, Any] = {}
        if isinstance(message, SystemMessage):
            role = "system"
        elif isinstance(message, HumanMessage):
            role = "user"
        elif isinstance(message, AIMessage):
            role = "assistant"
            calls = _openai_calls(message)
            if calls:
                extra["tool_calls"] = calls
        elif isinstance(message, ToolMessage):
            role = "tool"
            extra["tool_call_id"] = message.tool_call_id
            if message.name:
                extra["name"] = message.name
        elif isinstance(message, ChatMessage) and message.role.lower() in _ROLES:
            role = _ROLES[message.role.lower()]
        else:
            raise InvalidRequestError(
                f"ChatDGStream takes system, human, AI and tool messages, not a "
                f"{type(message).__name__} ({message.type!r})",
                param="messages",
                code="unsupported_parameter",
            )
        out.append({"role": role, "content": _text_of(message), **extra})
    return out


def _public_name(name: str) -> str:
    """A model name fit to show: a checkpoint path becomes its folder's name."""
    if "/" not in name and "\\" not in name:
        return name
    path = Path(name).expanduser().resolve()
    embedded = (Path(__file__).resolve().parent.parent / "default_model" / "verifier").resolve()
    return _DEFAULT_MODEL_NAME if path == embedded else (path.name or "dg-stream")


def _stats_metadata(stats: Stats) -> dict[str, Any]:
    return {
        **msgspec.structs.asdict(stats),
        "accepted_per_call": stats.mean_accepted,
        "tokens_per_call": stats.tokens_per_call,
        "acceptance_rate": stats.acceptance_rate,
    }


# -- tools ----------------------------------------------------------------------------------------


def _choice_value(tool_choice: Any) -> Any:
    """LangChain's spellings of ``tool_choice`` as OpenAI's: ``True`` and ``"any"`` force a
    call of any tool; ``None`` and ``False`` leave the default (``"auto"`` with tools)."""
    if tool_choice is None or tool_choice is False:
        return None
    if tool_choice is True or tool_choice == "any":
        return "required"
    if isinstance(tool_choice, (str, dict)):
        return tool_choice
    raise InvalidRequestError(
        "tool_choice must be None, 'auto', 'none', 'any', 'required', True, a tool's name or "
        f"{{'type': 'function', 'function': {{'name': ...}}}}, got {type(tool_choice).__name__}",
        param="tool_choice",
    )


def _auto_refusal(tokenizer: Any) -> InvalidRequestError:
    why = (
        "a remote backend's model is rendered by its server, which leaves no tokenizer here "
        "to read its calls back"
        if tokenizer is None
        else "this model's tokenizer has no response_template to read its calls back"
    )
    return InvalidRequestError(
        f"tool_choice 'auto' (the default) lets the model choose between text and a call, and "
        f"{why}: pass tool_choice='any' (a call of one of the tools) or a tool's name to force "
        "a call, whose arguments then follow the tool's schema, or 'none' for text",
        param="tool_choice",
        code="unsupported_parameter",
    )


class _Reply:
    """How one call's reply is read: as text; as a forced call, read as it streams; or, with
    ``tool_choice="auto"``, whole at its end by the tokenizer's ``response_template``."""

    def __init__(
        self,
        reader: ToolCallReader | None = None,
        auto: tuple[Any, str, tuple[FunctionTool, ...]] | None = None,
    ) -> None:
        self.reader = reader
        self.auto = auto  # (tokenizer, prompt text, tools)
        self.text = ""
        self.auto_error: str | None = None

    def fields(self, chunk: Chunk) -> tuple[dict[str, Any], str | None] | None:
        """The ``AIMessageChunk`` fields of one chunk and its finish reason; None for a chunk
        that says nothing (no text, not the last)."""
        self.text += chunk.text
        finish: str | None = chunk.finish_reason
        if self.reader is not None:
            deltas = self.reader.feed(chunk.text)
            if finish is None and not deltas:
                return None
            if finish is not None and self.reader.complete():
                finish = "tool_calls"
            pieces = [
                tool_call_chunk(name=name, args=arguments, id=call_id, index=index)
                for index, call_id, name, arguments in deltas
            ]
            return {"content": "", "tool_call_chunks": pieces}, finish
        if self.auto is not None:
            if finish is None:
                return None  # read whole at the end: a call's markup is no text to show
            content, pieces = self._read_auto()
            if pieces and finish == "stop":
                finish = "tool_calls"
            return {"content": content, "tool_call_chunks": pieces}, finish
        if finish is None and not chunk.text:
            return None
        return {"content": chunk.text}, finish

    def _read_auto(self) -> tuple[str, list[Any]]:
        assert self.auto is not None
        tokenizer, prefix, tools = self.auto
        try:
            content, calls = parse_auto_reply(tokenizer, self.text, prefix, tools)
        except Exception as exc:  # the model wrote markup its response_template cannot read
            self.auto_error = f"the tokenizer's response_template could not read the reply: {exc}"
            return self.text, []
        pieces = [
            tool_call_chunk(name=call.name, args=call.arguments, id=call.id, index=index)
            for index, call in enumerate(calls)
        ]
        return content, pieces

    def invalid_calls(self, finish: str | None) -> tuple[set[str | None], list[InvalidToolCall]]:
        """What a whole reply's message must move to ``invalid_tool_calls``: the ids of calls
        it holds that are cut short, and the entries to add (none when it read whole)."""
        if self.auto_error is not None:
            return set(), [invalid_tool_call(args=self.text, error=self.auto_error)]
        if self.reader is None or self.reader.complete():
            return set(), []
        error = f"the reply ended (finish_reason {finish!r}) before its JSON was complete"
        if self.reader.choice.mode == "function":
            call_id = self.reader.calls[0].id if self.reader.calls else None
            bad = invalid_tool_call(
                name=self.reader.choice.name, args=self.reader.text, id=call_id, error=error
            )
            return {call_id}, [bad]
        # "required": the calls it closed are whole; the rest is the unfinished item.
        return set(), [
            invalid_tool_call(
                args=self.reader.text, error=f"{error} (the calls it closed are in tool_calls)"
            )
        ]


class _Call:
    """One call's stream, how its reply is read, and the backend made for it (closed with
    it), if any."""

    def __init__(
        self,
        stream: GenerationStream,
        owned: Backend | None,
        on_draft: DraftCallback | None,
        reply: _Reply,
    ) -> None:
        self.stream = stream
        self.owned = owned
        self.on_draft = on_draft
        self.reply = reply

    async def aclose(self) -> None:
        await self.stream.aclose()
        if self.owned is not None:
            await self.owned.aclose()


def _named_schema(schema: Any) -> tuple[str, dict[str, Any]]:
    """A structured reply's name and JSON schema; a JSON schema without the ``title``
    LangChain names functions by is taken as it is."""
    try:
        return convert_to_openai_tool(schema)["function"]["name"], convert_to_json_schema(schema)
    except ValueError:
        if isinstance(schema, dict) and "title" not in schema:
            return "response", schema
        raise


def _parse_model(message: BaseMessage, *, schema: type) -> Any:
    """A whole JSON reply as an instance of the Pydantic model ``schema`` (v1 or v2)."""
    return PydanticOutputParser(pydantic_object=schema).invoke(message)


_portal: BlockingPortal | None = None
_portal_lock = threading.Lock()


def _sync_portal() -> BlockingPortal:
    """dg_stream's background event loop for LangChain's synchronous calls (started once).

    One long-lived loop rather than one per call: a ``RemoteBackend``'s connection pool
    belongs to the loop it runs on, and so is kept across synchronous calls.
    """
    global _portal
    with _portal_lock:
        if _portal is None:
            ready = threading.Event()
            holder: list[BlockingPortal] = []

            async def serve() -> None:
                async with BlockingPortal() as portal:
                    holder.append(portal)
                    ready.set()
                    await portal.sleep_until_stopped()

            threading.Thread(
                target=anyio.run, args=(serve,), daemon=True, name="dg_stream-langchain"
            ).start()
            ready.wait()
            _portal = holder[0]
        return _portal


class ChatDGStream(BaseChatModel):
    """A LangChain chat model that streams from a dg_stream backend.

    ``backend`` is any dg_stream ``Backend``: a ``LocalBackend`` (models in this process), a
    ``RemoteBackend`` (``dg-stream serve`` or any OpenAI-compatible server), or ``None``. With
    ``None`` and a ``base_url`` (default ``$DG_STREAM_URL``), a ``RemoteBackend`` is made from
    ``base_url``, ``model``, ``api_key`` (default ``$DG_STREAM_API_KEY``), ``timeout`` and
    ``max_retries`` (those apply only then: a backend you pass carries its own); with neither,
    the embedded default model pair is used.

    Sampling: ``temperature`` (0 is greedy, the default), ``top_p``, ``top_k``,
    ``repetition_penalty``, ``seed``; ``max_tokens`` (default 256) bounds the reply and
    ``stop`` strings end it (not included). ``block_size``, ``steps``, ``adaptive`` and
    ``confidence`` override the backend's speculative defaults. Each of these may also be
    given per call (``model.invoke(messages, temperature=0.7)`` or ``model.bind(...)``); a
    call's ``stop`` replaces the instance's. ``on_draft(text, draft)`` (on the model or per
    call) asks for draft previews and receives them after every step, outside the message. With
    a tokenizer that has no chat template the plain ``User:``/``Assistant:`` format is used and
    replies also stop where the next ``User:`` turn would start.

    ``bind_tools`` and ``with_structured_output`` constrain the reply (see their docs): a
    forced call follows its tool's schema and a structured reply its schema exactly, locally
    and through ``dg-stream serve``.

    A LangChain run that is cancelled, or a stream the caller leaves early, closes the
    dg_stream stream, which stops the model work (local) or the HTTP request (remote). The
    synchronous methods run the stream on an event loop of their own in a worker thread, so
    they also work where an event loop is already running.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, populate_by_name=True)

    backend: Backend | None = Field(default=None, exclude=True)
    """The dg_stream backend; ``None``: one made from ``base_url``, else the embedded pair."""
    base_url: str | None = Field(default_factory=from_env("DG_STREAM_URL", default=None))
    """Server root for a ``RemoteBackend`` made here (default: ``$DG_STREAM_URL``)."""
    api_key: SecretStr | None = Field(
        default_factory=secret_from_env("DG_STREAM_API_KEY", default=None), exclude=True
    )
    """Bearer token for that ``RemoteBackend`` (default: ``$DG_STREAM_API_KEY``)."""
    timeout: float | None = None
    """Timeout in seconds for that ``RemoteBackend`` (connect, first chunk and idle)."""
    max_retries: int = 2
    """Retries before the first chunk, for that ``RemoteBackend``."""
    model_name: str | None = Field(default=None, alias="model")
    """The model's name in responses and traces (default: the backend's model)."""
    max_tokens: int | None = None
    """Most tokens in a reply (``None``: 256)."""
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: list[str] | None = None
    """Stop strings: the reply ends before the first one."""
    on_draft: DraftCallback | None = Field(default=None, exclude=True)
    """``on_draft(text, draft)`` after every step: asks the backend for draft previews."""
    block_size: int | None = None
    steps: int | None = None
    adaptive: bool | None = None
    confidence: float | None = None
    streaming: bool = False
    """Whether ``invoke`` streams internally (so callbacks see each token)."""

    # -- LangChain's identity ---------------------------------------------------------------

    @property
    def _llm_type(self) -> str:
        return "dg-stream"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        options = self._default_options()
        del options["on_draft"]
        return {"model_name": self._model_name(), **options}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider="dg_stream",
            ls_model_name=str(kwargs.get("model") or self._model_name()),
            ls_model_type="chat",
            ls_temperature=kwargs.get("temperature", self.temperature),
        )
        max_tokens = kwargs.get("max_tokens", self.max_tokens)
        if max_tokens is not None:
            params["ls_max_tokens"] = max_tokens
        if stop or self.stop:
            params["ls_stop"] = list(stop or self.stop or [])
        return params

    def _model_name(self, backend: Backend | None = None) -> str:
        if self.model_name:
            return self.model_name
        backend = self.backend if self.backend is not None else backend
        if backend is None:
            return "dg-stream" if self.base_url is not None else _DEFAULT_MODEL_NAME
        name = backend.model_name
        if not name:
            return "dg-stream"
        from .._backends.remote import RemoteBackend  # httpx only

        # A server's model id ("Qwen/Qwen3-8B" from vLLM) is its public name already; only a
        # local checkpoint path is shortened to its folder's name.
        return name if isinstance(backend, RemoteBackend) else _public_name(name)

    # -- requests ----------------------------------------------------------------------------

    def _backend_for_call(self) -> tuple[Backend, bool]:
        """The backend for one call, and whether this call owns it (and must close it).

        A ``RemoteBackend`` made from ``base_url`` lives for one call, on the event loop that
        runs the call: its connections never outlive the loop they belong to.
        """
        if self.backend is not None:
            return self.backend, False
        if self.base_url is None:
            return _get_default_backend(), False
        from .._backends.remote import RemoteBackend

        key = self.api_key.get_secret_value() if self.api_key is not None else None
        return RemoteBackend(
            self.base_url,
            self.model_name,
            api_key=key,
            timeout=self.timeout,
            max_retries=self.max_retries,
        ), True

    def _tokenizer(self) -> Any:
        """The tokenizer calls render with here (None: a remote backend's server renders)."""
        if self.backend is not None:
            return getattr(self.backend, "tokenizer", None)
        if self.base_url is not None:
            return None
        return _get_default_backend().tokenizer

    def _default_options(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in CALL_OPTIONS}

    def _default_stop(self, backend: Backend) -> list[str]:
        return list(plain_chat_stops(backend.tokenizer))

    def _reply_for(
        self, dg_messages: list[dict[str, Any]], options: dict[str, Any]
    ) -> tuple[_Reply, Any, list[dict[str, Any]] | None]:
        """How the reply is read, the ``response_format`` that constrains it and the tools
        shown to the model, from a call's ``tools``, ``tool_choice``, ``parallel_tool_calls``
        and ``response_format``."""
        tools = tools_from(options.get("tools"))
        choice: ToolChoice = tool_choice_from(_choice_value(options.get("tool_choice")), tools)
        response_format = options.get("response_format")
        shown = [tool.openai() for tool in tools] or None
        if response_format is not None and choice.mode != "none":
            what = "a forced tool call" if choice.forced else "tool_choice 'auto'"
            raise InvalidRequestError(
                f"{what} and a response_format both decide the reply's shape: bind one "
                "(tool_choice 'none' shows the tools and keeps the response_format)",
                param="tool_choice",
            )
        if choice.forced:
            parallel = options.get("parallel_tool_calls") is not False
            return (
                _Reply(reader=ToolCallReader(choice)),
                call_format(tools, choice, parallel),
                shown,
            )
        if choice.mode == "auto":
            tokenizer = self._tokenizer()
            if not supports_auto(tokenizer):
                raise _auto_refusal(tokenizer)
            prefix = render_chat(tokenizer, request_for(dg_messages, tools=shown))
            return _Reply(auto=(tokenizer, prefix, tools)), None, shown
        return _Reply(), response_format, shown

    def _open(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> _Call:
        """The dg_stream stream for one call; parameters are checked here, before any work."""
        model = kwargs.pop("model", None)
        if model is not None and model != self._model_name():
            raise InvalidRequestError(
                f"ChatDGStream serves one model ({self._model_name()!r}), not {model!r}: make "
                "another ChatDGStream for another backend",
                param="model",
                code="model_not_found",
            )
        unknown = sorted(set(kwargs) - set(CALL_OPTIONS) - set(REPLY_OPTIONS))
        if unknown:
            raise InvalidRequestError(
                f"unknown option(s) {unknown}; ChatDGStream takes "
                f"{[*CALL_OPTIONS, *REPLY_OPTIONS]}",
                param=unknown[0],
                code="unknown_field",
            )
        reply_options = {name: kwargs.pop(name) for name in REPLY_OPTIONS if name in kwargs}
        options = {**self._default_options(), **kwargs}
        dg_messages = to_dg_messages(messages)
        reply, response_format, tools = self._reply_for(dg_messages, reply_options)
        backend, owned = self._backend_for_call()
        stops = list(stop if stop is not None else self.stop or [])
        stops += [s for s in self._default_stop(backend) if s not in stops]
        max_tokens = options.pop("max_tokens")
        on_draft = options.pop("on_draft")
        speculative = {name: options.pop(name) for name in _SPECULATIVE}
        try:
            stream = generate(
                dg_messages,
                backend=backend,
                max_new_tokens=256 if max_tokens is None else max_tokens,
                stop=stops or None,
                draft_preview=on_draft is not None,
                response_format=response_format,
                tools=tools,
                **options,
                **{name: value for name, value in speculative.items() if value is not None},
            )
        except InvalidRequestError as exc:
            if exc.param != "max_new_tokens":
                raise
            # The user set ChatDGStream's max_tokens: name that, not generate()'s argument.
            raise InvalidRequestError(
                re.sub(r"\bmax_new_tokens\b", "max_tokens", exc.message),
                param="max_tokens",
                code=exc.code,
            ) from None
        return _Call(stream, backend if owned else None, on_draft, reply)

    def _to_generation_chunk(self, chunk: Chunk, call: _Call) -> ChatGenerationChunk | None:
        read = call.reply.fields(chunk)
        if read is None:
            return None
        fields, finish = read
        if chunk.finish_reason is None:
            return ChatGenerationChunk(message=AIMessageChunk(**fields))
        usage = None
        if chunk.usage is not None:
            usage = UsageMetadata(
                input_tokens=chunk.usage.prompt_tokens,
                output_tokens=chunk.usage.completion_tokens,
                total_tokens=chunk.usage.total_tokens,
            )
        metadata: dict[str, Any] = {
            "finish_reason": finish,
            "model_name": self._model_name(call.owned),
        }
        if chunk.stats is not None:
            metadata["stats"] = _stats_metadata(chunk.stats)
        return ChatGenerationChunk(
            message=AIMessageChunk(
                **fields,
                chunk_position="last",
                usage_metadata=usage,
                response_metadata=metadata,
            )
        )

    # -- streaming ---------------------------------------------------------------------------

    async def _achunks(self, call: _Call) -> AsyncIterator[ChatGenerationChunk]:
        # Leaving this generator (end, early exit, cancellation) closes the stream, which
        # stops the model work or closes the HTTP response.
        try:
            async with call.stream:
                async for chunk in call.stream:
                    if call.on_draft is not None:
                        result = call.on_draft(call.stream.text, chunk.draft)
                        if inspect.isawaitable(result):
                            await result
                    generation = self._to_generation_chunk(chunk, call)
                    if generation is not None:
                        yield generation
        finally:
            await call.aclose()

    def _chunks(self, call: _Call) -> Iterator[ChatGenerationChunk]:
        # The stream runs on dg_stream's background event loop, so this works whether or not
        # the calling thread runs a loop; callbacks run here, in the caller's thread.
        portal = _sync_portal()
        try:
            while True:
                try:
                    chunk = portal.call(call.stream.__anext__)
                except StopAsyncIteration:
                    return
                if call.on_draft is not None:
                    call.on_draft(call.stream.text, chunk.draft)
                generation = self._to_generation_chunk(chunk, call)
                if generation is not None:
                    yield generation
        finally:
            portal.call(call.aclose)

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        async for generation in self._achunks(self._open(messages, stop, kwargs)):
            yield generation

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        return self._chunks(self._open(messages, stop, kwargs))

    # -- whole replies ---------------------------------------------------------------------

    @staticmethod
    def _whole(chunks: list[ChatGenerationChunk], call: _Call) -> ChatResult:
        """The merged reply; calls cut short (by ``max_tokens``, a stop string) or that the
        response template could not read become ``invalid_tool_calls``, as LangChain has it
        (a stream's merged chunks parse partial arguments leniently instead)."""
        result = generate_from_stream(iter(chunks))
        message = result.generations[0].message
        assert isinstance(message, AIMessage)
        cut, invalid = call.reply.invalid_calls(message.response_metadata.get("finish_reason"))
        if invalid:
            result.generations[0].message = message.model_copy(
                update={
                    "tool_calls": [c for c in message.tool_calls if c.get("id") not in cut],
                    "invalid_tool_calls": [*message.invalid_tool_calls, *invalid],
                }
            )
        return result

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        call = self._open(messages, stop, kwargs)
        return self._whole(list(self._chunks(call)), call)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        call = self._open(messages, stop, kwargs)
        return self._whole([c async for c in self._achunks(call)], call)

    # -- tools and structured output ------------------------------------------------------------

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: dict[str, Any] | str | bool | None = None,
        parallel_tool_calls: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """The model with ``tools`` bound: anything ``convert_to_openai_tool`` takes (a
        ``@tool``, a Pydantic model, a TypedDict, a function, an OpenAI tool dict).

        ``tool_choice``: a tool's name (or ``{"type": "function", "function": {"name": ...}}``)
        makes the reply a call of that tool, ``"any"`` / ``"required"`` / ``True`` a call of
        one of them (several unless ``parallel_tool_calls=False``): constrained decoding, so
        the arguments follow the tool's schema exactly, and the message has ``tool_calls``
        (streamed as ``tool_call_chunks``) and no text. ``"none"`` shows the tools and
        answers in text. ``None`` / ``"auto"`` lets the model choose, which needs a tokenizer
        with a ``response_template`` to read its calls back; without one the call is refused
        (here already when the backend is known) with what to pass instead. Tools are shown to
        the model through its chat template. Other ``kwargs`` are bound as call options.
        Raises ``InvalidRequestError`` for tools, choices or options it cannot take.
        """
        formatted = [convert_to_openai_tool(tool) for tool in tools]
        choice = _choice_value(tool_choice)
        mode = tool_choice_from(choice, tools_from(formatted)).mode
        if mode == "auto" and (self.backend is not None or self.base_url is not None):
            tokenizer = self._tokenizer()
            if not supports_auto(tokenizer):
                raise _auto_refusal(tokenizer)
        if parallel_tool_calls not in (None, True, False):
            raise InvalidRequestError(
                "parallel_tool_calls must be True, False or None", param="parallel_tool_calls"
            )
        bindable = {*CALL_OPTIONS, "stop", "response_format", "ls_structured_output_format"}
        unknown = sorted(set(kwargs) - bindable)
        if unknown:
            raise InvalidRequestError(
                f"unknown option(s) {unknown}; bind_tools binds {sorted(bindable)}",
                param=unknown[0],
                code="unknown_field",
            )
        if choice is not None:
            kwargs["tool_choice"] = choice
        if parallel_tool_calls is not None:
            kwargs["parallel_tool_calls"] = parallel_tool_calls
        return self.bind(tools=formatted, **kwargs)

    def with_structured_output(
        self,
        schema: dict[str, Any] | type | None = None,
        *,
        method: Literal["json_schema", "function_calling", "json_mode"] = "json_schema",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict[str, Any] | Any]:
        """The model answering with ``schema``'s JSON, parsed: a Pydantic model class gives
        an instance of it, a TypedDict or JSON schema a dict.

        ``method``: ``"json_schema"`` (the default) constrains the reply to the schema;
        ``"function_calling"`` forces a call of a tool made of the schema (``bind_tools``),
        the same constraint read back as a tool call; ``"json_mode"`` constrains it to a JSON
        object only (say which keys in the prompt; ``schema`` may be None). Constrained
        decoding makes the reply follow the schema exactly; ``strict=False`` lets objects
        hold properties the schema does not name. A reply cut by ``max_tokens`` is not JSON
        and fails to parse (``OutputParserException``). ``include_raw=True`` returns
        ``{"raw": message, "parsed": ..., "parsing_error": ...}`` instead of raising.
        A JSON schema reply streams partial dicts; a Pydantic instance comes once, whole.
        """
        if kwargs:
            raise ValueError(f"Received unsupported arguments {kwargs}")
        if method not in ("json_schema", "function_calling", "json_mode"):
            raise ValueError(
                f"method must be 'json_schema', 'function_calling' or 'json_mode', got {method!r}"
            )
        if schema is None and method != "json_mode":
            raise ValueError(f"method {method!r} needs a schema (only 'json_mode' takes None)")
        if strict is not None and method == "json_mode":
            raise ValueError("strict does not apply to method 'json_mode' (no schema)")
        target: Any = schema  # LangChain's converters each take a part of what schema may be
        is_model = isinstance(schema, type) and is_basemodel_subclass(schema)
        trace = None
        if schema is not None:  # LangChain traces the schema in the call's options
            trace = {"kwargs": {"method": method, "strict": strict}, "schema": schema}
        llm: Runnable[LanguageModelInput, Any]
        parser: Runnable[Any, Any]
        if method == "function_calling":
            name = convert_to_openai_tool(target)["function"]["name"]
            llm = self.bind_tools(
                [schema],  # type: ignore[list-item]
                tool_choice=name,
                parallel_tool_calls=False,
                ls_structured_output_format=trace,
            )
            if is_model:
                parser = PydanticToolsParser(tools=[schema], first_tool_only=True)  # type: ignore[list-item]
            else:
                parser = JsonOutputKeyToolsParser(key_name=name, first_tool_only=True)
        else:
            if method == "json_schema":
                name, json_schema = _named_schema(target)
                response_format: dict[str, Any] = {
                    "type": "json_schema",
                    "json_schema": {
                        "name": name,
                        "schema": json_schema,
                        "strict": strict is not False,
                    },
                }
            else:
                response_format = {"type": "json_object"}
            llm = self.bind(response_format=response_format, ls_structured_output_format=trace)
            if is_model:
                assert isinstance(schema, type)
                parser = RunnableLambda(partial(_parse_model, schema=schema)).with_types(
                    output_type=schema
                )
            else:
                parser = JsonOutputParser()
        if not include_raw:
            return llm | parser
        parsed = RunnablePassthrough.assign(
            parsed=itemgetter("raw") | parser, parsing_error=lambda _: None
        )
        unparsed = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parsed.with_fallbacks(
            [unparsed], exception_key="parsing_error"
        )
