"""Feature-conditioned drafting: the drafter reads the verifier's hidden states (DFlash-style).

The engine must hand the drafter exactly the verifier's features of the committed context
(all but the newest token, whose features do not exist yet), through prefill, partial
acceptance and rollback; the output must stay the verifier's own; a drafter trained for
another verifier must be refused at load time.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from _drafters import StatelessDrafter, concurrent_ids
from _models import ARCHITECTURES, tiny_causal_lm, tiny_feature_drafter, tiny_masked_lm
from test_greedy_lossless import PROMPTS, hybrid, reference

from dg_stream import LocalBackend
from dg_stream._drafters import DiffusionDrafter, DraftProposal
from dg_stream._drafters.base import DraftRequest
from dg_stream._errors import ModelLoadError
from dg_stream._loading import FEATURE_PROJECTION_FILE, save_feature_projection
from dg_stream._verifier import verifier_features


def test_features_are_unit_rms_layers_side_by_side() -> None:
    hidden = [torch.randn(1, 5, 8) * scale for scale in (1.0, 10.0, 100.0)]
    features = verifier_features(hidden, (2, 0))
    assert features.shape == (1, 5, 16)
    rms = features.view(1, 5, 2, 8).pow(2).mean(-1).sqrt()
    assert torch.allclose(rms, torch.ones_like(rms), atol=1e-4)
    # Layer 2 first, as asked: the same direction as its hidden state.
    cosine = torch.nn.functional.cosine_similarity(features[..., :8], hidden[2], dim=-1)
    assert torch.allclose(cosine, torch.ones_like(cosine), atol=1e-5)


class RecordingFeatureDrafter(StatelessDrafter):
    """Wraps a feature-conditioned drafter; keeps every (context, features) it was handed.

    With ``truth`` (prompt + the verifier's greedy continuation) it proposes that instead, its
    last token spoiled every other call: blocks wholly and partly accepted.
    """

    def __init__(self, inner: DiffusionDrafter, truth: list[int] | None = None) -> None:
        self.inner = inner
        self.truth = truth
        self.traits = replace(inner.traits, batched=False)
        self.seen: list[tuple[torch.Tensor, torch.Tensor | None]] = []

    def propose(self, request: DraftRequest) -> DraftProposal:
        context, k, features = request.context, request.k, request.features
        self.seen.append((context.clone(), None if features is None else features.clone()))
        if self.truth is None:
            return self.inner.propose(request)
        n = context.shape[0]
        tokens = torch.tensor(self.truth[n : n + k])
        if len(self.seen) % 2 and tokens.numel():
            tokens[-1] = (tokens[-1] + 1) % 50
        return DraftProposal(tokens, None)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "mistral"])
def test_the_drafter_sees_the_features_of_its_committed_context(arch: str, tiny_tok: Any) -> None:
    model = tiny_causal_lm(arch, len(tiny_tok))
    inner = tiny_feature_drafter(len(tiny_tok), tiny_tok.mask_token_id, model, window=6)
    prompt = PROMPTS["long"]
    expected = reference(model, prompt, 40)
    drafter = RecordingFeatureDrafter(inner, truth=[*prompt, *expected])
    backend = LocalBackend(model, drafter, tokenizer=tiny_tok)
    ids, stats = hybrid(backend, prompt, 40, block_size=3)
    assert ids == expected
    # Whole blocks and partial ones were accepted, so the features went through rollbacks.
    assert 0 < stats.accepted_tokens < stats.drafted_tokens
    assert len(drafter.seen) >= stats.verifier_calls - 1 > 5
    for context, features in drafter.seen:
        assert features is not None
        with torch.no_grad():
            out = model(input_ids=context[None, :-1], output_hidden_states=True)
        expected = verifier_features(out.hidden_states, inner.feature_layers)[0]
        m = min(inner.feature_window, context.shape[0] - 1)  # 5 rows: the window but its newest
        assert features.shape == (m, expected.shape[-1])
        # Computed a block at a time from a cache, so equal up to float rounding.
        torch.testing.assert_close(features, expected[-m:], atol=2e-4, rtol=1e-4)


def test_prompts_read_in_one_forward_hand_each_row_its_own_features(tiny_tok: Any) -> None:
    """Rows joining together read their prompts in shared, right-padded forwards: each
    row's features are still those of its own context, as a forward over it alone gives."""
    from dg_stream import GenerationRequest, SamplingParams, SpeculativeConfig

    model = tiny_causal_lm("llama", len(tiny_tok))
    inner = tiny_feature_drafter(len(tiny_tok), tiny_tok.mask_token_id, model, window=6)
    drafter = RecordingFeatureDrafter(inner)
    engine = LocalBackend(model, drafter, tokenizer=tiny_tok).engine
    batch = engine.batch()
    # Pieces of 38, 6, 36 and 2 tokens: the padding reaches into each short row's window.
    prompts = [PROMPTS["long"], PROMPTS["short"], PROMPTS["long"][2:], [9, 4, 17]]
    for prompt in prompts:
        request = GenerationRequest(
            prompt=prompt,
            max_new_tokens=3,
            sampling=SamplingParams(),
            speculative=SpeculativeConfig(block_size=2, adaptive=False),
        )
        batch.add(engine.session(request).state)
    batch.run()  # reads the prompts together (one forward), drafts, verifies, drafts again
    assert {len(context) for context, _ in drafter.seen} >= set(map(len, prompts))
    for context, features in drafter.seen:
        with torch.no_grad():
            out = model(input_ids=context[None, :-1], output_hidden_states=True)
        expected = verifier_features(out.hidden_states, inner.feature_layers)[0]
        m = min(inner.feature_window, context.shape[0] - 1)
        assert features is not None and features.shape == (m, expected.shape[-1])
        torch.testing.assert_close(features, expected[-m:], atol=2e-4, rtol=1e-4)


def test_a_one_token_prompt_starts_without_features(tiny_tok: Any) -> None:
    model = tiny_causal_lm("llama", len(tiny_tok))
    drafter = RecordingFeatureDrafter(
        tiny_feature_drafter(len(tiny_tok), tiny_tok.mask_token_id, model)
    )
    backend = LocalBackend(model, drafter, tokenizer=tiny_tok)
    assert hybrid(backend, PROMPTS["one"], 12, 4)[0] == reference(model, PROMPTS["one"], 12)
    assert drafter.seen[0][1] is None


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_feature_conditioned_drafting_matches_plain_greedy(arch: str, tiny_tok: Any) -> None:
    model = tiny_causal_lm(arch, len(tiny_tok))
    drafter = tiny_feature_drafter(len(tiny_tok), tiny_tok.mask_token_id, model)
    backend = LocalBackend(model, drafter, tokenizer=tiny_tok)
    for name in ("short", "long"):
        expected = reference(model, PROMPTS[name], 30)
        for block_size, steps in [(1, 1), (4, 1), (8, 3)]:
            assert hybrid(backend, PROMPTS[name], 30, block_size, steps)[0] == expected


def test_the_features_change_the_drafts(tiny_tok: Any) -> None:
    """Not a no-op: the same drafter without its features proposes other blocks."""
    model = tiny_causal_lm("llama", len(tiny_tok))
    drafter = tiny_feature_drafter(len(tiny_tok), tiny_tok.mask_token_id, model)
    context = torch.tensor(PROMPTS["long"])
    with torch.no_grad():
        out = model(input_ids=context[None, :-1], output_hidden_states=True)
    features = verifier_features(out.hidden_states, drafter.feature_layers)[0]
    from dg_stream import SamplingParams

    params = SamplingParams(temperature=1.0)
    with_features = drafter.propose(DraftRequest(context, 8, params, None, features=features)).q
    without = drafter.propose(DraftRequest(context, 8, params, None)).q
    assert with_features is not None and without is not None
    # A random tiny BERT predicts almost uniformly; still, every position moves.
    assert (with_features - without).abs().sum(-1).min() > 1e-4


def save_feature_drafter(path: Path, tiny_tok: Any, verifier: Any, layers: tuple[int, ...]) -> None:
    drafter = tiny_feature_drafter(len(tiny_tok), tiny_tok.mask_token_id, verifier, layers)
    drafter.model.save_pretrained(path)
    tiny_tok.save_pretrained(path)
    assert drafter.projection is not None
    save_feature_projection(path, drafter.projection)


def test_a_saved_feature_drafter_loads_from_its_folder(tmp_path: Path, tiny_tok: Any) -> None:
    verifier = tiny_causal_lm("llama", len(tiny_tok))
    save_feature_drafter(tmp_path, tiny_tok, verifier, (0, 2))
    backend = LocalBackend(verifier, tmp_path, tokenizer=tiny_tok)
    assert backend.drafter.feature_layers == (0, 2) and backend.drafter.feature_size == 64
    prompt = PROMPTS["short"]
    assert hybrid(backend, prompt, 20, 5)[0] == reference(verifier, prompt, 20)


def test_a_feature_drafter_without_its_projection_is_refused(tmp_path: Path, tiny_tok: Any) -> None:
    verifier = tiny_causal_lm("llama", len(tiny_tok))
    save_feature_drafter(tmp_path, tiny_tok, verifier, (2,))
    (tmp_path / FEATURE_PROJECTION_FILE).unlink()
    with pytest.raises(ModelLoadError, match="no feature projection"):
        LocalBackend(verifier, tmp_path, tokenizer=tiny_tok)


def test_a_feature_drafter_for_another_verifier_is_refused(tmp_path: Path, tiny_tok: Any) -> None:
    wide = tiny_causal_lm("gpt_neox", len(tiny_tok))
    wide_config = wide.config
    wide_config.hidden_size = 48  # only the width matters to the check
    save_feature_drafter(tmp_path, tiny_tok, wide, (1, 2))
    verifier = tiny_causal_lm("llama", len(tiny_tok))  # 32 wide
    with pytest.raises(ModelLoadError, match="trained for another verifier"):
        LocalBackend(verifier, tmp_path, tokenizer=tiny_tok)
    deep = tmp_path / "deep"
    save_feature_drafter(deep, tiny_tok, verifier, (1, 5))
    with pytest.raises(ModelLoadError, match="the verifier has 2 layers"):
        LocalBackend(verifier, deep, tokenizer=tiny_tok)


def test_a_drafter_of_the_earlier_contract_still_works(tiny_tok: Any) -> None:
    """No traits, no feature attributes, no ``features`` keyword: it is read through
    ``as_drafter`` with a deprecation warning, and handed no features."""

    class OlderDrafter:
        vocab_size = None
        max_block_size = 8

        def session(self) -> Any:
            return self

        def close(self) -> None: ...

        def propose(
            self, context: Any, k: int, params: Any, generator: Any, *, steps: Any, confidence: Any
        ) -> DraftProposal:
            return DraftProposal(context[-k:].clone(), None)  # repeats the context's tail

    verifier = tiny_causal_lm("llama", len(tiny_tok))
    with pytest.warns(FutureWarning, match="declare `traits`"):
        backend = LocalBackend(verifier, OlderDrafter(), tokenizer=tiny_tok)
    assert backend.drafter.traits.max_block_size == 8
    assert not backend.drafter.traits.batched and not backend.drafter.traits.feature_layers
    prompt = PROMPTS["long"]
    ids, stats = hybrid(backend, prompt, 20, 4)
    assert ids == reference(verifier, prompt, 20)
    assert stats.drafted_tokens > 0  # it did draft, through the adapter


def test_a_batching_drafter_of_the_earlier_contract_drafts_its_rows_together(
    tiny_tok: Any,
) -> None:
    """The earlier ``propose_batch(requests)`` of a stateless drafter is kept: one call for
    the rows of a round, and the verifier's output."""
    inner = tiny_masked_lm(len(tiny_tok), tiny_tok.mask_token_id)
    diffusion = DiffusionDrafter(inner, mask_token_id=tiny_tok.mask_token_id, window=12)
    calls: list[int] = []

    class OlderBatching:
        max_block_size = 8

        def session(self) -> Any:
            return self

        def close(self) -> None: ...

        def propose(self, context: Any, k: int, params: Any, generator: Any, **_: Any) -> Any:
            return diffusion.propose(DraftRequest(context, k, params, generator))

        def propose_batch(self, requests: list[DraftRequest]) -> list[DraftProposal]:
            calls.append(len(requests))
            return [diffusion.propose(r) for r in requests]

    verifier = tiny_causal_lm("llama", len(tiny_tok))
    with pytest.warns(FutureWarning):
        backend = LocalBackend(verifier, OlderBatching(), tokenizer=tiny_tok)
    assert backend.drafter.traits.batched
    prompts = [PROMPTS["long"], PROMPTS["short"], PROMPTS["long"][5:]]

    got = concurrent_ids(backend, prompts, 12, block_size=3, adaptive=False)
    assert got == [reference(verifier, p, 12) for p in prompts]
    assert max(calls) == len(prompts)


def test_what_is_not_a_drafter_is_refused_at_load(tiny_tok: Any) -> None:
    """Traits of the wrong type, batching without ``propose_batch``: a ModelLoadError that
    says which; a drafter whose rows draft alone needs no ``propose_batch``."""
    from dg_stream import DrafterTraits

    verifier = tiny_causal_lm("llama", len(tiny_tok))

    class Declared:
        traits: Any = DrafterTraits(max_block_size=4)

        def session(self) -> Any:
            return self

        def close(self) -> None: ...

        def propose(self, request: DraftRequest) -> DraftProposal:
            return DraftProposal(request.context[-request.k :].clone(), None)

    backend = LocalBackend(verifier, Declared(), tokenizer=tiny_tok)
    prompt = PROMPTS["long"]
    assert hybrid(backend, prompt, 10, 4)[0] == reference(verifier, prompt, 10)
    batching = Declared()
    batching.traits = DrafterTraits(max_block_size=4, batched=True)
    with pytest.raises(ModelLoadError, match="no propose_batch"):
        LocalBackend(verifier, batching, tokenizer=tiny_tok)
    wrong = Declared()
    wrong.traits = {"max_block_size": 4}
    with pytest.raises(ModelLoadError, match="not DrafterTraits"):
        LocalBackend(verifier, wrong, tokenizer=tiny_tok)


def test_a_drafter_is_read_from_its_traits_alone(tiny_tok: Any) -> None:
    """The round core reads ``traits``, not attributes: a drafter whose traits say it reads
    no features is handed none, whatever attributes it also has."""
    inner = tiny_feature_drafter(len(tiny_tok), tiny_tok.mask_token_id, tiny_causal_lm("llama", 50))
    drafter = RecordingFeatureDrafter(inner)
    drafter.traits = replace(drafter.traits, feature_layers=(), feature_window=0)
    drafter.feature_layers = inner.feature_layers  # type: ignore[attr-defined]
    verifier = tiny_causal_lm("llama", len(tiny_tok))
    hybrid(LocalBackend(verifier, drafter, tokenizer=tiny_tok), PROMPTS["long"], 8, 4)
    assert drafter.seen and all(features is None for _, features in drafter.seen)


def test_projection_must_fit_the_drafter() -> None:
    model = tiny_masked_lm(50, 2)
    model.config.dg_stream_feature_layers = [1]
    with pytest.raises(ValueError, match="hidden size 32"):
        DiffusionDrafter(model, mask_token_id=2, feature_projection=torch.zeros(16, 64))


def test_features_cover_only_the_feature_window(tiny_tok: Any) -> None:
    """A drafter trained on features of its newest positions reads exactly those."""
    model = tiny_causal_lm("llama", len(tiny_tok))
    drafter = tiny_feature_drafter(len(tiny_tok), tiny_tok.mask_token_id, model, window=10)
    drafter.feature_window = 3  # as from config dg_stream_feature_window
    context = torch.tensor(PROMPTS["long"])
    with torch.no_grad():
        out = model(input_ids=context[None, :-1], output_hidden_states=True)
    features = verifier_features(out.hidden_states, drafter.feature_layers)[0]
    from dg_stream import SamplingParams

    params = SamplingParams(temperature=1.0)

    def q(rows: int) -> torch.Tensor:
        proposal = drafter.propose(
            DraftRequest(context, 4, params, None, features=features[-rows:])
        )
        assert proposal.q is not None
        return proposal.q

    assert torch.equal(q(3), q(len(features)))  # rows beyond the window are ignored
    assert not torch.equal(q(2), q(3))  # the three newest all count
