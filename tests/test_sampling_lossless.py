"""Hybrid sampling follows the verifier's own distribution (chi-square on a tiny vocabulary)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch
from _drafters import MislabelledDrafter
from _models import tiny_causal_lm, tiny_dflash, tiny_feature_drafter, tiny_masked_lm
from scipy.stats import chisquare

from dg_stream import GenerationRequest, LocalBackend, SamplingParams, SpeculativeConfig
from dg_stream._drafters import CausalDrafter
from dg_stream._sampling import process_logits

V = 12
PROMPT = [3, 7, 3, 7, 3]
RUNS = 800
NEW = 3


@pytest.fixture(scope="module")
def verifier() -> Any:
    model = tiny_causal_lm("llama", V, seed=4, eos_token_id=V + 100)  # no end-of-sequence
    with torch.no_grad():  # soften: a spread-out distribution makes the test sensitive
        model.get_output_embeddings().weight.mul_(0.3)
    return model


def exact_marginals(model: Any, params: SamplingParams) -> list[torch.Tensor]:
    """P(t_i) for i = 1..NEW by enumerating prefixes (V^(NEW-1) rows at most)."""
    prefixes = torch.tensor([PROMPT])
    weights = torch.ones(1)
    marginals = []
    for _ in range(NEW):
        with torch.no_grad():
            logits = model(input_ids=prefixes).logits[:, -1].float()  # (N, V)
        probs = process_logits(logits, params).softmax(-1)
        joint = weights[:, None] * probs  # (N, V)
        marginals.append(joint.sum(0))
        prefixes = torch.cat(
            [prefixes.repeat_interleave(V, 0), torch.arange(V).repeat(prefixes.shape[0])[:, None]],
            dim=1,
        )
        weights = joint.flatten()
    return marginals


def sample_runs(
    backend: LocalBackend,
    params: SamplingParams,
    block_size: int,
    steps: int = 1,
    adaptive: bool = False,
) -> list[list[int]]:
    runs = []
    for seed in range(RUNS):
        request = GenerationRequest(
            prompt=PROMPT,
            max_new_tokens=NEW,
            sampling=SamplingParams(
                temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, seed=seed
            ),
            speculative=SpeculativeConfig(block_size=block_size, steps=steps, adaptive=adaptive),
        )
        session = backend.engine.session(request)
        ids: list[int] = []
        while (chunk := session.step()) is not None:
            ids.extend(chunk.token_ids)
        runs.append(ids)
    return runs


def p_values(runs: list[list[int]], marginals: list[torch.Tensor]) -> list[float]:
    """Chi-square p-value per position, pooling cells expected below 5 counts."""
    out = []
    for i, marginal in enumerate(marginals):
        counts = Counter(run[i] for run in runs)
        expected = (marginal * len(runs)).tolist()
        observed = [counts.get(t, 0) for t in range(V)]
        impossible = [t for t in range(V) if expected[t] == 0]
        assert all(observed[t] == 0 for t in impossible), "sampled a token filtered out of p"
        big = [t for t in range(V) if expected[t] >= 5]
        small = [t for t in range(V) if 0 < expected[t] < 5]
        obs = [observed[t] for t in big] + ([sum(observed[t] for t in small)] if small else [])
        exp = [expected[t] for t in big] + ([sum(expected[t] for t in small)] if small else [])
        scale = sum(obs) / sum(exp)
        out.append(float(chisquare(obs, [e * scale for e in exp]).pvalue))
    return out


def peaked_dflash(verifier: Any) -> Any:
    """A random DFlash drafter whose q is far from the verifier's p (an output multiplier
    sharpens it), so that acceptance and rejection both happen often."""
    import dataclasses

    model = tiny_dflash(verifier, V - 1, scale=3.0)
    model.spec = dataclasses.replace(model.spec, output_multiplier=6.0)
    return model


CASES = {  # sampling options, drafter, denoising steps, adaptive block size
    "diffusion-one-step-q": (dict(temperature=1.0), "diffusion", 1, False),
    "diffusion-multi-step-point-mass": (dict(temperature=0.8, top_k=6), "diffusion", 2, False),
    "ngram-point-mass": (dict(temperature=1.0, top_p=0.85), "ngram", 1, False),
    "causal-q": (dict(temperature=0.7), "causal", 1, False),
    # Drafts that read the verifier's hidden states: q is still exact in one step.
    "feature-conditioned-q": (dict(temperature=1.0, top_k=8), "features", 1, False),
    # A DFlash drafter: one forward, every slot drawn given the context alone.
    "dflash-q": (dict(temperature=0.8, top_p=0.95), "dflash", 1, False),
    # Block sizes chosen from past acceptance and timings, 0 included: still exact.
    "diffusion-adaptive": (dict(temperature=0.9), "diffusion", 1, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hybrid_sampling_matches_verifier_distribution(case: str, verifier: Any) -> None:
    options, kind, steps, adaptive = CASES[case]
    params = SamplingParams(**options)  # type: ignore[arg-type]
    drafter: Any = {
        "diffusion": lambda: tiny_masked_lm(V, mask_token_id=V - 1, seed=2),
        "ngram": lambda: "ngram",
        "causal": lambda: CausalDrafter(tiny_causal_lm("gpt2", V, seed=9)),
        "features": lambda: tiny_feature_drafter(V, V - 1, verifier),
        "dflash": lambda: peaked_dflash(verifier),
    }[kind]()
    backend = LocalBackend(verifier, drafter)
    runs = sample_runs(backend, params, block_size=2, steps=steps, adaptive=adaptive)
    assert all(len(r) == NEW for r in runs)
    pvals = p_values(runs, exact_marginals(verifier, params))
    assert min(pvals) > 1e-3, pvals


def test_a_wrong_q_is_detected(verifier: Any) -> None:
    """The same test fails when the drafter lies about q: the test has teeth."""
    params = SamplingParams(temperature=1.0)
    backend = LocalBackend(verifier, MislabelledDrafter(V))
    runs = sample_runs(backend, params, block_size=2)
    assert min(p_values(runs, exact_marginals(verifier, params))) < 1e-6


def test_a_q_the_drafter_does_not_vouch_for_is_ignored(verifier: Any) -> None:
    """The same lying drafter declaring ``exact_q=False``: its q is dropped and its drafts
    judged as point masses, so the output follows the verifier again."""
    from dataclasses import replace

    params = SamplingParams(temperature=1.0)
    drafter = MislabelledDrafter(V)
    drafter.traits = replace(drafter.traits, exact_q=False)
    runs = sample_runs(LocalBackend(verifier, drafter), params, block_size=2)
    assert min(p_values(runs, exact_marginals(verifier, params))) > 1e-3


def test_a_wrong_dflash_q_is_detected(verifier: Any) -> None:
    """A DFlash session that reports a uniform q for the tokens it really drew is caught."""
    from dg_stream._drafters import DFlashDrafter, DraftProposal

    drafter = DFlashDrafter(peaked_dflash(verifier), verifier)

    class Misreported:
        def __init__(self) -> None:
            self.inner = drafter.session()

        def propose(self, request: Any) -> DraftProposal:
            tokens, q = self.inner.propose(request)
            assert q is not None
            return DraftProposal(tokens, torch.full_like(q, 1.0 / q.shape[-1]))

        def close(self) -> None:
            self.inner.close()

    class Lying:
        def __getattr__(self, name: str) -> Any:
            return getattr(drafter, name)

        def session(self) -> Misreported:
            return Misreported()

    params = SamplingParams(temperature=1.0)
    runs = sample_runs(LocalBackend(verifier, Lying()), params, block_size=2)
    assert min(p_values(runs, exact_marginals(verifier, params))) < 1e-6


def test_same_seed_same_output(tiny_backend: Any) -> None:
    def once(seed: int) -> list[int]:
        request = GenerationRequest(
            prompt="def add(a, b):",
            max_new_tokens=24,
            sampling=SamplingParams(temperature=1.0, top_p=0.9, seed=seed),
        )
        session = tiny_backend.engine.session(request)
        ids: list[int] = []
        while (chunk := session.step()) is not None:
            ids.extend(chunk.token_ids)
        return ids

    assert once(1) == once(1)
    assert once(1) != once(2)
