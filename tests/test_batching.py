"""Batched decoding: concurrent generations share verifier calls and each writes exactly
what it writes alone."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

import anyio
import pytest
import torch
from _drafters import CountingDrafter, NoisyOracleDrafter
from _models import tiny_causal_lm, tiny_feature_drafter, tiny_masked_lm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

import dg_stream
from dg_stream import (
    GenerationRequest,
    InvalidRequestError,
    LocalBackend,
    OverloadedError,
    SamplingParams,
    SpeculativeConfig,
)
from dg_stream._batch_cache import BatchCache, attention_masks
from dg_stream._sampling import process_logits

pytestmark = pytest.mark.anyio

ARCHS = ["llama", "qwen2", "gpt2", "mistral", "phi"]
# Mixed lengths; the long one passes the Mistral model's sliding window (24).
PROMPTS = [[5], [11, 42, 7, 99, 3, 18, 77], list(range(3, 120, 3)), [8, 9, 8, 9, 8, 9, 8, 9]]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def reference(model: Any, prompt: list[int], new: int) -> list[int]:
    out = model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=new,
        do_sample=False,
    )
    return out[0, len(prompt) :].tolist()


async def collect(backend: LocalBackend, prompt: list[int], new: int, **options: Any) -> Any:
    """(token ids, chunks) of one stream."""
    ids: list[int] = []
    chunks = []
    async with dg_stream.generate(prompt, backend=backend, max_new_tokens=new, **options) as s:
        async for chunk in s:
            ids.extend(chunk.token_ids)
            chunks.append(chunk)
    return ids, chunks


def drain(batch: Any, sessions: list[Any]) -> None:
    """Run rounds until every session in ``batch`` has finished: what the scheduler does,
    without the event loop."""
    owners = {session.state: session for session in sessions}
    while len(batch):
        for state, outcome in zip(list(batch.states), batch.run(), strict=True):
            if outcome is not None:
                owners[state].emit(outcome)
        for state in [s for s in batch.states if s.finished]:
            batch.remove(state)


async def together(backend: LocalBackend, jobs: list[tuple[list[int], int, dict[str, Any]]]) -> Any:
    results: dict[int, Any] = {}

    async def one(i: int) -> None:
        prompt, new, options = jobs[i]
        results[i] = await collect(backend, prompt, new, **options)

    with anyio.fail_after(120):
        async with anyio.create_task_group() as tg:
            for i in range(len(jobs)):
                tg.start_soon(one, i)
    return [results[i] for i in range(len(jobs))]


# -- the cache on its own ------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2_sliding"])
@settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_rows_score_as_they_do_alone(arch: str, data: st.DataObject) -> None:
    """Random joins, leaves, ragged feeds and rollbacks: every row's logits equal a plain
    forward over that row's kept tokens alone."""
    model = _cache_models(arch)
    cache = BatchCache(model.config)
    rows: list[list[int]] = []  # each row's cached ids
    for _ in range(data.draw(st.integers(2, 6), label="rounds")):
        if not rows or data.draw(st.booleans(), label="join"):
            cache.add_row()
            rows.append([])
        if len(rows) > 1 and data.draw(st.booleans(), label="leave"):
            gone = data.draw(st.integers(0, len(rows) - 1), label="which")
            moved = cache.remove_row(gone)
            last = rows.pop()
            if moved is not None:
                rows[gone] = last
        width = data.draw(st.integers(1, 9), label="width")
        fed = torch.randint(0, 50, (len(rows), width))
        positions = cache.prepare(0, len(rows), width, torch.device("cpu"))
        masks = attention_masks(
            model.config, positions, cache.span, torch.float32, torch.device("cpu")
        )
        with torch.inference_mode():  # as the verifier runs it
            logits = model(
                input_ids=fed,
                attention_mask=masks,
                position_ids=positions,
                cache=cache,
                use_cache=True,
            ).logits
        for r, ids in enumerate(rows):
            keep = data.draw(st.integers(1, width), label="keep")  # ragged: real tokens fed
            with torch.inference_mode():
                alone = model(input_ids=torch.tensor([ids + fed[r, :keep].tolist()])).logits[0]
            torch.testing.assert_close(logits[r, :keep], alone[len(ids) :], atol=1e-4, rtol=1e-4)
            kept = data.draw(st.integers(0, keep), label="kept")  # roll back to what is kept
            ids.extend(fed[r, :kept].tolist())
            cache.lengths[r] = len(ids)
    while rows:
        cache.remove_row(0)
        rows.pop()
    assert all(layer.keys is None for layer in cache.layers)  # freed with the last row


_CACHE_MODELS: dict[str, Any] = {}


def _cache_models(arch: str) -> Any:
    if arch not in _CACHE_MODELS:
        if arch == "qwen2_sliding":  # one full and one sliding layer: a mask per type
            from transformers import Qwen2Config, Qwen2ForCausalLM

            torch.manual_seed(0)
            config = Qwen2Config(
                vocab_size=50,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                use_sliding_window=True,
                sliding_window=5,
                max_window_layers=1,
                attn_implementation="sdpa",
            )
            model = Qwen2ForCausalLM(config).eval()
        else:
            model = tiny_causal_lm(arch, 50, seed=3)
            if arch == "mistral":
                model.config.sliding_window = 5  # short, so the window matters here
        _CACHE_MODELS[arch] = model
    return _CACHE_MODELS[arch]


# -- greedy: batched streams write what they write alone -----------------------------------


@pytest.fixture(scope="module")
def greedy_setups(tiny_tok: Any) -> dict[str, Any]:
    setups = {}
    for arch in ARCHS:
        model = tiny_causal_lm(arch, len(tiny_tok), seed=1)
        expected = [reference(model, p, 24) for p in PROMPTS]
        setups[arch] = (model, expected)
    return setups


@pytest.mark.parametrize("arch", ARCHS)
async def test_batched_greedy_equals_plain_decoding(
    arch: str, greedy_setups: dict[str, Any], tiny_tok: Any
) -> None:
    model, expected = greedy_setups[arch]
    drafter = NoisyOracleDrafter(
        [p + e for p, e in zip(PROMPTS, expected, strict=False)], len(tiny_tok)
    )
    backend = LocalBackend(model, drafter, tokenizer=tiny_tok, prefill_chunk=16)
    # Different prompt lengths, block sizes and lengths: rows finish at different rounds.
    jobs = [
        (prompt, 24 - 5 * (i % 3), {"block_size": 1 + 3 * i})
        for i, prompt in enumerate(PROMPTS * 2)
    ]
    results = await together(backend, jobs)
    for (prompt, new, _), (ids, _chunks) in zip(jobs, results, strict=False):
        assert ids == expected[PROMPTS.index(prompt)][:new], (arch, prompt[:3], new)
    rows = [chunk.step.rows for _, chunks in results for chunk in chunks]
    assert max(rows) >= 4  # they did share rounds
    accepted = {chunk.step.accepted for _, chunks in results for chunk in chunks}
    assert len(accepted) >= 3  # and rows kept different numbers of drafts


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
async def test_batched_plain_decoding(
    arch: str, greedy_setups: dict[str, Any], tiny_tok: Any
) -> None:
    model, expected = greedy_setups[arch]
    backend = LocalBackend(model, None, tokenizer=tiny_tok)
    results = await together(backend, [(p, 24, {}) for p in PROMPTS])
    assert [ids for ids, _ in results] == expected
    assert max(c.step.rows for _, chunks in results for c in chunks) == len(PROMPTS)


async def test_streams_join_and_leave_mid_generation(
    greedy_setups: dict[str, Any], tiny_tok: Any
) -> None:
    model, expected = greedy_setups["mistral"]
    drafter = NoisyOracleDrafter(
        [p + e for p, e in zip(PROMPTS, expected, strict=False)], len(tiny_tok)
    )
    backend = LocalBackend(model, drafter, tokenizer=tiny_tok, block_size=3)
    scheduler_rows: list[int] = []
    results: dict[str, list[int]] = {}
    second_wave = anyio.Event()

    async def first(name: str, prompt: list[int]) -> None:
        ids: list[int] = []
        async with dg_stream.generate(prompt, backend=backend, max_new_tokens=24) as s:
            async for chunk in s:
                ids.extend(chunk.token_ids)
                scheduler_rows.append(chunk.step.rows)
                if len(ids) >= 6:
                    second_wave.set()
        results[name] = ids

    async def leaver(prompt: list[int]) -> None:
        await second_wave.wait()
        ids: list[int] = []
        async with dg_stream.generate(prompt, backend=backend, max_new_tokens=24) as s:
            async for chunk in s:
                ids.extend(chunk.token_ids)
                if len(ids) >= 3:
                    break  # leaves while the others run
        results["leaver"] = ids

    async def joiner(prompt: list[int]) -> None:
        await second_wave.wait()
        results["joiner"] = (await collect(backend, prompt, 24))[0]

    with anyio.fail_after(120):
        async with anyio.create_task_group() as tg:
            tg.start_soon(first, "a", PROMPTS[1])
            tg.start_soon(first, "b", PROMPTS[3])
            tg.start_soon(leaver, PROMPTS[2])
            tg.start_soon(joiner, PROMPTS[0])
    assert results["a"] == expected[1] and results["b"] == expected[3]
    assert results["joiner"] == expected[0]
    assert results["leaver"] == expected[2][: len(results["leaver"])]
    assert 2 in scheduler_rows and max(scheduler_rows) >= 3
    assert backend.model_thread.sync(10)
    batch = backend.model_thread.batch
    assert batch is not None and len(batch) == 0 and backend.model_thread.counts == (0, 0, 0)
    assert all(layer.keys is None for layer in batch.cache.layers)  # memory freed


async def test_a_cancelled_stream_stops_within_a_round(
    greedy_setups: dict[str, Any], tiny_tok: Any
) -> None:
    model, expected = greedy_setups["llama"]
    inner = NoisyOracleDrafter(
        [p + e for p, e in zip(PROMPTS, expected, strict=False)], len(tiny_tok)
    )
    drafter = CountingDrafter(inner)
    backend = LocalBackend(model, drafter, tokenizer=tiny_tok, block_size=2)
    got: dict[str, list[int]] = {}
    victim_rounds: list[int] = []

    async def victim(scope: anyio.CancelScope) -> None:
        with scope:
            async with dg_stream.generate(PROMPTS[2], backend=backend, max_new_tokens=60) as s:
                async for _chunk in s:
                    victim_rounds.append(drafter.calls)
                    if len(victim_rounds) == 3:
                        scope.cancel()  # cancelled while its next round may be running
                        await anyio.sleep(0)

    async def survivor() -> None:
        got["ids"] = (await collect(backend, PROMPTS[1], 24))[0]

    scope = anyio.CancelScope()
    with anyio.fail_after(120):
        async with anyio.create_task_group() as tg:
            tg.start_soon(victim, scope)
            tg.start_soon(survivor)
    assert got["ids"] == expected[1]
    assert backend.model_thread.sync(10)
    batch = backend.model_thread.batch
    assert batch is not None and len(batch) == 0
    before = drafter.calls
    await anyio.sleep(0.05)
    assert drafter.calls == before  # nothing runs for anyone any more


async def test_end_of_sequence_and_stop_strings_at_different_rounds(tiny_tok: Any) -> None:
    free = tiny_causal_lm("qwen2", len(tiny_tok), seed=5)
    continuations = [reference(free, p, 30) for p in PROMPTS]
    eos = continuations[1][6]  # one row's 7th token ends its sequence
    model = tiny_causal_lm("qwen2", len(tiny_tok), seed=5, eos_token_id=eos)
    expected = [reference(model, p, 30) for p in PROMPTS]
    assert expected[1][-1] == eos and len(expected[1]) == 7
    text3 = tiny_tok.decode([t for t in expected[3] if t != eos])
    stop = text3[len(text3) // 2 : len(text3) // 2 + 3]
    drafter = NoisyOracleDrafter(
        [p + e for p, e in zip(PROMPTS, expected, strict=False)], len(tiny_tok)
    )
    backend = LocalBackend(model, drafter, tokenizer=tiny_tok, block_size=4)
    jobs = [(p, 30, {"stop": stop} if i == 3 else {}) for i, p in enumerate(PROMPTS)]
    results = await together(backend, jobs)
    for i in (0, 1, 2):
        assert results[i][0] == expected[i]
    assert results[1][1][-1].finish_reason == "stop"
    last = results[3][1][-1]
    assert last.finish_reason == "stop"
    text = "".join(c.text for c in results[3][1])
    assert text == text3[: text3.index(stop)]
    finished = [len(chunks) for _, chunks in results]
    assert len(set(finished)) > 1  # they ended at different rounds


async def test_a_long_prompt_is_read_in_pieces_while_others_stream(
    greedy_setups: dict[str, Any], tiny_tok: Any
) -> None:
    model, expected = greedy_setups["llama"]
    backend = LocalBackend(model, None, tokenizer=tiny_tok, prefill_chunk=4)
    long_prompt = PROMPTS[2]  # 40 tokens: ten pieces
    runner_chunks: list[int] = []
    long_started = anyio.Event()
    long_first: list[int] = []

    async def runner() -> None:
        async with dg_stream.generate(PROMPTS[1], backend=backend, max_new_tokens=24) as s:
            async for _chunk in s:
                runner_chunks.append(len(long_first))
                if len(runner_chunks) == 2:
                    long_started.set()
        assert True

    async def long() -> None:
        await long_started.wait()
        ids, _ = await collect(backend, long_prompt, 24)
        long_first.append(1)
        assert ids == expected[2]

    with anyio.fail_after(120):
        async with anyio.create_task_group() as tg:
            tg.start_soon(runner)
            tg.start_soon(long)
    # While the long prompt was being read (ten rounds), the runner kept getting chunks.
    assert runner_chunks.count(0) >= 2 + 9


# -- limits ---------------------------------------------------------------------------------


async def test_rows_per_round_and_tokens_are_bounded(
    greedy_setups: dict[str, Any], tiny_tok: Any
) -> None:
    model, expected = greedy_setups["llama"]
    backend = LocalBackend(model, None, tokenizer=tiny_tok, max_batch=2)
    results = await together(backend, [(p, 24, {}) for p in PROMPTS])
    assert [ids for ids, _ in results] == expected
    assert max(c.step.rows for _, chunks in results for c in chunks) == 2

    capped = LocalBackend(model, None, tokenizer=tiny_tok, max_cached_tokens=60)
    with pytest.raises(InvalidRequestError, match="context of 60 tokens"):
        await collect(capped, PROMPTS[2], 24)  # 40 + 24 tokens can never fit
    assert capped.context_length == 60  # what generate() checks against
    results = await together(capped, [(p, 24, {}) for p in PROMPTS[:2] + PROMPTS[3:]])
    assert [ids for ids, _ in results] == [expected[0], expected[1], expected[3]]
    # The cache holds rows x the longest row: 2 x 31 positions pass 60, so they take turns.
    assert max(c.step.rows for _, chunks in results for c in chunks) == 1
    assert capped.model_thread.batch.cache.peak_positions <= 60
    roomier = LocalBackend(model, None, tokenizer=tiny_tok, max_cached_tokens=64)
    results = await together(roomier, [(p, 24, {}) for p in PROMPTS[:2] + PROMPTS[3:]])
    assert [ids for ids, _ in results] == [expected[0], expected[1], expected[3]]
    # 2 x 31 fit in 64, a third (3 x 32) waits for a row to leave.
    assert max(c.step.rows for _, chunks in results for c in chunks) == 2
    assert roomier.model_thread.batch.cache.peak_positions <= 64


async def test_a_full_queue_refuses_requests(greedy_setups: dict[str, Any], tiny_tok: Any) -> None:
    model, _ = greedy_setups["llama"]
    backend = LocalBackend(model, None, tokenizer=tiny_tok, max_batch=1 + 1, max_waiting=1)
    outcomes: Counter[str] = Counter()

    async def one(i: int) -> None:
        try:
            await collect(backend, PROMPTS[i % 4], 16)
            outcomes["done"] += 1
        except OverloadedError as exc:
            assert exc.status_code == 503
            outcomes["refused"] += 1

    with anyio.fail_after(120):
        async with anyio.create_task_group() as tg:
            for i in range(6):
                tg.start_soon(one, i)
    assert outcomes["refused"] >= 1 and outcomes["done"] >= 3


def test_limits_are_validated(tiny_verifier: Any, tiny_tok: Any) -> None:
    for bad in (
        {"max_batch": 0},
        {"max_cached_tokens": -5},
        {"prefill_chunk": 0},
        {"max_waiting": 1.5},
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            LocalBackend(tiny_verifier, None, tokenizer=tiny_tok, **bad)


async def test_turn_taking_without_batching(greedy_setups: dict[str, Any], tiny_tok: Any) -> None:
    model, expected = greedy_setups["gpt2"]
    drafter = NoisyOracleDrafter(
        [p + e for p, e in zip(PROMPTS, expected, strict=False)], len(tiny_tok)
    )
    backend = LocalBackend(model, drafter, tokenizer=tiny_tok, max_batch=1)
    results = await together(backend, [(p, 24, {}) for p in PROMPTS])
    assert [ids for ids, _ in results] == expected
    assert {c.step.rows for _, chunks in results for c in chunks} == {1}


async def test_no_thread_outlives_the_streams(greedy_setups: dict[str, Any], tiny_tok: Any) -> None:
    model, _expected = greedy_setups["llama"]
    backend = LocalBackend(model, None, tokenizer=tiny_tok)
    before = threading.active_count()
    await together(backend, [(p, 8, {}) for p in PROMPTS * 4])
    # anyio keeps idle workers for reuse; one round at a time needs at most one of them.
    assert threading.active_count() <= before + 1


# -- sampling -------------------------------------------------------------------------------

V = 12
RUNS = 480


@pytest.fixture(scope="module")
def soft_verifier() -> Any:
    model = tiny_causal_lm("llama", V, seed=4, eos_token_id=V + 100)  # no end-of-sequence
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(0.3)
    return model


def next_probs(model: Any, contexts: list[list[int]], params: SamplingParams) -> torch.Tensor:
    """(N, V) sampling distributions after each context, repetition penalty included."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(contexts)).logits[:, -1].float()
    penalty = params.repetition_penalty
    if penalty is not None:
        for row, context in zip(logits, contexts, strict=False):
            seen = torch.tensor(sorted(set(context)))
            row[seen] = torch.where(row[seen] > 0, row[seen] / penalty, row[seen] * penalty)
    return process_logits(logits, params).softmax(-1)


def marginal_of_second(model: Any, prompt: list[int], params: SamplingParams) -> torch.Tensor:
    """P(second new token) by enumerating the first."""
    p1 = next_probs(model, [prompt], params)[0]
    second = next_probs(model, [[*prompt, t] for t in range(V)], params)
    return (p1[:, None] * second).sum(0)


# Four kinds of rows in every batch: different prompts, parameters, block sizes and steps
# (steps=1 drafts carry an exact q; steps=2 drafts are point masses).
KINDS = [
    ([3, 7, 3, 7, 3], SamplingParams(temperature=1.0), 3, 1),
    ([1, 2], SamplingParams(temperature=0.7, top_k=6), 1, 1),
    ([5, 5, 9, 2, 2, 4, 8], SamplingParams(temperature=1.3, top_p=0.9), 4, 2),
    ([6], SamplingParams(temperature=1.0, repetition_penalty=1.3), 2, 1),
]


def test_each_row_of_a_mixed_batch_follows_the_verifier(soft_verifier: Any) -> None:
    drafter = tiny_masked_lm(V, mask_token_id=V - 1, seed=2)
    backend = LocalBackend(soft_verifier, drafter, adaptive=False)
    engine = backend.engine
    counts = [Counter() for _ in KINDS]
    copies = 4
    for run in range(RUNS // copies):
        batch = engine.batch()
        sessions = []
        for copy in range(copies):
            for prompt, params, block, steps in KINDS:
                request = GenerationRequest(
                    prompt=prompt,
                    max_new_tokens=2,
                    sampling=SamplingParams(
                        temperature=params.temperature,
                        top_k=params.top_k,
                        top_p=params.top_p,
                        repetition_penalty=params.repetition_penalty,
                        seed=run * 100 + copy,
                    ),
                    speculative=SpeculativeConfig(block_size=block, steps=steps),
                )
                session = engine.session(request)
                batch.add(session.state)
                sessions.append(session)
        drain(batch, sessions)
        for i, session in enumerate(sessions):
            ids = session.state.ids.tolist()
            counts[i % len(KINDS)][ids[-1]] += 1
    for (prompt, params, _, _), seen in zip(KINDS, counts, strict=False):
        expected = marginal_of_second(soft_verifier, prompt, params)
        keep = expected > 1e-3
        observed = torch.tensor([seen[t] for t in range(V)], dtype=torch.float64)[keep]
        assert observed.sum() == RUNS
        kept = expected[keep].double()
        exp = kept / kept.sum() * RUNS
        assert chisquare(observed.numpy(), exp.numpy()).pvalue > 1e-3, (prompt, params)


async def test_a_seeded_stream_writes_the_same_alone_and_in_a_batch(
    soft_verifier: Any,
) -> None:
    drafter = tiny_masked_lm(V, mask_token_id=V - 1, seed=2)
    backend = LocalBackend(soft_verifier, drafter, block_size=3)
    options = {"temperature": 1.0, "seed": 11}
    alone, _ = await collect(backend, [3, 7, 3], 20, **options)
    jobs = [([3, 7, 3], 20, options)] + [([1 + i], 20 + i, {"temperature": 0.8}) for i in range(5)]
    results = await together(backend, jobs)
    assert results[0][0] == alone
    assert max(c.step.rows for c in results[0][1]) > 1


# -- the drafter's batched call -------------------------------------------------------------


@pytest.mark.parametrize("lean", [True, False])
@pytest.mark.parametrize("with_features", [False, True])
def test_one_drafter_call_drafts_what_each_row_drafts_alone(
    lean: bool, with_features: bool, tiny_tok: Any
) -> None:
    from dg_stream._drafters import DiffusionDrafter
    from dg_stream._drafters.base import DraftRequest

    vocab = len(tiny_tok)
    if with_features:
        verifier = tiny_causal_lm("llama", vocab)
        drafter = tiny_feature_drafter(vocab, tiny_tok.mask_token_id, verifier)
    else:
        drafter = DiffusionDrafter(
            tiny_masked_lm(vocab, tiny_tok.mask_token_id),
            mask_token_id=tiny_tok.mask_token_id,
            window=12,
        )
    if not lean:
        drafter._lean = None  # transformers' own forward, with an attention mask
    width = drafter.feature_size
    contexts = [torch.tensor(p) for p in PROMPTS]
    sampled = SamplingParams(temperature=0.9, top_k=20)
    requests = [
        DraftRequest(
            context,
            k=1 + 2 * i,
            params=sampled if i % 2 else SamplingParams(temperature=0.0),
            generator=torch.Generator().manual_seed(i),
            steps=3 if i == 3 else 1,  # a multi-step row drafts alone
            features=torch.randn(min(5, context.shape[0]), width) if width else None,
        )
        for i, context in enumerate(contexts)
    ]
    together = drafter.propose_batch([drafter] * len(requests), requests)
    assert drafter.traits.batched
    for request, got in zip(requests, together, strict=True):
        seed = int(request.generator.initial_seed())
        alone = drafter.propose(request._replace(generator=torch.Generator().manual_seed(seed)))
        assert got.tokens.tolist() == alone.tokens.tolist()
        assert (got.q is None) == (alone.q is None)
        if got.q is not None:
            torch.testing.assert_close(got.q, alone.q, atol=1e-5, rtol=1e-4)


# -- models and limits the batch must respect ------------------------------------------------


async def test_a_position_dependent_rope_verifier_decodes_one_generation_per_forward(
    tiny_tok: Any,
) -> None:
    """Longrope picks its frequencies from the largest position in a forward: batching or
    splitting a prompt would change a row's numbers, so such a verifier takes turns."""
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    config = Phi3Config(
        vocab_size=len(tiny_tok),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        original_max_position_embeddings=32,
        pad_token_id=0,
        rope_scaling={"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [4.0] * 8},
    )
    model = Phi3ForCausalLM(config).eval()
    backend = LocalBackend(model, None, tokenizer=tiny_tok, prefill_chunk=8)
    assert backend.limits.max_batch == 1
    prompts = [PROMPTS[2], PROMPTS[1]]  # past and within the original 32 positions
    expected = [reference(model, p, 12) for p in prompts]
    results = await together(backend, [(p, 12, {}) for p in prompts])
    assert [ids for ids, _ in results] == expected


def test_eager_attention_reads_the_same_masks(greedy_setups: dict[str, Any], tiny_tok: Any) -> None:
    model = tiny_causal_lm("mistral", len(tiny_tok), seed=1)
    model.set_attn_implementation("eager")
    _, expected = greedy_setups["mistral"]
    engine = LocalBackend(model, None, tokenizer=tiny_tok).engine
    batch = engine.batch()
    sessions = [engine.session(GenerationRequest(prompt=p, max_new_tokens=24)) for p in PROMPTS]
    for session in sessions:
        batch.add(session.state)
    drain(batch, sessions)
    assert [
        s.state.ids[len(p) :].tolist() for s, p in zip(sessions, PROMPTS, strict=False)
    ] == expected


async def test_a_queued_stream_that_leaves_frees_its_place(
    greedy_setups: dict[str, Any], tiny_tok: Any
) -> None:
    model, expected = greedy_setups["llama"]
    backend = LocalBackend(model, None, tokenizer=tiny_tok, max_batch=2, max_waiting=1)
    done: list[list[int]] = []

    async def runner(prompt: list[int]) -> None:
        done.append((await collect(backend, prompt, 24))[0])

    async def impatient() -> None:
        with anyio.move_on_after(0.01):  # gives up while queued, most likely mid-round
            await collect(backend, PROMPTS[3], 24)

    with anyio.fail_after(120):
        async with anyio.create_task_group() as tg:
            tg.start_soon(runner, PROMPTS[0])
            tg.start_soon(runner, PROMPTS[1])
            await anyio.sleep(0.005)
            tg.start_soon(impatient)
            await anyio.sleep(0.05)
            # Its place in the queue is free again: one more may wait without a refusal.
            tg.start_soon(runner, PROMPTS[2])
    assert sorted(map(tuple, done)) == sorted(map(tuple, expected[:3]))
    assert backend.model_thread.sync(10)
    assert backend.model_thread.counts == (0, 0, 0)


async def test_adaptive_rows_of_different_block_sizes_keep_their_own_limit(
    greedy_setups: dict[str, Any], tiny_tok: Any
) -> None:
    model, expected = greedy_setups["qwen2"]
    drafter = NoisyOracleDrafter(
        [p + e for p, e in zip(PROMPTS, expected, strict=False)], len(tiny_tok)
    )
    backend = LocalBackend(model, drafter, tokenizer=tiny_tok, adaptive=True)
    jobs = [(p, 24, {"block_size": 2 if i % 2 else 12}) for i, p in enumerate(PROMPTS)]
    results = await together(backend, jobs)
    assert [ids for ids, _ in results] == expected
    for (_, _, options), (_, chunks) in zip(jobs, results, strict=True):
        largest = min(4 * options["block_size"], 64)
        assert max(c.step.drafted for c in chunks) <= largest


def test_memory_shrinks_when_a_long_row_leaves() -> None:
    model = _cache_models("llama")
    cache = BatchCache(model.config)
    ids = [torch.randint(0, 50, (1, n)) for n in (300, 10, 12)]
    for row, prompt in enumerate(ids):
        cache.add_row()
        positions = cache.prepare(row, 1, prompt.shape[1], torch.device("cpu"))
        masks = attention_masks(
            model.config, positions, cache.span, torch.float32, torch.device("cpu")
        )
        with torch.inference_mode():
            model(input_ids=prompt, attention_mask=masks, position_ids=positions, cache=cache)
        cache.lengths[row] = prompt.shape[1]
    assert cache.capacity >= 300
    cache.remove_row(0)  # the last row moves into its place
    assert cache.capacity < 300 and cache.lengths == [12, 10]
    nxt = torch.tensor([[7], [8]])
    positions = cache.prepare(0, 2, 1, torch.device("cpu"))
    masks = attention_masks(model.config, positions, cache.span, torch.float32, torch.device("cpu"))
    with torch.inference_mode():
        got = model(input_ids=nxt, attention_mask=masks, position_ids=positions, cache=cache).logits
        for r, prompt in enumerate([ids[2], ids[1]]):
            alone = model(input_ids=torch.cat([prompt, nxt[r : r + 1]], dim=1)).logits[0, -1]
            torch.testing.assert_close(got[r, 0], alone, atol=1e-4, rtol=1e-4)


# -- memory that the bound really bounds ----------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(st.data())
def test_a_bounded_cache_never_allocates_past_its_bound(data: st.DataObject) -> None:
    """Rows admitted as the model thread admits them (rows x the longest reservation within
    the bound) join, grow to their reservation and leave in any order: the allocation never
    passes the bound and no growth is refused."""
    from dg_stream._batch_cache import BatchCache

    model = _cache_models("llama")
    bound = data.draw(st.integers(64, 512))
    cache = BatchCache(model.config, max_positions=bound)
    reserved: list[int] = []
    for _ in range(data.draw(st.integers(1, 30))):
        if reserved and data.draw(st.booleans()):
            row = data.draw(st.integers(0, len(reserved) - 1))
            cache.remove_row(row)
            reserved[row] = reserved[-1]
            reserved.pop()
            continue
        want = data.draw(st.integers(1, bound))
        if (len(reserved) + 1) * max([want, *reserved]) > bound:
            continue  # the model thread keeps it waiting
        cache.add_row()
        reserved.append(want)
        for row, limit in enumerate(reserved):  # every row grows to its reservation
            fed = limit - cache.lengths[row]
            if fed > 0:
                positions = cache.prepare(row, 1, fed, torch.device("cpu"))
                with torch.inference_mode():
                    model(
                        input_ids=torch.ones(1, fed, dtype=torch.long),
                        attention_mask=attention_masks(
                            model.config, positions, cache.span, torch.float32, positions.device
                        ),
                        position_ids=positions,
                        cache=cache,
                        use_cache=True,
                    )
                cache.lengths[row] = limit
        assert cache.row_capacity * cache.capacity <= bound
    assert cache.peak_positions <= bound


def test_a_growth_past_the_bound_is_refused_and_changes_nothing() -> None:
    from dg_stream._batch_cache import BatchCache, CacheFullError

    cache = BatchCache(_cache_models("llama").config, max_positions=100)
    cache.add_row()
    cache.add_row()
    before = (cache.row_capacity, cache.capacity, list(cache.lengths))
    with pytest.raises(CacheFullError, match="bound of 100"):
        cache.prepare(0, 2, 51, torch.device("cpu"))  # 2 rows x 51 positions
    assert (cache.row_capacity, cache.capacity, list(cache.lengths)) == before


async def test_two_hundred_generations_leave_memory_as_they_found_it(tiny_tok: Any) -> None:
    """A soak: 200 generations of mixed prompt and reply lengths through one bounded backend,
    all at once: every one finishes, the allocation stays within max_cached_tokens, and the
    cache's buffers are gone once the last one leaves."""
    model = tiny_causal_lm("llama", len(tiny_tok), seed=5)
    backend = LocalBackend(model, "ngram", tokenizer=tiny_tok, max_cached_tokens=256)
    jobs = [
        (list(range(3, 3 + 2 + (7 * i) % 40)), 1 + (11 * i) % 30, {"block_size": 1 + i % 6})
        for i in range(200)
    ]
    try:
        results = await together(backend, jobs)
        assert all(len(ids) >= 1 for ids, _ in results)
        batch = backend.model_thread.batch
        assert batch is not None and len(batch) == 0
        cache = batch.cache
        assert cache.peak_positions <= 256
        assert not cache.allocated()  # the buffers were freed with the last row
        assert backend.model_thread.counts == (0, 0, 0)
    finally:
        await backend.aclose()


# -- prompts read together -----------------------------------------------------------------


def test_prompts_that_join_together_are_read_in_shared_forwards(
    greedy_setups: dict[str, Any], tiny_tok: Any
) -> None:
    """Rows that join at once read their prompts in one forward where that is cheaper than
    forwards of their own (a long one beside short ones reads alone), and each writes what
    it writes alone."""
    model, _ = greedy_setups["llama"]
    prompts = [list(range(3, 3 + n)) for n in (30, 28, 31, 2, 90)]
    expected = [reference(model, p, 10) for p in prompts]
    engine = LocalBackend(model, None, tokenizer=tiny_tok).engine
    batch = engine.batch()
    sessions = [
        engine.session(GenerationRequest(prompt=p, max_new_tokens=10, sampling=SamplingParams()))
        for p in prompts
    ]
    for session in sessions:
        batch.add(session.state)
    shapes: list[tuple[int, ...]] = []
    hook = model.register_forward_pre_hook(
        lambda _module, _args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)),
        with_kwargs=True,
    )
    try:
        batch.run()  # the first round reads every prompt
    finally:
        hook.remove()
    # 29, 27, 30 and 1 tokens to read share a forward (33 tokens of padding cost less than
    # three more forwards); the last row's 89 would pad the others by 269: it reads alone.
    # Then the round's decoding forward.
    assert shapes == [(4, 30), (1, 89), (5, 1)]
    drain(batch, sessions)
    written = [s.state.ids[len(p) :].tolist() for s, p in zip(sessions, prompts, strict=True)]
    assert written == expected


def test_a_row_part_way_through_its_prompt_is_not_padded_past_its_reservation(
    greedy_setups: dict[str, Any], tiny_tok: Any
) -> None:
    """A long prompt read in pieces (its last piece short) and a new neighbour: read apart,
    since reading them together would pad the first past what the bounded cache holds for
    it (a CacheFullError that would end every row of the round)."""
    model, _ = greedy_setups["llama"]
    engine = LocalBackend(model, None, tokenizer=tiny_tok).engine
    prompts = [[5 + i % 40 for i in range(90)], list(range(3, 40))]
    batch = engine.batch(max_positions=2 * (90 + 4))
    sessions = [
        engine.session(GenerationRequest(prompt=p, max_new_tokens=4, sampling=SamplingParams()))
        for p in prompts
    ]
    first, second = (s.state for s in sessions)
    batch.add(first)
    batch.core._prefill(batch.cache, [first], 80)  # 80 of its 89 pending tokens
    batch.add(second)
    batch.core._prefill(batch.cache, [first, second], 128)  # 9 and 36 to read
    assert (first._cached, second._cached) == (89, 36)
    drain(batch, sessions)
    written = [s.state.ids[len(p) :].tolist() for s, p in zip(sessions, prompts, strict=True)]
    assert written == [reference(model, p, 4) for p in prompts]
