"""One model thread per backend: every event loop's streams share its batch, all torch work
runs on it, a closed backend ends its streams, and the default block size drafts exactly when
drafting pays."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import anyio
import pytest
import torch
from _drafters import NoisyOracleDrafter, StatelessDrafter
from _models import tiny_causal_lm
from test_batching import PROMPTS, collect, reference

import dg_stream
from dg_stream import GenerationError, LocalBackend
from dg_stream._drafters.base import DraftProposal, DraftRequest

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def model_and_expected(tiny_tok: Any) -> tuple[Any, list[list[int]]]:
    model = tiny_causal_lm("llama", len(tiny_tok), seed=7)
    return model, [reference(model, p, 24) for p in PROMPTS]


class UselessDrafter(StatelessDrafter):
    """Proposes tokens the verifier never writes (a constant id it avoids)."""

    def __init__(self, token: int) -> None:
        self.token = token
        self.sizes: list[int] = []

    def propose(self, request: DraftRequest) -> DraftProposal:
        self.sizes.append(request.k)
        return DraftProposal(torch.full((request.k,), self.token, dtype=torch.long), None)


class ThreadRecorder:
    """Notes the thread of every verifier forward and drafter call."""

    def __init__(self, model: Any, drafter: Any) -> None:
        self.threads: set[int] = set()
        self._handle = model.register_forward_pre_hook(lambda *_: self._note())
        inner = drafter.propose

        def propose(*args: Any, **kwargs: Any) -> Any:
            self._note()
            return inner(*args, **kwargs)

        drafter.propose = propose

    def _note(self) -> None:
        self.threads.add(threading.get_ident())

    def remove(self) -> None:
        self._handle.remove()


def _in_two_loops(backend: LocalBackend, jobs: Sequence[tuple[list[int], int]]) -> list[Any]:
    """Run half the jobs on an event loop in another thread and half on this thread's loop,
    at the same time; returns (ids, chunks) per job."""
    results: list[Any] = [None] * len(jobs)
    start = threading.Barrier(2)

    async def run(indices: Sequence[int]) -> None:
        start.wait()

        async def one(i: int) -> None:
            results[i] = await collect(backend, jobs[i][0], jobs[i][1])

        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                for i in indices:
                    tg.start_soon(one, i)

    other = threading.Thread(target=anyio.run, args=(run, range(0, len(jobs), 2)))
    other.start()
    anyio.run(run, range(1, len(jobs), 2))
    other.join()
    return results


def test_two_event_loops_share_one_batch_and_one_torch_thread(
    model_and_expected: tuple[Any, list[list[int]]], tiny_tok: Any
) -> None:
    model, expected = model_and_expected
    drafter = NoisyOracleDrafter(
        [p + e for p, e in zip(PROMPTS, expected, strict=True)], len(tiny_tok)
    )
    backend = LocalBackend(model, drafter, tokenizer=tiny_tok, block_size=3)
    recorder = ThreadRecorder(model, drafter)
    try:
        results = _in_two_loops(backend, [(p, 24) for p in PROMPTS])
        torch_thread = backend.model_thread.ident
    finally:
        recorder.remove()
        backend.close()
    assert [ids for ids, _ in results] == expected
    # Rows of both loops shared verifier calls...
    assert max(c.step.rows for _, chunks in results for c in chunks) >= 3
    # ...and every forward and draft ran on the model thread, never on a loop's thread.
    assert recorder.threads == {torch_thread} and torch_thread != threading.get_ident()
    assert not backend.model_thread.alive  # closed: no thread outlives the backend


async def test_a_seeded_sample_is_the_same_alone_and_in_a_batch(
    model_and_expected: tuple[Any, list[list[int]]], tiny_tok: Any
) -> None:
    model, _ = model_and_expected
    backend = LocalBackend(model, "ngram", tokenizer=tiny_tok, block_size=3)
    options = {"temperature": 0.9, "seed": 1234}
    alone, _ = await collect(backend, PROMPTS[3], 24, **options)
    crowd: dict[int, list[int]] = {}

    async def one(i: int, prompt: list[int]) -> None:
        crowd[i] = (await collect(backend, prompt, 24, **options))[0]

    async with anyio.create_task_group() as tg:
        for i, prompt in enumerate(PROMPTS):
            tg.start_soon(one, i, prompt)
    assert crowd[3] == alone
    await backend.aclose()


async def test_adaptive_default_decodes_plainly_when_drafts_never_pass(
    model_and_expected: tuple[Any, list[list[int]]], tiny_tok: Any
) -> None:
    model, expected = model_and_expected
    never = next(t for t in range(5, 200) if all(t not in e for e in expected))
    drafter = UselessDrafter(never)
    backend = LocalBackend(model, drafter, tokenizer=tiny_tok, block_size=4, adaptive=True)
    for prompt, want in zip(PROMPTS, expected, strict=True):
        ids, chunks = await collect(backend, prompt, 24)
        assert ids == want
    _, chunks = await collect(backend, PROMPTS[1], 24)
    drafted = [c.step.drafted for c in chunks]
    # Once the costs are measured, plain decoding, with a rare probe.
    assert sum(d > 0 for d in drafted) <= len(drafted) // 3, drafted
    await backend.aclose()


async def test_adaptive_default_drafts_long_blocks_when_drafts_always_pass(
    tiny_tok: Any,
) -> None:
    model = tiny_causal_lm("llama", len(tiny_tok), seed=7)
    prompt = PROMPTS[1]
    want = reference(model, prompt, 96)
    drafter = NoisyOracleDrafter([prompt + want], len(tiny_tok), spoil_every=10**9)
    backend = LocalBackend(model, drafter, tokenizer=tiny_tok, block_size=4, adaptive=True)
    for _ in range(3):  # measured costs and acceptance carry over between generations
        ids, chunks = await collect(backend, prompt, 96)
        assert ids == want
    late = [c.step for c in chunks[len(chunks) // 2 :]]
    # Every draft passes: blocks grow past the requested size and nearly every call drafts.
    assert max(s.drafted for s in late) > 4
    assert sum(s.accepted for s in late) / len(late) >= 3.0
    await backend.aclose()


async def test_closing_the_backend_ends_its_streams_and_refuses_new_ones(
    model_and_expected: tuple[Any, list[list[int]]], tiny_tok: Any
) -> None:
    model, _ = model_and_expected
    backend = LocalBackend(model, None, tokenizer=tiny_tok)
    stream = dg_stream.generate(PROMPTS[1], backend=backend, max_new_tokens=500)
    with pytest.raises(GenerationError, match="closed"):
        async with stream:
            async for _ in stream:
                await backend.aclose()
    assert not backend.model_thread.alive
    with pytest.raises(GenerationError, match="closed"):
        await dg_stream.generate(PROMPTS[1], backend=backend, max_new_tokens=5).collect()


async def test_a_failing_row_ends_alone(
    model_and_expected: tuple[Any, list[list[int]]], tiny_tok: Any
) -> None:
    model, expected = model_and_expected

    class FailsOnOnePrompt(NoisyOracleDrafter):
        def propose(self, request: DraftRequest) -> DraftProposal:
            context = request.context
            if context[:2].tolist() == PROMPTS[2][:2] and context.shape[0] > len(PROMPTS[2]):
                raise RuntimeError("this row's drafter broke")
            return super().propose(request)

    drafter = FailsOnOnePrompt([p + e for p, e in zip(PROMPTS, expected, strict=True)], 300)
    backend = LocalBackend(model, drafter, tokenizer=tiny_tok, block_size=3)
    outcome: dict[int, Any] = {}

    async def one(i: int) -> None:
        try:
            outcome[i] = (await collect(backend, PROMPTS[i], 24))[0]
        except GenerationError as exc:
            outcome[i] = exc

    async with anyio.create_task_group() as tg:
        for i in range(len(PROMPTS)):
            tg.start_soon(one, i)
    assert isinstance(outcome[2], GenerationError) and "broke" in str(outcome[2])
    assert [outcome[i] for i in (0, 1, 3)] == [expected[i] for i in (0, 1, 3)]
    await backend.aclose()
