"""ChatDGStream's tool calling and structured output: LangChain's standard tests, then the rest.

The standard tool and structured-output tests need replies that close their JSON, which the
tiny random model of ``test_langchain.py`` cannot write in its 12 tokens: here they run on the
embedded default pair (a small code model), in process and through a real ``dg-stream serve``,
while the tiny suites run every other standard test. Where a standard test asks what a small
code model cannot do (read ``3`` from a question, pick JSON keys from a prompt) or what its
tokenizer cannot serve (``tool_choice="auto"``), it is replaced by a version that checks all
the rest, and its docstring says why. Then: ``"auto"`` with a tokenizer that has a
``response_template``, replies cut by ``max_tokens``, refusals, and LangChain's own
``ChatOpenAI`` against ``dg-stream serve``.
"""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, Literal

import anyio
import pytest

pytest.importorskip("langchain_core")
pytest.importorskip("langchain_tests")

import jsonschema
from langchain_core.exceptions import OutputParserException
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.tools import BaseTool, tool
from langchain_core.utils.function_calling import convert_to_openai_tool
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.integration_tests.chat_models import (
    magic_function,
    magic_function_no_args,
    unicode_customer,
)
from pydantic import BaseModel, ConfigDict, Field

import dg_stream
from dg_stream import Chunk, GenerationRequest, InvalidRequestError
from dg_stream._generate import _get_default_backend
from dg_stream._prompt import render_chat
from dg_stream.integrations.langchain import ChatDGStream

sys.path.insert(0, str(Path(__file__).parent))
from _servers import ServerThread

pytestmark = pytest.mark.anyio

MAX_TOKENS = 96  # the embedded model closes every call and JSON reply below well within it
QUERY = "What is the value of magic_function(3)? Use the tool."
UNICODE_QUESTION = (
    "Create a customer named '你好啊集团' (Hello Group) - a Chinese technology company"
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def served_default() -> Iterator[str]:
    """``dg-stream serve``'s app over the embedded pair, on a real loopback server."""
    from dg_stream.server import create_app

    with ServerThread(create_app(_get_default_backend())) as server:
        yield server.url


# -- checks shared by the suites ------------------------------------------------------------------


def _parameters(tool_: Any) -> dict[str, Any]:
    return dict(convert_to_openai_tool(tool_)["function"]["parameters"])


def _check_call(message: BaseMessage, tool_: Any) -> dict[str, Any]:
    """One well-formed call of ``tool_``: its name, an id, LangChain's type, arguments that
    follow the tool's schema, the same call among the content blocks, and no text."""
    assert isinstance(message, AIMessage)
    assert message.text == "" and not message.invalid_tool_calls
    (call,) = message.tool_calls
    assert call["name"] == tool_.name
    assert call["id"] and call["id"].startswith("call_")
    assert call.get("type") == "tool_call"
    jsonschema.validate(call["args"], _parameters(tool_))
    blocks = [block for block in message.content_blocks if block["type"] == "tool_call"]
    assert [(b["name"], b["args"], b["id"]) for b in blocks] == [
        (call["name"], call["args"], call["id"])
    ]
    assert message.response_metadata["finish_reason"] == "tool_calls"
    return dict(call["args"])


def _merged(chunks: list[Any]) -> Any:
    full = chunks[0]
    for chunk in chunks[1:]:
        full = full + chunk
    return full


def _streamed_like_invoked(model: Any, tool_: Any, query: Any, **bind: Any) -> dict[str, Any]:
    bound = model.bind_tools([tool_], **bind)
    args = _check_call(bound.invoke(query), tool_)
    chunks = list(bound.stream(query))
    assert all(c.text == "" for c in chunks)  # a forced call writes no text
    assert _check_call(_merged(chunks), tool_) == args  # greedy: the same call, streamed
    if bind.get("tool_choice") == tool_.name:  # a named call's arguments stream as written
        assert sum(1 for c in chunks if c.tool_call_chunks) > 1
    return args


async def _astreamed_like_ainvoked(model: Any, tool_: Any, query: Any, **bind: Any) -> None:
    bound = model.bind_tools([tool_], **bind)
    args = _check_call(await bound.ainvoke(query), tool_)
    chunks = [chunk async for chunk in bound.astream(query)]
    assert _check_call(_merged(chunks), tool_) == args


def _refuses_auto(model: BaseChatModel, tools: list[Any], messages: Any) -> None:
    """LangChain's default tool_choice, 'auto', needs a tokenizer with a response_template
    (the embedded one has none; a remote backend's tokenizer is its server's)."""
    with pytest.raises(InvalidRequestError, match="tool_choice 'auto'") as info:
        model.bind_tools(tools).invoke(messages)
    assert info.value.param == "tool_choice" and "tool_choice='any'" in str(info.value)


class _Joke(BaseModel):
    """Joke to tell user."""

    setup: str = Field(description="question to set up a joke")
    punchline: str = Field(description="answer to resolve the joke")


class _AnyObject(BaseModel):
    """Whatever a JSON object holds."""

    model_config = ConfigDict(extra="allow")


#: The standard tests of the features exercised here; every other standard test runs on the
#: tiny pair in test_langchain.py (test_the_suites_split_the_standard_tests checks the split).
TOOL_TESTS = frozenset(
    {
        "test_tool_calling",
        "test_tool_calling_async",
        "test_bind_runnables_as_tools",
        "test_tool_message_histories_string_content",
        "test_tool_message_histories_list_content",
        "test_tool_choice",
        "test_tool_calling_with_no_arguments",
        "test_tool_message_error_status",
        "test_structured_few_shot_examples",
        "test_structured_output",
        "test_structured_output_async",
        "test_structured_output_pydantic_2_v1",
        "test_structured_output_optional_param",
        "test_json_mode",
        "test_agent_loop",
        "test_unicode_tool_call_integration",
    }
)
_FEATURES = {"has_tool_calling", "has_tool_choice", "has_structured_output", "supports_json_mode"}


class _ToolSuite(ChatModelIntegrationTests):
    """LangChain's tool and structured-output tests (the others run on the tiny pair)."""

    @property
    def chat_model_class(self) -> type[ChatDGStream]:
        return ChatDGStream

    @property
    def has_tool_calling(self) -> bool:
        return True

    @property
    def has_tool_choice(self) -> bool:
        return True

    @property
    def has_structured_output(self) -> bool:
        return True

    @property
    def supports_json_mode(self) -> bool:
        return True

    @pytest.mark.parametrize("model", [{}, {"output_version": "v1"}], indirect=True)
    def test_tool_calling(self, model: BaseChatModel) -> None:
        """The standard test also wants ``args == {"input": 3}``: the embedded code model does
        not read the 3 from the question (it answers 0, or 2 when the tool is named). All the
        rest, for ``"any"`` and the tool's name: one call, its name, id and type, arguments
        that follow the schema (``-1000 < input < 1000``), the content block, no text, the
        finish reason, and the streamed call equal to the invoked one."""
        for choice in ("any", "magic_function"):
            _streamed_like_invoked(model, magic_function, QUERY, tool_choice=choice)

    async def test_tool_calling_async(self, model: BaseChatModel) -> None:
        """As ``test_tool_calling`` (the same reason), through ``ainvoke`` and ``astream``."""
        for choice in ("any", "magic_function"):
            await _astreamed_like_ainvoked(model, magic_function, QUERY, tool_choice=choice)

    def test_tool_message_histories_string_content(
        self, model: BaseChatModel, my_adder_tool: BaseTool
    ) -> None:
        """The standard test binds with LangChain's default tool_choice, 'auto', which the
        embedded tokenizer cannot serve (it has no response_template): that is refused with
        what to pass instead, and the same history is answered with a forced call."""
        messages = _history("What is 1 + 2", json.dumps({"result": 3}), content="")
        _refuses_auto(model, [my_adder_tool], messages)
        _check_call(
            model.bind_tools([my_adder_tool], tool_choice="any").invoke(messages), my_adder_tool
        )

    def test_tool_message_histories_list_content(
        self, model: BaseChatModel, my_adder_tool: BaseTool
    ) -> None:
        """As the string-content test (the same reason); the AI message's content is a list
        with a text block and an Anthropic ``tool_use`` block, which its ``tool_calls`` stand
        for."""
        content = [
            {"type": "text", "text": "some text"},
            {
                "type": "tool_use",
                "id": "abc123",
                "name": "my_adder_tool",
                "input": {"a": 1, "b": 2},
            },
        ]
        messages = _history("What is 1 + 2", json.dumps({"result": 3}), content=content)
        _refuses_auto(model, [my_adder_tool], messages)
        _check_call(
            model.bind_tools([my_adder_tool], tool_choice="any").invoke(messages), my_adder_tool
        )

    def test_tool_message_error_status(self, model: BaseChatModel, my_adder_tool: BaseTool) -> None:
        """A tool's error reply in the history (``status="error"``, sent as its text); 'auto'
        refused as in the history tests, so the call is forced."""
        messages = [
            HumanMessage("What is 1 + 2"),
            AIMessage(
                "",
                tool_calls=[
                    {"name": "my_adder_tool", "args": {"a": 1}, "id": "abc123", "type": "tool_call"}
                ],
            ),
            ToolMessage(
                "Error: Missing required argument 'b'.",
                name="my_adder_tool",
                tool_call_id="abc123",
                status="error",
            ),
        ]
        _refuses_auto(model, [my_adder_tool], messages)
        _check_call(
            model.bind_tools([my_adder_tool], tool_choice="any").invoke(messages), my_adder_tool
        )

    def test_json_mode(self, model: BaseChatModel) -> None:
        """The standard test asks the model to pick the keys ``setup`` and ``punchline`` from
        the prompt, which the embedded code model does not do (JSON mode constrains the reply
        to an object, not to keys). The rest: every reply, invoked or streamed, is a JSON
        object; the streamed one ends as the invoked one; a Pydantic model that takes any
        object parses it, and ``_Joke``'s missing keys are a parsing error, not a crash."""
        msg = (
            "Tell me a joke about cats. Return the result as a JSON with 'setup' and "
            "'punchline' keys. Return nothing other than JSON."
        )
        chat = model.with_structured_output(None, method="json_mode")
        result = chat.invoke(msg)
        assert isinstance(result, dict)
        chunks = list(chat.stream(msg))
        assert all(isinstance(c, dict) for c in chunks) and chunks[-1] == result
        parsed = model.with_structured_output(_AnyObject, method="json_mode").invoke(msg)
        assert isinstance(parsed, _AnyObject) and parsed.model_dump() == result
        raw = model.with_structured_output(_Joke, method="json_mode", include_raw=True).invoke(msg)
        assert json.loads(raw["raw"].content) == result
        if raw["parsed"] is None:
            assert isinstance(raw["parsing_error"], OutputParserException)
        else:
            assert isinstance(raw["parsed"], _Joke)

    @pytest.mark.parametrize("model", [{}, {"output_version": "v1"}], indirect=True)
    def test_agent_loop(self, model: BaseChatModel) -> None:
        """The standard loop binds with 'auto' (refused, as in the history tests): here the
        first turn forces the call, the tool runs on it, and the second turn answers in text
        (``tool_choice="none"``) with the whole exchange in its history."""

        @tool
        def get_weather(location: str) -> str:
            """Get the weather at a location."""
            return "It's sunny."

        question = HumanMessage("What is the weather in San Francisco, CA?")
        _refuses_auto(model, [get_weather], [question])
        call_message = model.bind_tools([get_weather], tool_choice="any").invoke([question])
        assert isinstance(call_message, AIMessage)
        assert any(block["type"] == "tool_call" for block in call_message.content_blocks)
        (call,) = call_message.tool_calls
        tool_message = get_weather.invoke(call)
        assert isinstance(tool_message, ToolMessage) and tool_message.tool_call_id == call["id"]
        answer = model.bind_tools([get_weather], tool_choice="none").invoke(
            [question, call_message, tool_message]
        )
        assert isinstance(answer, AIMessage) and not answer.tool_calls and answer.text

    def test_unicode_tool_call_integration(
        self,
        model: BaseChatModel,
        *,
        tool_choice: str | None = None,
        force_tool_call: bool = True,
    ) -> None:
        """The standard test wants the model to copy '你好啊集团' from the question into the
        call, which the embedded code model does not. Here: the forced call of
        ``unicode_customer`` is well formed, and non-ASCII arguments survive constrained
        decoding, streaming and parsing whole when the schema names them. One call
        (``parallel_tool_calls=False``): allowed several, this model repeats the call until
        ``max_tokens`` (``test_a_cut_reply_keeps_its_whole_calls`` reads such a reply)."""
        question = HumanMessage(UNICODE_QUESTION)
        args = _streamed_like_invoked(
            model, unicode_customer, [question], tool_choice="any", parallel_tool_calls=False
        )
        assert set(args) == {"customer_name", "description"}

        @tool
        def register(customer_name: Literal["你好啊集团", "こんにちは株式会社"]) -> str:
            """Register a customer."""
            return customer_name

        args = _streamed_like_invoked(model, register, [question], tool_choice="register")
        assert args["customer_name"] in ("你好啊集团", "こんにちは株式会社")


def _history(question: str, result: str, content: Any) -> list[BaseMessage]:
    call = {"name": "my_adder_tool", "args": {"a": 1, "b": 2}, "id": "abc123", "type": "tool_call"}
    return [
        HumanMessage(question),
        AIMessage(content, tool_calls=[call]),
        ToolMessage(result, name="my_adder_tool", tool_call_id="abc123"),
    ]


# Every other standard test runs on the tiny pair (test_langchain.py), with LangChain's
# no-overrides check; here it would only repeat them on a slower model.
for _name in dir(ChatModelIntegrationTests):
    if _name.startswith("test_") and _name not in TOOL_TESTS:
        setattr(_ToolSuite, _name, None)


class TestToolsLocal(_ToolSuite):
    """In process, on the embedded pair (ChatDGStream's default backend)."""

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"max_tokens": MAX_TOKENS}


_urls: dict[str, str] = {}


class TestToolsRemote(_ToolSuite):
    """Through ``dg-stream serve``'s native protocol: tools and the constraint travel with
    the request, the calls are read here."""

    @pytest.fixture(autouse=True)
    def _served(self, served_default: str) -> None:
        _urls["default"] = served_default

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"base_url": _urls["default"], "max_tokens": MAX_TOKENS}


def test_the_suites_split_the_standard_tests() -> None:
    """TOOL_TESTS are exactly the standard tests that ask for tool calling, tool choice,
    structured output or JSON mode (so a new one upstream is not left out unseen)."""
    asking = {
        name
        for name in dir(ChatModelIntegrationTests)
        if name.startswith("test_")
        and _FEATURES & set(getattr(ChatModelIntegrationTests, name).__code__.co_names)
    }
    assert asking == TOOL_TESTS
    collected = {name for name in dir(TestToolsLocal) if getattr(TestToolsLocal, name, None)}
    assert {n for n in collected if n.startswith("test_")} == TOOL_TESTS


# -- beyond the suites ---------------------------------------------------------------------------


def _generated(messages: list[dict[str, Any]], **options: Any) -> Any:
    async def main() -> Any:
        stream = dg_stream.generate(messages, backend=_get_default_backend(), **options)
        return await stream.collect()

    return anyio.run(main)


def test_a_forced_call_is_dg_streams_constrained_reply() -> None:
    """The call's arguments are, token for token, what ``dg_stream.generate`` writes under
    ``tool_call_format`` with the tools shown; the usage is its usage."""
    model = ChatDGStream(max_tokens=MAX_TOKENS)
    message = model.bind_tools([magic_function], tool_choice="magic_function").invoke(QUERY)
    tools = [convert_to_openai_tool(magic_function)]
    expected = _generated(
        [{"role": "user", "content": QUERY}],
        max_new_tokens=MAX_TOKENS,
        tools=tools,
        response_format=dg_stream.tool_call_format(tools, "magic_function"),
    )
    assert message.tool_calls[0]["args"] == json.loads(expected.text)
    assert message.usage_metadata is not None
    assert message.usage_metadata["output_tokens"] == expected.usage.completion_tokens
    # "any" with one call: the reply is the array [{"name", "arguments"}], read back.
    any_call = model.bind_tools([magic_function], tool_choice="any", parallel_tool_calls=False)
    expected = _generated(
        [{"role": "user", "content": QUERY}],
        max_new_tokens=MAX_TOKENS,
        tools=tools,
        response_format=dg_stream.tool_call_format(tools, "required", parallel_tool_calls=False),
    )
    (item,) = json.loads(expected.text)
    (call,) = any_call.invoke(QUERY).tool_calls
    assert (call["name"], call["args"]) == (item["name"], item["arguments"])


def test_a_call_cut_by_max_tokens_is_an_invalid_tool_call() -> None:
    """LangChain's way: the whole message moves the unfinished call to ``invalid_tool_calls``
    (its raw text, name, id and why) and says ``finish_reason="length"``; the stream sends
    the same text as it came, ending with the same finish reason."""
    bound = ChatDGStream(max_tokens=3).bind_tools([magic_function], tool_choice="magic_function")
    message = bound.invoke(QUERY)
    assert not message.tool_calls and message.response_metadata["finish_reason"] == "length"
    (bad,) = message.invalid_tool_calls
    assert bad["name"] == "magic_function" and bad["id"] and "length" in str(bad["error"])
    with pytest.raises(json.JSONDecodeError):
        json.loads(str(bad["args"]))
    chunks = list(bound.stream(QUERY))
    assert (
        "".join(c.tool_call_chunks[0]["args"] for c in chunks if c.tool_call_chunks) == bad["args"]
    )
    assert chunks[-1].response_metadata["finish_reason"] == "length"


def test_a_cut_reply_keeps_its_whole_calls() -> None:
    """With parallel calls allowed, this small model repeats its call until ``max_tokens``:
    the calls it closed are tool calls, the unfinished rest one invalid call."""
    question = [HumanMessage(UNICODE_QUESTION)]
    bound = ChatDGStream(max_tokens=60).bind_tools([unicode_customer], tool_choice="any")
    message = bound.invoke(question)
    assert message.response_metadata["finish_reason"] == "length"
    assert message.tool_calls and all(c["name"] == "unicode_customer" for c in message.tool_calls)
    for call in message.tool_calls:
        jsonschema.validate(call["args"], _parameters(unicode_customer))
    (rest,) = message.invalid_tool_calls
    assert rest["name"] is None and str(rest["args"]).startswith('[{"name":"unicode_customer"')
    streamed = _merged(list(bound.stream(question)))  # whole calls only come as they close
    assert [(c["name"], c["args"]) for c in streamed.tool_calls] == [
        (c["name"], c["args"]) for c in message.tool_calls
    ]


async def test_structured_output_methods_and_raw() -> None:
    """``function_calling`` reads the schema back as a forced call, ``json_schema`` as the
    reply; both parse to the model, both trace the schema; ``include_raw`` keeps the
    message; a reply cut short is a parsing error there, and raised without it."""
    model = ChatDGStream(max_tokens=MAX_TOKENS)
    for method in ("json_schema", "function_calling"):
        chat = model.with_structured_output(_Joke, method=method, include_raw=True)
        result = await chat.ainvoke("Tell me a joke about cats.")
        assert isinstance(result["parsed"], _Joke) and result["parsing_error"] is None
        raw = result["raw"]
        if method == "function_calling":
            assert raw.tool_calls[0]["args"] == result["parsed"].model_dump()
        else:
            assert json.loads(raw.content) == result["parsed"].model_dump()
    short = ChatDGStream(max_tokens=4).with_structured_output(_Joke, include_raw=True)
    result = await short.ainvoke("Tell me a joke about cats.")
    assert result["parsed"] is None and isinstance(result["parsing_error"], OutputParserException)
    with pytest.raises(OutputParserException):
        await ChatDGStream(max_tokens=4).with_structured_output(_Joke).ainvoke("A joke.")
    untitled = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    answer = await model.with_structured_output(untitled).ainvoke("Pick a number.")
    assert isinstance(answer, dict) and set(answer) == {"a"} and isinstance(answer["a"], int)
    with pytest.raises(ValueError, match="needs a schema"):
        model.with_structured_output(None)
    with pytest.raises(ValueError, match="unsupported"):
        model.with_structured_output(_Joke, tools=[magic_function])


# -- "auto": the model chooses, its tokenizer's response_template reads the choice ---------------

CHAT_TEMPLATE = (
    "{%- if tools %}<|system|>\nYou may call these tools:{% for tool in tools %}\n"
    "{{ tool.function | tojson }}{% endfor %}\n"
    'Call one as <tool_call>{"name": ..., "arguments": {...}}</tool_call><|end|>\n{% endif %}'
    "{%- for m in messages %}<|{{ m.role }}|>\n{{ m.content }}"
    "{% for call in m.tool_calls or [] %}<tool_call>{{ call.function | tojson }}</tool_call>"
    "{% endfor %}<|end|>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
#: transformers' response_template for that format (as Qwen 2.5's, with this template's tags).
RESPONSE_TEMPLATE = {
    "defaults": {"role": "assistant"},
    "start_anchor": "<|assistant|>\n",
    "fields": {
        "tool_calls": {
            "open_pattern": r"\s*<tool_call>",
            "close": "</tool_call>",
            "repeats": True,
            "content": "json",
            "transform": {"type": "function", "function": "{content}"},
        },
        "content": {"close_pattern": r"\s*<\|end\|>", "content": "text"},
    },
}


@pytest.fixture
def calling_tok(tiny_tok: Any) -> Any:
    """The tiny tokenizer with a chat template that shows tools and calls, and the
    response_template that reads calls back."""
    tok = copy.deepcopy(tiny_tok)
    tok.chat_template = CHAT_TEMPLATE
    tok.response_template = RESPONSE_TEMPLATE
    return tok


class Scripted:
    """A backend over a real tokenizer whose model writes ``pieces``: what a model trained on
    its template's call format writes (the tiny random model writes no calls)."""

    def __init__(self, tokenizer: Any, pieces: list[str]) -> None:
        self.tokenizer = tokenizer
        self.context_length = 2048
        self.model_name = "scripted"
        self.pieces = pieces
        self.requests: list[GenerationRequest] = []

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        self.requests.append(request)
        for piece in self.pieces[:-1]:
            yield Chunk(text=piece)
        yield Chunk(text=self.pieces[-1], finish_reason="stop")

    async def aclose(self) -> None:
        return None


async def test_auto_reads_the_models_calls_with_its_response_template(calling_tok: Any) -> None:
    reply = [
        'Let me add. <tool_call>{"name": "my_adder", "argu',
        'ments": {"a": 1, "b": 2}}',
        "</tool_call>",
    ]

    @tool
    def my_adder(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    backend = Scripted(calling_tok, reply)
    model = ChatDGStream(backend=backend).bind_tools([my_adder])  # tool_choice: auto
    message = await model.ainvoke("What is 1 + 2?")
    assert message.content == "Let me add."
    (call,) = message.tool_calls
    assert (call["name"], call["args"]) == ("my_adder", {"a": 1, "b": 2})
    assert call["id"].startswith("call_") and not message.invalid_tool_calls
    assert message.response_metadata["finish_reason"] == "tool_calls"
    # The tools reached the model through the chat template.
    (request, *_) = backend.requests
    assert request.tools == [convert_to_openai_tool(my_adder)]
    assert '"name": "my_adder"' in render_chat(calling_tok, request)
    # Streamed: read whole at the end (a call's markup is never shown as text), the same.
    chunks = [chunk async for chunk in model.astream("What is 1 + 2?")]
    assert len(chunks) == 1
    assert (chunks[0].content, chunks[0].tool_calls[0]["args"]) == ("Let me add.", call["args"])
    # The call and its result go back to the model in the template's own format.
    history = [HumanMessage("What is 1 + 2?"), message, ToolMessage("3", tool_call_id=call["id"])]
    await model.ainvoke(history)
    prompt = render_chat(calling_tok, backend.requests[-1])
    assert '<tool_call>{"name": "my_adder", "arguments": {"a": 1, "b": 2}}</tool_call>' in prompt
    assert "<|tool|>\n3<|end|>" in prompt


async def test_auto_markup_it_cannot_read_is_an_invalid_tool_call(calling_tok: Any) -> None:
    backend = Scripted(calling_tok, ["<tool_call>{not json</tool_call>"])
    message = await ChatDGStream(backend=backend).bind_tools([magic_function]).ainvoke("hi")
    assert not message.tool_calls and message.content == "<tool_call>{not json</tool_call>"
    (bad,) = message.invalid_tool_calls
    assert "response_template" in str(bad["error"]) and bad["args"] == message.content


def test_auto_with_a_real_model_that_answers_in_text(
    calling_tok: Any, tiny_verifier: Any, tiny_drafter: Any
) -> None:
    """End to end on the tiny model: tools shown by the template, a reply without a call is
    the message's text (``dg_stream.generate``'s, as the response_template reads it)."""
    backend = dg_stream.LocalBackend(tiny_verifier, tiny_drafter, tokenizer=calling_tok)
    message = ChatDGStream(backend=backend, max_tokens=8).bind_tools([magic_function]).invoke(QUERY)

    async def plain() -> Any:
        messages = [{"role": "user", "content": QUERY}]
        tools = [convert_to_openai_tool(magic_function)]
        return await dg_stream.generate(
            messages, backend=backend, max_new_tokens=8, tools=tools
        ).collect()

    expected = anyio.run(plain)
    assert not message.tool_calls and message.content == expected.text.strip()
    assert message.response_metadata["finish_reason"] == expected.finish_reason


# -- refusals ------------------------------------------------------------------------------------


def test_bad_tools_and_choices_are_refused_when_bound(tiny_backend: Any) -> None:
    model = ChatDGStream(backend=tiny_backend, max_tokens=8)
    with pytest.raises(InvalidRequestError, match="'magic_function_no_args'") as info:
        model.bind_tools([magic_function, magic_function_no_args], tool_choice="nope")
    assert "'nope'" in str(info.value) and "'magic_function'" in str(info.value)
    with pytest.raises(InvalidRequestError, match="twice"):
        model.bind_tools(
            [magic_function, convert_to_openai_tool(magic_function)], tool_choice="any"
        )
    with pytest.raises(InvalidRequestError, match="tool_choice must be"):
        model.bind_tools([magic_function], tool_choice=3)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="needs tools"):
        model.bind_tools([], tool_choice="any")
    with pytest.raises(InvalidRequestError, match="unknown option"):
        model.bind_tools([magic_function], tool_choice="any", strict=True)
    # 'auto' (the default): this tokenizer has a chat template but no response_template.
    with pytest.raises(InvalidRequestError, match="no response_template"):
        model.bind_tools([magic_function])
    with pytest.raises(InvalidRequestError, match="tool_choice 'auto'"):
        model.bind_tools([magic_function], tool_choice="auto")
    # A remote backend's tokenizer is its server's: 'auto' is refused there too, when bound.
    with pytest.raises(InvalidRequestError, match="remote backend"):
        ChatDGStream(base_url="http://127.0.0.1:9").bind_tools([magic_function])
    # "none" shows the tools and answers in text; a forced call and a response_format clash.
    text = model.bind_tools([magic_function], tool_choice="none").invoke("hi")
    assert text.content and not text.tool_calls
    both = model.bind_tools(
        [magic_function], tool_choice="any", response_format={"type": "json_object"}
    )
    with pytest.raises(InvalidRequestError, match="both decide"):
        both.invoke("hi")


def test_the_embedded_template_shows_no_tools() -> None:
    """What the embedded model is shown of its tools: its chat template renders each message's
    role and content only, so tools (and an assistant's calls) never reach its prompt; a
    forced call's schema is what guides it. Fails when the template learns tools."""
    backend = _get_default_backend()
    messages = [{"role": "user", "content": QUERY}]
    with_tools = dg_stream._generate.request_for(
        messages, tools=[convert_to_openai_tool(magic_function)]
    )
    assert render_chat(backend.tokenizer, with_tools) == render_chat(
        backend.tokenizer, dg_stream._generate.request_for(messages)
    )


# -- LangChain's ChatOpenAI against dg-stream serve ----------------------------------------------


def test_chat_openai_structured_output_against_the_server(served_default: str) -> None:
    """``langchain-openai``'s own ``with_structured_output(method="json_schema")`` over
    ``/v1/chat/completions``: the same greedy reply as ChatDGStream in process."""
    openai_models = pytest.importorskip("langchain_openai")
    remote = openai_models.ChatOpenAI(
        base_url=f"{served_default}/v1",
        api_key="x",
        model="dg-stream-default",
        temperature=0,
        max_tokens=MAX_TOKENS,
        max_retries=0,
    )
    local = ChatDGStream(max_tokens=MAX_TOKENS)
    question = "Tell me a joke about cats."
    joke = remote.with_structured_output(_Joke, method="json_schema").invoke(question)
    assert isinstance(joke, _Joke)
    assert joke == local.with_structured_output(_Joke).invoke(question)


def test_chat_openai_tool_calls_against_the_server(served_default: str) -> None:
    """``ChatOpenAI.bind_tools`` with a forced call through ``/v1/chat/completions``'s
    ``tools`` and ``tool_choice``: the call ChatDGStream makes in process."""
    openai_models = pytest.importorskip("langchain_openai")
    remote = openai_models.ChatOpenAI(
        base_url=f"{served_default}/v1",
        api_key="x",
        model="dg-stream-default",
        temperature=0,
        max_tokens=MAX_TOKENS,
        max_retries=0,
    )
    local = ChatDGStream(max_tokens=MAX_TOKENS)
    for choice in ("magic_function", "any"):
        expected = local.bind_tools([magic_function], tool_choice=choice).invoke(QUERY)
        message = remote.bind_tools([magic_function], tool_choice=choice).invoke(QUERY)
        assert [(c["name"], c["args"]) for c in message.tool_calls] == [
            (c["name"], c["args"]) for c in expected.tool_calls
        ]
        streamed = _merged(
            list(remote.bind_tools([magic_function], tool_choice=choice).stream(QUERY))
        )
        assert [(c["name"], c["args"]) for c in streamed.tool_calls] == [
            (c["name"], c["args"]) for c in expected.tool_calls
        ]
