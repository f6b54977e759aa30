"""The async stream: off-loop work, early exits, errors, concurrency, asyncio and trio."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import anyio
import pytest
from _drafters import CountingDrafter

import dg_stream
from dg_stream import (
    Chunk,
    GenerationError,
    InvalidRequestError,
    LocalBackend,
    ModelLoadError,
    VocabularyMismatchError,
    generate,
)
from dg_stream._drafters import NgramDrafter

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def counting(tiny_verifier: Any, tiny_tok: Any) -> tuple[LocalBackend, CountingDrafter]:
    drafter = CountingDrafter(NgramDrafter())
    return LocalBackend(tiny_verifier, drafter, tokenizer=tiny_tok, block_size=3), drafter


async def test_chunks_add_up_to_the_final_text(tiny_backend: LocalBackend, tiny_tok: Any) -> None:
    async with generate("def add(a, b):", backend=tiny_backend, max_new_tokens=40) as stream:
        chunks = [chunk async for chunk in stream]
    assert all(isinstance(c, Chunk) for c in chunks)
    assert "".join(c.text for c in chunks) == stream.text
    ids = [t for c in chunks for t in c.token_ids]
    assert stream.text == tiny_tok.decode(ids, skip_special_tokens=True)
    assert chunks[-1].finish_reason == stream.finish_reason == "length"
    assert all(c.finish_reason is None for c in chunks[:-1])
    assert stream.usage is not None and stream.usage.completion_tokens == len(ids) == 40
    assert stream.usage.prompt_tokens == len(tiny_tok("def add(a, b):")["input_ids"])
    assert stream.stats is not None and stream.stats.verifier_calls == len(chunks)
    assert stream.stats.committed_tokens == 40


async def test_event_loop_stays_responsive(tiny_backend: LocalBackend) -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await anyio.sleep(0.001)
            ticks += 1

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        completion = await generate("x", backend=tiny_backend, max_new_tokens=60).collect()
        tg.cancel_scope.cancel()
    assert completion.usage is not None and completion.usage.completion_tokens == 60
    assert ticks >= 10  # the loop ran other tasks while the model worked


async def _steps_after(drafter: CountingDrafter) -> int:
    before = drafter.calls
    await anyio.sleep(0.2)
    return drafter.calls - before


async def test_break_stops_model_work(counting: tuple[LocalBackend, CountingDrafter]) -> None:
    backend, drafter = counting
    async with generate("abc", backend=backend, max_new_tokens=200) as stream:
        async for _ in stream:
            break
    assert stream.closed
    assert await _steps_after(drafter) == 0
    # The first proposal, then one per round, which run ahead of the reader by at most the
    # backlog before it leaves.
    assert drafter.calls <= 1 + backend.limits.backlog


async def test_bare_async_for_break_runs_no_more_steps(
    counting: tuple[LocalBackend, CountingDrafter],
) -> None:
    backend, drafter = counting
    stream = generate("abc", backend=backend, max_new_tokens=200)
    async for _ in stream:
        break
    # Rounds run ahead of an idle reader by at most the backlog, then wait for it.
    assert await _steps_after(drafter) <= backend.limits.backlog
    assert await _steps_after(drafter) == 0
    await stream.aclose()
    await stream.aclose()  # idempotent


async def test_cancellation_stops_model_work(
    counting: tuple[LocalBackend, CountingDrafter],
) -> None:
    backend, drafter = counting
    seen = 0
    with anyio.move_on_after(0.05):
        async with generate("abc", backend=backend, max_new_tokens=100000 // 1000) as stream:
            async for _ in stream:
                seen += 1
                await anyio.sleep(0.02)
    assert stream.closed
    assert await _steps_after(drafter) == 0


async def test_exception_in_consumer_closes_stream(
    counting: tuple[LocalBackend, CountingDrafter],
) -> None:
    backend, drafter = counting
    with pytest.raises(KeyError):
        async with generate("abc", backend=backend, max_new_tokens=100) as stream:
            async for _ in stream:
                raise KeyError("consumer failed")
    assert stream.closed
    assert await _steps_after(drafter) == 0


async def test_model_error_reaches_the_consumer(tiny_verifier: Any, tiny_tok: Any) -> None:
    drafter = CountingDrafter(NgramDrafter(), fail_at=3)
    backend = LocalBackend(tiny_verifier, drafter, tokenizer=tiny_tok)
    received = []
    with pytest.raises(GenerationError, match="drafter exploded") as info:
        async with generate("abc", backend=backend, max_new_tokens=50) as stream:
            async for chunk in stream:
                received.append(chunk.text)
    assert isinstance(info.value.__cause__, RuntimeError)
    assert info.value.text == "".join(received)


async def test_concurrent_streams_do_not_interfere(tiny_backend: LocalBackend) -> None:
    prompts = ["def add(a, b):", "class Stack:", "print(", "x = 1\n"]
    alone = [
        (await generate(p, backend=tiny_backend, max_new_tokens=30).collect()).text for p in prompts
    ]
    together: dict[int, str] = {}

    async def run(i: int) -> None:
        together[i] = (
            await generate(prompts[i], backend=tiny_backend, max_new_tokens=30).collect()
        ).text

    async with anyio.create_task_group() as tg:
        for i in range(len(prompts)):
            tg.start_soon(run, i)
    assert [together[i] for i in range(len(prompts))] == alone


async def test_stop_string_spanning_chunks(tiny_backend: LocalBackend) -> None:
    full = (
        await generate("def add(a, b):", backend=tiny_backend, max_new_tokens=40).collect()
    ).text
    stop = full[10:13]
    assert stop and full.find(stop) >= 1
    completion = await generate(
        "def add(a, b):", backend=tiny_backend, max_new_tokens=40, stop=[stop]
    ).collect()
    assert completion.text == full[: full.find(stop)]
    assert completion.finish_reason == "stop"


async def test_draft_preview(tiny_verifier: Any, tiny_tok: Any) -> None:
    backend = LocalBackend(tiny_verifier, "ngram", tokenizer=tiny_tok, block_size=4)
    async with generate(
        "ab ab ab ab", backend=backend, max_new_tokens=30, draft_preview=True
    ) as stream:
        chunks = [c async for c in stream]
    assert any(c.draft for c in chunks[:-1])
    assert chunks[-1].draft == ""
    async with generate("ab ab ab ab", backend=backend, max_new_tokens=30) as plain:
        drafts = [c.draft async for c in plain]
    assert drafts and all(d == "" for d in drafts)


async def test_chat_messages_use_the_chat_template(
    tiny_backend: LocalBackend, tiny_tok: Any
) -> None:
    messages = [{"role": "user", "content": "hi"}]
    completion = await generate(messages, backend=tiny_backend, max_new_tokens=5).collect()
    rendered = tiny_tok.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_dict=False
    )
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == len(rendered)


@pytest.mark.parametrize(
    "kwargs, param",
    [
        (dict(prompt=""), "prompt"),
        (dict(prompt=[]), "prompt"),
        (dict(prompt="x", max_new_tokens=0), "max_new_tokens"),
        (dict(prompt="x", max_new_tokens=-3), "max_new_tokens"),
        (dict(prompt="x", temperature=-1.0), "temperature"),
        (dict(prompt="x", temperature=1.0, top_p=0.0), "top_p"),
        (dict(prompt="x", temperature=1.0, top_p=1.01), "top_p"),
        (dict(prompt="x", block_size=0), "block_size"),
        (dict(prompt="x", blocksize=4), "blocksize"),
        (dict(prompt=[{"role": "user"}]), "prompt"),
        (dict(prompt=42), "prompt"),
    ],
)
async def test_bad_input_fails_before_model_work(
    kwargs: dict[str, Any], param: str, counting: tuple[LocalBackend, CountingDrafter]
) -> None:
    backend, drafter = counting
    kwargs = dict(kwargs)
    prompt = kwargs.pop("prompt")
    with pytest.raises(InvalidRequestError) as info:
        generate(prompt, backend=backend, **kwargs)
    assert info.value.param == param
    assert drafter.calls == 0


async def test_too_long_and_out_of_vocabulary_prompts(
    counting: tuple[LocalBackend, CountingDrafter],
) -> None:
    backend, drafter = counting
    with pytest.raises(InvalidRequestError, match="context"):
        await generate("x", backend=backend, max_new_tokens=10_000).collect()
    with pytest.raises(InvalidRequestError, match=r"the prompt \(1 token\) plus"):
        await generate([5], backend=backend, max_new_tokens=10_000).collect()
    with pytest.raises(InvalidRequestError, match=r"the prompt \(2 tokens\) plus"):
        await generate([5, 6], backend=backend, max_new_tokens=10_000).collect()
    with pytest.raises(InvalidRequestError, match="vocabulary"):
        await generate([1, 10_000], backend=backend, max_new_tokens=3).collect()
    assert drafter.calls == 0


def test_unknown_paths_and_vocabulary_mismatch(
    tmp_path: Any, tiny_verifier: Any, tiny_tok: Any
) -> None:
    from _models import tiny_masked_lm

    with pytest.raises(ModelLoadError, match="does not exist"):
        LocalBackend(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        LocalBackend(tiny_verifier, str(tmp_path / "nope"), tokenizer=tiny_tok)
    with pytest.raises(VocabularyMismatchError):
        LocalBackend(tiny_verifier, tiny_masked_lm(len(tiny_tok) + 50, 2), tokenizer=tiny_tok)


def test_an_unavailable_device_is_a_model_load_error(tiny_verifier: Any, tiny_tok: Any) -> None:
    import torch

    if not torch.cuda.is_available():
        missing = (
            "CUDA is not available in this torch build"
            if not torch.backends.cuda.is_built()
            else "CUDA is not available: torch finds no GPU"
        )
        with pytest.raises(ModelLoadError, match=missing):
            LocalBackend(tiny_verifier, None, tokenizer=tiny_tok, device="cuda")
    with pytest.raises(
        ModelLoadError,
        match="no device cuda:99" if torch.cuda.is_available() else "CUDA is not available",
    ):
        LocalBackend(tiny_verifier, None, tokenizer=tiny_tok, device="cuda:99")
    with pytest.raises(ModelLoadError, match="unknown device 'gpu'"):
        LocalBackend(tiny_verifier, None, tokenizer=tiny_tok, device="gpu")


def test_import_without_torch_and_a_clear_hint() -> None:
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
        "import dg_stream\n"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "try:\n    dg_stream.LocalBackend('x')\n"
        "except dg_stream.MissingDependencyError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install '.[local]' in a dg_stream checkout" in out.stdout


def test_public_names() -> None:
    for name in dg_stream.__all__:
        assert getattr(dg_stream, name) is not None
