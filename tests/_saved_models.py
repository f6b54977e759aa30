"""Tiny models saved as checkpoints, for tests that load models by path (CLI, examples)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def save_tiny_pair(root: Path, tok: Any, verifier: Any, drafter: Any) -> tuple[Path, Path]:
    """Save the tiny verifier and drafter, each with the tokenizer; returns their folders."""
    verifier_dir, drafter_dir = root / "verifier", root / "drafter"
    for model, folder in ((verifier, verifier_dir), (drafter, drafter_dir)):
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
    return verifier_dir, drafter_dir
