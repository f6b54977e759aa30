"""The structured-output benchmark (``dg-stream bench structured``) at a tiny scale.

Tiny random-init models and tokenizers (the verifier's 300 tokens and a 400-token BPE trained
on a few kB): no timing assertions, only the bookkeeping — the JSON document's fields, the
table, the plot, the greedy identity of hybrid and plain decoding under the same constraint —
and the pieces a full run leans on (the document walk, the options, the thin entry point).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from _saved_models import save_tiny_pair

from dg_stream.bench import _cli, _structured, _structured_report, main

ROOT = Path(__file__).resolve().parent.parent
SHIM = ROOT / "benchmarks" / "structured.py"
PNG = b"\x89PNG\r\n\x1a\n"


def _script() -> ModuleType:
    """benchmarks/structured.py, loaded from its file (plain ``pytest`` does not put the
    checkout on the import path)."""
    name = "_bench_structured"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SHIM)
        assert spec is not None and spec.loader is not None
        sys.modules[name] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules[name]


shim = _script()


@pytest.fixture(scope="module")
def tiny_files(
    tmp_path_factory: pytest.TempPathFactory, tiny_tok: Any, tiny_verifier: Any, tiny_drafter: Any
) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("structured-models")
    verifier, drafter = save_tiny_pair(root, tiny_tok, tiny_verifier, tiny_drafter)
    return {"verifier": verifier, "drafter": drafter, "cache": root / "cache"}


def test_tiny_run_writes_json_png_and_table(
    tiny_files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "--verifier", str(tiny_files["verifier"]),
        "--drafter", str(tiny_files["drafter"]),
        "--vocabs", "verifier,400",
        "--corpus-mb", "0.02",
        "--cache", str(tiny_files["cache"]),
        "--mask-repeats", "1",
        "--mask-threads", "1",
        "--no-xgrammar",
        "--tasks", "2",
        "--new-tokens", "6",
        "--repeats", "1",
        "--threads", "1",
        "--out", str(tmp_path),
        "--name", "tiny",
    ]  # fmt: skip
    assert shim.main(argv) == 0
    out = capsys.readouterr().out
    assert "**Part 1: the mask per token**" in out and "**Part 2: speed**" in out
    assert "| method | tokens/s | × constrained plain |" in out
    assert (tmp_path / "tiny-cpu.png").read_bytes().startswith(PNG)
    doc = json.loads((tmp_path / "tiny-cpu.json").read_text())
    assert {"name", "machine", "settings", "tasks", "mask", "speed", "wall_seconds"} <= set(doc)
    assert list(doc["tasks"]) == ["server-config", "user-record"]

    mask = doc["mask"]
    assert mask["xgrammar_unavailable"] == "--no-xgrammar" and _structured.XGR not in mask["ways"]
    assert [v["vocab_size"] for v in mask["vocabularies"]] == [300, 400]
    bpe = mask["vocabularies"][1]["tokenizer"]
    assert bpe["requested"] == 400 and bpe["size"] == 400 and bpe["cached"] is False
    for vocab in mask["vocabularies"]:
        assert vocab["threads"] == 1
        assert set(vocab["ways"]) == set(mask["ways"])
        for task in vocab["tasks"]:
            assert task["positions"] == task["document_tokens"] + 1
            for way in vocab["ways"]:
                assert task["ways"][way]["samples"] == task["positions"]
                assert task["ways"][way]["median_us"] > 0

    speed = doc["speed"]
    assert speed["settings"]["new_tokens"] == 6 and speed["settings"]["greedy"] is True
    rows = {row["method"]: row for row in speed["results"]}
    assert set(rows) == {m.name for m in _structured.SPEED_METHODS}
    for name, row in rows.items():
        assert row["generations"] == 2 and row["tokens_per_second"] > 0
        for key in ("vs_constrained_plain", "vs_unconstrained_plain", "accepted_per_call"):
            assert row[key] is not None
        assert row["forced_per_call"] is not None
        if name in _structured.REFERENCE:  # greedy is lossless, under a constraint too
            assert row["identical"] == row["generations"], name
        assert row["violations"] == 0
    assert rows[_structured.CONSTRAINED_PLAIN]["vs_constrained_plain"] == pytest.approx(1.0)
    assert len(speed["runs"]) == 2 * len(rows)

    # A second run reads the trained tokenizer from the cache.
    assert shim.main([*argv[:-4], "--parts", "mask", "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "structured-cpu.json").read_text())
    assert again["speed"] is None
    assert again["mask"]["vocabularies"][1]["tokenizer"]["cached"] is True
    assert "**Part 2: speed**" not in capsys.readouterr().out


class _Retokenizing:
    """An llguidance tokenizer whose own tokenization the grammar never takes."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def tokenize_str(self, text: str) -> list[int]:
        return []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_the_document_walk_falls_back_to_the_longest_allowed_tokens(tiny_tok: Any) -> None:
    from dg_stream._config import response_format_from
    from dg_stream._constraints import ConstraintFactory

    factory = ConstraintFactory(tiny_tok, len(tiny_tok))
    ll_tokenizer = factory.tokenizer()
    for task in _structured.TASKS:
        constraint = factory.constraint(response_format_from(task.response_format))  # type: ignore[arg-type]
        direct = _structured.walk_document(constraint, ll_tokenizer, task.document_text)
        longest = _structured.walk_document(
            constraint, _Retokenizing(ll_tokenizer), task.document_text
        )
        for tokens in (direct, longest):
            assert bytes(ll_tokenizer.decode_bytes(tokens)).decode() == task.document_text
            assert constraint.matcher.consume_tokens(tokens) and constraint.matcher.is_accepting()
            constraint.matcher.reset()
        assert json.loads(task.document_text) == task.document


def test_every_document_fits_its_schema() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    for task in _structured.TASKS:
        jsonschema.validate(task.document, task.schema)
        assert task.prompt and task.response_format["json_schema"]["schema"] is task.schema


def test_options(capsys: pytest.CaptureFixture[str]) -> None:
    parser = _cli.structured_parser()
    quick = _cli.structured_settings(parser.parse_args(["--quick"]))
    assert quick.vocabs == ("verifier", 32000) and quick.repeats == 1
    assert quick.out.parent == _structured.RUNS_DIR and quick.name == "structured-quick"
    full = _cli.structured_settings(parser.parse_args(["--vocabs", "verifier,150k"]))
    assert full.vocabs == ("verifier", 150000) and full.mask_threads == (1, 2)
    assert full.out == _structured.RESULTS_DIR and full.name == "structured"
    assert full.parts == ("mask", "speed") and full.block8 and full.new_tokens == 128
    for bad in (["--vocabs", "12"], ["--parts", "mask,sped"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
    assert "error" in capsys.readouterr().err


def test_the_script_is_a_thin_entry_point_and_the_harness_reaches_the_mode(
    capsys: pytest.CaptureFixture[str],
) -> None:
    text = SHIM.read_text(encoding="utf-8")
    assert len(text.splitlines()) < 60
    defined = [
        node.name
        for node in ast.walk(ast.parse(text))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
    ]
    assert defined == ["main"]
    assert shim.run_structured is _structured.run_structured
    assert shim.structured_main is _cli.structured_main
    assert shim.markdown is _structured_report.markdown
    with pytest.raises(SystemExit) as exit_:
        main(["structured", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: dg-stream bench structured") and "--vocabs" in out
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "dg-stream bench structured" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        shim.main(["--help"])
    assert capsys.readouterr().out.startswith("usage: python -m benchmarks.structured")
