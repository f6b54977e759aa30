"""The synchronous step loop: draft, verify, accept, roll back, emit.

One ``GenerationSession`` per generation; each ``step()`` is one verifier call and returns one
``Chunk`` (``None`` once finished). Everything here is plain torch on the calling thread; the
async layer decides which thread that is.
"""

from __future__ import annotations

import random
import time
from typing import Any

import msgspec
import torch

from ._acceptance import Verdict, accept_greedy, accept_sampled
from ._block_policy import AcceptanceEstimate, BlockSizePolicy, CostTable
from ._chunks import Chunk, FinishReason, Stats, StepStats, Usage
from ._config import GenerationRequest, SpeculativeConfig
from ._detokenize import IncrementalDetokenizer
from ._drafters.base import Drafter, DraftProposal, DraftSession, empty_proposal
from ._errors import InvalidRequestError
from ._prompt import encode_prompt
from ._sampling import apply_repetition_penalty, process_logits
from ._stop import StopMatcher
from ._verifier import Scores, Verifier

__all__ = ["Engine", "GenerationSession"]


class Engine:
    """A verifier, an optional drafter and the defaults for speculative options."""

    def __init__(
        self,
        verifier: Verifier,
        drafter: Drafter | None,
        tokenizer: Any,
        defaults: SpeculativeConfig,
    ) -> None:
        self.verifier = verifier
        self.drafter = drafter
        self.tokenizer = tokenizer
        self.defaults = defaults
        # Measured seconds per verifier and drafter call, and the acceptance seen so far
        # (greedy and sampled apart), shared by every generation's adaptive block size: they
        # belong to these models on this machine, not to one prompt.
        self.costs = CostTable()
        self.acceptance = {
            greedy: AcceptanceEstimate(64, decay=0.98) for greedy in (True, False)
        }

    def session(self, request: GenerationRequest) -> GenerationSession:
        """Tokenize and validate (no model work yet); raises InvalidRequestError."""
        return GenerationSession(self, request)


class GenerationSession:
    def __init__(self, engine: Engine, request: GenerationRequest) -> None:
        self.engine = engine
        self.request = request
        verifier = engine.verifier
        self.prompt_ids = encode_prompt(engine.tokenizer, request, verifier.vocab_size)
        limit = verifier.max_length
        if limit is not None and len(self.prompt_ids) + request.max_new_tokens > limit:
            n = len(self.prompt_ids)
            raise InvalidRequestError(
                f"the prompt ({n} token{'' if n == 1 else 's'}) plus max_new_tokens "
                f"({request.max_new_tokens}) exceeds the verifier's context of {limit} tokens",
                param="max_new_tokens",
            )
        spec, defaults = request.speculative, engine.defaults
        self.block_size = spec.block_size or defaults.block_size or 8
        self.steps = spec.steps or defaults.steps or 1
        self.confidence = spec.confidence if spec.confidence is not None else defaults.confidence
        self.params = request.sampling
        if spec.adaptive is not None:
            self.adaptive = spec.adaptive
        else:
            # Adaptive block sizes follow measured timings; greedy output does not depend on
            # them, but a seeded sample would, so a backend default leaves seeded sampling be.
            reproducible = self.params.greedy or self.params.seed is None
            self.adaptive = bool(defaults.adaptive) and reproducible
        seed = self.params.seed if self.params.seed is not None else random.getrandbits(63)
        self.generator = torch.Generator().manual_seed(seed)
        self.ids = torch.tensor(self.prompt_ids, dtype=torch.long)
        self.cache = verifier.new_cache()
        self.draft_session: DraftSession | None = (
            engine.drafter.session() if engine.drafter is not None else None
        )
        self.policy: BlockSizePolicy | None = None
        if self.adaptive and engine.drafter is not None:
            largest = min(4 * self.block_size, 64, engine.drafter.max_block_size)
            self.policy = BlockSizePolicy(
                self.block_size,
                largest,
                engine.costs,
                steps=self.steps,
                shared=engine.acceptance[self.params.greedy],
            )
        self.detok = IncrementalDetokenizer(engine.tokenizer, self.prompt_ids)
        self.stops = StopMatcher(request.stop)
        self.generated = 0
        self.stats = Stats()
        self.started = time.perf_counter()
        # Verifier features of the newest committed positions (all but the newest token),
        # for a drafter that reads them; drafters written before features existed read none.
        drafter = engine.drafter
        self.feature_window = int(getattr(drafter, "feature_window", 0) or 0)
        layers = getattr(drafter, "feature_layers", ()) or ()
        self.feature_layers: tuple[int, ...] = tuple(layers) if self.feature_window > 0 else ()
        # A drafter that caches what it has read (DFlash) is handed each position's features
        # once; it reads them raw when its own projection normalises them.
        self.feature_stream = bool(getattr(drafter, "feature_stream", False))
        self.raw_features = bool(getattr(drafter, "raw_features", False))
        self.features: torch.Tensor | None = None
        self.proposal: DraftProposal | None = None
        self.finished = False
        self.text_parts: list[str] = []

    # -- one verifier call ------------------------------------------------------------------

    def step(self) -> Chunk | None:
        if self.finished:
            return None
        verifier = self.engine.verifier
        draft_seconds = 0.0
        t0 = time.perf_counter()
        if self.cache.length == 0 and self.ids.shape[0] > 1:
            # Prefill all but the newest token (features only for the rows the drafter reads).
            prefill = verifier.forward(
                self.ids[:-1],
                self.cache,
                self.feature_layers,
                feature_rows=self.feature_window,
                raw_features=self.raw_features,
            )
            self._keep_features(prefill)
        if self.proposal is None:  # first step; later proposals are made at the end of a step
            t_draft = time.perf_counter()
            self.proposal = self._propose()
            draft_seconds += time.perf_counter() - t_draft
        draft = self.proposal
        k = draft.tokens.shape[0]
        block = torch.cat([self.ids[-1:], draft.tokens])  # newest committed token + draft
        t_verify = time.perf_counter()
        scores = verifier.forward(
            block, self.cache, self.feature_layers, raw_features=self.raw_features
        )
        logits = scores.logits  # (k+1, V)
        if self.policy is not None:
            if logits.is_cuda:  # time the work, not its launch (acceptance syncs anyway)
                torch.cuda.synchronize(logits.device)
            self.policy.costs.observe_verify(k + 1, time.perf_counter() - t_verify)
        verdict = self._accept(logits, draft)
        # Keep the cache of the context, the newest token and the accepted drafts; the token
        # the verifier adds is the next call's first input, so it is not cached yet.
        self.cache.rollback(self.cache.length - (k - verdict.accepted))
        self._keep_features(scores, verdict.accepted + 1)
        new = [*draft.tokens[: verdict.accepted].tolist(), verdict.token]
        finish = self._truncate(new)
        self.ids = torch.cat([self.ids, torch.tensor(new, dtype=torch.long)])
        self.generated += len(new)
        verify_seconds = time.perf_counter() - t0 - draft_seconds
        text = self.stops.feed(self.detok.feed([t for t in new if t not in verifier.eos_ids]))
        if self.stops.stopped:
            finish = "stop"
        self.proposal = None
        if finish is None:
            if self.policy is not None:
                self.policy.observe(k, verdict.accepted)
            t_draft = time.perf_counter()
            self.proposal = self._propose()
            draft_seconds += time.perf_counter() - t_draft
        step = StepStats(
            drafted=k,
            accepted=verdict.accepted,
            committed=len(new),
            draft_seconds=draft_seconds,
            verify_seconds=verify_seconds,
        )
        self.stats = self.stats.add(step)
        if finish is not None:
            return self._finish(text, new, step, finish)
        self.text_parts.append(text)
        preview = ""
        if self.request.draft_preview and self.proposal is not None:
            preview = self.stops.held + self.detok.peek(self.proposal.tokens.tolist())
        return Chunk(text=text, token_ids=tuple(new), draft=preview, step=step)

    # -- pieces -----------------------------------------------------------------------------

    def _keep_features(self, scores: Scores, count: int | None = None) -> None:
        """Append the features of the first ``count`` positions a call fed (all by default)."""
        if scores.features is None:
            return
        new = scores.features[:count]
        if self.features is not None:
            new = torch.cat([self.features, new])
        self.features = new[-self.feature_window :].clone()  # not a view of the whole call

    def _propose(self) -> DraftProposal:
        remaining = self.request.max_new_tokens - self.generated
        # The verifier always adds one token, so drafting past remaining - 1 is wasted work.
        wanted = self.policy.next_block() if self.policy is not None else self.block_size
        k = min(wanted, remaining - 1)
        if self.draft_session is None or k <= 0:
            return empty_proposal()
        started = time.perf_counter()
        # Features go only to drafters that read them (older drafters lack the keyword).
        extra = {"features": self.features} if self.feature_layers else {}
        proposal = self.draft_session.propose(
            self.ids,
            k,
            self.params,
            self.generator,
            steps=self.steps,
            confidence=self.confidence,
            **extra,
        )
        if self.feature_stream:
            self.features = None  # the drafter has them now
        if self.policy is not None:
            self.policy.costs.observe_draft(k, time.perf_counter() - started, self.steps)
        return proposal

    def _accept(self, logits: torch.Tensor, draft: DraftProposal) -> Verdict:
        params = self.params
        if params.repetition_penalty is not None and params.repetition_penalty != 1.0:
            logits = apply_repetition_penalty(
                logits,
                self.ids.to(logits.device),
                draft.tokens.to(logits.device),
                params.repetition_penalty,
            )
        tokens = draft.tokens.to(logits.device)
        if params.greedy:
            return accept_greedy(logits, tokens)
        p = process_logits(logits, params).softmax(dim=-1)  # (k+1, V)
        q = draft.q
        if q is not None:
            q = q.to(p.device, p.dtype)
            if q.shape[-1] < p.shape[-1]:  # drafter vocabulary without the verifier's padding
                q = torch.nn.functional.pad(q, (0, p.shape[-1] - q.shape[-1]))
        return accept_sampled(p, tokens, q, self.generator)

    def _truncate(self, new: list[int]) -> FinishReason | None:
        """Cut ``new`` in place at the first end-of-sequence or at max_new_tokens."""
        finish: FinishReason | None = None
        for i, token in enumerate(new):
            if token in self.engine.verifier.eos_ids:
                del new[i + 1 :]
                finish = "stop"
                break
        room = self.request.max_new_tokens - self.generated
        if len(new) > room:
            del new[room:]
            finish = "length"
        elif len(new) == room and finish is None:
            finish = "length"
        return finish

    def _finish(self, text: str, new: list[int], step: StepStats, finish: FinishReason) -> Chunk:
        self.finished = True
        if not self.stops.stopped:
            text += self.stops.feed(self.detok.flush())
            text += self.stops.flush()
        self.text_parts.append(text)
        self.stats = msgspec.structs.replace(
            self.stats, total_seconds=time.perf_counter() - self.started
        )
        usage = Usage(prompt_tokens=len(self.prompt_ids), completion_tokens=self.generated)
        self.close()
        return Chunk(
            text=text,
            token_ids=tuple(new),
            finish_reason=finish,
            step=step,
            usage=usage,
            stats=self.stats,
        )

    def close(self) -> None:
        """Free the cache and drafter state (idempotent)."""
        self.finished = True
        self.proposal = None
        if self.draft_session is not None:
            self.draft_session.close()
            self.draft_session = None
        self.cache.release()
        self.features = None

    @property
    def text(self) -> str:
        return "".join(self.text_parts)
