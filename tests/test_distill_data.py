"""Distillation data in shards and the resumable distillation run, on tiny models."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from _models import TEXT, tiny_causal_lm, tiny_masked_lm

from dg_stream.cli import main
from dg_stream.train._loop import TokenStream
from dg_stream.train.corpus import Corpus
from dg_stream.train.distil import DistilRunConfig, run_distillation
from dg_stream.train.distill_data import (
    ShardLayout,
    batched_greedy,
    generate_shards,
    load_shards,
    shard_path,
)
from dg_stream.train.drafter import greedy_continuations

LAYOUT = ShardLayout(rows=6, context_tokens=24, continuation_tokens=20, seed=3)


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return Corpus(train=(TEXT * 20,), held_out=(TEXT,), manifest={"source": "test"})


@pytest.fixture(scope="module")
def verifier_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tok: Any) -> Path:
    out = tmp_path_factory.mktemp("verifier")
    tiny_causal_lm("llama", len(tiny_tok)).save_pretrained(out)
    tiny_tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def drafter_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tok: Any) -> Path:
    """A tiny BERT drafter as the trainer writes one: window 16, blocks up to 8."""
    out = tmp_path_factory.mktemp("drafter")
    model = tiny_masked_lm(len(tiny_tok), tiny_tok.mask_token_id, positions=24)
    model.config.dg_stream_window = 16
    model.save_pretrained(out)
    tiny_tok.save_pretrained(out)
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2", "mistral"])
def test_batched_greedy_is_the_verifiers_greedy_continuation(arch: str) -> None:
    # Preallocated cache (llama, gpt2) and the fallback for sliding windows (mistral) alike.
    verifier = tiny_causal_lm(arch, 300)
    contexts = torch.randint(3, 300, (5, 17), generator=torch.Generator().manual_seed(0))
    reference = greedy_continuations(verifier, contexts, 12).ids
    assert torch.equal(batched_greedy(verifier, contexts, 12), reference)
    # Row by row, without a batch: the same text.
    for row in range(contexts.shape[0]):
        alone = batched_greedy(verifier, contexts[row : row + 1], 12)
        assert torch.equal(alone[0], reference[row])


def test_shards_are_compact_resumable_and_checked(tmp_path: Path, tiny_tok: Any) -> None:
    verifier = tiny_causal_lm("llama", len(tiny_tok))
    stream = TokenStream([TEXT * 20], tiny_tok, 0)
    report = generate_shards(verifier, stream, tmp_path, LAYOUT, 3, log=lambda _: None)
    assert report["shards"] == 3
    assert report["generated_tokens"] == 3 * LAYOUT.rows * LAYOUT.continuation_tokens
    from safetensors.torch import load_file

    stored = load_file(str(shard_path(tmp_path, 1)))["ids"]
    assert stored.dtype == torch.int16  # a 300-id vocabulary fits
    assert stored.shape == (LAYOUT.rows, LAYOUT.length)
    first = load_shards(tmp_path, 3, LAYOUT)
    assert first.dtype == torch.int64 and first.shape == (3 * LAYOUT.rows, LAYOUT.length)
    # Each row is its context continued greedily by the verifier.
    assert torch.equal(
        batched_greedy(verifier, first[:, : LAYOUT.context_tokens], LAYOUT.continuation_tokens),
        first,
    )
    # A stopped run resumes at the first missing shard, and makes it as the first run did.
    shard_path(tmp_path, 1).unlink()
    again = generate_shards(verifier, stream, tmp_path, LAYOUT, 3, log=lambda _: None)
    assert again["shards"] == 1
    assert torch.equal(load_shards(tmp_path, 3, LAYOUT), first)
    # A budget already spent makes nothing (and says so), but leaves what exists.
    spent = generate_shards(verifier, stream, tmp_path, LAYOUT, 4, stop_after=0.0)
    assert spent["shards"] == 0 and not shard_path(tmp_path, 3).exists()
    with pytest.raises(ValueError, match="layout"):
        load_shards(tmp_path, 3, ShardLayout(rows=6, context_tokens=24, continuation_tokens=20))
    with pytest.raises(FileNotFoundError):
        load_shards(tmp_path, 4, LAYOUT)


def _config(**changes: Any) -> DistilRunConfig:
    base = DistilRunConfig(
        layout=LAYOUT,
        shards=2,
        generation_dtype="float32",
        batch_size=4,
        steps=8,
        lr=1e-3,
        warmup=2,
        cpu_bf16=False,
        eval_prompts=0,
    )
    return dataclasses.replace(base, **changes)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    return dict(state["model"]) | {"optimizer step": torch.tensor(state["step"])}


def test_a_resumed_run_takes_the_steps_an_uninterrupted_one_takes(
    tmp_path: Path, corpus: Corpus, verifier_dir: Path, drafter_dir: Path
) -> None:
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    run_distillation(corpus, verifier_dir, drafter_dir, whole, _config(), prompts=[])
    first = run_distillation(
        corpus, verifier_dir, drafter_dir, halves, _config(stop_at=4), prompts=[]
    )
    assert first["training"]["steps"] == 4 and not first["training"]["finished"]
    second = run_distillation(corpus, verifier_dir, drafter_dir, halves, _config(), prompts=[])
    assert second["training"]["resumed_from"] == 4 and second["training"]["finished"]
    assert "data" not in second  # the shards were kept, not made again
    a, b = _weights(whole), _weights(halves)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # The drafter did train: its weights moved from the warm start.
    from transformers import AutoModelForMaskedLM

    start = AutoModelForMaskedLM.from_pretrained(drafter_dir).state_dict()
    assert any(not torch.equal(start[n], a[n]) for n in start if n in a)


def test_the_run_logs_a_learning_curve_and_exports_a_drafter(
    tmp_path: Path, corpus: Corpus, verifier_dir: Path, drafter_dir: Path, tiny_tok: Any
) -> None:
    out = tmp_path / "run"
    prompts = ["def add(a, b):\n"]
    config = _config(eval_tokens=8, stop_at=3)
    run_distillation(corpus, verifier_dir, drafter_dir, out, config, prompts=prompts)
    curve = json.loads((out / "curve.json").read_text())
    assert [p["step"] for p in curve["points"]] == [0, 3]  # the warm start, then the last
    point = curve["points"][-1]
    assert point["examples"] == 12 and point["block_size"] == 8
    assert 0 <= point["mean_accepted_per_call"] <= 8 and point["train_cpu_seconds"] >= 0
    # The export is a stock fp16 checkpoint the package loads.
    from transformers import AutoModelForMaskedLM

    exported = AutoModelForMaskedLM.from_pretrained(out / "drafter")
    assert next(exported.parameters()).dtype == torch.float16
    # Resuming drops nothing it measured up to its checkpoint and adds the new points.
    run_distillation(
        corpus, verifier_dir, drafter_dir, out, _config(eval_tokens=8), prompts=prompts
    )
    steps = [p["step"] for p in json.loads((out / "curve.json").read_text())["points"]]
    assert steps == [0, 3, 8]


def test_distil_command_refuses_another_layout_in_the_same_folder(
    tmp_path: Path, corpus: Corpus, verifier_dir: Path, drafter_dir: Path
) -> None:
    out = tmp_path / "run"
    run_distillation(corpus, verifier_dir, drafter_dir, out, _config(stop_at=1), prompts=[])
    other = ShardLayout(rows=6, context_tokens=30, continuation_tokens=20, seed=3)
    with pytest.raises(ValueError, match="layout"):
        run_distillation(corpus, verifier_dir, drafter_dir, out, _config(layout=other), prompts=[])


def test_distil_command_line(
    tmp_path: Path, verifier_dir: Path, drafter_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corpus_file = tmp_path / "code.py"
    corpus_file.write_text(TEXT * 20)
    code = main(
        [
            "train",
            "distil",
            *("--out", str(tmp_path / "run"), "--verifier", str(verifier_dir)),
            *("--init-from", str(drafter_dir), "--corpus", str(corpus_file)),
            *("--shards", "1", "--shard-rows", "4", "--context-tokens", "24"),
            *("--continuation-tokens", "16", "--batch-size", "4", "--steps", "3"),
            *("--eval-prompts", "0", "--threads", "1", "--fp32"),
            *("--soft-top-k", "4", "--soft-weight", "0.5"),
        ]
    )
    assert code == 0
    settings = json.loads((tmp_path / "run" / "settings.json").read_text())
    assert settings["layout"]["top_k"] == 4 and settings["soft_weight"] == 0.5
    out = capsys.readouterr().out
    summary = json.loads(out[out.index("{\n") :])  # the summary, after the progress lines
    assert summary["training"]["finished"] and summary["data"]["shards"] == 1
    assert (tmp_path / "run" / "checkpoint.pt").exists()


# -- the verifier's distribution as well as its choice ------------------------------------


def test_soft_targets_are_the_distribution_each_token_was_chosen_from() -> None:
    from dg_stream.train.distill_data import continue_greedily

    verifier = tiny_causal_lm("llama", 300)
    contexts = torch.randint(3, 300, (4, 17), generator=torch.Generator().manual_seed(0))
    ids, soft = continue_greedily(verifier, contexts, 10, top_k=5)
    assert soft is not None and soft.ids.shape == soft.probs.shape == (4, 10, 5)
    assert torch.equal(ids, batched_greedy(verifier, contexts, 10))  # the same text
    assert torch.equal(soft.ids[:, :, 0], ids[:, 17:])  # the chosen token is the likeliest
    with torch.no_grad():  # and the probabilities are the verifier's own
        full = verifier(input_ids=ids).logits[:, 16:-1].float().softmax(dim=-1)
    expected = full.gather(-1, soft.ids)
    torch.testing.assert_close(soft.probs.float(), expected, atol=2e-3, rtol=1e-2)
    assert bool((soft.probs[..., :-1] >= soft.probs[..., 1:]).all())


def test_shards_keep_soft_targets_and_earlier_shards_still_load(
    tmp_path: Path, tiny_tok: Any
) -> None:
    from safetensors.torch import load_file, save_file

    from dg_stream.train.distill_data import load_soft_targets

    verifier = tiny_causal_lm("llama", len(tiny_tok))
    stream = TokenStream([TEXT * 20], tiny_tok, 0)
    soft_layout = dataclasses.replace(LAYOUT, top_k=4)
    generate_shards(verifier, stream, tmp_path / "soft", soft_layout, 2, log=lambda _: None)
    soft = load_soft_targets(tmp_path / "soft", 2, soft_layout)
    assert soft is not None and soft.ids.shape == (12, 20, 4) and soft.ids.dtype == torch.long
    assert soft.probs.dtype == torch.float16 and bool((soft.probs.sum(-1) <= 1.01).all())
    ids = load_shards(tmp_path / "soft", 2, soft_layout)
    assert torch.equal(soft.ids[:, :, 0], ids[:, LAYOUT.context_tokens :])
    assert load_soft_targets(tmp_path / "soft", 2, LAYOUT) is None  # a layout without them
    # A shard written before top_k existed (its layout lacks the field) is read as top_k 0.
    generate_shards(verifier, stream, tmp_path / "old", LAYOUT, 1, log=lambda _: None)
    path = shard_path(tmp_path / "old", 0)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
    layout = json.loads(metadata["layout"])
    del layout["top_k"]
    metadata["layout"] = json.dumps(layout)
    save_file(load_file(str(path)), str(path), metadata=metadata)
    assert load_shards(tmp_path / "old", 1, LAYOUT).shape == (6, 44)
    with pytest.raises(ValueError, match="layout"):
        load_shards(tmp_path / "old", 1, soft_layout)


def test_a_run_on_soft_targets_trains_and_resumes_exactly(
    tmp_path: Path, corpus: Corpus, verifier_dir: Path, drafter_dir: Path
) -> None:
    layout = dataclasses.replace(LAYOUT, top_k=8)
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    config = _config(layout=layout, soft_weight=0.7)
    summary = run_distillation(corpus, verifier_dir, drafter_dir, whole, config, prompts=[])
    assert summary["training"]["finished"]
    run_distillation(
        corpus,
        verifier_dir,
        drafter_dir,
        halves,
        _config(layout=layout, soft_weight=0.7, stop_at=4),
        prompts=[],
    )
    run_distillation(corpus, verifier_dir, drafter_dir, halves, config, prompts=[])
    a, b = _weights(whole), _weights(halves)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    plain = run_distillation(
        corpus,
        verifier_dir,
        drafter_dir,
        tmp_path / "plain",
        _config(layout=layout, soft_weight=0.0),
        prompts=[],
    )
    assert plain["training"]["finished"]
    c = _weights(tmp_path / "plain")
    assert any(not torch.equal(a[n], c[n]) for n in a if n != "optimizer step")  # it counts
    with pytest.raises(ValueError, match="soft_weight"):
        _config(soft_weight=1.5)
