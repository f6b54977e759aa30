"""Constrained output: a per-row token mask from a grammar, exact under speculation.

A request's ``response_format`` (a JSON schema, any JSON object, a regular expression or a
choice of strings) becomes a grammar that llguidance compiles against the verifier's
tokenizer; each generation walks it with its own ``LLMatcher``. In the round:

- a draft is cut at its first token the grammar rejects before it is verified (no verifier
  work on it): ``Constraint.fit``;
- the verifier's logits are masked at every verified position (``Constraint.masks``: the
  matcher steps through the draft and back), so greedy takes the masked argmax and sampling
  draws from the masked, renormalised p;
- sampling stays exact with the drafter's own, unmasked q: a token the grammar rejects has
  masked p = 0, so speculative sampling would always reject it; cutting the draft there is
  that rejection made early, and the token is then drawn from ``normalize(max(0, p - q))`` at
  the cut, as a rejection would draw it (``_acceptance.draw_after_rejection``);
- what the round commits is consumed by the matcher (``Constraint.commit``); the draft
  positions stepped through for the masks are rolled back first.

Why llguidance (not xgrammar): both compute a mask in microseconds and roll back rejected
tokens; llguidance is one self-contained wheel, where xgrammar pulls in triton (hundreds of
MB) on Linux. Measured here: 5 µs per mask (``compute_bitmask``) at the embedded pair's
4,096-token vocabulary.

Schemas come from the network, so they are bounded before compiling: at most
``MAX_SCHEMA_BYTES`` of JSON and ``MAX_DEPTH`` levels of nesting; a grammar llguidance
rejects is refused with its reason (``InvalidRequestError``), never generated without.
Compiled grammars are cached by their text (bounded), so a repeated schema costs nothing.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import numpy
import torch

from ._config import ResponseFormat
from ._errors import InvalidRequestError

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

__all__ = ["Constraint", "ConstraintFactory"]

MAX_SCHEMA_BYTES = 64 * 1024
MAX_DEPTH = 32
_CACHE_SIZE = 128


def grammar_text(fmt: ResponseFormat) -> str:
    """The llguidance grammar of a response format (raises InvalidRequestError)."""
    from llguidance import LLMatcher

    # Compact JSON: whitespace the schema does not need is where a small model wanders.
    # oneOf is generated as anyOf: exact wherever the branches are disjoint, as Pydantic's
    # discriminated unions are (llguidance cannot check "exactly one" while generating).
    options: JsonCompileOptions = {"whitespace_flexible": False, "coerce_one_of": True}
    if fmt.type == "json_object":
        return str(LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=options))
    if fmt.type == "json_schema":
        assert fmt.json_schema is not None
        schema = fmt.json_schema.schema
        _check_size(schema)
        if fmt.json_schema.strict:
            schema = _closed(schema)
        try:
            return str(LLMatcher.grammar_from_json_schema(schema, overrides=options))
        except Exception as exc:  # llguidance names what it cannot compile
            raise InvalidRequestError(
                f"the JSON schema cannot be used: {exc}", param="response_format"
            ) from None
    if fmt.type == "regex":
        assert fmt.pattern is not None
        return str(LLMatcher.grammar_from_regex(fmt.pattern))
    assert fmt.type == "choice" and fmt.choices
    return str(LLMatcher.grammar_from_regex("|".join(re.escape(c) for c in fmt.choices)))


# Keywords whose value is a schema, a list of schemas, or a mapping of names to schemas: the
# places ``strict`` looks for object schemas (never inside const, enum, default or examples).
_SUBSCHEMA = {
    "items",
    "additionalItems",
    "contains",
    "not",
    "if",
    "then",
    "else",
    "additionalProperties",
    "propertyNames",
    "unevaluatedItems",
    "unevaluatedProperties",
}
_SUBSCHEMAS = {"allOf", "anyOf", "oneOf", "prefixItems"}
_SCHEMA_MAPS = {"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"}


def _closed(schema: Any) -> Any:
    """``strict`` as OpenAI reads it: an object schema that does not say otherwise admits no
    properties beyond those it names."""
    if not isinstance(schema, dict):
        return schema
    closed = dict(schema)
    for key, value in schema.items():
        if key in _SUBSCHEMA:
            closed[key] = _closed(value)
        elif key in _SUBSCHEMAS and isinstance(value, list):
            closed[key] = [_closed(item) for item in value]
        elif key in _SCHEMA_MAPS and isinstance(value, dict):
            closed[key] = {name: _closed(item) for name, item in value.items()}
    if "properties" in closed and "additionalProperties" not in closed:
        closed["additionalProperties"] = False
    return closed


def _check_size(schema: Any) -> None:
    size = len(json.dumps(schema))
    if size > MAX_SCHEMA_BYTES:
        raise InvalidRequestError(
            f"the JSON schema is {size} bytes; at most {MAX_SCHEMA_BYTES} are accepted",
            param="response_format",
        )
    stack = [(schema, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise InvalidRequestError(
                f"the JSON schema nests deeper than {MAX_DEPTH} levels", param="response_format"
            )
        children = value.values() if isinstance(value, dict) else value
        if isinstance(value, (dict, list)):
            stack.extend((child, depth + 1) for child in children)


class ConstraintFactory:
    """Compiles response formats for one tokenizer, caching grammars; thread-safe."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self._hf_tokenizer = tokenizer
        self.vocab_size = vocab_size  # the verifier's logits width
        self._tokenizer: Any = None
        self._grammars: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    def tokenizer(self) -> Any:
        """llguidance's view of the tokenizer (made on first use)."""
        if self._tokenizer is None:
            import llguidance.hf

            self._tokenizer = llguidance.hf.from_tokenizer(self._hf_tokenizer)
        return self._tokenizer

    def constraint(self, fmt: ResponseFormat) -> Constraint:
        """A fresh matcher for one generation (raises InvalidRequestError)."""
        from llguidance import LLMatcher

        key = fmt.cache_key()
        with self._lock:  # held for the cache only: a slow compile holds up no other
            tokenizer = self.tokenizer()
            grammar = self._grammars.get(key)
            if grammar is not None:
                self._grammars.move_to_end(key)
        if grammar is None:
            grammar = grammar_text(fmt)
            valid, message = _validate(grammar, tokenizer)
            if not valid:
                raise InvalidRequestError(
                    f"the response format cannot be used: {message}", param="response_format"
                )
            with self._lock:
                self._grammars[key] = grammar
                if len(self._grammars) > _CACHE_SIZE:
                    self._grammars.popitem(last=False)
        matcher = LLMatcher(tokenizer, grammar)
        if matcher.is_error():
            raise InvalidRequestError(
                f"the response format cannot be used: {matcher.get_error()}",
                param="response_format",
            )
        return Constraint(matcher, tokenizer.vocab_size, self.vocab_size)


def _validate(grammar: str, tokenizer: Any) -> tuple[bool, str]:
    from llguidance import LLMatcher

    result = LLMatcher.validate_grammar(grammar, tokenizer)
    if isinstance(result, str):  # older releases: an error message, empty when valid
        return not result, result
    valid, messages = result
    return bool(valid), str(messages)


class Constraint:
    """One generation's position in its grammar (an ``LLMatcher``)."""

    def __init__(self, matcher: Any, tokenizer_vocab: int, vocab_size: int) -> None:
        self.matcher = matcher
        self.tokenizer_vocab = tokenizer_vocab
        self.vocab_size = vocab_size

    def fit(self, draft: list[int], room: int) -> tuple[int, bool, list[int]]:
        """A draft walked through the grammar from here, in one pass (the matcher ends where
        it started): how many leading tokens may be drafted, whether the token after them is
        illegal (else the grammar ends there, where plain decoding stops, and what follows is
        not drafted), and up to ``room`` minus those the tokens the grammar then dictates
        (JSON keys, punctuation: the canonical tokens of the bytes it forces)."""
        legal = int(self.matcher.validate_tokens(draft)) if draft else 0
        kept = 0
        try:
            for token in draft[:legal]:
                self.matcher.consume_token(token)
                kept += 1
                if self.matcher.is_stopped():
                    break
            forced: list[int] = []
            if room > kept and not self.matcher.is_stopped():
                forced = list(self.matcher.compute_ff_tokens())[: room - kept]
                forced = forced[: int(self.matcher.validate_tokens(forced))] if forced else []
        finally:
            if kept:
                self.matcher.rollback(kept)
        return kept, kept == legal < len(draft), forced

    def masks(self, draft: list[int], device: torch.device) -> torch.Tensor:
        """(len(draft) + 1, vocab) bool: the tokens allowed after each prefix of ``draft``
        (which must be legal); the matcher ends where it started."""
        rows = []
        for i in range(len(draft) + 1):
            rows.append(self.matcher.compute_bitmask())
            if i < len(draft) and not self.matcher.consume_token(draft[i]):
                raise RuntimeError(f"the grammar rejected draft token {draft[i]} it had allowed")
        if draft:
            self.matcher.rollback(len(draft))
        # Little-endian 32-bit words, bit j of word w for token 32 w + j: byte by byte with
        # the low bit first. numpy unpacks on this thread (torch's element-wise ops would
        # split a large mask across its threads, which waits when the other core is busy).
        packed = numpy.frombuffer(b"".join(rows), dtype=numpy.uint8).reshape(len(rows), -1)
        allowed = numpy.unpackbits(packed, axis=1, bitorder="little")
        out = numpy.zeros((len(rows), self.vocab_size), dtype=numpy.bool_)
        width = min(self.vocab_size, allowed.shape[1])
        out[:, :width] = allowed[:, :width]
        return torch.from_numpy(out).to(device)

    def commit(self, tokens: list[int]) -> int | None:
        """Consume what the round kept; where the grammar ended (nothing may follow), how many
        of ``tokens`` it took: plain decoding would have stopped there."""
        for i, token in enumerate(tokens):
            if not self.matcher.consume_token(token):
                raise RuntimeError(
                    f"the grammar rejected committed token {token}: {self.matcher.get_error()}"
                )
            if self.matcher.is_stopped():
                return i + 1
        return None
