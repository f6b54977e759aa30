"""Every ``generate()`` argument, fuzzed: each call works or fails with a DGStreamError up front."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from _drafters import CountingDrafter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dg_stream import DGStreamError, InvalidRequestError, LocalBackend, generate
from dg_stream._drafters import DiffusionDrafter


@pytest.fixture(scope="module")
def counting(
    tiny_verifier: Any, tiny_drafter: Any, tiny_tok: Any
) -> tuple[LocalBackend, CountingDrafter]:
    drafter = CountingDrafter(DiffusionDrafter(tiny_drafter, mask_token_id=tiny_tok.mask_token_id))
    return LocalBackend(tiny_verifier, drafter, tokenizer=tiny_tok, block_size=3), drafter


# Values of every wrong type, and text with lone surrogates (what ``surrogateescape`` makes
# of invalid UTF-8), control characters and astral characters.
junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4),
    st.binary(max_size=4),
    st.lists(st.integers(-2, 400), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
any_text = st.one_of(
    st.text(max_size=12),
    st.text(st.characters(codec=None, exclude_categories=()), max_size=12),
)
token_ids = st.one_of(
    st.lists(st.integers(0, 400), min_size=1, max_size=6),
    st.lists(st.one_of(st.integers(-3, 400), st.booleans(), st.floats(-1, 5)), max_size=4),
)
message = st.fixed_dictionaries(
    {
        "role": st.one_of(st.sampled_from(["system", "user", "assistant"]), any_text),
        "content": any_text,
    },
    optional={"name": junk},
)
prompts = st.one_of(any_text, token_ids, st.lists(message, max_size=3))
edges = st.sampled_from([1e-300, 1e-45, 1e300, -1.0, 0.0, 1.0, float("nan"), float("inf")])
# Each option over its domain and just past it; at most one option replaced by junk below.
options = st.fixed_dictionaries(
    {},
    optional={
        "max_new_tokens": st.one_of(st.integers(-2, 6), st.just(10**9)),
        "temperature": st.one_of(st.floats(0, 3), edges),
        "top_k": st.one_of(st.none(), st.integers(-1, 500)),
        "top_p": st.one_of(st.none(), st.floats(0, 1), edges),
        "repetition_penalty": st.one_of(st.none(), st.floats(0, 3), edges),
        "seed": st.one_of(st.none(), st.integers(-(2**65), 2**65)),
        "stop": st.one_of(st.none(), any_text, st.lists(any_text, max_size=3)),
        "draft_preview": st.booleans(),
        "block_size": st.one_of(st.none(), st.integers(-1, 70)),
        "steps": st.one_of(st.none(), st.integers(-1, 10), st.just(10**12)),
        "adaptive": st.one_of(st.none(), st.booleans()),
        "confidence": st.one_of(st.none(), st.floats(0, 1), edges),
    },
)
corruption = st.one_of(
    st.none(),
    st.tuples(
        st.sampled_from(
            [
                "prompt",
                "max_new_tokens",
                "temperature",
                "top_k",
                "top_p",
                "repetition_penalty",
                "seed",
                "stop",
                "draft_preview",
                "block_size",
                "steps",
                "adaptive",
                "confidence",
                "blocksize",
            ]
        ),
        junk,
    ),
)


async def _first_chunks(stream: Any) -> None:
    async with stream:
        n = 0
        async for _ in stream:
            n += 1
            if n == 2:
                break


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(prompt=prompts, kwargs=options, corrupt=corruption)
def test_generate_works_or_refuses_up_front(
    prompt: Any,
    kwargs: dict[str, Any],
    corrupt: tuple[str, Any] | None,
    counting: tuple[LocalBackend, CountingDrafter],
) -> None:
    backend, drafter = counting
    if corrupt is not None:
        name, value = corrupt
        if name == "prompt":
            prompt = value
        else:
            kwargs = {**kwargs, name: value}
    before = drafter.calls
    try:
        stream = generate(prompt, backend=backend, **kwargs)
    except DGStreamError as exc:
        assert isinstance(exc, InvalidRequestError) and exc.param, exc
        assert drafter.calls == before
        return
    # What needs the model's tokenizer or size (a token id past the vocabulary, a prompt too
    # long for the context) was checked at the call too: the stream itself starts.
    anyio.run(_first_chunks, stream)


@pytest.mark.parametrize(
    "prompt",
    [
        "abc\udcff",
        [{"role": "user", "content": "hi \ud800"}],
        [{"role": "us\udcffer", "content": "x"}],
    ],
)
def test_lone_surrogates_are_refused(
    prompt: Any, counting: tuple[LocalBackend, CountingDrafter]
) -> None:
    with pytest.raises(InvalidRequestError, match="UTF-8") as info:
        generate(prompt, backend=counting[0])
    assert info.value.param in ("prompt", "messages")
    with pytest.raises(InvalidRequestError, match="UTF-8") as info:
        generate("abc", backend=counting[0], stop=["\udcff"])
    assert info.value.param == "stop"
