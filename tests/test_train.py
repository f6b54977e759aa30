"""Training end to end on tiny models: tokenizer, verifier, drafter (with resume), CLI."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from _models import TEXT, tiny_causal_lm

from dg_stream import LocalBackend, generate
from dg_stream.cli import main
from dg_stream.train import drafter as drafter_module
from dg_stream.train.corpus import file_corpus, stdlib_corpus
from dg_stream.train.drafter import Distillation, DrafterTrainingConfig, train_drafter

TINY = [
    "--hidden-size",
    "32",
    "--layers",
    "1",
    "--sequences",
    "64",
    "--batch-size",
    "8",
    "--window",
    "8",
    "--threads",
    "1",
]

TINY_CONFIG = DrafterTrainingConfig(
    hidden_size=32, layers=1, heads=2, intermediate_size=64, window=8, sequences=32, batch_size=8
)


def train_drafter_command(verifier: Path, corpus: Path, out: Path, *options: str) -> int:
    """``dg-stream train drafter`` on the tiny verifier and corpus, with tiny sizes."""
    return main(
        [
            "train",
            "drafter",
            *("--verifier", str(verifier), "--corpus", str(corpus), "--out", str(out)),
            *options,
            *TINY,
        ]
    )


def assert_writes_as_plain(backend: LocalBackend, verifier: Path) -> None:
    """A trained drafter changes the speed, never the text: greedy output as plain decoding."""
    import anyio

    plain = LocalBackend(str(verifier), None)

    async def both() -> tuple[str, str]:
        a = await generate("def add", backend=backend, max_new_tokens=20).collect()
        b = await generate("def add", backend=plain, max_new_tokens=20).collect()
        return a.text, b.text

    hybrid_text, plain_text = anyio.run(both)
    assert hybrid_text == plain_text


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "code.py"
    path.write_text(TEXT * 30)
    return path


@pytest.fixture(scope="module")
def verifier_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tok: Any) -> Path:
    out = tmp_path_factory.mktemp("verifier")
    tiny_causal_lm("llama", len(tiny_tok)).save_pretrained(out)
    tiny_tok.save_pretrained(out)
    return out


def test_stdlib_corpus_is_deterministic_and_holds_out_tests() -> None:
    a, b = stdlib_corpus(max_held_out_files=5), stdlib_corpus(max_held_out_files=5)
    assert a.manifest == b.manifest
    assert a.manifest["train_files"] > 100 and len(a.held_out) == 5
    assert not set(a.held_out) & set(a.train)


def test_train_drafter_command_end_to_end(
    tmp_path: Path, verifier_dir: Path, corpus_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "drafter"
    options = ("--steps", "6", "--eval-prompts", "2")
    code = train_drafter_command(verifier_dir, corpus_file, out, *options)
    assert code == 0
    assert (out / "model.safetensors").exists() and (out / "training_metrics.json").exists()
    assert not (out / "checkpoint.pt").exists()  # removed once training completed
    assert '"mean_accepted_per_call"' in capsys.readouterr().out
    backend = LocalBackend(str(verifier_dir), str(out))
    assert type(backend.drafter).__name__ == "DiffusionDrafter"
    assert backend.drafter.window == 8
    assert backend.defaults.block_size == 8  # no recommendation in its config: the default


def test_drafter_for_a_tokenizer_without_mask_token(
    tmp_path: Path, corpus_file: Path, tiny_tok: Any
) -> None:
    """The mask token is added (and said so); the pair still decodes losslessly."""
    from transformers import PreTrainedTokenizerFast

    plain = PreTrainedTokenizerFast(
        tokenizer_object=tiny_tok.backend_tokenizer, eos_token="<|endoftext|>", pad_token="<|pad|>"
    )
    assert plain.mask_token_id is None
    verifier = tmp_path / "verifier"
    tiny_causal_lm("gpt2", len(tiny_tok)).save_pretrained(verifier)
    plain.save_pretrained(verifier)
    messages: list[str] = []
    config = dataclasses.replace(TINY_CONFIG, steps=3)
    train_drafter(
        file_corpus([corpus_file]), verifier, tmp_path / "drafter", config, log=messages.append
    )
    assert any("no mask token" in m for m in messages)
    backend = LocalBackend(str(verifier), str(tmp_path / "drafter"))
    assert_writes_as_plain(backend, verifier)


def test_drafter_training_resumes(
    tmp_path: Path, verifier_dir: Path, corpus_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = dataclasses.replace(TINY_CONFIG, steps=4, checkpoint_every=2)
    out = tmp_path / "drafter"
    # First run "interrupted" after its last checkpoint: keep the checkpoint it would remove.
    monkeypatch.setattr(drafter_module.Checkpointer, "remove", lambda self: None)
    train_drafter(file_corpus([corpus_file]), verifier_dir, out, config)
    assert (out / "checkpoint.pt").exists()
    monkeypatch.undo()
    longer = dataclasses.replace(config, steps=6)
    metrics = train_drafter(file_corpus([corpus_file]), verifier_dir, out, longer)
    assert metrics["resumed_from_step"] == 4
    assert not (out / "checkpoint.pt").exists()


def test_train_tokenizer_and_verifier_commands(tmp_path: Path, corpus_file: Path) -> None:
    tok_dir, ver_dir = tmp_path / "tok", tmp_path / "ver"
    assert (
        main(
            [
                "train",
                "tokenizer",
                "--corpus",
                str(corpus_file),
                "--out",
                str(tok_dir),
                "--vocab-size",
                "300",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "train",
                "verifier",
                "--corpus",
                str(corpus_file),
                "--tokenizer",
                str(tok_dir),
                "--out",
                str(ver_dir),
                "--steps",
                "3",
                "--hidden-size",
                "32",
                "--layers",
                "1",
                "--batch-size",
                "2",
                "--seq-len",
                "32",
                "--threads",
                "1",
            ]
        )
        == 0
    )
    backend = LocalBackend(str(ver_dir), None)
    assert backend.tokenizer.mask_token == "<|mask|>"
    assert backend.tokenizer.chat_template
    # A chat reply ends at the end-of-turn token as well as at end of text.
    end_of_turn = backend.tokenizer.convert_tokens_to_ids("<|end|>")
    eos = backend.verifier.model.generation_config.eos_token_id
    assert eos == [backend.tokenizer.eos_token_id, end_of_turn]


def test_time_budget_ends_the_schedule_fully_decayed(tmp_path: Path) -> None:
    import time

    import torch

    from dg_stream.train._loop import Checkpointer, optimize

    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)

    def batch_loss() -> tuple[torch.Tensor, int]:
        time.sleep(0.01)
        return model(torch.ones(2, 4)).pow(2).mean(), 2

    started = time.perf_counter()
    steps = optimize(
        model,
        optimizer,
        start_step=0,
        steps=1_000_000,
        peak_lr=1.0,
        warmup=2,
        batch_loss=batch_loss,
        checkpoints=Checkpointer(tmp_path),
        generator=torch.Generator(),
        checkpoint_every=10_000,
        desc="budget",
        time_budget=0.5,
    )
    elapsed = time.perf_counter() - started
    assert 5 < steps < 1_000_000
    assert elapsed < 0.5 + 0.5  # ends at the budget (plus one step and a checkpoint)
    # The last step ran near the end of the cosine: close to the floor of a tenth of the peak.
    assert optimizer.param_groups[0]["lr"] < 0.2
    with pytest.raises(ValueError, match="time_budget"):
        optimize(
            model,
            optimizer,
            start_step=0,
            steps=5,
            peak_lr=1.0,
            warmup=1,
            batch_loss=batch_loss,
            checkpoints=Checkpointer(tmp_path / "x"),
            generator=torch.Generator(),
            checkpoint_every=10,
            desc="x",
            time_budget=0,
        )
    # The checkpoint records the time spent, so a resumed run continues the same schedule.
    checkpoints = Checkpointer(tmp_path)
    assert checkpoints.load(model, optimizer, torch.Generator()) == steps
    assert checkpoints.extra["seconds"] >= 0.5


def test_stdlib_corpus_from_another_lib_folder(tmp_path: Path) -> None:
    lib = tmp_path / "test" / "Lib"  # a folder named "test" above Lib holds no test files
    (lib / "test").mkdir(parents=True)
    (lib / "json.py").write_text("def dumps(obj):\n    return str(obj)\n")
    (lib / "test" / "test_json.py").write_text("def test_dumps():\n    assert True\n")
    corpus = stdlib_corpus(lib)
    assert corpus.manifest["train_files"] == 1 and corpus.manifest["held_out_files"] == 1
    assert str(lib) in str(corpus.manifest["python_version"])  # not this interpreter's version
    with pytest.raises(FileNotFoundError):
        stdlib_corpus(tmp_path / "missing")
    with pytest.raises(SystemExit, match="alternatives"):
        main(["train", "tokenizer", "--corpus", str(lib), "--stdlib", str(lib)])


def test_drafter_windows_longer_than_the_corpus_context_stay_inside_their_rows() -> None:
    """Each training window is a contiguous slice of one row (no wrap-around to its end)."""
    import torch

    config = dataclasses.replace(TINY_CONFIG, window=60, batch_size=64, max_block=8)
    assert config.context_length == 60 > config.context_tokens
    length = config.context_length + config.continuation_tokens
    data = torch.arange(16)[:, None] * 1000 + torch.arange(length)[None, :]  # rows increase by 1
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        batch = drafter_module._batch(Distillation(data), config, -1, generator)
        inputs, targets = batch.inputs, batch.targets
        window = inputs.shape[1] - targets.shape[1]
        steps = torch.diff(torch.cat([inputs[:, :window], targets], dim=1), dim=1)
        assert bool((steps == 1).all())  # contiguous context followed by its continuation
        assert bool((targets % 1000 >= config.context_length).all())  # verifier-written part


def test_kept_continuations_carry_their_layout(
    tmp_path: Path, verifier_dir: Path, corpus_file: Path
) -> None:
    """A second drafter reuses kept continuations; one that would read them differently stops."""
    import torch

    config = dataclasses.replace(TINY_CONFIG, steps=2, keep_data=True)
    out = tmp_path / "drafter"
    train_drafter(file_corpus([corpus_file]), verifier_dir, out, config)
    saved = torch.load(out / "distillation.pt")
    assert saved["continuation_tokens"] == config.continuation_tokens
    assert saved["ids"].shape == (config.sequences, config.context_length + 80)
    (out / "model.safetensors").unlink()  # a second model from the same continuations
    train_drafter(file_corpus([corpus_file]), verifier_dir, out, config)
    other = dataclasses.replace(config, continuation_tokens=40)
    with pytest.raises(ValueError, match="continuations of 80 tokens, not 40"):
        train_drafter(file_corpus([corpus_file]), verifier_dir, out, other)


@pytest.mark.parametrize("feature_window", [0, 3])
def test_feature_batches_line_up_with_their_tokens(tmp_path: Path, feature_window: int) -> None:
    """Each context token before the newest gets the features of its own position, also from
    continuations kept for a longer feature window."""
    import torch

    from dg_stream.train.drafter import load_distillation, save_distillation

    config = dataclasses.replace(
        TINY_CONFIG, window=8, batch_size=64, feature_layers=(1,), feature_window=feature_window
    )
    c = config.context_length
    length = c + config.continuation_tokens
    ids = torch.arange(16)[:, None] * length + torch.arange(length)[None, :]
    # Features hold the id of the position they belong to (float16 is exact up to 2048), kept
    # for the whole window (7 positions before the newest context token) and everything after.
    assert int(ids.max()) <= 2048
    stored = ids[:, c - 8 : length - 1].to(torch.float16)
    features = stored[:, :, None].expand(-1, -1, 3).contiguous()
    written = dataclasses.replace(config, feature_window=0)
    save_distillation(tmp_path / "d.pt", Distillation(ids, features), written)
    data = load_distillation(tmp_path / "d.pt", config)
    assert data.features is not None and data.features.shape[1] == config.feature_positions
    read = feature_window or 7
    generator = torch.Generator().manual_seed(0)
    for _ in range(30):
        batch = drafter_module._batch(data, config, -1, generator)
        assert batch.features is not None
        window = batch.inputs.shape[1] - batch.targets.shape[1]
        rows = min(window - 1, read)
        assert batch.features.shape == (64, rows, 3)
        context = batch.inputs[:, window - 1 - rows : window - 1].float()
        assert torch.equal(batch.features[:, :, 0], context)


def test_settings_that_would_fail_late_are_refused_early(
    tmp_path: Path, verifier_dir: Path, corpus_file: Path
) -> None:
    corpus = file_corpus([corpus_file])
    short = dataclasses.replace(TINY_CONFIG, continuation_tokens=8)  # blocks of up to 16
    with pytest.raises(ValueError, match="do not fit in continuations of 8"):
        train_drafter(corpus, verifier_dir, tmp_path, short)
    deep = dataclasses.replace(TINY_CONFIG, feature_layers=(1, 3))  # the verifier has 2
    with pytest.raises(ValueError, match=r"feature layers \[3\] do not exist"):
        train_drafter(corpus, verifier_dir, tmp_path, deep)
    assert not (tmp_path / "distillation.pt").exists()  # refused before any verifier work


def test_train_a_feature_conditioned_drafter_end_to_end(
    tmp_path: Path, verifier_dir: Path, corpus_file: Path
) -> None:
    out = tmp_path / "drafter"
    code = train_drafter_command(
        verifier_dir,
        corpus_file,
        out,
        *("--steps", "4", "--eval-prompts", "0", "--feature-layers", "0,2"),
        *("--continuation-tokens", "24", "--cpu-bf16"),
    )
    assert code == 0
    assert (out / "feature_projection.safetensors").exists()
    backend = LocalBackend(str(verifier_dir), str(out))
    assert backend.drafter.feature_layers == (0, 2)
    assert backend.drafter.feature_size == 2 * 32
    assert_writes_as_plain(backend, verifier_dir)


def test_kept_features_must_be_of_the_same_layers(
    tmp_path: Path, verifier_dir: Path, corpus_file: Path
) -> None:
    config = dataclasses.replace(
        TINY_CONFIG, steps=2, keep_data=True, feature_layers=(2,), continuation_tokens=16
    )
    out = tmp_path / "drafter"
    train_drafter(file_corpus([corpus_file]), verifier_dir, out, config)
    other = dataclasses.replace(config, feature_layers=(1, 2))
    with pytest.raises(ValueError, match=r"features of verifier layers \[2\], not \[1, 2\]"):
        train_drafter(file_corpus([corpus_file]), verifier_dir, out, other)


def test_a_token_drafter_learns_to_read_features(
    tmp_path: Path, verifier_dir: Path, corpus_file: Path
) -> None:
    """--init-from keeps the drafter's window and block size and starts from its weights."""
    import torch
    from transformers import AutoModelForMaskedLM

    from dg_stream.train.drafter import FeatureConditionedMLM

    corpus = file_corpus([corpus_file])
    tokens = tmp_path / "tokens"
    base = dataclasses.replace(TINY_CONFIG, steps=2, window=6, max_block=5)
    train_drafter(corpus, verifier_dir, tokens, base)
    start = AutoModelForMaskedLM.from_pretrained(tokens).float().eval()
    # The projection starts at zero: the warm-started drafter predicts as before.
    wrapped = FeatureConditionedMLM(start, 64).eval()
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        plain = start.bert(input_ids=ids).last_hidden_state
        conditioned = wrapped.hidden(ids, torch.randn(2, 3, 64), context=5)
    torch.testing.assert_close(conditioned, plain)
    config = dataclasses.replace(
        TINY_CONFIG,
        steps=2,
        init_from=str(tokens),
        feature_layers=(1, 2),
        feature_window=4,
        continuation_tokens=16,
    )
    out = tmp_path / "features"
    train_drafter(corpus, verifier_dir, out, config)
    saved = json.loads((out / "config.json").read_text())
    assert saved["dg_stream_window"] == 6 and saved["max_position_embeddings"] == 11
    assert saved["dg_stream_feature_layers"] == [1, 2]
    assert saved["dg_stream_feature_window"] == 4
    backend = LocalBackend(str(verifier_dir), str(out))
    assert backend.drafter.feature_window == 4 and backend.drafter.window == 6
    # A warm start keeps a projection only for the same verifier layers.
    from dg_stream._loading import load_feature_projection

    trained = load_feature_projection(out).float()
    again = FeatureConditionedMLM(AutoModelForMaskedLM.from_pretrained(out), 64)
    again.load_projection(out, (1, 2))
    assert torch.equal(again.projection.weight.data, trained)
    other = FeatureConditionedMLM(AutoModelForMaskedLM.from_pretrained(out), 64)
    other.load_projection(out, (0, 2))
    assert not other.projection.weight.data.any()
    # A token-only drafter started from a feature drafter reads no features.
    plain = tmp_path / "plain"
    train_drafter(corpus, verifier_dir, plain, dataclasses.replace(base, init_from=str(out)))
    assert "dg_stream_feature_layers" not in json.loads((plain / "config.json").read_text())
    assert LocalBackend(str(verifier_dir), str(plain)).drafter.feature_layers == ()


def test_feature_layers_are_for_diffusion_drafters(
    tmp_path: Path, verifier_dir: Path, corpus_file: Path
) -> None:
    config = dataclasses.replace(TINY_CONFIG, architecture="causal", feature_layers=(1,))
    with pytest.raises(ValueError, match="for diffusion drafters only"):
        train_drafter(file_corpus([corpus_file]), verifier_dir, tmp_path, config)


@pytest.mark.parametrize("bad", ["", "a,b", "1,-2"])
def test_feature_layers_flag_rejects_bad_lists(
    bad: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", "drafter", "--feature-layers", bad]) == 2
    assert "--feature-layers: expected" in capsys.readouterr().err


def test_gpu_training_script_runs_end_to_end_on_a_cpu(tmp_path: Path) -> None:
    """SMOKE=1 shrinks every phase: the script that spends scarce GPU minutes must not fail."""
    import os
    import subprocess
    import sys

    script = Path(__file__).parents[1] / "scripts" / "train_default_pair_gpu.sh"
    env = {**os.environ, "SMOKE": "1", "FEATURES": "1,2", "PYTHON": sys.executable}
    subprocess.run(
        ["bash", str(script), str(tmp_path)], env=env, check=True, timeout=900, capture_output=True
    )
    for part in ("verifier", "drafter", "assistant", "dflash"):
        assert list((tmp_path / "packed").glob(f"{part}.tar.part-*")), part
    dflash = json.loads((tmp_path / "dflash" / "config.json").read_text())
    assert dflash["architectures"] == ["DFlashDraftModel"] and dflash["block_size"] == 6
    drafter = json.loads((tmp_path / "drafter" / "config.json").read_text())
    assert drafter["dg_stream_feature_layers"] == [1, 2]
    assert (tmp_path / "drafter" / "feature_projection.safetensors").exists()
    # The causal assistant learnt from the same continuations, without their features.
    assert (tmp_path / "assistant" / "model.safetensors").exists()


def test_train_a_dflash_drafter_end_to_end(
    tmp_path: Path, verifier_dir: Path, corpus_file: Path
) -> None:
    """The published layout comes out, loads as a DFlash drafter and stays lossless."""
    out = tmp_path / "dflash"
    options = (
        *("--architecture", "dflash", "--layers", "1", "--block-size", "6"),
        *("--context-tokens", "8", "--continuation-tokens", "16", "--blocks-per-row", "3"),
        *("--eval-prompts", "0", "--keep-data", "--cpu-bf16"),
    )
    assert train_drafter_command(verifier_dir, corpus_file, out, "--steps", "4", *options) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["DFlashDraftModel"]
    assert config["block_size"] == 6 and config["dflash_config"]["block_size"] == 6
    # A 2-layer verifier: layer outputs 1..2 are hidden-state indices, ids 0..1 in the file.
    assert all(0 <= i < 2 for i in config["dflash_config"]["target_layer_ids"])
    metrics = json.loads((out / "training_metrics.json").read_text())
    assert metrics["architecture"] == "dflash" and metrics["steps"] == 4
    backend = LocalBackend(str(verifier_dir), str(out))
    assert type(backend.drafter).__name__ == "DFlashDrafter"
    assert backend.defaults.block_size == 5
    assert_writes_as_plain(backend, verifier_dir)
    # Kept continuations hold raw features: a token drafter must not read them as its own.
    layers = tuple(i + 1 for i in config["dflash_config"]["target_layer_ids"])
    token_drafter = dataclasses.replace(
        TINY_CONFIG, feature_layers=layers, context_tokens=8, continuation_tokens=16, max_block=5
    )
    with pytest.raises(ValueError, match="another drafter architecture"):
        train_drafter(file_corpus([corpus_file]), verifier_dir, out, token_drafter)


def test_dflash_batches_target_the_verifiers_tokens() -> None:
    """Anchors lie where every drafted slot is verifier-written, distinct within a row."""
    from dg_stream.train.dflash import dflash_batch, slot_weights
    from dg_stream.train.drafter import Distillation

    ids = torch.arange(40).repeat(5, 1)  # context 10, continuation 30
    data = Distillation(ids, torch.zeros(5, 39, 4))
    batch = dflash_batch(data, 7, 6, 5, 30, torch.Generator().manual_seed(0))
    assert batch.anchors.shape == (7, 6)
    assert int(batch.anchors.min()) >= 9 and int(batch.anchors.max()) <= 35
    assert all(len(set(row.tolist())) == 6 for row in batch.anchors)
    assert torch.equal(batch.targets(), batch.slots()[:, :, 1:])  # ids equal positions here
    w = slot_weights(15, 7.0)
    assert abs(float(w.sum()) - 1.0) < 1e-6 and bool((w[1:] < w[:-1]).all())
