"""One registry of model kinds (``_model_kinds``): recognising a drafter checkpoint, building
its drafter and picking its trainer happen there, not in the backend or the train commands."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from _models import tiny_causal_lm, tiny_dflash, tiny_masked_lm

from dg_stream import _model_kinds
from dg_stream._drafters import CausalDrafter, DFlashDrafter, DiffusionDrafter, NgramDrafter
from dg_stream._drafters.dflash_model import save_dflash

SRC = Path(__file__).resolve().parents[1] / "src" / "dg_stream"


def test_each_saved_checkpoint_is_recognised(tiny_tok: Any, tmp_path: Path) -> None:
    verifier = tiny_causal_lm("llama", len(tiny_tok))
    verifier.save_pretrained(tmp_path / "causal")
    tiny_masked_lm(len(tiny_tok), tiny_tok.mask_token_id).save_pretrained(tmp_path / "bert")
    save_dflash(tiny_dflash(verifier, tiny_tok.mask_token_id), tmp_path / "dflash", 2)
    kinds = {name: _model_kinds.checkpoint_kind(tmp_path / name) for name in ("causal", "bert")}
    kinds["dflash"] = _model_kinds.checkpoint_kind(tmp_path / "dflash")
    assert kinds == {"causal": "causal", "bert": "diffusion", "dflash": "dflash"}


def test_the_backend_gets_each_kind_of_drafter_from_the_registry(tiny_tok: Any) -> None:
    from dg_stream import LocalBackend

    verifier = tiny_causal_lm("llama", len(tiny_tok))
    made = {
        "ngram": "ngram",
        "causal": tiny_causal_lm("llama", len(tiny_tok), seed=4),
        "diffusion": tiny_masked_lm(len(tiny_tok), tiny_tok.mask_token_id),
        "dflash": tiny_dflash(verifier, tiny_tok.mask_token_id),
    }
    expected = {
        "ngram": NgramDrafter,
        "causal": CausalDrafter,
        "diffusion": DiffusionDrafter,
        "dflash": DFlashDrafter,
    }
    assert set(made) == set(_model_kinds.KINDS)
    for kind, drafter in made.items():
        backend = LocalBackend(verifier, drafter, tokenizer=tiny_tok, max_batch=1)
        try:
            assert type(backend.drafter) is expected[kind], kind
        finally:
            backend.close()


def test_every_trainable_kind_has_a_trainer_and_the_command_offers_exactly_those() -> None:
    import argparse

    from dg_stream.train import commands
    from dg_stream.train.dflash import train_dflash
    from dg_stream.train.drafter import ARCHITECTURES

    assert _model_kinds.TRAINABLE == ARCHITECTURES == ("diffusion", "causal", "dflash")
    assert _model_kinds.trainer("dflash") is train_dflash
    for name in _model_kinds.TRAINABLE:
        assert callable(_model_kinds.trainer(name))
    with pytest.raises(ValueError, match="architecture must be one of"):
        _model_kinds.trainer("ngram")
    parser = argparse.ArgumentParser()
    commands.add_parser(parser.add_subparsers())
    args = parser.parse_args(["train", "drafter", "--architecture", "dflash"])
    assert args.architecture == "dflash"
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "drafter", "--architecture", "ngram"])


def _imported_names(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            names.add(node.module or "")
            names.update(alias.name for alias in node.names)
    return names


def test_no_other_module_decides_a_drafter_kind() -> None:
    """The backend and the trainers ask the registry; none loads or builds drafters itself."""
    deciders = {"is_dflash_checkpoint", "load_masked_lm", "load_dflash_drafter", "DiffusionDrafter"}
    for path in (SRC / "_backends" / "local.py", SRC / "train" / "drafter.py"):
        assert not _imported_names(path) & deciders, path
