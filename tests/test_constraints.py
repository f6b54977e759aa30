"""Constrained replies (``response_format``), exact under speculation: every reply parses and
validates, greedy output with a drafter is the constrained plain output, sampled output
follows constrained plain sampling, and no token the grammar rejects reaches the verifier."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import anyio
import jsonschema
import msgspec
import pytest
import torch
from _drafters import StatelessDrafter
from _models import tiny_causal_lm, tiny_masked_lm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.stats import chi2_contingency

import dg_stream
from dg_stream import InvalidRequestError, LocalBackend
from dg_stream._config import ResponseFormat, response_format_from
from dg_stream._drafters.base import DrafterTraits, DraftProposal, DraftRequest

PROMPT = [40, 41, 42, 43, 44]


@pytest.fixture(scope="module")
def verifier(tiny_tok: Any) -> Any:
    return tiny_causal_lm("llama", len(tiny_tok), seed=2)


@pytest.fixture(scope="module")
def backends(verifier: Any, tiny_tok: Any) -> dict[str, LocalBackend]:
    drafter = tiny_masked_lm(len(tiny_tok), tiny_tok.mask_token_id)
    return {
        "plain": LocalBackend(verifier, None, tokenizer=tiny_tok),
        "diffusion": LocalBackend(verifier, drafter, tokenizer=tiny_tok, block_size=4),
        "ngram": LocalBackend(verifier, "ngram", tokenizer=tiny_tok, block_size=4),
    }


def reply(backend: LocalBackend, fmt: Any, max_new_tokens: int = 80, **options: Any) -> Any:
    async def main() -> Any:
        stream = dg_stream.generate(
            PROMPT, backend=backend, max_new_tokens=max_new_tokens, response_format=fmt, **options
        )
        return await stream.collect()

    return anyio.run(main)


# -- JSON schemas: every reply parses and validates -----------------------------------------

_leaf = st.sampled_from(
    [
        {"type": "integer"},
        {"type": "boolean"},
        {"type": "string", "maxLength": 6},
        {"enum": ["red", "green", "blue"]},
    ]
)


def _objects(children: Any) -> Any:
    return st.dictionaries(
        st.sampled_from(["a", "b", "id", "name", "tags"]), children, min_size=1, max_size=3
    ).map(
        lambda props: {
            "type": "object",
            "properties": props,
            "required": sorted(props),
            "additionalProperties": False,
        }
    )


schemas = st.recursive(
    _leaf,
    lambda inner: (
        _objects(inner) | inner.map(lambda item: {"type": "array", "items": item, "maxItems": 3})
    ),
    max_leaves=6,
).filter(lambda s: s.get("type") == "object")


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schema=schemas, kind=st.sampled_from(["diffusion", "ngram"]), sampled=st.booleans())
def test_every_reply_parses_and_validates(
    schema: dict[str, Any], kind: str, sampled: bool, backends: dict[str, LocalBackend]
) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    options = {"temperature": 1.0, "seed": 5} if sampled else {}
    result = reply(backends[kind], fmt, max_new_tokens=200, **options)
    if result.finish_reason == "length":  # nested arrays of long strings can outgrow 200
        from dg_stream._constraints import ConstraintFactory

        backend = backends[kind]
        matcher = ConstraintFactory(backend.tokenizer, len(backend.tokenizer)).constraint(
            response_format_from(fmt)  # type: ignore[arg-type]
        )
        assert matcher.fit(list(result.token_ids), 0)[0] == len(result.token_ids)
        return
    assert result.finish_reason == "stop", result.text
    jsonschema.validate(json.loads(result.text), schema)


def test_rows_with_different_formats_share_a_batch(backends: dict[str, LocalBackend]) -> None:
    """In one batch: two schemas, a choice and no format at all."""
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer"}},
        "required": ["n"],
        "additionalProperties": False,
    }
    other = {
        "type": "object",
        "properties": {"tag": {"type": "string", "maxLength": 5}, "ok": {"type": "boolean"}},
        "required": ["tag", "ok"],
        "additionalProperties": False,
    }
    formats: list[Any] = [
        {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}},
        {"type": "json_schema", "json_schema": {"name": "other", "schema": other}},
        {"type": "choice", "choices": ["alpha", "beta"]},
        None,
    ]
    results: list[Any] = [None] * len(formats)

    async def one(i: int) -> None:
        stream = dg_stream.generate(
            PROMPT, backend=backends["diffusion"], max_new_tokens=60, response_format=formats[i]
        )
        results[i] = await stream.collect()

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            for i in range(len(formats)):
                tg.start_soon(one, i)

    anyio.run(main)
    jsonschema.validate(json.loads(results[0].text), schema)
    jsonschema.validate(json.loads(results[1].text), other)
    assert results[2].text in ("alpha", "beta")
    assert results[3].text == reply(backends["plain"], None, max_new_tokens=60).text


# -- greedy with a drafter is constrained plain greedy --------------------------------------


@pytest.mark.parametrize(
    "fmt",
    [
        {"type": "json_object"},
        {"type": "regex", "pattern": "[a-z]{2,8}-[0-9]{1,4}"},
        {"type": "choice", "choices": ["cat", "car", "cart", "dog"]},
    ],
)
def test_greedy_with_a_drafter_is_constrained_plain_greedy(
    fmt: dict[str, Any], backends: dict[str, LocalBackend]
) -> None:
    expected = reply(backends["plain"], fmt)
    for kind in ("diffusion", "ngram"):
        assert reply(backends[kind], fmt).text == expected.text, kind


# -- sampling: the distribution of constrained plain sampling -------------------------------


def test_sampled_replies_follow_constrained_plain_sampling(
    verifier: Any, backends: dict[str, LocalBackend]
) -> None:
    """A choice among strings with shared prefixes: the replies of hybrid sampling and of
    plain constrained sampling are drawn from the same distribution (chi-square)."""
    with torch.no_grad():
        soft = type(verifier)(verifier.config)
        soft.load_state_dict(verifier.state_dict())
        soft.get_output_embeddings().weight.mul_(0.05)  # a spread-out p: a sensitive test
    tok = backends["plain"].tokenizer
    plain = LocalBackend(soft, None, tokenizer=tok)
    drafter = tiny_masked_lm(len(tok), tok.mask_token_id, seed=4)
    hybrid = LocalBackend(soft, drafter, tokenizer=tok, block_size=3, adaptive=False)
    fmt = {"type": "choice", "choices": ["cat", "car", "cart", "care", "dog", "do"]}
    runs = 300
    counts = {
        name: Counter(
            reply(backend, fmt, max_new_tokens=8, temperature=1.0, seed=seed).text
            for seed in range(runs)
        )
        for name, backend in (("plain", plain), ("hybrid", hybrid))
    }
    assert set(counts["hybrid"]) <= set(fmt["choices"])
    seen = sorted(set(counts["plain"]) | set(counts["hybrid"]))
    table = [[counts[name][s] + 0.5 for s in seen] for name in ("plain", "hybrid")]
    assert chi2_contingency(table).pvalue > 1e-3, counts


class _HalfIllegal(StatelessDrafter):
    """Drafts one token: ``legal`` or ``illegal`` with probability 1/2 each, and says so
    (q): a draft cut at its illegal token must then be followed by the residual
    ``normalize(max(0, p - q))``, not p."""

    traits = DrafterTraits(max_block_size=4)

    def __init__(self, legal: int, illegal: int, vocab: int) -> None:
        self.legal, self.illegal, self.vocab = legal, illegal, vocab

    def propose(self, request: DraftRequest) -> DraftProposal:
        q = torch.zeros(1, self.vocab)
        q[0, self.legal] = q[0, self.illegal] = 0.5
        token = torch.multinomial(q[0], 1, generator=request.generator)
        return DraftProposal(token, q)


def test_a_draft_cut_at_an_illegal_token_keeps_sampling_exact(verifier: Any, tiny_tok: Any) -> None:
    """One-token replies from a choice of three: their frequencies match the verifier's
    masked, renormalised p exactly (chi-square); a cut that drew from p instead of the
    residual would give the drafted legal token about half again its share."""
    from scipy.stats import chisquare

    with torch.no_grad():
        soft = type(verifier)(verifier.config)
        soft.load_state_dict(verifier.state_dict())
        soft.get_output_embeddings().weight.mul_(0.05)
    choices = ["a", "b", "c"]
    ids = [tiny_tok.convert_tokens_to_ids(c) for c in choices]
    with torch.no_grad():
        logits = soft(input_ids=torch.tensor([PROMPT])).logits[0, -1]
    p = logits[ids].double().softmax(-1)
    drafter = _HalfIllegal(ids[0], tiny_tok.convert_tokens_to_ids("x"), len(tiny_tok))
    backend = LocalBackend(soft, drafter, tokenizer=tiny_tok, block_size=1, adaptive=False)
    runs = 600
    fmt = {"type": "choice", "choices": choices}
    counts = Counter(
        reply(backend, fmt, max_new_tokens=3, temperature=1.0, seed=seed).text
        for seed in range(runs)
    )
    observed = [counts[c] for c in choices]
    assert sum(observed) == runs
    expected = (p * runs).tolist()
    expected[-1] = runs - sum(expected[:-1])  # sums exactly as chisquare asks
    assert chisquare(observed, expected).pvalue > 1e-3, (observed, p)


# -- no draft token the grammar rejects reaches the verifier --------------------------------


class _Illegal(StatelessDrafter):
    """Drafts only tokens the grammar of a JSON object never allows first (letters)."""

    traits = DrafterTraits(max_block_size=16)

    def __init__(self, token: int) -> None:
        self.token = token
        self.proposed = 0

    def propose(self, request: DraftRequest) -> DraftProposal:
        self.proposed += request.k
        return DraftProposal(torch.full((request.k,), self.token, dtype=torch.long), None)


def test_no_illegal_draft_reaches_the_verifier(verifier: Any, tiny_tok: Any) -> None:
    letter = tiny_tok.convert_tokens_to_ids("x")
    drafter = _Illegal(letter)
    backend = LocalBackend(verifier, drafter, tokenizer=tiny_tok, block_size=4, adaptive=False)
    fed: list[int] = []
    forward = backend.verifier.forward

    def spy(ids: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if not kwargs.get("prefill"):
            fed.append(ids.shape[1])
        return forward(ids, *args, **kwargs)

    backend.verifier.forward = spy  # type: ignore[method-assign]

    async def main() -> Any:
        chunks = []
        stream = dg_stream.generate(
            PROMPT,
            backend=backend,
            max_new_tokens=30,
            response_format={"type": "regex", "pattern": "[0-9]{10,20}"},
        )
        async with stream:
            async for chunk in stream:
                chunks.append(chunk)
        return chunks

    chunks = anyio.run(main)
    text = "".join(c.text for c in chunks)
    assert text.isdigit() and 10 <= len(text) <= 20
    assert drafter.proposed > 0  # it kept drafting letters...
    assert all(c.step.drafted == 0 for c in chunks)  # ...every one cut before the verifier
    assert set(fed) == {1}


# -- the formats themselves -------------------------------------------------------------------


class Point(msgspec.Struct):
    x: int
    y: int


def test_types_and_openai_shapes_become_formats() -> None:
    from pydantic import BaseModel

    class Pet(BaseModel):
        name: str
        legs: int

    pet = response_format_from(Pet)
    assert pet is not None and pet.type == "json_schema" and pet.json_schema is not None
    assert pet.json_schema.schema["properties"].keys() == {"name", "legs"}
    point = response_format_from(Point)
    assert point is not None and point.json_schema is not None
    assert point.json_schema.name == "Point" and point.json_schema.strict
    openai = response_format_from({"type": "json_schema", "json_schema": {"schema": {}}})
    assert openai == ResponseFormat(type="json_schema", json_schema=openai.json_schema)
    assert response_format_from({"type": "text"}) == ResponseFormat()


def test_a_struct_reply_decodes_into_its_type(backends: dict[str, LocalBackend]) -> None:
    result = reply(backends["diffusion"], Point)
    assert result.finish_reason == "stop"
    point = msgspec.json.decode(result.text, type=Point)
    assert isinstance(point.x, int) and isinstance(point.y, int)


@pytest.mark.parametrize(
    ("fmt", "message"),
    [
        ({"type": "xml"}, "type must be one of"),
        ({"type": "json_schema"}, "needs a 'json_schema'"),
        ({"type": "regex", "pattern": ""}, "non-empty 'pattern'"),
        ({"type": "choice", "choices": []}, "list of non-empty strings"),
        ({"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}, "Invalid type"),
        ({"type": "regex", "pattern": "(unclosed"}, "cannot be used"),
        (int, "neither a Pydantic model nor a msgspec Struct"),
    ],
)
def test_a_bad_format_is_refused_before_any_model_work(
    fmt: Any, message: str, backends: dict[str, LocalBackend]
) -> None:
    with pytest.raises(InvalidRequestError, match=message) as caught:
        dg_stream.generate(PROMPT, backend=backends["ngram"], response_format=fmt)
    assert caught.value.param == "response_format"


def test_an_oversized_or_deep_schema_is_refused(backends: dict[str, LocalBackend]) -> None:
    deep: dict[str, Any] = {"type": "integer"}
    for _ in range(40):
        deep = {"type": "object", "properties": {"a": deep}}
    big = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(5000)}}
    for schema, message in ((deep, "nests deeper"), (big, "bytes; at most")):
        fmt = {"type": "json_schema", "json_schema": {"schema": schema}}
        with pytest.raises(InvalidRequestError, match=message):
            dg_stream.generate(PROMPT, backend=backends["ngram"], response_format=fmt)


def test_a_remote_backend_passes_json_formats_and_refuses_its_own() -> None:
    """To an OpenAI-compatible server a JSON format goes as OpenAI writes it; regex and
    choice, which such a server does not know, are refused rather than dropped. The native
    protocol carries any format."""
    from dg_stream import GenerationRequest
    from dg_stream._backends._remote_protocol import openai_body

    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    fmt = response_format_from(
        {"type": "json_schema", "json_schema": {"name": "n", "schema": schema, "strict": True}}
    )
    request = GenerationRequest(prompt="hi", max_new_tokens=5, response_format=fmt)
    _, body, _ = openai_body(request, model="m", chat=True, include_usage=True, diffusing=False)
    assert json.loads(body)["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "n", "schema": schema, "strict": True},
    }
    wire = msgspec.json.decode(msgspec.json.encode(request), type=GenerationRequest)
    assert wire.response_format == fmt
    regex = GenerationRequest(
        prompt="hi", response_format=ResponseFormat(type="regex", pattern="[a-z]+")
    )
    with pytest.raises(InvalidRequestError, match="OpenAI-compatible"):
        openai_body(regex, model="m", chat=True, include_usage=True, diffusing=False)


# -- over HTTP: the openai client against dg-stream serve -----------------------------------


def test_the_openai_client_gets_json_that_follows_its_schema(
    backends: dict[str, LocalBackend],
) -> None:
    """json_schema and json_object through /v1/chat/completions, streamed and not, with the
    real openai client; a schema that cannot compile is a 400 naming response_format."""
    import openai
    from _servers import ServerThread

    from dg_stream.server import create_app

    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 8}, "n": {"type": "integer"}},
        "required": ["name", "n"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "thing", "schema": schema}}
    messages = [{"role": "user", "content": "A thing as JSON:"}]
    with ServerThread(create_app(backends["diffusion"], model_name="tiny")) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        whole = client.chat.completions.create(
            model="tiny",
            messages=messages,
            response_format=fmt,
            max_tokens=120,  # type: ignore[arg-type]
        )
        jsonschema.validate(json.loads(whole.choices[0].message.content or ""), schema)
        assert whole.choices[0].finish_reason == "stop"
        pieces = client.chat.completions.create(
            model="tiny",
            messages=messages,  # type: ignore[arg-type]
            response_format={"type": "json_object"},
            max_tokens=120,
            stream=True,
        )
        text = "".join(c.choices[0].delta.content or "" for c in pieces if c.choices)
        assert text.startswith("{")
        bad = {"type": "json_schema", "json_schema": {"name": "b", "schema": {"type": "nope"}}}
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(
                model="tiny",
                messages=messages,
                response_format=bad,
                max_tokens=5,  # type: ignore[arg-type]
            )
        assert caught.value.body["param"] == "response_format"  # type: ignore[index]
        client.close()


# -- forced tokens: what the grammar dictates is drafted without the drafter --------------------


def test_forced_tokens_are_drafted_counted_and_leave_greedy_as_plain(
    verifier: Any, tiny_tok: Any, backends: dict[str, LocalBackend]
) -> None:
    """A drafter whose every token is illegal still gets drafts: the tokens the schema
    dictates (keys, punctuation). Plain decoding stays plain (no drafter: nothing forced)."""
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 5}, "count": {"type": "integer"}},
        "required": ["name", "count"],
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "item", "schema": schema}}
    letter = tiny_tok.convert_tokens_to_ids("x")
    forcing = LocalBackend(
        verifier, _Illegal(letter), tokenizer=tiny_tok, block_size=4, adaptive=False
    )
    plain = reply(backends["plain"], fmt)
    forced = reply(forcing, fmt)
    assert forced.text == plain.text
    assert forced.token_ids == plain.token_ids
    assert plain.stats.forced_tokens == 0
    assert forced.stats.forced_tokens >= len('{"name":"",')  # every key and its quotes
    assert forced.stats.accepted_tokens >= forced.stats.forced_tokens // 2
    assert forced.stats.verifier_calls < plain.stats.verifier_calls
    for kind in ("diffusion", "ngram"):  # alongside a real drafter's own tokens
        assert reply(backends[kind], fmt).token_ids == plain.token_ids, kind


def test_forced_tokens_keep_sampling_exact(verifier: Any, tiny_tok: Any) -> None:
    """Sampled with forced drafts (the drafter's own are all illegal), replies to a choice
    whose branches share forced stretches ("ret", "urn") follow plain constrained sampling
    (chi-square). llguidance allows only the canonical spelling of bytes it forces, so a
    forced token is the single legal one there: the masked p accepts it always."""
    with torch.no_grad():
        soft = type(verifier)(verifier.config)
        soft.load_state_dict(verifier.state_dict())
        soft.get_output_embeddings().weight.mul_(0.05)
    letter = tiny_tok.convert_tokens_to_ids("x")
    plain = LocalBackend(soft, None, tokenizer=tiny_tok)
    forcing = LocalBackend(soft, _Illegal(letter), tokenizer=tiny_tok, block_size=4, adaptive=False)
    choices = ["return self", "return None", "retry", "ret"]
    fmt = {"type": "choice", "choices": choices}
    runs = 300
    counts: dict[str, Counter[str]] = {}
    forced = 0
    for name, backend in (("plain", plain), ("forced", forcing)):
        counts[name] = Counter()
        for seed in range(runs):
            done = reply(backend, fmt, max_new_tokens=16, temperature=1.0, seed=seed)
            counts[name][done.text] += 1
            forced += done.stats.forced_tokens if name == "forced" else 0
    assert set(counts["forced"]) <= set(choices)
    assert forced >= runs  # "ret" at least, every time
    assert len(counts["plain"]) > 1
    seen = sorted(set(counts["plain"]) | set(counts["forced"]))
    table = [[counts[name][t] + 0.5 for t in seen] for name in ("plain", "forced")]
    assert chi2_contingency(table).pvalue > 1e-3, counts


# -- the matcher after rejections: where plain decoding would leave it --------------------------


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_rollback_after_rejections_leaves_the_matcher_where_plain_decoding_would(
    data: st.DataObject, tiny_tok: Any
) -> None:
    """Rounds of random legal drafts, each judged (its masks stepped through and rolled
    back) and cut at a random position: the matcher then allows exactly what a fresh one fed
    only the committed tokens allows."""
    from dg_stream._constraints import ConstraintFactory

    schema = {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {"enum": ["ab", "abc", "b"]}}},
        "required": ["tags"],
    }
    fmt = response_format_from({"type": "json_schema", "json_schema": {"schema": schema}})
    assert fmt is not None
    factory = ConstraintFactory(tiny_tok, len(tiny_tok))
    live, committed = factory.constraint(fmt), []
    cpu = torch.device("cpu")
    for _ in range(data.draw(st.integers(1, 6))):
        if live.matcher.is_stopped():
            break
        draft: list[int] = []
        for _ in range(data.draw(st.integers(0, 5))):  # a legal draft, token by token
            allowed = live.masks(draft, cpu)[-1].nonzero().flatten().tolist()
            allowed = [t for t in allowed if t not in (0,)]  # not end-of-sequence
            if not allowed:
                break
            draft.append(data.draw(st.sampled_from(allowed)))
        masks = live.masks(draft, cpu)
        kept = data.draw(st.integers(0, len(draft)))
        allowed = masks[kept].nonzero().flatten().tolist()
        new = [*draft[:kept], data.draw(st.sampled_from(allowed))]  # the verifier's token
        live.commit(new)
        committed += new
    fresh = factory.constraint(fmt)
    fresh.commit(committed)
    assert torch.equal(live.masks([], cpu), fresh.masks([], cpu))


@pytest.mark.parametrize("arch", ["gpt2", "qwen2", "gpt_neox", "phi"])
def test_constrained_greedy_is_exact_across_architectures(arch: str, tiny_tok: Any) -> None:
    """Tiny transformers families under a JSON schema: drafted (diffusion, n-gram) greedy is
    token-identical to plain constrained greedy, alone and with a second row in the batch."""
    from _models import tiny_causal_lm as causal

    verifier = causal(arch, len(tiny_tok), seed=3)
    schema = {
        "type": "object",
        "properties": {"id": {"type": "integer"}, "tags": {"type": "array", "maxItems": 2}},
        "required": ["id", "tags"],
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    plain = LocalBackend(verifier, None, tokenizer=tiny_tok)
    expected = reply(plain, fmt, max_new_tokens=40).token_ids
    drafter = tiny_masked_lm(len(tiny_tok), tiny_tok.mask_token_id)
    for draft in (drafter, "ngram"):
        backend = LocalBackend(verifier, draft, tokenizer=tiny_tok, block_size=4)

        async def two(backend: LocalBackend = backend) -> Any:
            async with anyio.create_task_group() as tg:
                other = dg_stream.generate(PROMPT[:3], backend=backend, max_new_tokens=30)
                tg.start_soon(other.collect)
                stream = dg_stream.generate(
                    PROMPT, backend=backend, max_new_tokens=40, response_format=fmt
                )
                return await stream.collect()

        assert reply(backend, fmt, max_new_tokens=40).token_ids == expected, (arch, draft)
        assert anyio.run(two).token_ids == expected, (arch, draft)


def test_strict_closes_object_schemas_and_leaves_values_alone() -> None:
    from dg_stream._constraints import _closed

    schema = {
        "type": "object",
        "properties": {
            "properties": {"const": {"properties": 1}},  # a field named so; a constant value
            "inner": {"type": "object", "properties": {"x": {}}},
            "open": {"type": "object", "properties": {}, "additionalProperties": True},
        },
        "$defs": {"D": {"properties": {"y": {}}}},
        "anyOf": [{"properties": {}}],
    }
    closed = _closed(schema)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["properties"] == {"const": {"properties": 1}}
    assert closed["properties"]["inner"]["additionalProperties"] is False
    assert closed["properties"]["open"]["additionalProperties"] is True
    assert closed["$defs"]["D"]["additionalProperties"] is False
    assert closed["anyOf"][0]["additionalProperties"] is False
    assert "additionalProperties" not in closed["properties"]


class _Script(StatelessDrafter):
    """Drafts the continuation of a fixed script (then end-of-sequence and more): a drafter
    that agrees with the verifier up to the grammar's end and past it."""

    traits = DrafterTraits(max_block_size=8)

    def __init__(self, prompt: list[int], script: list[int]) -> None:
        self.start, self.script = len(prompt), script

    def propose(self, request: DraftRequest) -> DraftProposal:
        done, k = request.context.shape[0] - self.start, request.k
        return DraftProposal(torch.tensor(self.script[done : done + k], dtype=torch.long), None)


def test_a_draft_past_the_grammars_end_commits_what_plain_decoding_does(
    verifier: Any, tiny_tok: Any, backends: dict[str, LocalBackend]
) -> None:
    """Plain decoding stops as the grammar completes; a draft accepted past that point (here
    end-of-sequence and more) must not add tokens to the reply."""
    fmt = {"type": "choice", "choices": ["cat", "dog"]}
    plain = reply(backends["plain"], fmt, max_new_tokens=10)
    script = [*plain.token_ids, tiny_tok.eos_token_id, 50, 51]
    drafter = _Script(PROMPT, script)
    hybrid = LocalBackend(verifier, drafter, tokenizer=tiny_tok, block_size=8, adaptive=False)
    done = reply(hybrid, fmt, max_new_tokens=10)
    assert done.token_ids == plain.token_ids and done.finish_reason == plain.finish_reason
    assert done.stats.verifier_calls == 1  # the whole reply came from one verified draft
    for seed in range(5):  # sampled: the draft past the end is no rejection to draw after
        sampled = reply(hybrid, fmt, max_new_tokens=10, temperature=1.0, seed=seed)
        assert sampled.text in ("cat", "dog") and sampled.finish_reason == "stop"
        assert sampled.token_ids[-1] != tiny_tok.eos_token_id
