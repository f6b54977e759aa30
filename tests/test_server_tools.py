"""Tool calls and structured output through ``dg-stream serve``, with the real openai client.

Forced calls (``tool_choice`` ``"required"`` or a named function) are constrained decoding:
every call parses and follows its tool's schema, streamed or not, with a tiny random model.
``"auto"`` needs a tokenizer whose ``response_template`` reads the model's calls back; without
one it is a 400 that says what to send instead. Schemas from the network are compiled off the
event loop within a time limit while other streams keep flowing.
"""

from __future__ import annotations

import gc
import json
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _models import tiny_masked_lm
from _servers import ServerThread

import dg_stream
from dg_stream import Chunk, LocalBackend
from dg_stream._config import Message
from dg_stream._prompt import render_plain_chat
from dg_stream._tools import FunctionTool, ToolChoice
from dg_stream.server import create_app
from dg_stream.server._responses import AutoToolRenderer, ToolCallRenderer

openai = pytest.importorskip("openai")

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"enum": ["Paris", "Oslo", "Lima"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "days"],
}
CLOCK = {
    "type": "object",
    "properties": {"zone": {"type": "string", "maxLength": 6}},
    "required": ["zone"],
}
TOOLS = [
    {"type": "function", "function": {"name": "weather", "parameters": WEATHER}},
    {
        "type": "function",
        "function": {"name": "clock", "description": "The time.", "parameters": CLOCK},
    },
]
SCHEMAS = {"weather": WEATHER, "clock": CLOCK}
MESSAGES = [{"role": "user", "content": "Weather in Oslo for 3 days?"}]


@pytest.fixture(scope="module")
def backend(tiny_verifier: Any, tiny_tok: Any) -> LocalBackend:
    drafter = tiny_masked_lm(len(tiny_tok), tiny_tok.mask_token_id)
    return LocalBackend(tiny_verifier, drafter, tokenizer=tiny_tok, block_size=4)


@pytest.fixture(scope="module")
def server(backend: LocalBackend) -> Any:
    with ServerThread(create_app(backend, model_name="tiny")) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: Any) -> Iterator[Any]:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0) as client:
        yield client


def _streamed_calls(pieces: Any) -> tuple[list[dict[str, str]], str | None]:
    """Join OpenAI tool-call deltas by index, as clients do."""
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in pieces:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        assert not choice.delta.content  # a forced call has no text
        for delta in choice.delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
            call["id"] += delta.id or ""
            call["name"] += (delta.function.name or "") if delta.function else ""
            call["arguments"] += (delta.function.arguments or "") if delta.function else ""
        finish = choice.finish_reason or finish
    return [calls[i] for i in sorted(calls)], finish


def _check(calls: list[dict[str, str]]) -> None:
    for call in calls:
        assert call["id"].startswith("call_")
        jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])


def test_a_named_function_is_called_with_arguments_that_follow_its_schema(client: Any) -> None:
    choice = {"type": "function", "function": {"name": "weather"}}
    whole = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        tools=TOOLS,
        tool_choice=choice,
        max_tokens=60,
        temperature=0,
    )
    message = whole.choices[0].message
    assert whole.choices[0].finish_reason == "tool_calls"
    assert message.content is None and len(message.tool_calls) == 1
    call = message.tool_calls[0]
    assert call.type == "function" and call.function.name == "weather"
    _check([{"id": call.id, "name": "weather", "arguments": call.function.arguments}])
    pieces = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        tools=TOOLS,
        tool_choice=choice,
        max_tokens=60,
        temperature=0,
        stream=True,
    )
    streamed, finish = _streamed_calls(pieces)
    assert finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in streamed] == [
        ("weather", call.function.arguments)  # greedy: the same call, streamed in pieces
    ]
    _check(streamed)


def test_required_calls_follow_their_tools_schemas_streamed_or_not(client: Any) -> None:
    for parallel in (True, False):
        options = {"parallel_tool_calls": parallel, "max_tokens": 120, "temperature": 0}
        whole = client.chat.completions.create(
            model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="required", **options
        )
        calls = [
            {"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
            for c in whole.choices[0].message.tool_calls or []
        ]
        if whole.choices[0].finish_reason == "length":  # the limit cut a later call
            assert parallel
        else:
            assert whole.choices[0].finish_reason == "tool_calls"
        assert calls and (parallel or len(calls) == 1)
        _check(calls)
        pieces = client.chat.completions.create(
            model="tiny",
            messages=MESSAGES,
            tools=TOOLS,
            tool_choice="required",
            stream=True,
            **options,
        )
        streamed, finish = _streamed_calls(pieces)
        assert finish == whole.choices[0].finish_reason
        assert [(c["name"], c["arguments"]) for c in streamed] == [
            (c["name"], c["arguments"]) for c in calls
        ]


def test_a_conversation_with_calls_and_their_results_goes_on(client: Any) -> None:
    history = [
        *MESSAGES,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "weather", "arguments": '{"city":"Oslo","days":3}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "Snow."},
    ]
    reply = client.chat.completions.create(
        model="tiny", messages=history, tools=TOOLS, tool_choice="none", max_tokens=5
    )
    assert reply.choices[0].message.tool_calls is None
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_the_plain_chat_format_shows_tools_calls_and_results() -> None:
    text = render_plain_chat(
        [
            Message("user", "Weather?"),
            Message(
                "assistant",
                "",
                tool_calls=[
                    {"id": "c", "function": {"name": "weather", "arguments": '{"days":2}'}}
                ],
            ),
            Message("tool", "Sunny.", tool_call_id="c", name="weather"),
        ],
        [TOOLS[0]],
    )
    assert text.startswith('Tools:\n{"name": "weather"')
    assert '"arguments": {"days": 2}' in text
    assert "Tool (weather): Sunny." in text
    assert text.endswith("Assistant:")


def test_auto_without_a_response_template_says_what_to_send(client: Any) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS)
    body = caught.value.body
    assert body["param"] == "tool_choice" and "response_template" in body["message"]


RESPONSE_TEMPLATE = {
    "start_anchor": "<|assistant|>",
    "fields": {
        "content": {},
        "tool_calls": {
            "open": "<tool_call>",
            "close": "</tool_call>",
            "content": "json",
            "repeats": True,
            "transform": {"type": "function", "function": "{content}"},
        },
    },
}
CHAT_TEMPLATE = (
    "{% if tools %}<|tools|>{{ tools | tojson }}{% endif %}"
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_auto_reads_the_models_calls_with_its_response_template(tiny_tok: Any) -> None:
    """The renderer over a reply written in the template's format (the tiny model does not
    write calls by itself): content and calls apart, streamed and whole."""
    import copy

    tok = copy.deepcopy(tiny_tok)
    tok.chat_template = CHAT_TEMPLATE
    tok.response_template = RESPONSE_TEMPLATE
    reply = 'Checking. <tool_call>{"name": "weather", "arguments": {"city": "Lima", "days": 2}}'
    chunks = [
        Chunk(text=reply[:20]),
        Chunk(text=reply[20:] + "</tool_call>", finish_reason="stop"),
    ]
    tools = [FunctionTool(name="weather", parameters=WEATHER)]
    options = {"id": "x", "model": "tiny", "include_usage": False}
    renderer = AutoToolRenderer(tok, "<|user|>hi<|assistant|>", tools, **options)
    frames = [frame for chunk in chunks for frame in renderer.chunk(chunk)]
    events = [json.loads(f.decode()[len("data: ") :]) for f in frames]
    deltas = [e["choices"][0]["delta"] for e in events]
    assert "".join(d.get("content") or "" for d in deltas) == "Checking."
    calls = [c for d in deltas for c in d.get("tool_calls") or []]
    assert [c["function"]["name"] for c in calls] == ["weather"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Lima", "days": 2}
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"
    whole = json.loads(renderer.whole(reply + "</tool_call>", chunks))
    message = whole["choices"][0]["message"]
    assert message["content"] == "Checking." and message["tool_calls"][0]["id"].startswith("call_")


def test_auto_over_http_with_a_template_that_renders_tools(
    tiny_verifier: Any, tiny_tok: Any
) -> None:
    """End to end: the tools reach the prompt through the chat template; a reply without a
    call is content, as OpenAI gives it."""
    import copy

    tok = copy.deepcopy(tiny_tok)
    tok.chat_template = CHAT_TEMPLATE
    tok.response_template = RESPONSE_TEMPLATE
    backend = LocalBackend(tiny_verifier, "ngram", tokenizer=tok, block_size=4)
    with (
        ServerThread(create_app(backend, model_name="tiny")) as running,
        openai.OpenAI(base_url=f"{running.url}/v1", api_key="x", max_retries=0) as client,
    ):
        reply = client.chat.completions.create(
            model="tiny", messages=MESSAGES, tools=TOOLS, max_tokens=8, temperature=0
        )
    import anyio

    async def plain() -> str:
        stream = dg_stream.generate(MESSAGES, backend=backend, max_new_tokens=8, tools=TOOLS)
        return (await stream.collect()).text

    expected = anyio.run(plain)
    content, calls = reply.choices[0].message.content, reply.choices[0].message.tool_calls
    if calls is None:
        assert content == expected.strip() or content == expected
    rendered = dg_stream._prompt.render_chat(
        tok, dg_stream._config.GenerationRequest(messages=[Message("user", "x")], tools=TOOLS)
    )
    assert '"name": "weather"' in rendered


def test_a_forced_call_cut_by_the_limit_says_length() -> None:
    renderer = ToolCallRenderer(
        ToolChoice("function", "weather"), id="x", model="tiny", include_usage=False
    )
    whole = json.loads(renderer.whole('{"city":"Pa', [Chunk(text="", finish_reason="length")]))
    assert whole["choices"][0]["finish_reason"] == "length"


def test_a_slow_or_deep_schema_is_a_400_while_another_stream_flows(backend: LocalBackend) -> None:
    """Grammars compile on a worker thread within grammar_timeout: one past it is a 400 that
    says so (here the limit is tiny), a schema nested past the cap is refused at once, and a
    stream already running keeps its pace meanwhile."""
    app = create_app(backend, model_name="tiny", grammar_timeout=1e-6)
    deep: dict[str, Any] = {"type": "integer"}
    for _ in range(40):
        deep = {"anyOf": [{"type": "integer"}, {"type": "array", "items": deep}]}
    slow = {"type": "json_schema", "json_schema": {"name": "s", "schema": WEATHER}}
    with ServerThread(app) as running:
        gaps: list[float] = []

        def stream() -> None:
            body = {"prompt": "def f(x):", "max_tokens": 200, "stream": True, "temperature": 0}
            last = time.monotonic()
            with httpx.stream("POST", f"{running.url}/v1/completions", json=body) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        now = time.monotonic()
                        gaps.append(now - last)
                        last = now

        flowing = threading.Thread(target=stream)
        flowing.start()
        with openai.OpenAI(base_url=f"{running.url}/v1", api_key="x", max_retries=0) as client:
            for fmt, code in (
                (slow, "response_format_timeout"),
                ({"type": "json_schema", "json_schema": {"name": "d", "schema": deep}}, None),
            ):
                started = time.monotonic()
                with pytest.raises(openai.BadRequestError) as caught:
                    client.chat.completions.create(
                        model="tiny", messages=MESSAGES, response_format=fmt, max_tokens=5
                    )
                assert time.monotonic() - started < 5
                assert caught.value.body["param"] == "response_format"
                if code is not None:
                    assert caught.value.body["code"] == code
        flowing.join(timeout=60)
        assert len(gaps) > 50  # the other stream ran to its end
        assert max(gaps[1:]) < 5


def test_a_client_leaving_mid_json_frees_its_matcher(
    backend: LocalBackend, server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dg_stream._constraints import ConstraintFactory

    made: list[weakref.ref[Any]] = []
    original = ConstraintFactory.constraint

    def recording(self: Any, fmt: Any) -> Any:
        constraint = original(self, fmt)
        made.append(weakref.ref(constraint))
        return constraint

    monkeypatch.setattr(ConstraintFactory, "constraint", recording)
    body = {
        "model": "tiny",
        "messages": MESSAGES,
        "stream": True,
        "max_tokens": 400,
        "response_format": {"type": "json_object"},
    }
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        for n, _ in enumerate(response.iter_lines()):
            if n == 6:
                break
    deadline = time.monotonic() + 10
    while True:
        with warnings.catch_warnings():  # others' unclosed sockets are not this test's topic
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()
        if made and all(ref() is None for ref in made):
            break
        assert time.monotonic() < deadline, "the matcher outlived its stream"
        time.sleep(0.05)
    health = httpx.get(f"{server.url}/health").json()
    assert health["active_generations"] == 0


def test_completions_take_a_response_format_too(client: Any) -> None:
    """vLLM's extension of /v1/completions: the completion follows the schema."""
    fmt = {"type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER}}
    done = client.completions.create(
        model="tiny",
        prompt="weather = ",
        max_tokens=60,
        temperature=0,
        extra_body={"response_format": fmt},
    )
    assert done.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(done.choices[0].text), WEATHER)
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(
            model="tiny", prompt="x", max_tokens=5, extra_body={"response_format": {"type": 1}}
        )
    assert caught.value.body["param"] == "response_format"
