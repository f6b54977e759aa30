"""Generations on top of the round core: the per-request output layer.

``Engine`` holds the models, the speculative defaults and what all generations learn about
this machine (costs, acceptance). ``GenerationSession`` is one request: it tokenizes and
validates, owns the ``SequenceState`` the round core advances, and turns each round's
``RowOutcome`` into a ``Chunk`` (detokenized text, stop strings, draft preview, stats, finish).
The round core never sees text; this layer never sees the cache.

``session.step()`` runs rounds of a private batch of one on the calling thread; a backend
(``LocalBackend``) instead adds the session's state to the shared ``Batch`` of its model
thread and hands each outcome to ``session.emit`` on the event loop that reads the stream.
``emit`` never touches the ``SequenceState`` (the torch thread owns it): what it shows comes
in the outcome.
"""

from __future__ import annotations

import random
import threading
import time
from typing import Any

import msgspec
import torch

from ._block_policy import AcceptanceEstimate, BlockSizePolicy, CostTable, DraftGate
from ._chunks import Chunk, FinishReason, Stats, StepStats, Usage
from ._config import GenerationRequest, SpeculativeConfig
from ._constraints import ConstraintFactory
from ._detokenize import IncrementalDetokenizer
from ._drafters.base import Drafter
from ._prompt import admit_length, encode_prompt
from ._rounds import Batch, RoundCore, RowOutcome, SequenceState
from ._stop import StopMatcher
from ._verifier import Verifier

__all__ = ["Engine", "GenerationSession"]


class Engine:
    """A verifier, an optional drafter and the defaults for speculative options."""

    def __init__(
        self,
        verifier: Verifier,
        drafter: Drafter | None,
        tokenizer: Any,
        defaults: SpeculativeConfig,
        prefill_chunk: int = 512,
        context_length: int | None = None,
    ) -> None:
        self.verifier = verifier
        # The most tokens one generation may span (the backend's context_length; default
        # the verifier's): every request is admitted against it here, once.
        self.context_length = verifier.max_length if context_length is None else context_length
        self._constraints: ConstraintFactory | None = None
        self.drafter = drafter
        self.tokenizer = tokenizer
        self.defaults = defaults
        # Measured seconds per verifier and drafter call, and the acceptance seen so far
        # (greedy and sampled apart), shared by every generation's adaptive block size: they
        # belong to these models on this machine, not to one prompt.
        self.acceptance = {greedy: AcceptanceEstimate(64, decay=0.98) for greedy in (True, False)}
        self.core = RoundCore(verifier, drafter, CostTable(), prefill_chunk)
        # Event loops in different threads may encode and decode at once; a fast tokenizer
        # is not safe for that.
        self.tokenizer_lock = threading.Lock()

    @property
    def costs(self) -> CostTable:
        """The measured costs every generation's adaptive block size reads (the core's)."""
        return self.core.costs

    @costs.setter
    def costs(self, costs: CostTable) -> None:
        self.core.costs = costs

    def session(self, request: GenerationRequest) -> GenerationSession:
        """Tokenize and validate (no model work yet); raises InvalidRequestError."""
        return GenerationSession(self, request)

    def constraints(self) -> ConstraintFactory:
        """Compiles response formats for this tokenizer (made on first use)."""
        with self.tokenizer_lock:
            if self._constraints is None:
                factory = ConstraintFactory(self.tokenizer, self.verifier.vocab_size)
                factory.tokenizer()  # reads the tokenizer: under its lock, once
                self._constraints = factory
            return self._constraints

    def batch(self, max_positions: int | None = None) -> Batch:
        """An empty batch of generations sharing one cache (of at most ``max_positions``
        allocated positions)."""
        return Batch(self.core, max_positions)


class GenerationSession:
    def __init__(self, engine: Engine, request: GenerationRequest) -> None:
        self.engine = engine
        self.request = request
        verifier = engine.verifier
        with engine.tokenizer_lock:
            self.prompt_ids = encode_prompt(engine.tokenizer, request, verifier.vocab_size)
        room = admit_length(request, len(self.prompt_ids), engine.context_length)
        if room != request.max_new_tokens:
            self.request = request = msgspec.structs.replace(request, max_new_tokens=room)
        spec, defaults = request.speculative, engine.defaults
        self.block_size = spec.block_size or defaults.block_size or 8
        self.steps = spec.steps or defaults.steps or 1
        self.confidence = spec.confidence if spec.confidence is not None else defaults.confidence
        self.params = request.sampling
        gate: DraftGate | None = None
        if spec.adaptive is not None:
            self.adaptive = spec.adaptive
        else:
            # Adaptive block sizes follow measured timings; greedy output does not depend on
            # them, but a seeded sample would, so a backend default leaves seeded sampling a
            # fixed block, switched off where the row's own acceptance says it loses (a
            # decision that repeats with the seed).
            reproducible = self.params.greedy or self.params.seed is None
            self.adaptive = bool(defaults.adaptive) and reproducible
            if defaults.adaptive and not reproducible and engine.drafter is not None:
                gate = DraftGate(self.block_size)
        seed = self.params.seed if self.params.seed is not None else random.getrandbits(63)
        policy: BlockSizePolicy | None = None
        if self.adaptive and engine.drafter is not None:
            largest = min(4 * self.block_size, 64, engine.drafter.traits.max_block_size)
            policy = BlockSizePolicy(
                self.block_size,
                largest,
                engine.costs,
                steps=self.steps,
                shared=engine.acceptance[self.params.greedy],
            )
        constraint = None
        fmt = request.response_format
        if fmt is not None and fmt.constrains:
            constraint = engine.constraints().constraint(fmt)
        device = verifier.device
        self.state = SequenceState(
            prompt=torch.tensor(self.prompt_ids, dtype=torch.long, device=device),
            max_new_tokens=request.max_new_tokens,
            params=self.params,
            # On the verifier's device: draws happen where the probabilities are.
            generator=torch.Generator(device=device).manual_seed(seed),
            block_size=self.block_size,
            steps=self.steps,
            confidence=self.confidence,
            drafting=engine.drafter is not None,  # its session opens when the row joins
            preview=request.draft_preview,
            policy=policy,
            gate=gate,
            constraint=constraint,
        )
        # The most tokens a round may feed this row: the newest one and its largest draft.
        largest = policy.max_block if policy is not None else self.block_size
        self.widest_feed = 1 + (largest if engine.drafter is not None else 0)
        with engine.tokenizer_lock:
            self.detok = IncrementalDetokenizer(engine.tokenizer, self.prompt_ids)
        self.stops = StopMatcher(request.stop)
        self.stats = Stats()
        self.started = time.perf_counter()
        self.finished = False
        self.text_parts: list[str] = []
        self._own_batch: Batch | None = None
        self._emitted = 0

    @property
    def policy(self) -> BlockSizePolicy | None:
        return self.state.policy

    @property
    def generated(self) -> int:
        """Tokens emitted so far (the output layer's count)."""
        return self._emitted

    # -- driving it alone -------------------------------------------------------------------

    def step(self) -> Chunk | None:
        """One round of this generation alone (a batch of one); None once finished."""
        if self.finished:
            return None
        if self._own_batch is None:
            self._own_batch = self.engine.batch()
            self._own_batch.add(self.state)
        while True:
            outcome = self._own_batch.run()[0]
            if isinstance(outcome, Exception):
                self.close()
                raise outcome
            if outcome is not None:  # None while a long prompt is still being read
                chunk = self.emit(outcome)
                if self.finished:
                    self.close()
                return chunk

    # -- the output layer -------------------------------------------------------------------

    def emit(self, outcome: RowOutcome) -> Chunk:
        """The chunk for what a round committed: text, stop strings, preview, stats."""
        new, step = outcome.tokens, outcome.step
        self._emitted += len(new)
        eos = self.engine.verifier.eos_ids
        with self.engine.tokenizer_lock:
            text = self.stops.feed(self.detok.feed([t for t in new if t not in eos]))
        finish: FinishReason | None = "stop" if self.stops.stopped else outcome.finish
        self.stats = self.stats.add(step)
        if finish is not None:
            return self._finish(text, new, step, finish)
        self.text_parts.append(text)
        preview = ""
        if self.request.draft_preview and outcome.preview is not None:
            with self.engine.tokenizer_lock:
                preview = self.stops.held + self.detok.peek(outcome.preview)
        return Chunk(text=text, token_ids=tuple(new), draft=preview, step=step)

    def _finish(self, text: str, new: list[int], step: StepStats, finish: FinishReason) -> Chunk:
        self.finished = True
        if not self.stops.stopped:
            with self.engine.tokenizer_lock:
                text += self.stops.feed(self.detok.flush())
            text += self.stops.flush()
            if self.stops.stopped:  # a stop string completed in the last text
                finish = "stop"
        self.text_parts.append(text)
        self.stats = msgspec.structs.replace(
            self.stats, total_seconds=time.perf_counter() - self.started
        )
        usage = Usage(prompt_tokens=len(self.prompt_ids), completion_tokens=self.generated)
        return Chunk(
            text=text,
            token_ids=tuple(new),
            finish_reason=finish,
            step=step,
            usage=usage,
            stats=self.stats,
        )

    def close(self) -> None:
        """Free the cache row and drafter state when this session drives itself with
        ``step()`` (idempotent). Under a backend the torch thread frees them instead."""
        self.finished = True
        if self._own_batch is not None:
            self._own_batch.remove(self.state)
            self._own_batch = None
        self.state.close()

    @property
    def text(self) -> str:
        return "".join(self.text_parts)
