"""The embedded default pair: ships with the package, loads offline, drafts well, stays exact."""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest

import dg_stream
from dg_stream import GenerationRequest, LocalBackend, SpeculativeConfig
from dg_stream._backends.local import default_model_dir
from dg_stream.train.corpus import stdlib_corpus
from dg_stream.train.evaluate import acceptance, held_out_prompts

# These 4 prompts measured 2.11 on 2026-11-26 (see MODEL_CARD.md); the floor leaves room for
# platform differences.
ACCEPTED_PER_CALL_FLOOR = 1.2


@pytest.fixture(scope="module")
def default() -> LocalBackend:
    return LocalBackend.default()


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    return held_out_prompts(stdlib_corpus(max_held_out_files=40).held_out, count=4)


def test_shipped_files_are_small_and_complete() -> None:
    root = default_model_dir()
    files = [p for p in root.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 80 * 2**20
    for part in ("verifier", "drafter"):
        names = {p.name for p in (root / part).iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert (root / "MODEL_CARD.md").exists()
    config = json.loads((root / "verifier" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]  # a stock class, no remote code


def test_default_backends(default: LocalBackend) -> None:
    assert type(default.drafter).__name__ == "DiffusionDrafter"
    assert default.drafter._lean is not None  # the lean forward reproduced the BERT forward
    # The block size recorded in the shipped drafter's config (the fastest on 2 CPU cores).
    assert default.defaults.block_size == default.drafter.recommended_block_size == 4
    assert LocalBackend.default(block_size=6).defaults.block_size == 6
    # Adaptive by default, where it cannot change a reproducible output.
    assert default.defaults.adaptive is True
    from dg_stream import SamplingParams

    def adaptive(**sampling: Any) -> bool:
        request = GenerationRequest(prompt="x = 1", sampling=SamplingParams(**sampling))
        return default.engine.session(request).adaptive

    assert adaptive() and adaptive(temperature=0.8)  # greedy; unseeded sampling
    assert not adaptive(temperature=0.8, seed=3)  # a seeded sample stays reproducible
    explicit = GenerationRequest(
        prompt="x = 1",
        sampling=SamplingParams(temperature=0.8, seed=3),
        speculative=SpeculativeConfig(adaptive=True),
    )
    assert default.engine.session(explicit).adaptive  # unless the request asks for it
    assert LocalBackend.default(drafter=None).drafter is None
    assert type(LocalBackend.default(drafter="ngram").drafter).__name__ == "NgramDrafter"


def _greedy(backend: LocalBackend, prompt: str, block_size: int = 8) -> tuple[list[int], Any]:
    request = GenerationRequest(
        prompt=prompt, max_new_tokens=48, speculative=SpeculativeConfig(block_size=block_size)
    )
    session = backend.engine.session(request)
    ids: list[int] = []
    while (chunk := session.step()) is not None:
        ids.extend(chunk.token_ids)
    return ids, session


def test_default_pair_is_lossless_and_accepts_well(
    default: LocalBackend, prompts: list[str]
) -> None:
    plain = LocalBackend.default(drafter=None)
    for prompt in prompts[:2]:
        assert _greedy(default, prompt)[0] == _greedy(plain, prompt)[0]
    result = acceptance(default, prompts, block_size=8, max_new_tokens=64)
    assert result["mean_accepted_per_call"] >= ACCEPTED_PER_CALL_FLOOR, result


def test_default_verifier_writes_python(default: LocalBackend) -> None:
    _, session = _greedy(default, "def fibonacci(n):")
    text = session.text
    assert "\n    " in text  # an indented body
    assert any(word in text for word in ("return", "if ", "def ", "for "))


def test_a_server_calls_the_embedded_pair_dg_stream_default(default: LocalBackend) -> None:
    from dg_stream.server.app import public_model_name

    assert public_model_name(default) == "dg-stream-default"


def test_constrained_greedy_with_the_drafter_is_constrained_plain_greedy(
    default: LocalBackend,
) -> None:
    """The embedded pair under a JSON schema: the drafter (and the tokens the grammar
    forces) change nothing of greedy output; the reply validates."""
    import jsonschema

    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "port": {"type": "integer"},
            "debug": {"type": "boolean"},
            "tags": {"type": "array", "items": {"enum": ["web", "db", "cache"]}, "maxItems": 3},
        },
        "required": ["name", "port", "debug", "tags"],
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "server", "schema": schema}}
    plain = LocalBackend.default(drafter=None)
    prompt = "# The server's settings, as JSON\nsettings = "

    async def main(backend: LocalBackend) -> Any:
        stream = dg_stream.generate(prompt, backend=backend, max_new_tokens=80, response_format=fmt)
        return await stream.collect()

    expected = anyio.run(main, plain)
    got = anyio.run(main, default)
    assert got.token_ids == expected.token_ids
    assert got.stats.forced_tokens > 0
    if got.finish_reason == "stop":
        jsonschema.validate(json.loads(got.text), schema)
