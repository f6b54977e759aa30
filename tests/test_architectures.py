"""Every architecture family transformers ships, as verifier: greedy output identical to the
model's own ``generate()``, alone and with three streams sharing a backend, with the
diffusion, n-gram and a rollback-heavy drafter; sampled output exact on a recurrent and a
hybrid model; recurrent states rolled back exactly; a failing row ends alone.

Tiny random configs (fp32), built here. Recurrent and hybrid families run on per-generation
caches (``StateCache``, taking turns); the others share the batched cache.
"""

from __future__ import annotations

import logging
from typing import Any

import anyio
import pytest
import torch
from _drafters import NoisyOracleDrafter
from _models import tiny_masked_lm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dg_stream
from dg_stream import GenerationError, LocalBackend, SamplingParams
from dg_stream._drafters.base import DraftProposal, DraftRequest
from dg_stream._state_cache import StateCache
from dg_stream._verifier import Verifier

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


_SMALL = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=256,
)
_GQA = dict(_SMALL, num_key_value_heads=2)
_EXPERTS = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)

#: model_type -> config keywords (sizes in each family's own names)
FAMILIES: dict[str, dict[str, Any]] = {
    "gpt2": dict(n_embd=32, n_layer=2, n_head=2, n_positions=256),
    "gptj": dict(n_embd=32, n_layer=2, n_head=4, n_positions=256, rotary_dim=4),
    "gpt_neox": dict(_SMALL, num_attention_heads=2, rotary_pct=0.5),
    "codegen": dict(n_embd=32, n_layer=2, n_head=4, n_positions=256, n_ctx=256, rotary_dim=4),
    "bloom": dict(hidden_size=32, n_layer=2, n_head=4, initializer_range=0.3),
    "mpt": dict(d_model=32, n_layers=2, n_heads=4, max_seq_len=256, expansion_ratio=2),
    "opt": dict(_SMALL, ffn_dim=64, word_embed_proj_dim=32),
    "falcon": dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        new_decoder_architecture=True,
        num_kv_heads=2,
        initializer_range=0.1,
    ),
    "falcon_alibi": dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        alibi=True,
        initializer_range=0.1,
    ),
    "phi": dict(_SMALL, num_attention_heads=2, partial_rotary_factor=0.5),
    "phi3": dict(_GQA),
    "phi3_longrope": dict(
        _GQA,
        max_position_embeddings=64,
        original_max_position_embeddings=32,
        rope_scaling={"type": "longrope", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4},
    ),
    "gemma": dict(_SMALL, num_key_value_heads=1, head_dim=8),
    "gemma2": dict(
        _GQA, head_dim=8, sliding_window=8, attn_logit_softcapping=5.0, initializer_range=0.3
    ),
    "gemma3_text": dict(_GQA, head_dim=8, sliding_window=8, sliding_window_pattern=2),
    "llama": dict(_GQA),
    "mistral": dict(_GQA, sliding_window=8),
    "qwen2": dict(_GQA),
    "qwen3": dict(_GQA),
    "qwen2_moe": dict(_GQA, **_EXPERTS, shared_expert_intermediate_size=32),
    "mixtral": dict(_GQA, num_local_experts=4, num_experts_per_tok=2),
    "deepseek_v3": dict(
        _SMALL,
        num_key_value_heads=4,
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        first_k_dense_replace=1,
        kv_lora_rank=16,
        q_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
        n_group=1,
        topk_group=1,
    ),
    "olmo2": dict(_GQA, initializer_range=0.1),
    "mamba": dict(hidden_size=32, num_hidden_layers=2, state_size=8, expand=2, conv_kernel=4),
    "falcon_h1": dict(
        _GQA,
        mamba_d_ssm=64,
        mamba_n_heads=4,
        mamba_d_head=16,
        mamba_d_state=8,
        mamba_n_groups=1,
        mamba_chunk_size=16,
    ),
    "qwen3_next": dict(
        _GQA,
        **_EXPERTS,
        head_dim=8,
        linear_num_value_heads=4,
        linear_num_key_heads=2,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        shared_expert_intermediate_size=32,
        layer_types=["linear_attention", "full_attention"],
    ),
    "recurrent_gemma": dict(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=1,
        intermediate_size=64,
        lru_width=32,
        attention_window_size=8,
        block_types=["recurrent", "attention", "recurrent"],
        head_dim=8,
    ),
    "jamba": dict(
        _GQA,
        num_experts=4,
        num_experts_per_tok=2,
        attn_layer_period=2,
        attn_layer_offset=1,
        expert_layer_period=2,
        expert_layer_offset=1,
        mamba_d_state=8,
        mamba_expand=2,
        mamba_dt_rank=4,
    ),
}
#: families whose layers keep a recurrent state, and others that take turns
TURN_TAKING = {"falcon_alibi", "mamba", "falcon_h1", "qwen3_next", "recurrent_gemma", "jamba"}
#: ... and one whose rotary scaling depends on the longest position in a forward
ONE_AT_A_TIME = TURN_TAKING | {"phi3_longrope"}
#: an extra random spread where a family's own initialisation writes near-constant text
_PERTURB = {"recurrent_gemma": 0.1}


def build(family: str, vocab: int, seed: int = 0, eos: int = 0) -> Any:
    """A random-init causal LM of ``family`` with a sharp output layer, fp32."""
    import transformers as tf

    model_type = family.split("_alibi")[0].split("_longrope")[0]
    config = tf.AutoConfig.for_model(
        model_type,
        vocab_size=vocab,
        eos_token_id=eos,
        bos_token_id=eos,
        pad_token_id=1,
        tie_word_embeddings=False,
        **FAMILIES[family],
    )
    if family == "gemma2":  # soft-capping exists in eager attention only
        config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        if family in _PERTURB:
            for p in model.parameters():
                if p.dim() >= 2:
                    p.add_(torch.randn_like(p) * _PERTURB[family])
        model.get_output_embeddings().weight.mul_(4.0)  # fewer near-ties, varied text
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = 1
    return model.eval()


def reference(model: Any, prompt: list[int], new: int) -> list[int]:
    out = model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=new,
        do_sample=False,
    )
    return out[0, len(prompt) :].tolist()


PROMPTS = [[5], [40, 41, 42, 43, 44, 45, 46], list(range(3, 60, 3))]
NEW = 20


async def collect(backend: LocalBackend, prompt: list[int], block: int) -> list[int]:
    ids: list[int] = []
    async with dg_stream.generate(
        prompt, backend=backend, max_new_tokens=NEW, block_size=block, adaptive=False
    ) as stream:
        async for chunk in stream:
            ids.extend(chunk.token_ids)
    return ids


async def together(backend: LocalBackend, jobs: list[tuple[list[int], int]]) -> list[Any]:
    results: list[Any] = [None] * len(jobs)

    async def one(i: int) -> None:
        try:
            results[i] = await collect(backend, *jobs[i])
        except GenerationError as exc:
            results[i] = exc

    with anyio.fail_after(120):
        async with anyio.create_task_group() as tg:
            for i in range(len(jobs)):
                tg.start_soon(one, i)
    return results


@pytest.mark.parametrize("family", list(FAMILIES))
async def test_greedy_is_the_models_own_generate(family: str, tiny_tok: Any) -> None:
    model = build(family, len(tiny_tok))
    expected = [reference(model, p, NEW) for p in PROMPTS]
    drafters: dict[str, Any] = {
        "diffusion": tiny_masked_lm(len(tiny_tok), tiny_tok.mask_token_id),
        "ngram": "ngram",
        # Right except for one slot per block: partial acceptance (a rollback) every round.
        "oracle": NoisyOracleDrafter(
            [p + e for p, e in zip(PROMPTS, expected, strict=True)], len(tiny_tok)
        ),
    }
    for name, drafter in drafters.items():
        backend = LocalBackend(model, drafter, tokenizer=tiny_tok, prefill_chunk=8)
        try:
            assert (backend.limits.max_batch == 1) == (family in ONE_AT_A_TIME)
            shared = await together(backend, [(p, 2 + i) for i, p in enumerate(PROMPTS)])
            alone = await together(backend, [(PROMPTS[2], 4)])
        finally:
            await backend.aclose()
        assert shared == expected, (family, name)
        assert alone[0] == expected[2], (family, name)


def test_turn_taking_is_said_once_with_its_reason(
    tiny_tok: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="dg_stream.verifier"):
        verifier = Verifier(build("jamba", len(tiny_tok)))
    assert isinstance(verifier.new_cache(), StateCache)
    said = [r.getMessage() for r in caplog.records if "takes turns" in r.getMessage()]
    assert len(said) == 1 and "linear_attention" in said[0]
    assert not Verifier(build("bloom", len(tiny_tok))).turns_reason


def test_eager_soft_capped_attention_stays_eager(tiny_tok: Any) -> None:
    model = build("gemma2", len(tiny_tok))
    Verifier(model)
    assert model.config._attn_implementation == "eager"


# -- recurrent states roll back exactly -----------------------------------------------------


@pytest.mark.parametrize("family", ["mamba", "qwen3_next", "recurrent_gemma", "falcon_alibi"])
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_rolled_back_row_continues_as_if_it_had_read_only_what_it_kept(
    family: str, data: st.DataObject
) -> None:
    """Feed blocks, keep random prefixes of them (0 to all): the next forward's logits are
    the ones a fresh forward over exactly the kept tokens gives."""
    if family not in _ROLLBACK_MODELS:
        _ROLLBACK_MODELS[family] = build(family, 50, seed=2)
    verifier = Verifier(_ROLLBACK_MODELS[family])
    cache = verifier.new_cache()
    row = cache.add_row()
    # RecurrentGemma's own forward treats a one- or two-token prompt unlike a longer one.
    prompt = data.draw(st.lists(st.integers(3, 49), min_size=4, max_size=12))
    kept = list(prompt[:-1])
    verifier.forward(torch.tensor([kept]), cache, row, prefill=True)
    cache.lengths[row] = len(kept)
    newest = prompt[-1]
    for _ in range(data.draw(st.integers(1, 4))):
        block = data.draw(st.lists(st.integers(3, 49), min_size=0, max_size=6))
        logits, _ = verifier.forward(torch.tensor([[newest, *block]]), cache, row)
        with torch.no_grad():
            full = verifier.model(input_ids=torch.tensor([[*kept, newest, *block]])).logits[0]
        width = len(block) + 1
        # A wrong rollback is off by tenths nearly everywhere; scans of different lengths
        # round differently (Mamba's fallback scan: up to a few hundredths at a rare logit).
        error = (logits[0] - full[-width:].float()).abs()
        assert error.max() < 0.15 and error.mean() < 2e-2, (error.max(), error.mean())
        accepted = data.draw(st.integers(0, len(block)))
        kept += [newest, *block[:accepted]]
        cache.lengths[row] = len(kept)
        newest = data.draw(st.integers(3, 49))


_ROLLBACK_MODELS: dict[str, Any] = {}


# -- sampling stays exact on recurrent and hybrid verifiers ---------------------------------


@pytest.mark.parametrize("family", ["mamba", "jamba"])
def test_sampled_output_follows_a_recurrent_verifier(family: str) -> None:
    from test_sampling_lossless import V, exact_marginals, p_values, sample_runs

    model = build(family, V, seed=4, eos=V + 100)  # no end of sequence
    with torch.no_grad():  # a spread-out distribution makes the test sensitive
        model.get_output_embeddings().weight.mul_(0.08)
    backend = LocalBackend(model, tiny_masked_lm(V, mask_token_id=V - 1, seed=2))
    params = SamplingParams(temperature=1.0)
    runs = sample_runs(backend, params, block_size=2)
    pvals = p_values(runs, exact_marginals(model, params))
    assert min(pvals) > 1e-3, pvals


# -- a failure stays with its row -----------------------------------------------------------


class _FailsOnOnePrompt(NoisyOracleDrafter):
    """Raises whenever it drafts for contexts that start with ``poison``."""

    def __init__(self, sequences: Any, vocab: int, poison: int) -> None:
        super().__init__(sequences, vocab)
        self.poison = poison

    def propose(self, request: DraftRequest) -> DraftProposal:
        if int(request.context[0]) == self.poison and request.context.shape[0] > 10:
            raise RuntimeError("this row's drafter failed")
        return super().propose(request)


@pytest.mark.parametrize("family", ["llama", "jamba"])
async def test_a_row_whose_drafter_raises_ends_alone(family: str, tiny_tok: Any) -> None:
    model = build(family, len(tiny_tok))
    expected = [reference(model, p, NEW) for p in PROMPTS]
    drafter = _FailsOnOnePrompt(
        [p + e for p, e in zip(PROMPTS, expected, strict=True)], len(tiny_tok), poison=PROMPTS[1][0]
    )
    backend = LocalBackend(model, drafter, tokenizer=tiny_tok)
    try:
        results = await together(backend, [(p, 3) for p in PROMPTS])
    finally:
        await backend.aclose()
    assert isinstance(results[1], GenerationError)
    assert "this row's drafter failed" in str(results[1])
    assert results[0] == expected[0] and results[2] == expected[2]
