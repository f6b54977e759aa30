"""ChatDGStream, the LangChain chat model: LangChain's own standard suites, then what they miss.

The standard suites (``langchain-tests``) run on the tiny Llama verifier + tiny BERT diffusion
drafter, in process and through a real ``dg-stream serve`` app; features the model lacks are
declared through the suites' own properties, each with its reason. The tests after them check
what the suites cannot see: identity with ``dg_stream.generate``, draft previews kept out of the
text, cancellation, the sync path inside a running event loop, and refusals.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import msgspec
import pytest

pytest.importorskip("langchain_core")
pytest.importorskip("langchain_tests")

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import (
    AIMessage,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.runnables import RunnableBinding
from langchain_core.tools import BaseTool
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests
from langchain_tests.unit_tests.chat_models import TEST_PYDANTIC_MODELS

import dg_stream
from dg_stream import Chunk, GenerationRequest, InvalidRequestError
from dg_stream.integrations.langchain import ChatDGStream, to_dg_messages

sys.path.insert(0, str(Path(__file__).parent))
from _servers import ServerThread

pytestmark = pytest.mark.anyio

LIMIT = 12  # tokens per reply in the standard suites: the tiny model never stops by itself


@pytest.fixture
def anyio_backend() -> str:
    # LangChain's async callback machinery is asyncio's (asyncio.gather, contextvars tasks).
    return "asyncio"


# -- the standard suites -------------------------------------------------------------------------

_backends: dict[str, Any] = {}


@pytest.fixture(scope="module")
def served(tiny_backend: Any) -> Iterator[str]:
    """``dg-stream serve``'s app over the tiny pair, on a real loopback server."""
    from dg_stream.server import create_app

    with ServerThread(create_app(tiny_backend)) as server:
        yield server.url


class _Declared:
    """What ChatDGStream lacks, declared through the suites' own properties, with reasons."""

    @property
    def chat_model_class(self) -> type[ChatDGStream]:
        return ChatDGStream

    @property
    def has_tool_calling(self) -> bool:
        """A call's JSON does not close in the tiny model's 12 tokens: LangChain's tool and
        structured-output tests run on the embedded pair in test_langchain_tools.py."""
        return False

    @property
    def has_tool_choice(self) -> bool:
        return False  # as has_tool_calling

    @property
    def has_structured_output(self) -> bool:
        return False  # as has_tool_calling

    @property
    def supports_json_mode(self) -> bool:
        return False  # as has_tool_calling

    @property
    def supports_image_inputs(self) -> bool:
        """Text-only models; image (and audio, video, PDF) blocks are refused with an error."""
        return False

    @property
    def supports_model_override(self) -> bool:
        """One ChatDGStream wraps one backend, which serves one model: a per-call ``model``
        naming another is refused (tested below), not silently ignored."""
        return False

    @property
    def returns_usage_metadata(self) -> bool:
        return True  # input/output/total tokens on the last chunk


class TestChatDGStreamUnit(_Declared, ChatModelUnitTests):
    """No model work here: tools and structured output are bound, so they are on."""

    @pytest.fixture(autouse=True)
    def _tiny(self, tiny_backend: Any) -> None:
        _backends["local"] = tiny_backend

    has_tool_calling = has_tool_choice = has_structured_output = supports_json_mode = True

    @pytest.mark.xfail(
        reason="it binds PersonA twice (the Pydantic model and its own JSON schema): tools "
        "with one name are refused, since a call names its tool",
        raises=InvalidRequestError,
        strict=True,
    )
    def test_bind_tool_pydantic(self, model: BaseChatModel, my_adder_tool: BaseTool) -> None:
        super().test_bind_tool_pydantic(model, my_adder_tool)

    def test_bind_tool_pydantic_once_each(self, model: BaseChatModel, my_adder_tool: Any) -> None:
        """The standard test's tools, each name once: a @tool, a function, a Pydantic model,
        a JSON schema."""

        def my_adder(a: int, b: int) -> int:
            """Return the sum of two integers."""
            return a + b

        person = TEST_PYDANTIC_MODELS[0]
        schema = {**person.model_json_schema(), "title": "PersonB"}
        bound = model.bind_tools([my_adder_tool, my_adder, person, schema], tool_choice="any")
        assert isinstance(bound, RunnableBinding)
        names = [t["function"]["name"] for t in bound.kwargs["tools"]]
        assert names == ["my_adder_tool", "my_adder", "PersonA", "PersonB"]
        assert bound.kwargs["tool_choice"] == "required"

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"backend": _backends["local"]}

    @property
    def init_from_env_params(self) -> tuple[dict[str, str], dict[str, Any], dict[str, Any]]:
        return (
            {"DG_STREAM_URL": "http://127.0.0.1:9", "DG_STREAM_API_KEY": "key"},
            {},
            {"base_url": "http://127.0.0.1:9", "api_key": "key"},
        )


class TestChatDGStreamLocal(_Declared, ChatModelIntegrationTests):
    """The integration suite on a LocalBackend (models in this process)."""

    @pytest.fixture(autouse=True)
    def _tiny(self, tiny_backend: Any) -> None:
        _backends["local"] = tiny_backend

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"backend": _backends["local"], "max_tokens": LIMIT}


class TestChatDGStreamRemote(_Declared, ChatModelIntegrationTests):
    """The integration suite through HTTP: ``base_url`` makes a RemoteBackend per model."""

    @pytest.fixture(autouse=True)
    def _tiny(self, served: str) -> None:
        _backends["url"] = served

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"base_url": _backends["url"], "max_tokens": LIMIT}


# -- beyond the suites ---------------------------------------------------------------------------


def _generate_text(backend: Any, messages: list[dict[str, str]], **options: Any) -> Any:
    async def main() -> Any:
        return await dg_stream.generate(messages, backend=backend, **options).collect()

    return anyio.run(main)


def test_stream_is_dg_streams_own_text_usage_and_stats(tiny_backend: Any) -> None:
    model = ChatDGStream(backend=tiny_backend, max_tokens=LIMIT)
    chunks = list(model.stream([SystemMessage("Be brief."), HumanMessage("def add")]))
    expected = _generate_text(
        tiny_backend,
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def add"}],
        max_new_tokens=LIMIT,
    )
    full = chunks[0]
    for chunk in chunks[1:]:
        full += chunk
    assert full.content == expected.text and len(chunks) > 2  # streamed, not one piece
    assert [c.chunk_position for c in chunks] == [None] * (len(chunks) - 1) + ["last"]
    assert all(c.usage_metadata is None for c in chunks[:-1])
    assert full.usage_metadata is not None
    assert full.usage_metadata["input_tokens"] == expected.usage.prompt_tokens
    assert full.usage_metadata["output_tokens"] == LIMIT
    assert full.usage_metadata["total_tokens"] == expected.usage.prompt_tokens + LIMIT
    meta = chunks[-1].response_metadata
    assert meta["finish_reason"] == "length"
    assert meta["model_name"] == "LlamaForCausalLM"
    assert meta["stats"]["verifier_calls"] == expected.stats.verifier_calls
    assert meta["stats"]["committed_tokens"] == LIMIT


def test_accepted_per_call_reaches_response_metadata(tiny_tok: Any, tiny_verifier: Any) -> None:
    """With the verifier as its own (causal) drafter every draft is accepted."""
    import copy

    backend = dg_stream.LocalBackend(
        tiny_verifier, copy.deepcopy(tiny_verifier), tokenizer=tiny_tok, block_size=4
    )
    result = ChatDGStream(backend=backend, max_tokens=LIMIT).invoke("def add")
    stats = result.response_metadata["stats"]
    assert stats["accepted_per_call"] == stats["accepted_tokens"] / stats["verifier_calls"]
    assert stats["accepted_per_call"] >= 2.0 and stats["verifier_calls"] < LIMIT


async def test_ainvoke_equals_invoke_and_per_call_options(tiny_backend: Any) -> None:
    model = ChatDGStream(backend=tiny_backend, max_tokens=LIMIT)
    sync = await anyio.to_thread.run_sync(model.invoke, "hello")
    async_ = await model.ainvoke("hello")
    assert async_.content == sync.content and async_.usage_metadata == sync.usage_metadata
    short = await model.ainvoke("hello", max_tokens=3)
    assert short.usage_metadata is not None and short.usage_metadata["output_tokens"] == 3
    assert isinstance(sync.content, str) and sync.content.startswith(str(short.content))
    # Sampling follows dg_stream's seeded sampling exactly, per call or bound.
    sampled = await model.bind(temperature=1.0, top_p=0.9, seed=7).ainvoke("hello")
    expected = await dg_stream.generate(
        [{"role": "user", "content": "hello"}],
        backend=tiny_backend,
        max_new_tokens=LIMIT,
        temperature=1.0,
        top_p=0.9,
        seed=7,
    ).collect()
    assert sampled.content == expected.text


def test_stop_strings_end_the_reply(tiny_backend: Any) -> None:
    model = ChatDGStream(backend=tiny_backend, max_tokens=LIMIT)
    full = model.invoke("hello").content
    assert isinstance(full, str)
    stop = full[len(full) // 2 :][:2]
    cut = full[: full.index(stop)]
    assert model.invoke("hello", stop=[stop]).content == cut
    stopped = ChatDGStream(backend=tiny_backend, max_tokens=LIMIT, stop=[stop]).invoke("hello")
    assert stopped.content == cut and stopped.response_metadata["finish_reason"] == "stop"


def test_messages_map_to_the_chat_template(tiny_backend: Any) -> None:
    messages = [
        SystemMessage("Be brief."),
        HumanMessage("hi"),
        AIMessage("hello"),
        ChatMessage(role="user", content=[{"type": "text", "text": "and "}, "again"]),
    ]
    assert to_dg_messages(messages) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "and again"},
    ]
    requests: list[GenerationRequest] = []

    class Recording:
        tokenizer = tiny_backend.tokenizer
        context_length = tiny_backend.context_length
        model_name = tiny_backend.model_name

        def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
            requests.append(request)
            return tiny_backend.stream(request)

        async def aclose(self) -> None:
            return None

    ChatDGStream(backend=Recording(), max_tokens=4).invoke(messages)
    (request,) = requests
    assert [(m.role, m.content) for m in request.messages or []] == [
        (m["role"], m["content"]) for m in to_dg_messages(messages)
    ]
    assert request.stop == ()  # the tiny tokenizer has a chat template: no plain-format stop


@pytest.mark.parametrize(
    "message",
    [
        FunctionMessage("3", name="add"),
        HumanMessage([{"type": "image", "url": "https://example.com/cat.png"}]),
        ToolMessage([{"type": "image", "url": "https://example.com/cat.png"}], tool_call_id="c"),
        ChatMessage(role="tool", content="3"),
    ],
)
def test_what_the_model_cannot_take_is_refused(tiny_backend: Any, message: Any) -> None:
    model = ChatDGStream(backend=tiny_backend, max_tokens=4)
    with pytest.raises(InvalidRequestError) as info:
        model.invoke([HumanMessage("hi"), message])
    assert info.value.param == "messages"
    assert "takes system, human, AI and tool" in str(info.value) or "text only" in str(info.value)


def test_tool_calls_and_results_map_to_openais_shape(tiny_backend: Any) -> None:
    """An AI message's calls (valid or not) go as OpenAI's ``tool_calls`` with JSON text
    arguments, its tool-call content blocks as those calls, a tool's reply as a ``tool``
    message; the backend's request carries them."""
    call = {"name": "add", "args": {"a": 1, "b": "二"}, "id": "call-1", "type": "tool_call"}
    bad = {"name": "add", "args": '{"a": 1', "id": "call-2", "error": None}
    messages = [
        HumanMessage("1 + 2?"),
        AIMessage(
            [{"type": "text", "text": "Adding."}, {"type": "tool_use", "id": "call-1"}],
            tool_calls=[call],
            invalid_tool_calls=[bad],  # type: ignore[list-item]
        ),
        ToolMessage("3", tool_call_id="call-1", name="add"),
        ToolMessage([{"type": "text", "text": "no"}], tool_call_id="call-2", status="error"),
    ]
    expected = [
        {"role": "user", "content": "1 + 2?"},
        {
            "role": "assistant",
            "content": "Adding.",
            "tool_calls": [
                {
                    "type": "function",
                    "function": {"name": "add", "arguments": '{"a": 1, "b": "二"}'},
                    "id": "call-1",
                },
                {
                    "type": "function",
                    "function": {"name": "add", "arguments": '{"a": 1'},
                    "id": "call-2",
                },
            ],
        },
        {"role": "tool", "content": "3", "tool_call_id": "call-1", "name": "add"},
        {"role": "tool", "content": "no", "tool_call_id": "call-2"},
    ]
    assert to_dg_messages(messages) == expected
    requests: list[GenerationRequest] = []

    class Recording:
        tokenizer = tiny_backend.tokenizer
        context_length = tiny_backend.context_length
        model_name = tiny_backend.model_name

        def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
            requests.append(request)
            return tiny_backend.stream(request)

        async def aclose(self) -> None:
            return None

    ChatDGStream(backend=Recording(), max_tokens=4).invoke(messages)
    (request,) = requests
    sent = [msgspec.to_builtins(m) for m in request.messages or []]
    assert sent == expected


def test_other_models_and_unknown_options_are_refused(tiny_backend: Any) -> None:
    model = ChatDGStream(backend=tiny_backend, max_tokens=4)
    assert model.invoke("hi", model="LlamaForCausalLM").content  # its own name is fine
    with pytest.raises(InvalidRequestError, match="serves one model"):
        model.invoke("hi", model="gpt-4o")
    with pytest.raises(InvalidRequestError, match="unknown option"):
        model.invoke("hi", frequency_penalty=0.5)
    with pytest.raises(InvalidRequestError):
        model.invoke("hi", max_tokens=0)  # dg_stream's own validation, before any work


@pytest.mark.parametrize("value", [0, -3])
def test_a_bad_max_tokens_is_named_max_tokens(tiny_backend: Any, value: Any) -> None:
    """The user set ``max_tokens``: the error names it, not generate()'s ``max_new_tokens``."""
    for model, options in (
        (ChatDGStream(backend=tiny_backend, max_tokens=value), {}),
        (ChatDGStream(backend=tiny_backend), {"max_tokens": value}),
    ):
        with pytest.raises(InvalidRequestError) as info:
            model.invoke("hi", **options)
        assert info.value.param == "max_tokens"
        assert str(info.value).startswith("max_tokens must be") and "max_new" not in str(info.value)


def test_drafts_go_to_on_draft_never_into_the_message(tiny_backend: Any) -> None:
    model = ChatDGStream(backend=tiny_backend, max_tokens=LIMIT, block_size=4)
    plain = model.invoke("hello").content
    assert isinstance(plain, str)
    seen: list[tuple[str, str]] = []
    chunks = list(model.stream("hello", on_draft=lambda text, draft: seen.append((text, draft))))
    full = chunks[0]
    for chunk in chunks[1:]:
        full += chunk
    # The text is the plain reply; no draft reaches any field of the merged message.
    assert full.content == plain and not full.additional_kwargs
    drafts = [draft for _, draft in seen]
    assert any(drafts) and drafts[-1] == ""  # the last step leaves no draft
    assert not any(d and d in str(full.response_metadata) for d in drafts)
    # Each call sees the text committed so far (a prefix of the reply), growing to all of it.
    assert all(plain.startswith(text) for text, _ in seen) and seen[-1][0] == plain
    # On the model, and awaited when it is a coroutine function (async calls).
    bound: list[str] = []

    async def note(text: str, draft: str) -> None:
        bound.append(draft)

    async def main() -> Any:
        drafting = ChatDGStream(backend=tiny_backend, max_tokens=LIMIT, block_size=4, on_draft=note)
        return await drafting.ainvoke("hello")

    assert anyio.run(main).content == plain and bound == drafts


class Watched:
    """Forwards to a real backend and records how far each stream got and whether it closed."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.tokenizer = inner.tokenizer
        self.context_length = inner.context_length
        self.model_name = inner.model_name
        self.produced = 0
        self.closed = False

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        try:
            async for chunk in self.inner.stream(request):
                self.produced += 1
                yield chunk
        finally:
            self.closed = True

    async def aclose(self) -> None:
        return None


async def test_leaving_astream_early_stops_the_work(tiny_backend: Any) -> None:
    watched = Watched(tiny_backend)
    model = ChatDGStream(backend=watched, max_tokens=200, block_size=1)
    stream = model.astream("hello")
    async for _ in stream:
        break
    await stream.aclose()  # type: ignore[attr-defined]
    with anyio.fail_after(5):
        while not watched.closed:
            await anyio.sleep(0.01)
    assert watched.produced <= 2  # the chunk read, at most one step more


async def test_cancelling_a_run_stops_the_work(tiny_backend: Any) -> None:
    watched = Watched(tiny_backend)
    model = ChatDGStream(backend=watched, max_tokens=200, block_size=1)
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(model.ainvoke, "hello")
            while watched.produced < 3:
                await anyio.sleep(0.001)
            scope.cancel()
    assert watched.closed and watched.produced <= 4


def test_leaving_a_sync_stream_early_stops_the_work(tiny_backend: Any) -> None:
    watched = Watched(tiny_backend)
    model = ChatDGStream(backend=watched, max_tokens=200, block_size=1)
    for _ in model.stream("hello"):
        break
    assert watched.closed and watched.produced <= 2


def test_sync_calls_work_inside_a_running_event_loop(tiny_backend: Any) -> None:
    model = ChatDGStream(backend=tiny_backend, max_tokens=LIMIT)
    expected = model.invoke("hello").content

    async def main() -> Any:  # e.g. a notebook, or sync LangChain code called from async code
        return model.invoke("hello").content, [c.content for c in model.stream("hello")]

    text, pieces = anyio.run(main)
    assert text == expected and "".join(map(str, pieces)) == expected


async def test_remote_backend_streams_the_local_text(tiny_backend: Any, served: str) -> None:
    local = await ChatDGStream(backend=tiny_backend, max_tokens=LIMIT).ainvoke("hello")
    async with dg_stream.RemoteBackend(served) as backend:  # yours to close, on your loop
        remote = ChatDGStream(backend=backend, max_tokens=LIMIT)
        chunks = [chunk async for chunk in remote.astream("hello")]
    assert "".join(str(c.content) for c in chunks) == local.content
    assert chunks[-1].usage_metadata == local.usage_metadata
    stats = chunks[-1].response_metadata["stats"]
    assert stats["verifier_calls"] == local.response_metadata["stats"]["verifier_calls"]
    # base_url: a RemoteBackend per call, closed with it (sync calls run on a loop of ours).
    by_url = ChatDGStream(base_url=served, max_tokens=LIMIT)
    assert by_url.invoke("hello").content == local.content


def test_names_and_tracing_params(tiny_backend: Any) -> None:
    model = ChatDGStream(backend=tiny_backend, max_tokens=7, stop=["x"], temperature=0.5)
    params = model._get_ls_params()
    assert params == {
        "ls_provider": "dg_stream",
        "ls_model_name": "LlamaForCausalLM",
        "ls_model_type": "chat",
        "ls_temperature": 0.5,
        "ls_max_tokens": 7,
        "ls_stop": ["x"],
    }
    assert (
        ChatDGStream(model="my-model", backend=tiny_backend)._get_ls_params()["ls_model_name"]
        == "my-model"
    )
    assert ChatDGStream()._get_ls_params()["ls_model_name"] == "dg-stream-default"
