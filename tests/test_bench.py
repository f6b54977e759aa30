"""The benchmark harness end to end on tiny models: files written, ours identical to baseline.

No timing assertions: tiny random models on a shared machine say nothing about speed. What
must hold is the harness's bookkeeping and the losslessness of every dg_stream method.
"""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from _models import tiny_causal_lm, tiny_dflash
from _saved_models import save_tiny_pair

from dg_stream._drafters.dflash_model import save_dflash
from dg_stream.bench import main
from dg_stream.bench._prompts import load_prompts, make_prompts
from dg_stream.train.corpus import _is_test_file

ROOT = Path(__file__).resolve().parent.parent
PNG = b"\x89PNG\r\n\x1a\n"
PROMPTS = [
    "def add(a, b):\n    return",
    "class Stack:\n    def push(self, x):\n",
    "print('héllo wörld')\ndef",
]


@pytest.fixture(scope="module")
def tiny_models(
    tmp_path_factory: pytest.TempPathFactory, tiny_tok: Any, tiny_verifier: Any, tiny_drafter: Any
) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bench-models")
    verifier, drafter = save_tiny_pair(root, tiny_tok, tiny_verifier, tiny_drafter)
    save_dflash(tiny_dflash(tiny_verifier, tiny_tok.mask_token_id), root / "dflash", 2)
    assistant = root / "assistant"
    tiny_causal_lm("llama", len(tiny_tok), seed=7).save_pretrained(assistant)
    tiny_tok.save_pretrained(assistant)
    prompts = root / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"id": f"p{i}", "kind": "short" if i % 2 else "long", "text": t}) + "\n"
            for i, t in enumerate(PROMPTS)
        )
    )
    return {
        "verifier": verifier,
        "drafter": drafter,
        "dflash": root / "dflash",
        "assistant": assistant,
        "prompts": prompts,
    }


def _args(models: dict[str, Path], out: Path) -> list[str]:
    return [
        "--verifier", str(models["verifier"]),
        "--drafter", str(models["drafter"]),
        "--dflash", str(models["dflash"]),
        "--assistant", str(models["assistant"]),
        "--prompts", str(models["prompts"]),
        "--out", str(out),
        "--num-prompts", "3",
        "--max-new-tokens", "12",
        "--threads", "1",
        "--profile-repeats", "1",
    ]  # fmt: skip


def test_quick_bench_writes_json_plots_and_table(
    tiny_models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "--quick",
        *_args(tiny_models, tmp_path),
        "--repeats", "2",
        "--block-sizes", "2,4",
        "--steps", "1,2",  # the quick preset drafts in one step; keep the second covered
    ]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| method | tokens/s | speed-up |" in out and "**profile**" in out

    result = json.loads((tmp_path / "quick-cpu.json").read_text())
    for plot in ("quick-cpu-speedup.png", "quick-cpu-blocks.png"):
        assert (tmp_path / plot).read_bytes().startswith(PNG)
    assert result["machine"]["torch"] and result["machine"]["cpu"]
    assert result["config"]["num_prompts"] == 3 and result["config"]["threads"] == 1

    greedy = {row["method"]: row for row in result["results"]["greedy"]}
    families = {row["family"] for row in greedy.values()}
    assert families == {"baseline", "hybrid", "dflash", "ngram", "causal", "transformers"}
    dflash = sorted(r["method"] for r in greedy.values() if r["family"] == "dflash")
    assert dflash == [
        "dg_stream dflash k=2",
        "dg_stream dflash k=4",
        "dg_stream dflash k=8 adaptive",
    ]
    # The grid: block sizes 2 and 4 at 1 and 2 steps, plus the adaptive setting.
    hybrids = sorted(
        (r["block_size"], r["steps"])
        for r in greedy.values()
        if r["family"] == "hybrid" and r["method"] != "dg_stream default"
    )
    assert hybrids == [(2, 1), (2, 2), (4, 1), (4, 2), (8, 1)]
    # The headline: generate() with the backend's default options, through the stream.
    assert greedy["dg_stream default"]["identical"] == greedy["dg_stream default"]["generations"]
    assert result["headline"]["greedy_speedup"] == greedy["dg_stream default"]["speedup"]
    assert "transformers assisted (default)" in greedy
    assert "transformers prompt lookup" in greedy
    for row in greedy.values():
        assert row["generations"] == 3 * 2  # every prompt in every repeat
        assert row["tokens_per_second"] > 0 and row["speedup_runs"]
        assert row["peak_rss_mib"] > 0
        if row["family"] != "transformers":  # ours must be lossless, token for token
            assert row["identical"] == row["generations"], row["method"]
    assert greedy["dg_stream plain"]["speedup"] == pytest.approx(1.0)
    # The same greedy decoding in transformers gives the same tokens on these models.
    assert greedy["transformers generate"]["identical"] == 6
    for row in greedy.values():  # each verifier call commits its accepted drafts + 1 token
        if row["family"] != "baseline" and row["block_size"]:
            assert 0 <= row["mean_accepted_per_call"] <= row["block_size"] * 4
        assert row["tokens_per_call"] >= 1.0 - 1e-9
    assert greedy["dg_stream plain"]["mean_accepted_per_call"] == 0

    sampled = {row["method"] for row in result["results"]["sampling"]}
    assert "dg_stream plain" in sampled and result["best_hybrid"] in sampled
    # Every raw figure is kept: one record per method, prompt, repeat and mode.
    n_records = len(result["records"])
    assert n_records == (len(greedy) + len(sampled)) * 3 * 2

    profile = result["profile"]
    assert sum(profile["shares"].values()) == pytest.approx(1.0, abs=1e-6)
    assert profile["seconds"]["verification"] > 0 and profile["seconds"]["drafting"] > 0
    assert isinstance(profile["async_overhead_met"], bool)
    targets = {t["target"] for t in result["targets"]}
    assert any("3×" in t for t in targets) and any("async" in t for t in targets)


def test_gpu_script_runs_on_the_cpu(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    if shutil.which("bash") is None or shutil.which("timeout") is None:
        pytest.skip("needs bash and coreutils timeout")
    argv = [
        *_args(tiny_models, tmp_path),
        "--device", "cpu",
        "--repeats", "1",
        "--block-sizes", "4",
        "--steps", "1",
        "--temperature", "0",
        "--no-plots",
    ]  # fmt: skip
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh"), "compare", *argv],
        env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "gpu-cpu.json").read_text())
    assert result["config"]["dtype"] == "torch.float32"  # bf16 is for CUDA only
    assert list(result["results"]) == ["greedy"]
    rows = result["results"]["greedy"]
    assert all(r["identical"] == r["generations"] for r in rows if r["family"] != "transformers")


def test_no_assistant_is_a_note_not_a_failure(
    tiny_models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    models = {**tiny_models, "assistant": tmp_path / "missing"}
    argv = [
        *_args(models, tmp_path),
        "--repeats",
        "1",
        "--block-sizes",
        "4",
        "--steps",
        "1",
        "--temperature",
        "0",
        "--no-plots",
        "--no-profile",
        "--no-adaptive",
        "--name",
        "x",
    ]
    assert main(argv) == 0
    result = json.loads((tmp_path / "x-cpu.json").read_text())
    names = [r["method"] for r in result["results"]["greedy"]]
    assert not any("assisted" in n for n in names) and "transformers prompt lookup" in names
    assert "no assistant checkpoint" in capsys.readouterr().out


def test_shipped_prompts_are_held_out_text() -> None:
    prompts = load_prompts(ROOT / "benchmarks" / "prompts" / "prompts.jsonl")
    assert len(prompts) >= 32 and len({p.id for p in prompts}) == len(prompts)
    assert {p.kind for p in prompts} == {"short", "long"}
    for prompt in prompts:  # from the test suites the default models never trained on
        assert _is_test_file(Path(prompt.source)), prompt.source
    long = [len(p.text) for p in prompts if p.kind == "long"]
    short = [len(p.text) for p in prompts if p.kind == "short"]
    assert min(long) > 4 * max(short)
    fresh = make_prompts(per_kind=2)
    assert len(fresh) == 4 and all(_is_test_file(Path(p.source)) for p in fresh)


def test_causal_assistant_distils_from_the_same_continuations(
    tmp_path: Path, tiny_tok: Any, tiny_verifier: Any
) -> None:
    import torch
    from _models import TEXT

    from dg_stream import LocalBackend
    from dg_stream.train.corpus import Corpus
    from dg_stream.train.drafter import DrafterTrainingConfig, causal_batch_rows, train_drafter

    verifier_dir = tmp_path / "verifier"
    tiny_verifier.save_pretrained(verifier_dir)
    tiny_tok.save_pretrained(verifier_dir)
    corpus = Corpus(train=(TEXT * 20,), held_out=(TEXT,), manifest={"source": "test"})
    config = DrafterTrainingConfig(
        architecture="causal", hidden_size=32, layers=1, heads=2, intermediate_size=64,
        window=8, sequences=16, generation_batch=16, batch_size=8, steps=4,
        context_tokens=8, continuation_tokens=8,
    )  # fmt: skip
    out = tmp_path / "assistant"
    metrics = train_drafter(corpus, verifier_dir, out, config, device="cpu", log=lambda _m: None)
    assert metrics["architecture"] == "causal"
    assert causal_batch_rows(config, 16) >= 1
    from transformers import AutoModelForCausalLM

    assistant = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(assistant).__name__ == "LlamaForCausalLM"
    assert assistant.config.vocab_size == tiny_verifier.config.vocab_size
    assert assistant.config.hidden_size == 32 and assistant.config.num_hidden_layers == 1
    # Usable both by dg_stream (as a causal drafter) and by transformers as an assistant.
    backend = LocalBackend(str(verifier_dir), str(out), device="cpu")
    assert type(backend.drafter).__name__ == "CausalDrafter"
    ids = torch.tensor([[5, 6, 7]])
    with torch.inference_mode():
        plain = tiny_verifier.generate(ids, max_new_tokens=6, do_sample=False)
        assisted = tiny_verifier.generate(
            ids, max_new_tokens=6, do_sample=False, assistant_model=assistant
        )
    assert plain.tolist() == assisted.tolist()
    with pytest.raises(ValueError, match="architecture"):
        train_drafter(
            corpus, verifier_dir, tmp_path / "x", DrafterTrainingConfig(architecture="rnn")
        )


def test_runs_write_a_fresh_folder_and_report_the_repeats_that_ran(
    tiny_models: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from dg_stream.bench._report import speedup_figure

    monkeypatch.chdir(tmp_path)  # as from a checkout: benchmarks/results is right here
    kept = tmp_path / "benchmarks" / "results" / "quick-cpu.json"
    kept.parent.mkdir(parents=True)
    kept.write_text("{}")
    argv = [
        "--quick",
        *_args(tiny_models, tmp_path)[:10],  # models and prompts, no --out
        "--num-prompts", "2",
        "--max-new-tokens", "6",
        "--threads", "1",
        "--repeats", "2",
        "--max-seconds", "0.001",  # the budget is spent after one repeat of each phase
        "--block-sizes", "2",
        "--no-adaptive",
        "--no-profile",
        "--no-transformers",
    ]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert kept.read_text() == "{}"  # the results kept in the repository are left alone
    (run,) = (tmp_path / "runs" / "bench").iterdir()
    assert f"files: {Path('runs/bench') / run.name / 'quick-cpu.json'}" in out
    result = json.loads((run / "quick-cpu.json").read_text())
    assert result["config"]["repeats_run"] == {"greedy": 1, "sampling": 1}
    assert "greedy 1 of 2 repeats, sampling 1 of 2 (time budget; medians)" in out
    assert "2 repeats (medians)" not in out

    # The speed-up plot: its legend beside the bars, every bar label inside the figure.
    fig = speedup_figure(result)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    (ax,) = fig.axes
    legend = ax.get_legend().get_window_extent(renderer)
    assert not legend.overlaps(ax.get_window_extent(renderer))
    labels = [t for t in ax.texts if t.get_text().endswith("×")]
    assert labels
    for label in labels:
        box = label.get_window_extent(renderer)
        assert not box.overlaps(legend)
        assert ax.get_window_extent(renderer).contains(box.x1 - 1, box.y0 + 1), label.get_text()


def test_the_blocks_plot_labels_methods_of_equal_speedup_apart() -> None:
    """Two methods at 1.07× (as in a quick run: ngram k=8 and transformers prompt lookup) and
    a third close by: each name readable, none on another, all inside the axes."""
    from dg_stream.bench._report import blocks_figure

    def hybrid(k: int, speedup: float) -> dict[str, Any]:
        return {
            "method": f"dg_stream k={k}",
            "family": "hybrid",
            "adaptive": False,
            "steps": 1,
            "block_size": k,
            "mean_accepted_per_call": k / 3,
            "speedup": speedup,
        }

    def line(method: str, family: str, speedup: float) -> dict[str, Any]:
        return {"method": method, "family": family, "adaptive": False, "speedup": speedup}

    greedy = [
        hybrid(4, 1.21),
        hybrid(8, 1.30),
        line("dg_stream ngram k=8", "ngram", 1.07),
        line("transformers prompt lookup", "transformers", 1.07),
        line("transformers assisted (causal)", "transformers", 1.08),
        line("dg_stream causal assistant", "causal", 1.45),
        line("transformers generate", "transformers", 1.0),
    ]
    fig = blocks_figure({"name": "quick", "results": {"greedy": greedy}})
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    right = fig.axes[1]
    labels = [t for t in right.texts if t.get_text()]
    assert sorted(t.get_text() for t in labels) == sorted(
        r["method"] for r in greedy if r["family"] != "hybrid" and "generate" not in r["method"]
    )
    boxes = [t.get_window_extent(renderer) for t in labels]
    for (a, box_a), (b, box_b) in itertools.combinations(zip(labels, boxes, strict=True), 2):
        assert not box_a.overlaps(box_b), (a.get_text(), b.get_text())
    area = right.get_window_extent(renderer)
    for label, box in zip(labels, boxes, strict=True):
        assert area.contains(box.x0 + 1, box.y1 - 1), label.get_text()
    import matplotlib.pyplot as plt

    plt.close(fig)
