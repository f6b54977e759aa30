"""Greedy hybrid decoding is token-for-token the verifier's own greedy decoding."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _drafters import OracleDrafter, concurrent_ids, count_batches
from _models import ARCHITECTURES, tiny_causal_lm, tiny_masked_lm

from dg_stream import GenerationRequest, LocalBackend, SpeculativeConfig
from dg_stream._drafters import CausalDrafter


def reference(model: Any, prompt: list[int], max_new_tokens: int) -> list[int]:
    out = model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=max_new_tokens,
        do_sample=False,
    )
    return out[0, len(prompt) :].tolist()


def hybrid(
    backend: LocalBackend, prompt: list[int], max_new_tokens: int, block_size: int, steps: int = 1
) -> tuple[list[int], Any]:
    request = GenerationRequest(
        prompt=prompt,
        max_new_tokens=max_new_tokens,
        speculative=SpeculativeConfig(block_size=block_size, steps=steps),
    )
    session = backend.engine.session(request)
    ids: list[int] = []
    while (chunk := session.step()) is not None:
        ids.extend(chunk.token_ids)
    return ids, session.stats


PROMPTS = {"one": [5], "short": [11, 42, 7, 99, 3, 18, 77], "long": list(range(3, 120, 3))}


@pytest.fixture(scope="module")
def models(tiny_tok: Any) -> dict[str, Any]:
    return {arch: tiny_causal_lm(arch, len(tiny_tok)) for arch in ARCHITECTURES}


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("prompt_name", list(PROMPTS))
def test_diffusion_drafter_matches_plain_greedy(
    arch: str, prompt_name: str, models: dict[str, Any], tiny_tok: Any
) -> None:
    model, prompt = models[arch], PROMPTS[prompt_name]
    expected = reference(model, prompt, 30)
    drafter = tiny_masked_lm(len(tiny_tok), tiny_tok.mask_token_id)
    backend = LocalBackend(model, drafter, tokenizer=tiny_tok)
    for block_size, steps in [(1, 1), (3, 1), (8, 1), (8, 3), (5, 5)]:
        got, stats = hybrid(backend, prompt, 30, block_size, steps)
        assert got == expected, (arch, block_size, steps)
        assert stats.committed_tokens == len(expected)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_lookup_and_causal_drafters_match_plain_greedy(
    arch: str, models: dict[str, Any], tiny_tok: Any
) -> None:
    model = models[arch]
    prompt = PROMPTS["long"]
    expected = reference(model, prompt, 40)
    for drafter in ["ngram", CausalDrafter(tiny_causal_lm("llama", len(tiny_tok), seed=7))]:
        backend = LocalBackend(model, drafter, tokenizer=tiny_tok)
        for block_size in (2, 6):
            assert hybrid(backend, prompt, 40, block_size)[0] == expected


@pytest.mark.parametrize("arch", ["llama", "gpt2", "mistral"])
def test_oracle_drafter_accepts_everything(
    arch: str, models: dict[str, Any], tiny_tok: Any
) -> None:
    """The other edge of the rollback: all drafts kept, only the bonus token is new."""
    model, prompt = models[arch], PROMPTS["short"]
    expected = reference(model, prompt, 48)
    for block_size in (4, 7):
        backend = LocalBackend(model, OracleDrafter(prompt, expected), tokenizer=tiny_tok)
        got, stats = hybrid(backend, prompt, 48, block_size)
        assert got == expected
        assert stats.accepted_tokens == stats.drafted_tokens  # nothing rejected
        assert stats.verifier_calls == -(-len(expected) // (block_size + 1))


def test_random_drafter_rejects_almost_everything_yet_matches(
    models: dict[str, Any], tiny_tok: Any
) -> None:
    model, prompt = models["qwen2"], PROMPTS["short"]
    expected = reference(model, prompt, 32)
    backend = LocalBackend(
        model, tiny_masked_lm(len(tiny_tok), tiny_tok.mask_token_id, seed=3), tokenizer=tiny_tok
    )
    got, stats = hybrid(backend, prompt, 32, block_size=8)
    assert got == expected
    assert stats.acceptance_rate < 0.2


@pytest.mark.parametrize("arch", ["llama", "gpt_neox", "phi"])
@pytest.mark.parametrize("eos_at", [0, 3, 9])
def test_eos_inside_a_block(arch: str, eos_at: int, tiny_tok: Any) -> None:
    """Make the token the verifier writes at position ``eos_at`` its end-of-sequence."""
    model = tiny_causal_lm(arch, len(tiny_tok))
    prompt = PROMPTS["short"]
    free_run = reference(model, prompt, 20)
    eos = free_run[eos_at]
    model.generation_config.eos_token_id = eos
    expected = reference(model, prompt, 20)
    assert expected[-1] == eos and len(expected) <= eos_at + 1
    oracle = OracleDrafter(prompt, free_run)  # drafts straight through the end of sequence
    for drafter in [oracle, tiny_masked_lm(len(tiny_tok), tiny_tok.mask_token_id)]:
        backend = LocalBackend(model, drafter, tokenizer=tiny_tok)
        request = GenerationRequest(
            prompt=prompt, max_new_tokens=20, speculative=SpeculativeConfig(block_size=8)
        )
        session = backend.engine.session(request)
        chunks = []
        while (chunk := session.step()) is not None:
            chunks.append(chunk)
        assert [t for c in chunks for t in c.token_ids] == expected
        assert chunks[-1].finish_reason == "stop"
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == len(expected)


@pytest.mark.parametrize("max_new_tokens", [1, 2, 5, 9, 13])
def test_max_new_tokens_inside_a_block(
    max_new_tokens: int, models: dict[str, Any], tiny_tok: Any
) -> None:
    model, prompt = models["llama"], PROMPTS["short"]
    full = reference(model, prompt, 20)
    backend = LocalBackend(model, OracleDrafter(prompt, full), tokenizer=tiny_tok)
    request = GenerationRequest(
        prompt=prompt, max_new_tokens=max_new_tokens, speculative=SpeculativeConfig(block_size=8)
    )
    session = backend.engine.session(request)
    chunks = []
    while (chunk := session.step()) is not None:
        chunks.append(chunk)
    assert [t for c in chunks for t in c.token_ids] == full[:max_new_tokens]
    assert chunks[-1].finish_reason == "length"


def test_adaptive_block_size_is_lossless(models: dict[str, Any], tiny_tok: Any) -> None:
    model, prompt = models["llama"], PROMPTS["long"]
    expected = reference(model, prompt, 40)
    backend = LocalBackend(model, "ngram", tokenizer=tiny_tok, adaptive=True, block_size=2)
    assert hybrid(backend, prompt, 40, 2)[0] == expected


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_causal_drafter_drafts_its_rows_together_as_each_alone(arch: str, tiny_tok: Any) -> None:
    """Sessions of one causal drafter share a batched cache: contexts of different lengths,
    ragged commits over rounds, greedy and sampled rows, a session leaving mid-way (its row
    taken by another): each row drafts what a drafter of its own drafts (tokens and q)."""
    from dg_stream import SamplingParams
    from dg_stream._drafters.base import DraftRequest

    model = tiny_causal_lm(arch, len(tiny_tok), seed=7)
    shared, solo = CausalDrafter(model), CausalDrafter(model)
    assert shared.traits.batched
    generator = torch.Generator().manual_seed(0)
    contexts = [torch.randint(5, 200, (n,), generator=generator) for n in (1, 7, 23, 12)]
    together = [shared.session() for _ in contexts]
    alone = [solo.session() for _ in contexts]
    sampled = SamplingParams(temperature=0.9, top_k=20)
    for round_ in range(4):
        live = [i for i in range(len(contexts)) if together[i] is not None]
        requests = [
            DraftRequest(
                contexts[i],
                2 + i,
                sampled if i % 2 else SamplingParams(),
                torch.Generator().manual_seed(10 * round_ + i),
            )
            for i in live
        ]
        got = shared.propose_batch([together[i] for i in live], requests)
        for i, request, proposal in zip(live, requests, got, strict=True):
            seed = int(request.generator.initial_seed())
            one = alone[i].propose(request._replace(generator=torch.Generator().manual_seed(seed)))
            assert proposal.tokens.tolist() == one.tokens.tolist(), (round_, i)
            assert (proposal.q is None) == (one.q is None)
            if one.q is not None:
                torch.testing.assert_close(proposal.q, one.q, atol=1e-5, rtol=1e-4)
        if round_ == 1:  # the first row leaves: the last one moves into its place
            together[0].close()
            together[0] = None
        contexts = [
            torch.cat([c, torch.randint(5, 200, (1 + (i + round_) % 3,), generator=generator)])
            for i, c in enumerate(contexts)
        ]
    assert shared._pool is not None and shared._pool.rows == 3
    for session in together[1:]:
        session.close()
    assert shared._pool.rows == 0


def test_concurrent_streams_with_a_causal_drafter_write_the_verifiers_tokens(
    tiny_tok: Any,
) -> None:
    verifier = tiny_causal_lm("llama", len(tiny_tok))
    drafter = CausalDrafter(tiny_causal_lm("llama", len(tiny_tok), seed=7))
    calls = count_batches(drafter)
    backend = LocalBackend(verifier, drafter, tokenizer=tiny_tok, block_size=3, adaptive=False)
    prompts = list(PROMPTS.values())
    expected = [reference(verifier, p, 20) for p in prompts]
    assert concurrent_ids(backend, prompts, 20) == expected
    assert max(calls) == len(prompts)  # the rows drafted together
    assert drafter._pool is not None and drafter._pool.rows == 0  # every row freed
