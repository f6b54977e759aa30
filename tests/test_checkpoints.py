"""Training state loads with ``torch.load(weights_only=True)``: a checkpoint or a kept
distillation restores everything a resumed run needs, and a file that would run code on load
is refused."""

from __future__ import annotations

import dataclasses
import pickle
import random
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from dg_stream.train._loop import Checkpointer  # noqa: E402

RAN: list[str] = []


def _mark(text: str) -> None:
    RAN.append(text)


class _RunsCode:
    """Unpickling this calls ``_mark``: what a hostile checkpoint would do."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_mark, ("ran",))


def _trained() -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.Generator]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(5, 4)).square().sum().backward()
        optimizer.step()
    generator = torch.Generator().manual_seed(1)
    torch.randint(0, 10, (7,), generator=generator)
    return model, optimizer, generator


def test_a_checkpoint_restores_weights_optimizer_and_every_random_state(tmp_path: Path) -> None:
    model, optimizer, generator = _trained()
    random.seed(2)
    random.random()
    checkpoints = Checkpointer(tmp_path)
    checkpoints.save(3, model, optimizer, generator, {"seconds": 1.5, "phase": "train"})
    torch.load(checkpoints.path, weights_only=True)  # the file itself is weights-only

    expected_next = (
        torch.randint(0, 10**6, (4,), generator=generator),
        torch.rand(3),
        [random.random() for _ in range(3)],
    )
    expected_weights = {k: v.clone() for k, v in model.state_dict().items()}
    expected_moments = optimizer.state_dict()["state"]

    fresh, fresh_optimizer, fresh_generator = _trained()
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)
    fresh_optimizer.state.clear()
    restored = Checkpointer(tmp_path)
    assert restored.load(fresh, fresh_optimizer, fresh_generator) == 3
    assert restored.extra == {"seconds": 1.5, "phase": "train"}
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, expected_weights[name]), name
    moments = fresh_optimizer.state_dict()["state"]
    assert moments.keys() == expected_moments.keys()
    for key, state in moments.items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(expected_moments[key][name]))
    # The same draws as the uninterrupted run: data order, dropout and Python's random.
    assert torch.equal(torch.randint(0, 10**6, (4,), generator=fresh_generator), expected_next[0])
    assert torch.equal(torch.rand(3), expected_next[1])
    assert [random.random() for _ in range(3)] == expected_next[2]


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path: Path) -> None:
    model, optimizer, generator = _trained()
    checkpoints = Checkpointer(tmp_path)
    checkpoints.save(1, model, optimizer, generator)
    state = torch.load(checkpoints.path, weights_only=True)
    state["extra"] = {"payload": _RunsCode()}
    torch.save(state, checkpoints.path)
    RAN.clear()
    with pytest.raises(pickle.UnpicklingError):
        checkpoints.load(model, optimizer, generator)
    assert RAN == []


def test_kept_distillations_load_weights_only(tmp_path: Path) -> None:
    from dg_stream.train.drafter import (
        Distillation,
        DrafterTrainingConfig,
        load_distillation,
        save_distillation,
    )

    config = dataclasses.replace(DrafterTrainingConfig(), continuation_tokens=4)
    width = config.window + config.max_block
    ids = torch.arange(3 * width, dtype=torch.long).view(3, width)
    save_distillation(tmp_path / "d.pt", Distillation(ids, None), config)
    assert torch.equal(load_distillation(tmp_path / "d.pt", config).ids, ids)

    saved = torch.load(tmp_path / "d.pt", weights_only=True)
    saved["continuation_tokens"] = _RunsCode()
    torch.save(saved, tmp_path / "d.pt")
    RAN.clear()
    with pytest.raises(pickle.UnpicklingError):
        load_distillation(tmp_path / "d.pt", config)
    assert RAN == []
