"""Static shapes for the decode round: bucketed rows, a fixed width and the whole cache span
give the same greedy text as the dynamic forward, batched and alone, captured or not."""

from __future__ import annotations

import os
from typing import Any

import anyio
import pytest
import torch
from _drafters import NoisyOracleDrafter
from _models import tiny_causal_lm, tiny_dflash
from hypothesis import given
from hypothesis import strategies as st

import dg_stream
from dg_stream import LocalBackend, StaticShapes
from dg_stream._static_shapes import rows_bucket

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


PROMPTS = [[5], [40, 41, 42, 43, 44, 45, 46], list(range(3, 60, 3))]
NEW = 24


def reference(model: Any, prompt: list[int]) -> list[int]:
    out = model.generate(
        torch.tensor([prompt], device=model.device),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=model.device),
        max_new_tokens=NEW,
        do_sample=False,
    )
    return out[0, len(prompt) :].tolist()


async def together(backend: LocalBackend, jobs: list[tuple[list[int], int]]) -> list[list[int]]:
    results: list[list[int]] = [[] for _ in jobs]

    async def one(i: int) -> None:
        prompt, block = jobs[i]
        async with dg_stream.generate(
            prompt, backend=backend, max_new_tokens=NEW, block_size=block, adaptive=False
        ) as stream:
            async for chunk in stream:
                results[i].extend(chunk.token_ids)

    with anyio.fail_after(120):
        async with anyio.create_task_group() as tg:
            for i in range(len(jobs)):
                tg.start_soon(one, i)
    return results


async def check(model: Any, drafter: Any, tok: Any, shapes: StaticShapes, **options: Any) -> Any:
    """Three streams sharing the backend, then one alone: each is the model's greedy text."""
    expected = [reference(model, p) for p in PROMPTS]
    if drafter is None:
        drafter = NoisyOracleDrafter([p + e for p, e in zip(PROMPTS, expected, strict=True)], 300)
    backend = LocalBackend(model, drafter, tokenizer=tok, static_shapes=shapes, **options)
    try:
        shared = await together(backend, [(p, 2 + i) for i, p in enumerate(PROMPTS)])
        alone = await together(backend, [(PROMPTS[2], 4)])
    finally:
        await backend.aclose()
    assert shared == expected
    assert alone[0] == expected[2]
    return backend


@pytest.mark.parametrize("arch", ["llama", "gpt2", "mistral", "phi"])
async def test_padded_rounds_write_the_dynamic_text(arch: str, tiny_tok: Any) -> None:
    model = tiny_causal_lm(arch, len(tiny_tok))
    backend = await check(model, None, tiny_tok, StaticShapes(compile=False), block_size=4)
    assert backend.verifier.static is not None and backend.verifier.static.calls >= 10


async def test_a_captured_forward_writes_the_dynamic_text(tiny_tok: Any) -> None:
    """torch.compile's graph capture (the "eager" backend: capture without code generation),
    one graph per rows bucket."""
    model = tiny_causal_lm("llama", len(tiny_tok))
    backend = await check(model, None, tiny_tok, StaticShapes(backend="eager"), block_size=4)
    assert backend.verifier.static is not None and backend.verifier.static.calls >= 10


async def test_rounds_wider_than_the_width_run_dynamic_and_stay_exact(tiny_tok: Any) -> None:
    model = tiny_causal_lm("qwen2", len(tiny_tok))
    shapes = StaticShapes(width=3, compile=False)  # blocks 2, 3 and 4: only block 2 fits
    backend = await check(model, None, tiny_tok, shapes)
    static = backend.verifier.static
    assert static is not None and static.width == 3 and static.calls > 0


async def test_a_feature_reading_drafter_gets_the_same_features(tiny_tok: Any) -> None:
    model = tiny_causal_lm("qwen3", len(tiny_tok))
    drafter = tiny_dflash(model, tiny_tok.mask_token_id)
    backend = await check(model, drafter, tiny_tok, StaticShapes(compile=False), block_size=4)
    assert backend.verifier.static is not None and backend.verifier.static.calls > 0


def test_a_turn_taking_verifier_keeps_its_dynamic_forward(tiny_tok: Any) -> None:
    from test_architectures import build

    backend = LocalBackend(
        build("mamba", len(tiny_tok)), "ngram", tokenizer=tiny_tok, static_shapes=True
    )
    assert backend.verifier.static is None
    assert backend.verifier.turns_reason is not None


@given(st.integers(1, 4096))
def test_rows_round_up_to_a_power_of_two(rows: int) -> None:
    bucket = rows_bucket(rows)
    assert bucket >= rows and bucket < 2 * rows + 1 and bucket & (bucket - 1) == 0


@pytest.mark.parametrize("width", [0, -1, 2.5, "8"])
def test_a_bad_width_is_refused(width: Any) -> None:
    with pytest.raises(ValueError, match="width"):
        StaticShapes(width=width)


# -- on a GPU: CUDA graphs through torch.compile's reduce-overhead mode ---------------------

CUDA = os.environ.get("DG_STREAM_GPU_TEST_DEVICE", "cuda")


@pytest.mark.gpu
# Importing inductor touches torch's own deprecated TorchScript helpers.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.skipif(
    torch.device(CUDA).type == "cuda" and not torch.cuda.is_available(),
    reason="needs a CUDA device",
)
async def test_cuda_graphs_write_the_dynamic_text(tiny_tok: Any) -> None:
    model = tiny_causal_lm("llama", len(tiny_tok)).to(CUDA)
    backend = await check(model, None, tiny_tok, StaticShapes(), block_size=4, device=CUDA)
    assert backend.verifier.static is not None and backend.verifier.static.calls >= 10
