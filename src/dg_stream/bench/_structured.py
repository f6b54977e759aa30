"""The harness's structured-output mode: what a JSON constraint costs per token, and how fast
constrained generation runs, plain and hybrid (issue 26's "Measure").

    dg-stream bench structured [--quick] [--parts mask,speed] [--vocabs verifier,32000,150000]
                               [--new-tokens 128] [--repeats 3] [--out DIR]

(``python -m benchmarks.structured`` in a checkout: the same options and outputs.) This module
holds the workload and the measurements; the options are in ``_cli``, the report in
``_structured_report``.

**Part 1, the mask per token** (``mask``). For each vocabulary (the verifier's own tokenizer,
4,096 tokens for the embedded pair, and byte-level BPE tokenizers of ~32k and ~150k tokens
trained here on the Python sources of this interpreter's site-packages: there is no model hub;
they are cached under ``--cache`` so that a rerun does not train again) and each schema of
:data:`TASKS`, a matcher walks a valid document of the schema token by token and the mask is
timed at every position (the document's tokens and the end, where only end-of-sequence is
allowed), each way in its own walk, the order of the ways rotating between repeats:

- ``llguidance compute_bitmask``: ``LLMatcher.compute_bitmask()`` alone (the packed mask as
  ``bytes``);
- ``llguidance fill``: the packed mask written into a preallocated int32 tensor (what
  ``llguidance.torch.fill_next_token_bitmask`` does; what an engine that applies packed masks
  would pay);
- ``ours``: ``Constraint.masks([], cpu)``, the packed mask unpacked to a ``(1, vocab)`` bool
  tensor: the per-position cost of dg_stream's round today;
- ``ours, in a block of 8``: ``Constraint.masks(next 8 tokens, cpu)`` divided by the 9 masks
  it makes (it steps through the draft and rolls back): the per-position cost inside a round
  that verifies 8 drafts;
- ``numpy unpackbits``: ``compute_bitmask()`` unpacked by ``numpy.unpackbits`` into a bool
  tensor: the same mask as ours, unpacked on one thread (an alternative, for comparison);
- ``xgrammar fill``: xgrammar's ``GrammarMatcher.fill_next_token_bitmask``, only where
  ``import xgrammar`` works (it is no dependency of dg_stream), on the same tokenizer, schema
  (``any_whitespace=False``, compact separators) and tokens.

Reported: the median (and p90) microseconds per position, pooled over the schemas, per
vocabulary and per schema, with torch at each of ``--mask-threads`` threads (by default 1 and
``--threads``, what a round runs with): ``Constraint.masks`` unpacks with torch operations,
which torch spreads over its threads once a tensor is large, and on a busy machine a parallel
region waits for a thread the system has put aside.

**Part 2, speed** (``speed``). The embedded pair (or ``--verifier``/``--drafter``) on the
held-out prompts of :data:`TASKS`, greedy, ``--new-tokens`` each. Methods, in one process,
interleaved (each repeat runs every prompt once per method, the order rotating):
unconstrained plain decoding (``LocalBackend.default(drafter=None)``, the speed-up bench's
baseline), constrained plain decoding, constrained hybrid with ``generate()``'s default
options (the headline: what users run), constrained hybrid with block 8, not adaptive, and
unconstrained hybrid with the defaults (for reference). Reported per method: tokens/s (the
median over repeats of generated tokens ÷ seconds, all prompts of a repeat together), the
medians of the per-repeat ratios to constrained and to unconstrained plain decoding, accepted
drafts and forced tokens (drafted tokens the grammar dictated) per verifier call. Checked:
every hybrid reply equals plain decoding's under the same constraint (greedy is lossless),
and every constrained reply that ended (``finish_reason == "stop"``) parses and validates
against its schema (``jsonschema`` where it is installed); violations are counted.

Writes ``<out>/<name>-<device>.json`` (settings, machine, every timing summary and run) and a
PNG plot, and prints a Markdown table. The full run writes ``benchmarks/results/
structured-cpu.*`` by default; ``--quick`` writes to a fresh ``runs/bench/<date>-<time>``
unless ``--out`` names a folder.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import sysconfig
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._config import RUNS_DIR, default_models
from ._report import percentile, stderr_log

__all__ = [
    "CACHE_DIR",
    "FULL",
    "MASK_METHODS",
    "QUICK",
    "RESULTS_DIR",
    "SPEED_METHODS",
    "TASKS",
    "Settings",
    "SpeedMethod",
    "Task",
    "build_tokenizer",
    "measure_masks",
    "run_structured",
    "walk_document",
]

#: Where the full run writes by default (the results kept in the repository).
RESULTS_DIR = Path("benchmarks/results")
#: Trained tokenizers are kept here between runs (not committed: ``runs/`` is ignored).
CACHE_DIR = RUNS_DIR / "cache" / "structured"

_log = stderr_log("structured")


# -- the workload -----------------------------------------------------------------------------
#
# The embedded pair is a code model (the standard library, tests held out), so each prompt is
# Python source leading into a JSON-shaped value; none is text of the training corpus. Every
# object requires all its properties and closes itself (additionalProperties: false), so
# llguidance and xgrammar compile the same language; strings and arrays are bounded, so that
# a small model under the constraint still reaches the end of the document.


@dataclass(frozen=True)
class Task:
    """A schema, one document it accepts and a prompt that leads into such a document."""

    id: str
    what: str
    schema: dict[str, Any]
    document: Any
    prompt: str

    @property
    def response_format(self) -> dict[str, Any]:
        """OpenAI's ``response_format`` for the schema (what ``generate()`` takes)."""
        return {"type": "json_schema", "json_schema": {"name": self.id, "schema": self.schema}}

    @property
    def document_text(self) -> str:
        """The document as the grammar spells it: compact JSON (``,`` and ``:``)."""
        return json.dumps(self.document, separators=(",", ":"), ensure_ascii=False)


def _object(properties: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


def _string(most: int) -> dict[str, Any]:
    return {"type": "string", "maxLength": most}


def _array(items: dict[str, Any], least: int, most: int) -> dict[str, Any]:
    return {"type": "array", "items": items, "minItems": least, "maxItems": most}


_METHODS = {"enum": ["GET", "POST", "PUT", "DELETE"]}

TASKS: tuple[Task, ...] = (
    Task(
        id="server-config",
        what="web server configuration: scalars, a boolean, an array of small objects with enums",
        schema=_object(
            {
                "host": _string(40),
                "port": {"type": "integer", "minimum": 1, "maximum": 65535},
                "debug": {"type": "boolean"},
                "workers": {"type": "integer", "minimum": 1, "maximum": 64},
                "routes": _array(_object({"path": _string(40), "method": _METHODS}), 1, 4),
            }
        ),
        document={
            "host": "127.0.0.1",
            "port": 8080,
            "debug": False,
            "workers": 4,
            "routes": [
                {"path": "/", "method": "GET"},
                {"path": "/api/items", "method": "POST"},
                {"path": "/api/items/<id>", "method": "DELETE"},
            ],
        },
        prompt=(
            '"""Start the development web server from its JSON configuration."""\n'
            "import json\n"
            "import socket\n\n\n"
            "# JSON config for a web server: where it listens, how many workers it starts and\n"
            "# which routes it serves.\n"
            "DEFAULT_CONFIG = "
        ),
    ),
    Task(
        id="user-record",
        what="a flat record: strings, integers, a boolean, an array of enum values",
        schema=_object(
            {
                "id": {"type": "integer", "minimum": 0, "maximum": 1000000},
                "name": _string(40),
                "email": _string(60),
                "age": {"type": "integer", "minimum": 0, "maximum": 150},
                "roles": _array({"enum": ["admin", "editor", "viewer"]}, 1, 3),
                "active": {"type": "boolean"},
            }
        ),
        document={
            "id": 1042,
            "name": "Ada Lovelace",
            "email": "ada@example.org",
            "age": 36,
            "roles": ["admin", "viewer"],
            "active": True,
        },
        prompt=(
            "import json\n"
            "import unittest\n\n\n"
            "class UserRecordTests(unittest.TestCase):\n"
            "    def test_round_trip(self):\n"
            "        # A user record as the accounts service stores it.\n"
            "        record = "
        ),
    ),
    Task(
        id="inventory",
        what="a list of items with enums (a bounded array of objects)",
        schema=_object(
            {
                "warehouse": _string(30),
                "items": _array(
                    _object(
                        {
                            "sku": _string(12),
                            "quantity": {"type": "integer", "minimum": 0, "maximum": 9999},
                            "status": {"enum": ["in_stock", "backorder", "discontinued"]},
                        }
                    ),
                    1,
                    5,
                ),
            }
        ),
        document={
            "warehouse": "north",
            "items": [
                {"sku": "A-100", "quantity": 12, "status": "in_stock"},
                {"sku": "B-220", "quantity": 0, "status": "backorder"},
                {"sku": "C-310", "quantity": 3, "status": "discontinued"},
            ],
        },
        prompt=(
            "def load_inventory(path):\n"
            '    """Read the inventory file: a JSON object with the warehouse name and its\n'
            '    items, each with a SKU, a quantity and a stock status."""\n'
            "    with open(path) as f:\n"
            "        return json.load(f)\n\n\n"
            "SAMPLE_INVENTORY = "
        ),
    ),
    Task(
        id="package-manifest",
        what="nested objects: a package manifest with objects inside objects",
        schema=_object(
            {
                "package": _object({"name": _string(30), "version": _string(12)}),
                "dependencies": _object(
                    {"runtime": _array(_string(24), 0, 4), "dev": _array(_string(24), 0, 4)}
                ),
                "scripts": _object({"test": _string(40), "build": _string(40)}),
            }
        ),
        document={
            "package": {"name": "widgets", "version": "1.4.2"},
            "dependencies": {"runtime": ["requests", "attrs"], "dev": ["pytest"]},
            "scripts": {"test": "python -m pytest", "build": "python -m build"},
        },
        prompt=(
            '"""Write the package manifest the release script reads."""\n'
            "import json\n"
            "from pathlib import Path\n\n\n"
            "def write_manifest(folder):\n"
            "    # The manifest: the package's name and version, its dependencies and the\n"
            "    # commands that test and build it.\n"
            "    manifest = "
        ),
    ),
    Task(
        id="test-matrix",
        what="bounded arrays: cases with arrays of integers",
        schema=_object(
            {
                "function": _string(30),
                "cases": _array(
                    _object(
                        {
                            "args": _array({"type": "integer"}, 1, 3),
                            "expected": {"type": "integer"},
                        }
                    ),
                    2,
                    4,
                ),
            }
        ),
        document={
            "function": "add",
            "cases": [
                {"args": [1, 2], "expected": 3},
                {"args": [10, -4], "expected": 6},
                {"args": [0, 0], "expected": 0},
            ],
        },
        prompt=(
            "def add(a, b):\n"
            "    return a + b\n\n\n"
            "# Test cases for add(), as JSON: the arguments of each call and the result it\n"
            "# must return.\n"
            "CASES = "
        ),
    ),
    Task(
        id="log-event",
        what="an event with an enum level, free text and a short array of tags",
        schema=_object(
            {
                "level": {"enum": ["DEBUG", "INFO", "WARNING", "ERROR"]},
                "logger": _string(30),
                "message": _string(80),
                "line": {"type": "integer", "minimum": 1, "maximum": 100000},
                "tags": _array(_string(16), 0, 3),
            }
        ),
        document={
            "level": "WARNING",
            "logger": "http.server",
            "message": "request took longer than the timeout",
            "line": 418,
            "tags": ["slow", "http"],
        },
        prompt=(
            "import json\n"
            "import logging\n\n\n"
            "class JSONFormatter(logging.Formatter):\n"
            '    """Format each record as one JSON object per line."""\n\n'
            "    def format(self, record):\n"
            "        event = "
        ),
    ),
)


# -- settings ---------------------------------------------------------------------------------

#: The mask part's ways, in the report's order.
LLG = "llguidance compute_bitmask"
LLG_FILL = "llguidance fill"
OURS = "ours"
OURS_BLOCK = "ours, in a block of 8"
UNPACK = "numpy unpackbits"
XGR = "xgrammar fill"
MASK_METHODS = {
    LLG: "LLMatcher.compute_bitmask(): the packed mask as bytes",
    LLG_FILL: "LLMatcher.unsafe_compute_mask_ptr into a preallocated int32 tensor (what "
    "llguidance.torch.fill_next_token_bitmask does)",
    OURS: "Constraint.masks([], cpu): the packed mask unpacked to a (1, vocab) bool tensor, "
    "dg_stream's per-position cost",
    OURS_BLOCK: "Constraint.masks(next 8 tokens, cpu) ÷ the 9 masks it makes (steps through "
    "the draft and rolls back)",
    UNPACK: "compute_bitmask() unpacked by numpy.unpackbits into a bool tensor: the same mask "
    "as ours, unpacked on one thread (an alternative, not what dg_stream runs)",
    XGR: "xgrammar GrammarMatcher.fill_next_token_bitmask into a preallocated int32 tensor "
    "(any_whitespace=False, compact separators)",
}
DRAFT = 8  # the draft length of OURS_BLOCK


@dataclass(frozen=True)
class SpeedMethod:
    """One way to generate in the speed part."""

    name: str
    hybrid: bool  # with the drafter (else plain decoding)
    constrained: bool
    options: dict[str, Any] = field(default_factory=dict)  # speculative options of generate()
    description: str = ""


UNCONSTRAINED_PLAIN = "plain, unconstrained"
CONSTRAINED_PLAIN = "plain, constrained"
SUBJECT = "hybrid defaults, constrained"
BLOCK8 = "hybrid k=8, constrained"
UNCONSTRAINED_HYBRID = "hybrid defaults, unconstrained"
SPEED_METHODS = (
    SpeedMethod(
        UNCONSTRAINED_PLAIN,
        False,
        False,
        description="LocalBackend(verifier, None): plain decoding, no response_format",
    ),
    SpeedMethod(
        CONSTRAINED_PLAIN,
        False,
        True,
        description="plain decoding with the schema as response_format",
    ),
    SpeedMethod(
        SUBJECT,
        True,
        True,
        description="generate() with the backend's default options and the schema (the headline)",
    ),
    SpeedMethod(
        BLOCK8,
        True,
        True,
        {"block_size": 8, "adaptive": False},
        description="block_size=8, adaptive=False, with the schema",
    ),
    SpeedMethod(
        UNCONSTRAINED_HYBRID,
        True,
        False,
        description="generate() with the backend's default options, no response_format",
    ),
)
#: Whose reply each method must reproduce (greedy is lossless).
REFERENCE = {
    SUBJECT: CONSTRAINED_PLAIN,
    BLOCK8: CONSTRAINED_PLAIN,
    UNCONSTRAINED_HYBRID: UNCONSTRAINED_PLAIN,
}

#: Presets; options given on the command line override them.
FULL: dict[str, Any] = {
    "vocabs": ("verifier", 32000, 150000),
    "mask_repeats": 5,
    "new_tokens": 128,
    "repeats": 3,
    "tasks": len(TASKS),
    "block8": True,
}
QUICK: dict[str, Any] = {
    "vocabs": ("verifier", 32000),
    "mask_repeats": 1,
    "new_tokens": 32,
    "repeats": 1,
    "tasks": 3,
    "block8": False,
}
WARMUP_TOKENS = 4
MIN_VOCAB = 300  # 256 bytes, the special tokens and a few merges
PARTS = ("mask", "speed")


@dataclass(frozen=True)
class Settings:
    """What one run measures."""

    out: Path
    parts: tuple[str, ...] = ("mask", "speed")
    vocabs: tuple[str | int, ...] = FULL["vocabs"]  # "verifier" or a BPE size to train
    corpus_mb: float = 48.0  # training text for the BPE tokenizers
    cache: Path = CACHE_DIR
    mask_repeats: int = FULL["mask_repeats"]
    xgrammar: bool = True  # when importable
    new_tokens: int = FULL["new_tokens"]
    repeats: int = FULL["repeats"]
    tasks: int = FULL["tasks"]
    block8: bool = FULL["block8"]
    threads: int | None = 2
    mask_threads: tuple[int, ...] = ()  # torch threads of the mask part, each (): ``threads``
    verifier: Path | None = None  # None: the embedded default verifier
    drafter: Path | None = None  # None: the embedded default drafter
    device: str = "cpu"
    name: str = "structured"
    plots: bool = True


# -- tokenizers -------------------------------------------------------------------------------


def _corpus(limit_bytes: int) -> tuple[list[str], dict[str, Any]]:
    """Python sources of this interpreter's site-packages, in path order, up to
    ``limit_bytes`` characters: text to train the BPE tokenizers on."""
    root = Path(sysconfig.get_paths()["purelib"])
    docs: list[str] = []
    total = 0
    for path in sorted(root.rglob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        docs.append(text)
        total += len(text)
        if total >= limit_bytes:
            break
    return docs, {"source": str(root), "files": len(docs), "characters": total}


def build_tokenizer(
    size: int, settings: Settings, log: Callable[[str], None] = _log
) -> tuple[Any, dict[str, Any]]:
    """A byte-level BPE tokenizer of ``size`` tokens (trained once, then read from the cache)
    as a transformers fast tokenizer, and how it was made."""
    from transformers import AutoTokenizer

    folder = settings.cache / f"bpe-{size}-python-{settings.corpus_mb:g}mb"
    info: dict[str, Any] = {"requested": size, "path": str(folder), "cached": True}
    if not (folder / "tokenizer.json").exists():
        try:
            from ..train.tokenizer import train_tokenizer
        except ImportError as exc:  # pragma: no cover - the train extra is missing
            from .._errors import missing_extra

            raise missing_extra("structured's BPE tokenizers", ("train",), exc) from exc
        started = time.perf_counter()
        docs, corpus = _corpus(int(settings.corpus_mb * 1e6))
        log(
            f"training a {size:,}-token BPE tokenizer on {corpus['characters'] / 1e6:.1f} MB of "
            f"Python ({corpus['files']} files of {corpus['source']})"
        )
        staging = folder.with_name(folder.name + f".tmp{os.getpid()}")
        train_tokenizer(docs, staging, vocab_size=size)
        staging.replace(folder)
        info.update(cached=False, corpus=corpus, seconds=time.perf_counter() - started)
        (folder / "bench-corpus.json").write_text(json.dumps(corpus, indent=1) + "\n")
    elif (folder / "bench-corpus.json").exists():
        info["corpus"] = json.loads((folder / "bench-corpus.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    info["size"] = len(tokenizer)
    return tokenizer, info


def _vocabularies(
    settings: Settings, log: Callable[[str], None]
) -> list[tuple[str, Any, int, dict[str, Any]]]:
    """(label, tokenizer, logits width, how it was made) for each ``settings.vocabs``."""
    from .._loading import load_tokenizer

    out = []
    for spec in settings.vocabs:
        if spec == "verifier":
            from transformers import AutoConfig

            path = settings.verifier or default_models()[0]
            tokenizer = load_tokenizer(path)
            config = AutoConfig.from_pretrained(path, local_files_only=True)
            width = int(getattr(config, "vocab_size", 0) or 0)
            width = max(width, len(tokenizer))
            info: dict[str, Any] = {"path": str(path), "size": len(tokenizer)}
            out.append((f"verifier {len(tokenizer):,}", tokenizer, width, info))
        else:
            tokenizer, info = build_tokenizer(int(spec), settings, log)
            out.append((f"BPE {len(tokenizer):,}", tokenizer, len(tokenizer), info))
    return out


# -- part 1: the mask per token ---------------------------------------------------------------


def walk_document(constraint: Any, ll_tokenizer: Any, text: str) -> list[int]:
    """Tokens that spell ``text`` and that the grammar accepts one by one: the tokenizer's own
    tokens when the grammar takes them all, else the longest allowed token at each step (the
    grammar allows only the canonical spelling of bytes it forces). The matcher is reset."""
    matcher = constraint.matcher
    matcher.reset()
    tokens = list(ll_tokenizer.tokenize_str(text))
    if matcher.validate_tokens(tokens) == len(tokens):
        if matcher.consume_tokens(tokens) and matcher.is_accepting():
            matcher.reset()
            return tokens
        matcher.reset()
    spelled: dict[bytes, int] = {}
    for token in range(ll_tokenizer.vocab_size):
        if ll_tokenizer.is_special_token(token):
            continue
        spelled.setdefault(bytes(ll_tokenizer.decode_bytes([token])), token)
    longest = max(len(b) for b in spelled)
    rest = text.encode()
    tokens = []
    while rest:
        mask = matcher.compute_bitmask()
        for length in range(min(longest, len(rest)), 0, -1):
            found = spelled.get(rest[:length])
            if found is not None and mask[found // 8] >> (found % 8) & 1:
                token = found
                break
        else:
            raise RuntimeError(f"the grammar allows no token spelling {rest[:16]!r}")
        matcher.consume_token(token)
        tokens.append(token)
        rest = rest[length:]
    accepting = matcher.is_accepting()
    matcher.reset()
    if not accepting:
        raise RuntimeError("the grammar does not accept the whole document")
    return tokens


def _timed_walk(
    tokens: list[int],
    reset: Callable[[], None],
    consume: Callable[[int], Any],
    measure: Callable[[int], int],
) -> list[float]:
    """Microseconds per mask at each position of ``tokens`` and after the last;
    ``measure(i)`` makes the masks of position ``i`` and returns how many it made."""
    reset()
    out = []
    clock = time.perf_counter_ns
    for i in range(len(tokens) + 1):
        started = clock()
        made = measure(i)
        out.append((clock() - started) / 1000.0 / made)
        if i < len(tokens):
            consume(tokens[i])
    return out


def _summary(samples: list[float]) -> dict[str, Any]:
    return {
        "median_us": statistics.median(samples),
        "p90_us": percentile(samples, 90),
        "mean_us": statistics.fmean(samples),
        "samples": len(samples),
    }


def _xgrammar_available() -> tuple[Any, str | None]:
    try:
        import xgrammar
    except Exception as exc:  # ImportError, or a broken install
        return None, f"{type(exc).__name__}: {exc}"
    return xgrammar, None


_Way = tuple[Callable[[], Any], Callable[[int], Any], Callable[[int], int]]


def _llguidance_ways(constraint: Any, tokens: list[int], vocab: int) -> dict[str, _Way]:
    """(reset, consume, measure) of each llguidance and dg_stream way, on one matcher."""
    import numpy
    import torch

    cpu = torch.device("cpu")
    matcher = constraint.matcher
    # What llguidance.torch.fill_next_token_bitmask does (that module compiles a kernel with
    # torch.compile on import, pulling in inductor: not what a benchmark of masks should pay).
    packed = torch.zeros((vocab + 31) // 32, dtype=torch.int32)
    size = packed.numel() * packed.element_size()
    width = constraint.vocab_size

    def bitmask(i: int) -> int:
        matcher.compute_bitmask()
        return 1

    def fill(i: int) -> int:
        matcher.unsafe_compute_mask_ptr(packed.data_ptr(), size)
        return 1

    def ours(i: int) -> int:
        constraint.masks([], cpu)
        return 1

    def block(i: int) -> int:
        draft = tokens[i : i + DRAFT]
        constraint.masks(draft, cpu)
        return len(draft) + 1

    def unpack(i: int) -> int:
        raw = numpy.frombuffer(matcher.compute_bitmask(), dtype=numpy.uint8)
        bits = numpy.unpackbits(raw, bitorder="little")[:width]
        torch.from_numpy(bits).view(torch.bool)
        return 1

    step = (matcher.reset, matcher.consume_token)
    return {
        LLG: (*step, bitmask),
        LLG_FILL: (*step, fill),
        OURS: (*step, ours),
        OURS_BLOCK: (*step, block),
        UNPACK: (*step, unpack),
    }


def _xgrammar_way(xgrammar: Any, compiled: Any, tokens: list[int], vocab: int) -> _Way | None:
    """xgrammar's (reset, consume, measure), or None when it rejects ``tokens``."""
    matcher = xgrammar.GrammarMatcher(compiled)
    packed = xgrammar.allocate_token_bitmask(1, vocab)
    if not all(matcher.accept_token(t) for t in tokens):
        return None

    def fill(i: int) -> int:
        matcher.fill_next_token_bitmask(packed)
        return 1

    return matcher.reset, matcher.accept_token, fill


def measure_masks(
    tasks: Sequence[Task],
    tokenizer: Any,
    vocab_size: int,
    repeats: int,
    xgrammar: Any = None,
    log: Callable[[str], None] = _log,
) -> dict[str, Any]:
    """Part 1 for one vocabulary: every mask way on every task, ``repeats`` walks each."""
    from .._config import response_format_from
    from .._constraints import ConstraintFactory

    factory = ConstraintFactory(tokenizer, vocab_size)
    started = time.perf_counter()
    ll_tokenizer = factory.tokenizer()
    setup = {"llguidance_tokenizer_ms": 1000 * (time.perf_counter() - started)}
    xgr_info = xgr_compiler = None
    if xgrammar is not None:
        started = time.perf_counter()
        xgr_info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        xgr_compiler = xgrammar.GrammarCompiler(xgr_info)
        setup["xgrammar_tokenizer_ms"] = 1000 * (time.perf_counter() - started)
    rows = []
    pooled: dict[str, list[float]] = {}
    for task in tasks:
        started = time.perf_counter()
        constraint = factory.constraint(response_format_from(task.response_format))  # type: ignore[arg-type]
        compile_ms = 1000 * (time.perf_counter() - started)
        tokens = walk_document(constraint, ll_tokenizer, task.document_text)
        ways = _llguidance_ways(constraint, tokens, ll_tokenizer.vocab_size)
        notes = []
        xgr_compile_ms = None
        if xgr_compiler is not None:
            started = time.perf_counter()
            compiled = xgr_compiler.compile_json_schema(
                json.dumps(task.schema), any_whitespace=False, separators=(",", ":")
            )
            xgr_compile_ms = 1000 * (time.perf_counter() - started)
            xgr_way = _xgrammar_way(xgrammar, compiled, tokens, xgr_info.vocab_size)  # type: ignore[union-attr]
            if xgr_way is not None:
                ways[XGR] = xgr_way
            else:
                notes.append("xgrammar rejected the document's tokens: no xgrammar column")
        samples: dict[str, list[float]] = {way: [] for way in ways}
        order = list(ways)
        for repeat in range(repeats):
            shift = repeat % len(order)
            for way in [*order[shift:], *order[:shift]]:
                gc.collect()
                samples[way] += _timed_walk(tokens, *ways[way])
        constraint.matcher.reset()
        for way, values in samples.items():
            pooled.setdefault(way, []).extend(values)
        rows.append(
            {
                "task": task.id,
                "document_tokens": len(tokens),
                "positions": len(tokens) + 1,
                "compile_ms": compile_ms,
                "xgrammar_compile_ms": xgr_compile_ms,
                "ways": {way: _summary(values) for way, values in samples.items()},
                "per_position_us": {
                    way: [round(v, 3) for v in values[: len(tokens) + 1]]
                    for way, values in samples.items()
                },
                "notes": notes,
            }
        )
        cells = ", ".join(
            f"{way} {statistics.median(values):.1f}" for way, values in samples.items()
        )
        log(f"  {task.id}: {len(tokens)} tokens; µs per mask: {cells}")
    return {
        "setup": setup,
        "tasks": rows,
        "ways": {way: _summary(values) for way, values in pooled.items()},
    }


def run_masks(settings: Settings, log: Callable[[str], None]) -> dict[str, Any]:
    """Part 1: every vocabulary of ``settings.vocabs``."""
    import torch

    xgrammar, why = _xgrammar_available() if settings.xgrammar else (None, "--no-xgrammar")
    tasks = TASKS[: settings.tasks]
    vocabularies = []
    threads = torch.get_num_threads()
    counts = settings.mask_threads or (threads,)
    try:
        for label, tokenizer, width, info in _vocabularies(settings, log):
            for count in counts:
                torch.set_num_threads(count)
                log(
                    f"mask cost, {label} ({width:,} logits), {settings.mask_repeats} "
                    f"repeat(s), {count} torch thread(s)"
                )
                measured = measure_masks(
                    tasks, tokenizer, width, settings.mask_repeats, xgrammar, log
                )
                vocabularies.append(
                    {
                        "label": f"{label}, {count} thread{'' if count == 1 else 's'}",
                        "vocabulary": label,
                        "vocab_size": width,
                        "threads": count,
                        "tokenizer": info,
                        **measured,
                    }
                )
    finally:
        torch.set_num_threads(threads)
    import llguidance

    versions = {"llguidance": getattr(llguidance, "__version__", None)}
    if xgrammar is not None:
        from importlib.metadata import version

        versions["xgrammar"] = version("xgrammar")
    return {
        "repeats": settings.mask_repeats,
        "threads": list(counts),
        "ways": {
            way: what for way, what in MASK_METHODS.items() if way != XGR or xgrammar is not None
        },
        "xgrammar_unavailable": why,
        "versions": versions,
        "vocabularies": vocabularies,
    }


# -- part 2: speed ----------------------------------------------------------------------------


@dataclass
class _Reply:
    tokens: list[int]
    text: str
    seconds: float
    finish_reason: str | None
    calls: int
    accepted: int
    forced: int


def _generate(
    backend: Any, prompt: str, new_tokens: int, fmt: Any, options: dict[str, Any]
) -> _Reply:
    import anyio

    from .._generate import generate

    async def read() -> _Reply:
        tokens: list[int] = []
        started = time.perf_counter()
        stream = generate(
            prompt, backend=backend, max_new_tokens=new_tokens, response_format=fmt, **options
        )
        async with stream:
            async for chunk in stream:
                tokens.extend(chunk.token_ids)
        seconds = time.perf_counter() - started
        stats = stream.stats
        return _Reply(
            tokens,
            stream.text,
            seconds,
            stream.finish_reason,
            stats.verifier_calls if stats is not None else 0,
            stats.accepted_tokens if stats is not None else 0,
            stats.forced_tokens if stats is not None else 0,
        )

    return anyio.run(read)


def _validator() -> tuple[Callable[[Any, dict[str, Any]], str | None], str | None]:
    """A check of a parsed reply against its schema (None when it validates), and why
    replies are only parsed when ``jsonschema`` is missing."""
    try:
        import jsonschema
    except ImportError:
        return (lambda value, schema: None), "jsonschema is not installed: replies only parsed"

    def check(value: Any, schema: dict[str, Any]) -> str | None:
        error = jsonschema.exceptions.best_match(
            jsonschema.Draft202012Validator(schema).iter_errors(value)
        )
        return None if error is None else error.message

    return check, None


def _violation(
    reply: _Reply, task: Task, check: Callable[[Any, dict[str, Any]], str | None]
) -> str | None:
    """Why a finished constrained reply breaks its schema (None: it does not)."""
    try:
        value = json.loads(reply.text)
    except ValueError as exc:
        return f"not JSON: {exc}"
    return check(value, task.schema)


def _speed_rows(records: list[dict[str, Any]], methods: Sequence[SpeedMethod]) -> list[Any]:
    rows = []
    by_repeat: dict[tuple[str, int], tuple[int, float]] = {}
    for r in records:
        tokens, seconds = by_repeat.get((r["method"], r["repeat"]), (0, 0.0))
        by_repeat[(r["method"], r["repeat"])] = (tokens + r["new_tokens"], seconds + r["seconds"])
    rates = {key: t / s if s > 0 else 0.0 for key, (t, s) in by_repeat.items()}
    repeats = sorted({repeat for _, repeat in rates})

    def ratios(method: str, base: str) -> list[float]:
        return [
            rates[(method, r)] / rates[(base, r)]
            for r in repeats
            if (method, r) in rates and rates.get((base, r))
        ]

    for method in methods:
        mine = [r for r in records if r["method"] == method.name]
        if not mine:
            continue
        runs = [rates[(method.name, r)] for r in repeats if (method.name, r) in rates]
        calls = sum(r["verifier_calls"] for r in mine)
        vs_constrained = ratios(method.name, CONSTRAINED_PLAIN)
        vs_unconstrained = ratios(method.name, UNCONSTRAINED_PLAIN)
        finished = [r for r in mine if r["finish_reason"] == "stop"]
        rows.append(
            {
                "method": method.name,
                "hybrid": method.hybrid,
                "constrained": method.constrained,
                "tokens_per_second": statistics.median(runs),
                "tokens_per_second_runs": runs,
                "vs_constrained_plain": (
                    statistics.median(vs_constrained) if vs_constrained else None
                ),
                "vs_constrained_plain_runs": vs_constrained,
                "vs_unconstrained_plain": (
                    statistics.median(vs_unconstrained) if vs_unconstrained else None
                ),
                "vs_unconstrained_plain_runs": vs_unconstrained,
                "generated_tokens": sum(r["new_tokens"] for r in mine),
                "verifier_calls": calls,
                "accepted_per_call": sum(r["accepted"] for r in mine) / calls if calls else None,
                "forced_per_call": sum(r["forced"] for r in mine) / calls if calls else None,
                "tokens_per_call": (sum(r["new_tokens"] for r in mine) / calls if calls else None),
                "generations": len(mine),
                "reference": REFERENCE.get(method.name),
                "identical": (
                    sum(bool(r["identical"]) for r in mine) if method.name in REFERENCE else None
                ),
                "finished": len(finished),
                "checked": len(finished) if method.constrained else 0,
                "violations": sum(r["violation"] is not None for r in finished),
            }
        )
    return rows


def run_speed(settings: Settings, log: Callable[[str], None]) -> dict[str, Any]:
    """Part 2: every method on every task, interleaved, ``settings.repeats`` times."""
    from transformers.utils import logging as hf_logging

    from .. import LocalBackend

    hf_logging.set_verbosity_error()  # a benchmark's output is its table
    verifier_default, drafter_default = default_models()
    verifier = settings.verifier or verifier_default
    drafter = settings.drafter or drafter_default
    # What LocalBackend.default(...) builds, with the paths given (by default the same).
    backends = {
        False: LocalBackend(verifier, None, device=settings.device),
        True: LocalBackend(verifier, drafter, device=settings.device),
    }
    try:
        result = _speed(settings, log, backends)
    finally:
        for backend in backends.values():
            backend.close()
    result["settings"].update(verifier=str(verifier), drafter=str(drafter))
    return result


def _speed(
    settings: Settings, log: Callable[[str], None], backends: dict[bool, Any]
) -> dict[str, Any]:
    import torch

    from .._config import response_format_from

    methods = [m for m in SPEED_METHODS if settings.block8 or m.name != BLOCK8]
    tasks = TASKS[: settings.tasks]
    formats = {task.id: response_format_from(task.response_format) for task in tasks}
    check, unchecked = _validator()

    def run(method: SpeedMethod, task: Task, new_tokens: int) -> _Reply:
        fmt = formats[task.id] if method.constrained else None
        return _generate(backends[method.hybrid], task.prompt, new_tokens, fmt, method.options)

    for method in methods:  # first calls pay for allocations, grammars, thread pools, …
        for task in tasks:
            run(method, task, min(WARMUP_TOKENS, settings.new_tokens))
    log(
        f"speed: {len(methods)} methods × {len(tasks)} prompts × {settings.new_tokens} tokens, "
        f"{settings.repeats} repeat(s), {torch.get_num_threads()} threads (warmed up)"
    )
    records: list[dict[str, Any]] = []
    for repeat in range(settings.repeats):
        replies: dict[tuple[str, str], _Reply] = {}
        for index, task in enumerate(tasks):
            shift = (repeat + index) % len(methods)
            for position, method in enumerate([*methods[shift:], *methods[:shift]]):
                gc.collect()
                replies[(method.name, task.id)] = reply = run(method, task, settings.new_tokens)
                violation = None
                if method.constrained and reply.finish_reason == "stop":
                    violation = _violation(reply, task, check)
                records.append(
                    {
                        "method": method.name,
                        "task": task.id,
                        "repeat": repeat,
                        "position": position,
                        "seconds": reply.seconds,
                        "new_tokens": len(reply.tokens),
                        "finish_reason": reply.finish_reason,
                        "verifier_calls": reply.calls,
                        "accepted": reply.accepted,
                        "forced": reply.forced,
                        "violation": violation,
                        "identical": None,
                        "text": reply.text,
                        "tokens": reply.tokens,
                    }
                )
        for r in records[-len(methods) * len(tasks) :]:
            base = REFERENCE.get(r["method"])
            if base is not None and (base, r["task"]) in replies:
                r["identical"] = r["tokens"] == replies[(base, r["task"])].tokens
        rows = _speed_rows(records[-len(methods) * len(tasks) :], methods)
        log(
            f"repeat {repeat + 1}/{settings.repeats}: "
            + ", ".join(f"{r['method']} {r['tokens_per_second']:.0f}" for r in rows)
            + " tok/s"
        )
    rows = _speed_rows(records, methods)
    notes = [unchecked] if unchecked else []
    for row in rows:
        if row["identical"] is not None and row["identical"] < row["generations"]:
            notes.append(
                f"{row['method']}: {row['identical']} of {row['generations']} replies equal "
                f"{row['reference']}'s (greedy should match)"
            )
        if row["violations"]:
            notes.append(
                f"{row['method']}: {row['violations']} of {row['checked']} finished replies "
                "break their schema"
            )
        if row["constrained"] and row["finished"] < row["generations"]:
            notes.append(
                f"{row['method']}: {row['generations'] - row['finished']} of "
                f"{row['generations']} replies stopped at the token limit (not checked)"
            )
    defaults = backends[True].defaults
    plain = backends[False]
    return {
        "settings": {
            "new_tokens": settings.new_tokens,
            "repeats": settings.repeats,
            "greedy": True,
            "device": str(plain.device),
            "dtype": str(plain.dtype),
            "hybrid_defaults": {
                "block_size": defaults.block_size,
                "steps": defaults.steps,
                "adaptive": defaults.adaptive,
            },
            "warmup_tokens": WARMUP_TOKENS,
        },
        "methods": {m.name: m.description for m in methods},
        "prompts": [
            {
                "task": task.id,
                "prompt_tokens": len(plain.tokenizer(task.prompt)["input_ids"]),
            }
            for task in tasks
        ],
        "results": rows,
        "notes": notes,
        "runs": records,
    }


# -- the run ----------------------------------------------------------------------------------


def run_structured(settings: Settings, log: Callable[[str], None] = _log) -> dict[str, Any]:
    """The parts of ``settings``; returns the result document (what the JSON holds)."""
    import torch

    from ._machine import describe_machine

    threads = torch.get_num_threads()
    started = time.perf_counter()
    load_at_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    try:
        if settings.threads:
            torch.set_num_threads(settings.threads)
        result: dict[str, Any] = {
            "name": settings.name,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "settings": {
                "parts": list(settings.parts),
                "tasks": [task.id for task in TASKS[: settings.tasks]],
                "threads": torch.get_num_threads(),
                "device": settings.device,
                "vocabs": [str(v) for v in settings.vocabs],
                "corpus_mb": settings.corpus_mb,
                "mask_repeats": settings.mask_repeats,
            },
            "tasks": {
                task.id: {
                    "what": task.what,
                    "schema": task.schema,
                    "document": task.document,
                    "prompt": task.prompt,
                }
                for task in TASKS[: settings.tasks]
            },
            "mask": run_masks(settings, log) if "mask" in settings.parts else None,
            "speed": run_speed(settings, log) if "speed" in settings.parts else None,
        }
        machine = describe_machine(torch.device(settings.device))
        machine["load_average_at_start"] = load_at_start
        result["machine"] = machine
        result["wall_seconds"] = time.perf_counter() - started
        return result
    finally:
        torch.set_num_threads(threads)  # leave torch as it was found when run in-process
