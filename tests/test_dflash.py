"""DFlash-format drafters: the verifier's hidden states as context, one forward per block.

Random-init checkpoints for tiny Qwen3, Llama and Mistral verifiers: the output must stay the
verifier's own, the drafter's context cache must equal a fresh forward over the committed
context after whole and partial acceptances, checkpoints round-trip in the published layout,
and a checkpoint made for another verifier is refused with the reason.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from _drafters import concurrent_ids, count_batches
from _models import tiny_causal_lm, tiny_dflash
from hypothesis import given, settings
from hypothesis import strategies as st
from test_greedy_lossless import PROMPTS, hybrid, reference

from dg_stream import GenerationRequest, LocalBackend, SamplingParams, SpeculativeConfig
from dg_stream._drafters import DFlashDrafter, DraftProposal
from dg_stream._drafters.base import DraftRequest
from dg_stream._drafters.dflash import DFlashSession
from dg_stream._drafters.dflash_model import (
    ContextCache,
    DFlashModel,
    block_attention_mask,
    default_target_layers,
    load_dflash,
    save_dflash,
)
from dg_stream._errors import ModelLoadError
from dg_stream._verifier import verifier_features

DFLASH_ARCHS = ["qwen3", "llama", "mistral"]


@pytest.fixture(scope="module")
def verifiers(tiny_tok: Any) -> dict[str, Any]:
    return {arch: tiny_causal_lm(arch, len(tiny_tok)) for arch in DFLASH_ARCHS}


@pytest.mark.parametrize("arch", DFLASH_ARCHS)
@pytest.mark.parametrize("prompt_name", list(PROMPTS))
def test_greedy_output_is_the_verifiers(
    arch: str, prompt_name: str, verifiers: dict[str, Any], tiny_tok: Any
) -> None:
    verifier, prompt = verifiers[arch], PROMPTS[prompt_name]
    expected = reference(verifier, prompt, 37)  # 37: max_new_tokens ends inside a block
    backend = LocalBackend(
        verifier, tiny_dflash(verifier, tiny_tok.mask_token_id), tokenizer=tiny_tok
    )
    assert isinstance(backend.drafter, DFlashDrafter)
    for block_size in (1, 4, 8, 16):
        got, stats = hybrid(backend, prompt, 37, block_size)
        assert got == expected, (arch, block_size)
        assert stats.committed_tokens == len(expected)


class TruthfulSession:
    """The real DFlash session (its cache updated as usual), but proposing the verifier's own
    continuation, spoiled at the last slot every other call: whole and partial acceptances.
    After each proposal the cache is compared with a fresh forward over the committed context."""

    def __init__(self, drafter: DFlashDrafter, truth: list[int], verifier: Any, log: list[int]):
        self.inner = DFlashSession(drafter)
        self.drafter, self.truth, self.verifier, self.log = drafter, truth, verifier, log
        self.calls = 0

    def propose(self, request: DraftRequest) -> DraftProposal:
        context, k = request.context, request.k
        self.inner.propose(request)
        self.check_cache(context)
        n = context.shape[0]
        tokens = torch.tensor(self.truth[n : n + k], dtype=torch.long)
        self.calls += 1
        if self.calls % 2 == 0 and tokens.shape[0] > 1:
            tokens[-1] = (tokens[-1] + 1) % 300
        return DraftProposal(tokens, None)

    def check_cache(self, context: torch.Tensor) -> None:
        """Context keys of every layer equal those of one forward over ids[:-1]."""
        assert self.inner.cache is not None
        n = context.shape[0] - 1
        self.log.append(n)
        assert self.inner.cache.length == n
        if n == 0:
            return
        with torch.no_grad():
            out = self.verifier(input_ids=context[None, :-1], output_hidden_states=True)
        features = verifier_features(
            out.hidden_states, self.drafter.traits.feature_layers, raw=True
        )
        fresh = ContextCache(len(self.drafter.model.layers))
        model = self.drafter.model
        block = self.drafter.embed(context[-1:])[None]
        model(block, torch.tensor([[n]]), features, torch.arange(n)[None], cache=fresh)
        for layer in range(len(model.layers)):
            got, want = self.inner.cache.keys[layer], fresh.keys[layer]
            assert got is not None and want is not None
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(self.inner.cache.values[layer], fresh.values[layer])

    def close(self) -> None:
        self.inner.close()


@pytest.mark.parametrize("arch", DFLASH_ARCHS)
def test_context_cache_equals_a_fresh_forward(
    arch: str, verifiers: dict[str, Any], tiny_tok: Any
) -> None:
    verifier = verifiers[arch]
    prompt = PROMPTS["short"]
    continuation = reference(verifier, prompt, 40)
    drafter = DFlashDrafter(tiny_dflash(verifier, tiny_tok.mask_token_id), verifier)
    seen: list[int] = []

    class Truthful:
        def __getattr__(self, name: str) -> Any:
            return getattr(drafter, name)

        def session(self) -> TruthfulSession:
            return TruthfulSession(drafter, prompt + continuation, verifier, seen)

    backend = LocalBackend(verifier, Truthful(), tokenizer=tiny_tok)
    got, stats = hybrid(backend, prompt, 40, 6)
    assert got == continuation
    assert stats.accepted_tokens > stats.verifier_calls  # whole and partial blocks were kept
    assert len(seen) >= 4 and seen == sorted(seen)


def test_drafts_depend_on_the_verifier_states(tiny_tok: Any) -> None:
    """The context enters through the features: other states, other drafts."""
    verifier = tiny_causal_lm("qwen3", len(tiny_tok))
    drafter = DFlashDrafter(tiny_dflash(verifier, tiny_tok.mask_token_id, scale=3.0), verifier)
    context = torch.tensor(PROMPTS["long"])
    with torch.no_grad():
        out = verifier(input_ids=context[None, :-1], output_hidden_states=True)
    features = verifier_features(out.hidden_states, drafter.traits.feature_layers, raw=True)[0]
    greedy = SamplingParams(temperature=0.0)
    real = drafter.session().propose(DraftRequest(context, 8, greedy, None, features=features))
    other = drafter.session().propose(
        DraftRequest(context, 8, greedy, None, features=features.flip(0))
    )
    none = drafter.session().propose(DraftRequest(context, 8, greedy, None))
    assert real.tokens.shape == (8,)
    assert not torch.equal(real.tokens, other.tokens) or not torch.equal(real.tokens, none.tokens)


def test_save_load_round_trip_in_the_published_layout(tmp_path: Path, tiny_tok: Any) -> None:
    verifier = tiny_causal_lm("qwen3", len(tiny_tok))
    model = tiny_dflash(verifier, tiny_tok.mask_token_id, target_layers=(0, 1), block_size=9)
    save_dflash(model, tmp_path, verifier_layers=2)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["DFlashDraftModel"]
    assert config["dflash_config"]["target_layer_ids"] == [0, 1]
    assert config["dflash_config"]["mask_token_id"] == tiny_tok.mask_token_id
    assert config["block_size"] == 9 and config["num_target_layers"] == 2
    from safetensors.torch import load_file

    names = set(load_file(str(tmp_path / "model.safetensors")))
    assert {"fc.weight", "hidden_norm.weight", "norm.weight"} <= names
    for part in ("self_attn.q_proj", "self_attn.q_norm", "self_attn.k_norm", "mlp.gate_proj"):
        assert f"layers.1.{part}.weight" in names
    assert not any("embed" in n or "lm_head" in n or "rotary" in n for n in names)
    loaded = load_dflash(tmp_path, "cpu", torch.float32)
    block, positions = torch.randn(1, 9, 32), torch.arange(5, 14)[None]
    context, context_positions = torch.randn(1, 5, 64), torch.arange(5)[None]
    with torch.no_grad():
        a = model.half().float()(block, positions, context, context_positions)
        b = loaded(block, positions, context, context_positions)
    torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-3)  # saved in fp16
    backend = LocalBackend(verifier, tmp_path, tokenizer=tiny_tok)
    assert isinstance(backend.drafter, DFlashDrafter)
    assert backend.defaults.block_size == 8  # the checkpoint's block, less its clean token


def test_missing_target_layers_default_from_the_verifier_depth(tmp_path: Path) -> None:
    assert default_target_layers(36, 5) == [1, 9, 17, 25, 33]
    assert default_target_layers(8, 1) == [4]
    assert all(0 <= i < 2 for i in default_target_layers(2, 3))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("width", "hidden size"),
        ("layers", "verifier layers"),
        ("mask", "mask token id"),
        ("architecture", "DFlash2DraftModel"),
        ("weights", "does not match its config"),
    ],
)
def test_checkpoints_for_another_verifier_are_refused(
    change: str, message: str, tmp_path: Path, tiny_tok: Any
) -> None:
    verifier = tiny_causal_lm("qwen3", len(tiny_tok))
    source = verifier
    if change == "width":
        import transformers as tf

        source = tf.AutoModelForCausalLM.from_config(
            tf.Qwen3Config(
                vocab_size=len(tiny_tok),
                hidden_size=48,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                intermediate_size=64,
            )
        )
    layers = (0, 5) if change == "layers" else (0, 1)
    mask = 10_000 if change == "mask" else tiny_tok.mask_token_id
    save_dflash(tiny_dflash(source, mask, target_layers=layers), tmp_path, 2)
    config_path = tmp_path / "config.json"
    config = json.loads(config_path.read_text())
    if change == "architecture":
        config["architectures"] = ["DFlash2DraftModel"]
    if change == "weights":
        config["num_hidden_layers"] = 3
        config.pop("layer_types")
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=message):
        LocalBackend(verifier, tmp_path, tokenizer=tiny_tok)


@settings(max_examples=60, deadline=None)
@given(
    anchors=st.lists(st.integers(0, 40), min_size=1, max_size=5, unique=True),
    block_size=st.integers(2, 6),
)
def test_block_mask_hides_the_future(anchors: list[int], block_size: int) -> None:
    """A block sees the context strictly before its anchor and its own slots, nothing else."""
    context = 48
    mask = block_attention_mask(torch.tensor([anchors]), block_size, context)[0, 0]
    assert mask.shape == (len(anchors) * block_size, context + len(anchors) * block_size)
    for query in range(mask.shape[0]):
        block = query // block_size
        anchor = anchors[block]
        sees = mask[query].nonzero().flatten().tolist()
        ctx = [k for k in sees if k < context]
        slots = [(k - context) // block_size for k in sees if k >= context]
        assert ctx == list(range(anchor))  # never its own anchor's features, nor later ones
        assert set(slots) == {block} and len(slots) == block_size


def test_training_pass_equals_one_block_at_a_time(tiny_tok: Any) -> None:
    """Many blocks under the block mask give what each block gives alone with its context."""
    verifier = tiny_causal_lm("qwen3", len(tiny_tok))
    model: DFlashModel = tiny_dflash(verifier, tiny_tok.mask_token_id, block_size=4)
    features = torch.randn(1, 20, 64)
    anchors = torch.tensor([[3, 11, 16]])
    block = torch.randn(1, 12, 32)
    positions = (anchors[:, :, None] + torch.arange(4)).flatten(1)
    mask = block_attention_mask(anchors, 4, 20)
    with torch.no_grad():
        together = model(block, positions, features, torch.arange(20)[None], mask=mask)
        for j, anchor in enumerate(anchors[0].tolist()):
            alone = model(
                block[:, 4 * j : 4 * j + 4],
                positions[:, 4 * j : 4 * j + 4],
                features[:, :anchor],
                torch.arange(anchor)[None],
            )
            torch.testing.assert_close(together[:, 4 * j : 4 * j + 4], alone)


def test_sampled_requests_run_and_stop(tiny_tok: Any) -> None:
    verifier = tiny_causal_lm("llama", len(tiny_tok))
    backend = LocalBackend(
        verifier, tiny_dflash(verifier, tiny_tok.mask_token_id), tokenizer=tiny_tok
    )
    request = GenerationRequest(
        prompt=PROMPTS["short"],
        max_new_tokens=20,
        sampling=SamplingParams(temperature=0.9, top_p=0.9, seed=3),
        speculative=SpeculativeConfig(block_size=8, adaptive=True),
    )
    session = backend.engine.session(request)
    ids: list[int] = []
    while (chunk := session.step()) is not None:
        ids.extend(chunk.token_ids)
    assert len(ids) == 20
    assert session.state.draft_session is None  # closed with the generation


def test_end_of_sequence_inside_an_accepted_block(tiny_tok: Any) -> None:
    """Drafts that run past the verifier's end-of-sequence: output stops right after it."""
    verifier = tiny_causal_lm("qwen3", len(tiny_tok), seed=2)
    prompt = PROMPTS["short"]
    free = reference(verifier, prompt, 30)
    eos = free[9]  # the verifier's 10th token becomes its end-of-sequence
    verifier.generation_config.eos_token_id = eos
    verifier.config.eos_token_id = eos
    expected = reference(verifier, prompt, 30)
    assert expected[-1] == eos and len(expected) <= 10
    drafter = DFlashDrafter(tiny_dflash(verifier, tiny_tok.mask_token_id), verifier)

    class Truthful:
        def __getattr__(self, name: str) -> Any:
            return getattr(drafter, name)

        def session(self) -> TruthfulSession:
            return TruthfulSession(drafter, prompt + free, verifier, [])

    backend = LocalBackend(verifier, Truthful(), tokenizer=tiny_tok)
    got, stats = hybrid(backend, prompt, 30, 16)
    assert got == expected
    assert stats.verifier_calls <= 2  # the whole run fits in one or two blocks


def test_a_bf16_drafter_beside_an_fp32_verifier(tiny_tok: Any) -> None:
    """The drafter's precision is its own: drafts change, the output does not."""
    verifier = tiny_causal_lm("llama", len(tiny_tok))
    model = tiny_dflash(verifier, tiny_tok.mask_token_id).to(torch.bfloat16)
    backend = LocalBackend(verifier, model, tokenizer=tiny_tok)
    prompt = PROMPTS["long"]
    assert hybrid(backend, prompt, 24, 8)[0] == reference(verifier, prompt, 24)


def test_sliding_window_layers_see_only_recent_context(tiny_tok: Any) -> None:
    """``layer_types`` sliding layers ignore context further back than the window."""
    verifier = tiny_causal_lm("qwen3", len(tiny_tok))
    from dg_stream._drafters.dflash_model import dflash_config

    config = dflash_config(
        verifier.config, layers=2, mask_token_id=2, block_size=5, target_layer_ids=[0, 1]
    )
    config.layer_types = ["sliding_attention", "sliding_attention"]
    config.sliding_window = 4
    torch.manual_seed(0)
    model = DFlashModel(config).eval()
    assert all(layer.self_attn.sliding_window == 4 for layer in model.layers)
    block, positions = torch.randn(1, 5, 32), torch.arange(20, 25)[None]
    features = torch.randn(1, 20, 64)
    with torch.no_grad():
        everything = model(block, positions, features, torch.arange(20)[None])
        recent = model(block, positions, features[:, 17:], torch.arange(17, 20)[None])
        cache = ContextCache(2)
        cached = model(block, positions, features, torch.arange(20)[None], cache=cache)
        older = model(block, positions, features[:, 15:], torch.arange(15, 20)[None])
    torch.testing.assert_close(everything, recent)
    torch.testing.assert_close(everything, cached)
    torch.testing.assert_close(everything, older)
    for layer in model.layers:  # the same layers with full attention do read the old context
        layer.self_attn.sliding_window = None
    with torch.no_grad():
        full = model(block, positions, features, torch.arange(20)[None])
    assert not torch.allclose(full, everything, atol=1e-4)


def test_a_smaller_block_drafts_the_first_slots_of_the_trained_one(tiny_tok: Any) -> None:
    """Slots attend to each other: a short block runs the whole trained block and keeps its
    first k, so every block size drafts what training taught."""
    verifier = tiny_causal_lm("qwen3", len(tiny_tok))
    drafter = DFlashDrafter(tiny_dflash(verifier, tiny_tok.mask_token_id, scale=3.0), verifier)
    context = torch.tensor(PROMPTS["long"])
    with torch.no_grad():
        out = verifier(input_ids=context[None, :-1], output_hidden_states=True)
    features = verifier_features(out.hidden_states, drafter.traits.feature_layers, raw=True)[0]
    greedy = SamplingParams(temperature=0.0)
    full = (
        drafter.session().propose(DraftRequest(context, 16, greedy, None, features=features)).tokens
    )
    assert full.shape == (16,)
    for k in (1, 2, 5):
        short = (
            drafter.session()
            .propose(DraftRequest(context, k, greedy, None, features=features))
            .tokens
        )
        assert torch.equal(short, full[:k])


def test_the_context_cache_appends_in_place_and_grows_geometrically() -> None:
    """A commit writes its positions into the buffers; they double when full (a handful of
    reallocations for hundreds of commits), and what is read is what concatenation gives."""
    from dg_stream._drafters.dflash_model import ContextCache

    cache = ContextCache(layers=2)
    keys, positions, buffers = [], [], set()
    for step in range(150):
        width = 1 + step % 4
        key = torch.randn(1, 2, width, 8)
        cache.extend(0, key, -key)
        cache.extend_positions(torch.arange(width) + sum(k.shape[2] for k in keys))
        keys.append(key)
        positions.append(cache.positions)
        buffers.add(cache._key_buffers[0].data_ptr())  # type: ignore[union-attr]
    expected = torch.cat(keys, dim=2)
    assert torch.equal(cache.keys[0], expected) and torch.equal(cache.values[0], -expected)
    assert cache.keys[1] is None and cache.length == expected.shape[2]
    assert torch.equal(cache.positions, torch.arange(expected.shape[2]))
    assert len(buffers) <= 6  # doublings from 64, not one copy per commit
    assert cache.nbytes <= 2 * 2 * (expected.numel() * 4) + 8 * 2 * expected.shape[2] + 4096


# -- several generations in one forward ----------------------------------------------------


@pytest.mark.parametrize("sliding", [False, True])
def test_rows_drafted_together_draft_what_each_drafts_alone(sliding: bool, tiny_tok: Any) -> None:
    """``propose_batch``: contexts of different lengths, caches grown over several rounds by
    different numbers of committed positions (a gap restarting one), greedy and sampled rows:
    every row's tokens (and q) equal those of its twin session proposing alone."""
    verifier = tiny_causal_lm("qwen3", len(tiny_tok))
    network = tiny_dflash(verifier, tiny_tok.mask_token_id, scale=3.0)
    if sliding:
        network.config.layer_types = ["sliding_attention", "full_attention"]
        network.layers[0].self_attn.sliding_window = 6
    drafter = DFlashDrafter(network, verifier)
    assert drafter.traits.batched
    width = drafter.traits.feature_size
    assert width is not None
    generator = torch.Generator().manual_seed(0)
    contexts = [torch.randint(5, 200, (n,), generator=generator) for n in (2, 9, 30, 14)]
    together = [drafter.session() for _ in contexts]
    alone = [drafter.session() for _ in contexts]
    handed = [0] * len(contexts)  # positions whose features each row has been handed
    sampled = SamplingParams(temperature=0.8)
    for round_ in range(4):
        requests = []
        for i, context in enumerate(contexts):
            newest = context.shape[0] - 1
            if round_ == 2 and i == 1:
                handed[i] += 3  # positions never handed over: that cache restarts
            rows = torch.randn(max(0, newest - handed[i]), width, generator=generator)
            handed[i] = newest
            params = sampled if i % 2 else SamplingParams()
            requests.append(
                DraftRequest(
                    context,
                    3 + i,
                    params,
                    torch.Generator().manual_seed(round_ * 10 + i),
                    features=rows,
                )
            )
        got = drafter.propose_batch(together, requests)
        for i, request in enumerate(requests):
            seed = int(request.generator.initial_seed())
            one = alone[i].propose(request._replace(generator=torch.Generator().manual_seed(seed)))
            assert got[i].tokens.tolist() == one.tokens.tolist(), (round_, i)
            assert (got[i].q is None) == (one.q is None)
            if one.q is not None:
                torch.testing.assert_close(got[i].q, one.q, atol=1e-5, rtol=1e-4)
        # Each row commits a different number of tokens before the next round.
        contexts = [
            torch.cat([c, torch.randint(5, 200, (1 + (i + round_) % 3,), generator=generator)])
            for i, c in enumerate(contexts)
        ]
    for session in together:
        assert session.cache is not None and session.cache.length > 0


def test_concurrent_streams_with_a_dflash_drafter_write_the_verifiers_tokens(
    tiny_tok: Any,
) -> None:
    """Streams sharing rounds draft in one DFlash forward and still write plain decoding's
    tokens."""
    verifier = tiny_causal_lm("qwen3", len(tiny_tok))
    drafter = DFlashDrafter(tiny_dflash(verifier, tiny_tok.mask_token_id), verifier)
    calls = count_batches(drafter)
    backend = LocalBackend(verifier, drafter, tokenizer=tiny_tok, block_size=4, adaptive=False)
    prompts = list(PROMPTS.values())
    expected = [reference(verifier, p, 24) for p in prompts]
    assert concurrent_ids(backend, prompts, 24) == expected
    assert max(calls) == len(prompts)  # rows did draft together
