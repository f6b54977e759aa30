"""The training corpus: the running interpreter's standard library, built deterministically.

Test suites (``test/``, ``tests/``, ``test_*.py``) are held out: they are the evaluation text.
The manifest records the Python version and a hash of the file list so a model card can say
exactly what the model saw.
"""

from __future__ import annotations

import hashlib
import platform
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Corpus", "file_corpus", "stdlib_corpus"]


@dataclass(frozen=True)
class Corpus:
    """Training and held-out documents, plus a manifest describing where they came from."""

    train: tuple[str, ...]
    held_out: tuple[str, ...]
    manifest: dict[str, object]


def _is_test_file(path: Path) -> bool:
    return (
        "test" in path.parts
        or "tests" in path.parts
        or "idle_test" in path.parts
        or path.name.startswith("test_")
    )


def _read(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None
    return text if text.strip() else None


def _hash_files(names: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]


def stdlib_corpus(root: str | Path | None = None, max_held_out_files: int = 200) -> Corpus:
    """The standard library's ``.py`` files; test suites form the held-out split.

    ``root`` is another interpreter's ``Lib`` folder (default: this interpreter's), e.g. to
    train on a GPU machine whose Python differs from the one the shipped pair was built with.
    """
    own = root is None
    root = Path(sysconfig.get_paths()["stdlib"]) if root is None else Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"standard library folder does not exist: {root}")
    # Classified by their path inside the Lib folder, whatever folders lie above it.
    files = sorted(
        p
        for p in root.rglob("*.py")
        if not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts)
    )
    train_files = [p for p in files if not _is_test_file(p.relative_to(root))]
    # Every k-th test file, so the held-out set spans the whole test suite but stays small.
    test_files = [p for p in files if _is_test_file(p.relative_to(root))]
    stride = max(1, len(test_files) // max_held_out_files)
    held_files = test_files[::stride][:max_held_out_files]
    train = [(p, _read(p)) for p in train_files]
    held = [(p, _read(p)) for p in held_files]
    train_docs = tuple(t for _, t in train if t)
    held_docs = tuple(t for _, t in held if t)
    names = [str(p.relative_to(root)) for p, t in train if t]
    manifest = {
        "source": "CPython standard library (Lib/), test suites held out",
        "licence": "Python Software Foundation License",
        "python_version": platform.python_version() if own else f"(library at {root})",
        "train_files": len(train_docs),
        "held_out_files": len(held_docs),
        "train_file_list_sha256": _hash_files(names),
        "train_bytes": sum(len(t.encode()) for t in train_docs),
    }
    return Corpus(train_docs, held_docs, manifest)


def file_corpus(paths: Sequence[str | Path], held_out_fraction: float = 0.05) -> Corpus:
    """A corpus from user files (each a document); the last files form the held-out split."""
    expanded: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            expanded.extend(sorted(p for p in path.rglob("*") if p.is_file()))
        elif path.is_file():
            expanded.append(path)
        else:
            raise FileNotFoundError(f"corpus path does not exist: {path}")
    docs = [t for t in (_read(p) for p in expanded) if t]
    if not docs:
        raise ValueError("the corpus is empty: no readable UTF-8 text in the given files")
    n_held = max(1, int(len(docs) * held_out_fraction)) if len(docs) > 1 else 0
    train = tuple(docs[: len(docs) - n_held]) if n_held else tuple(docs)
    held = tuple(docs[len(docs) - n_held :]) if n_held else tuple(docs[-1:])
    manifest = {
        "source": "user files",
        "train_files": len(train),
        "held_out_files": len(held),
        "train_file_list_sha256": _hash_files([str(p) for p in expanded]),
        "train_bytes": sum(len(t.encode()) for t in train),
    }
    return Corpus(train, held, manifest)
