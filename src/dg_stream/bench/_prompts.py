"""The benchmark prompts: a fixed set cut from text the default models never saw.

The default pair was trained on the standard library *without* its test suites
(``dg_stream.train.corpus``), so the prompts come from those test suites: each prompt is the
text of one test file up to a function header, ``short`` (about 300 characters) or ``long``
(about 2,000), so every generation starts where a function body is due. The set is written
once to ``benchmarks/prompts/prompts.jsonl`` and read from there: later Python versions
change the test files, and a benchmark must not drift with them.
"""

from __future__ import annotations

import json
import re
import sysconfig
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["Prompt", "load_prompts", "make_prompts", "write_prompts"]

LENGTHS = {"short": 300, "long": 2000}
_HEADER = re.compile(r"^[ \t]*def [^\n]*:\n", flags=re.MULTILINE)


@dataclass(frozen=True)
class Prompt:
    id: str
    kind: str  # "short" | "long"
    source: str  # where the text comes from
    text: str


def _cut(text: str, length: int) -> str | None:
    """The ``length`` characters that end at the first function header past ``length``."""
    match = _HEADER.search(text, length)
    if match is None:
        return None
    return text[match.end() - length : match.end()]


def make_prompts(per_kind: int = 16, root: Path | None = None) -> list[Prompt]:
    """``per_kind`` short and ``per_kind`` long prompts from the stdlib test suites.

    Files are taken in sorted order at an even stride over the whole test suite, one prompt
    per file, so the set spans many kinds of test code and never repeats a file.
    """
    from ..train.corpus import _is_test_file

    base = root or Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p
        for p in base.rglob("*.py")
        if _is_test_file(p) and "site-packages" not in p.parts and "dist-packages" not in p.parts
    )
    prompts: list[Prompt] = []
    want = {kind: per_kind for kind in LENGTHS}
    stride = max(1, len(files) // (4 * per_kind))
    order = files[::stride] + [f for i, f in enumerate(files) if i % stride]
    for path in order:
        if not any(want.values()):
            break
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        kind = "long" if want["long"] >= want["short"] else "short"
        cut = _cut(text, LENGTHS[kind])
        if cut is None:
            continue
        number = per_kind - want[kind]
        source = str(path.relative_to(base))
        prompts.append(Prompt(id=f"{kind}-{number:02d}", kind=kind, source=source, text=cut))
        want[kind] -= 1
    return sorted(prompts, key=lambda p: p.id)


def write_prompts(prompts: Sequence[Prompt], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for prompt in prompts:
            f.write(json.dumps(asdict(prompt), ensure_ascii=False) + "\n")
    return path


def load_prompts(path: Path) -> list[Prompt]:
    """Prompts from a JSON-lines file (``id``, ``kind``, ``source``, ``text``) or plain text
    files: one prompt per ``.txt`` file in a folder."""
    if path.is_dir():
        jsonl = path / "prompts.jsonl"
        if jsonl.exists():
            return load_prompts(jsonl)
        return [
            Prompt(id=p.stem, kind="file", source=str(p), text=p.read_text(encoding="utf-8"))
            for p in sorted(path.glob("*.txt"))
        ]
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if line.strip():
            row = json.loads(line)
            prompts.append(
                Prompt(
                    id=str(row.get("id", number)),
                    kind=str(row.get("kind", "prompt")),
                    source=str(row.get("source", path.name)),
                    text=str(row["text"]),
                )
            )
    if not prompts:
        raise ValueError(f"no prompts in {path}")
    return prompts
