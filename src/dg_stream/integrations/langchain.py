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
"""

from __future__ import annotations

import inspect
import re
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import msgspec
from anyio.from_thread import BlockingPortal

from .._backends.base import Backend
from .._chunks import Chunk, Stats
from .._errors import InvalidRequestError, missing_extra
from .._generate import _get_default_backend, generate
from .._prompt import plain_chat_stops
from .._stream import GenerationStream

try:
    from langchain_core.callbacks import (
        AsyncCallbackManagerForLLMRun,
        CallbackManagerForLLMRun,
    )
    from langchain_core.language_models import BaseChatModel, LangSmithParams
    from langchain_core.language_models.chat_models import generate_from_stream
    from langchain_core.messages import (
        AIMessage,
        AIMessageChunk,
        BaseMessage,
        ChatMessage,
        HumanMessage,
        SystemMessage,
        UsageMetadata,
    )
    from langchain_core.outputs import ChatGenerationChunk, ChatResult
    from langchain_core.utils import from_env, secret_from_env
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
_SPECULATIVE = ("block_size", "steps", "adaptive", "confidence")
_ROLES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "ai": "assistant",
}
_DEFAULT_MODEL_NAME = "dg-stream-default"


def _text_of(message: BaseMessage) -> str:
    """A message's text; content blocks other than text are refused."""
    content = message.content
    if isinstance(content, str):
        return content
    parts: list[str] = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") == "text":
            parts.append(str(block.get("text", "")))
        else:
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise InvalidRequestError(
                f"ChatDGStream takes text only: a {message.type} message has a {kind!r} "
                "content block",
                param="messages",
                code="unsupported_parameter",
            )
    return "".join(parts)


def to_dg_messages(messages: Sequence[BaseMessage]) -> list[dict[str, str]]:
    """LangChain messages as dg_stream chat messages (``{"role", "content"}``).

    System, human and AI messages (and ``ChatMessage`` with one of those roles) map to
    ``system``, ``user`` and ``assistant``; the backend renders them with its chat template.
    Tool and function messages, AI messages with tool calls and non-text content are refused
    with ``InvalidRequestError``: dg_stream models have no tool calling.
    """
    out: list[dict[str, str]] = []
    for message in messages:
        if isinstance(message, SystemMessage):
            role = "system"
        elif isinstance(message, HumanMessage):
            role = "user"
        elif isinstance(message, AIMessage):
            if message.tool_calls or message.invalid_tool_calls:
                raise InvalidRequestError(
                    "ChatDGStream has no tool calling: an AI message with tool calls cannot "
                    "be sent",
                    param="messages",
                    code="unsupported_parameter",
                )
            role = "assistant"
        elif isinstance(message, ChatMessage) and message.role.lower() in _ROLES:
            role = _ROLES[message.role.lower()]
        else:
            raise InvalidRequestError(
                f"ChatDGStream has no tool calling and takes system, human and AI messages "
                f"only, not a {type(message).__name__} ({message.type!r})",
                param="messages",
                code="unsupported_parameter",
            )
        out.append({"role": role, "content": _text_of(message)})
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


class _Call:
    """One call's stream, and the backend made for it (closed with it), if any."""

    def __init__(
        self, stream: GenerationStream, owned: Backend | None, on_draft: DraftCallback | None
    ) -> None:
        self.stream = stream
        self.owned = owned
        self.on_draft = on_draft

    async def aclose(self) -> None:
        await self.stream.aclose()
        if self.owned is not None:
            await self.owned.aclose()


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

    def _default_options(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in CALL_OPTIONS}

    def _default_stop(self, backend: Backend) -> list[str]:
        return list(plain_chat_stops(backend.tokenizer))

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
        unknown = sorted(set(kwargs) - set(CALL_OPTIONS))
        if unknown:
            raise InvalidRequestError(
                f"unknown option(s) {unknown}; ChatDGStream takes {list(CALL_OPTIONS)}",
                param=unknown[0],
                code="unknown_field",
            )
        options = {**self._default_options(), **kwargs}
        dg_messages = to_dg_messages(messages)
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
        return _Call(stream, backend if owned else None, on_draft)

    def _to_generation_chunk(self, chunk: Chunk, call: _Call) -> ChatGenerationChunk:
        if chunk.finish_reason is None:
            return ChatGenerationChunk(message=AIMessageChunk(content=chunk.text))
        usage = None
        if chunk.usage is not None:
            usage = UsageMetadata(
                input_tokens=chunk.usage.prompt_tokens,
                output_tokens=chunk.usage.completion_tokens,
                total_tokens=chunk.usage.total_tokens,
            )
        metadata: dict[str, Any] = {
            "finish_reason": chunk.finish_reason,
            "model_name": self._model_name(call.owned),
        }
        if chunk.stats is not None:
            metadata["stats"] = _stats_metadata(chunk.stats)
        return ChatGenerationChunk(
            message=AIMessageChunk(
                content=chunk.text,
                chunk_position="last",
                usage_metadata=usage,
                response_metadata=metadata,
            )
        )

    # -- streaming ---------------------------------------------------------------------------

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        call = self._open(messages, stop, kwargs)
        # Leaving this generator (end, early exit, cancellation) closes the stream, which
        # stops the model work or closes the HTTP response.
        try:
            async with call.stream:
                async for chunk in call.stream:
                    if call.on_draft is not None:
                        result = call.on_draft(call.stream.text, chunk.draft)
                        if inspect.isawaitable(result):
                            await result
                    if chunk.text or chunk.finish_reason is not None:
                        yield self._to_generation_chunk(chunk, call)
        finally:
            await call.aclose()

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        call = self._open(messages, stop, kwargs)
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
                if chunk.text or chunk.finish_reason is not None:
                    yield self._to_generation_chunk(chunk, call)
        finally:
            portal.call(call.aclose)

    # -- whole replies ---------------------------------------------------------------------

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return generate_from_stream(self._stream(messages, stop, run_manager, **kwargs))

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        chunks = [c async for c in self._astream(messages, stop, run_manager, **kwargs)]
        return generate_from_stream(iter(chunks))
