"""A small causal LM as drafter: the classic speculative-decoding baseline."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch

from .._batch_cache import BatchCache
from .._sampling import logits_to_probs, sample
from .._verifier import cache_keyword
from .base import (
    DrafterTraits,
    DraftProposal,
    DraftRequest,
    DraftSession,
    empty_proposal,
)

__all__ = ["CausalDrafter"]


class CausalDrafter:
    """Drafts ``k`` tokens one at a time with a small causal LM.

    Where the model can share dg_stream's batched cache (``Verifier.batchable``: attention
    models), generations that draft in the same round are rows of one ``BatchCache`` and
    draft together: one forward for the committed tokens each row has not read yet, then
    one ``(rows, 1)`` forward per drafted position (16 rows of a 4-layer drafter: 26 ms
    against 130 ms one by one). A generation keeps a cache of its own until it first drafts
    with others. Models that cannot share the batched cache (recurrent layers, ALiBi from
    2-D masks, position-dependent rotary scaling) always draft alone. Either way a row reads
    only its own tokens, so it drafts what it drafts alone (up to float rounding of
    differently shaped forwards).
    """

    def __init__(self, model: Any) -> None:
        from .._errors import ModelLoadError
        from .._verifier import Verifier

        self.model = model.eval()
        self.max_positions = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
        self.device = next(model.parameters()).device
        self.cache_keyword = cache_keyword(model)
        self.scorer: Verifier | None
        try:  # the batched forward of the verifier, reused: rows of their own lengths
            self.scorer = Verifier(model)
        except ModelLoadError:
            self.scorer = None
        batched = self.scorer is not None and self.scorer.batchable
        self.traits = DrafterTraits(
            max_block_size=64, vocab_size=int(model.config.vocab_size), batched=batched
        )
        self._pool: BatchCache | None = None  # the rows of the batched sessions
        self._owners: list[_CausalDraftSession] = []  # the session of each row

    def session(self) -> _CausalDraftSession:
        return _CausalDraftSession(self)

    def propose_batch(
        self, sessions: Sequence[DraftSession], requests: Sequence[DraftRequest]
    ) -> list[DraftProposal]:
        own = [cast(_CausalDraftSession, s) for s in sessions]
        # A generation drafting alone keeps a cache of its own (a forward of transformers'
        # own is cheaper than the batched one for one row: 7.5 against 9.7 ms for 4 tokens);
        # it moves to a row of the batched cache the first time it drafts with others.
        if not self.traits.batched or (len(own) == 1 and own[0].row < 0):
            return [s._propose_alone(r) for s, r in zip(own, requests, strict=True)]
        return self._draft_rows(own, list(requests))

    # -- the batched rows ------------------------------------------------------------------

    def _row_of(self, session: _CausalDraftSession) -> int:
        if self._pool is None:
            assert self.scorer is not None
            pool = self.scorer.new_cache()
            assert isinstance(pool, BatchCache)
            self._pool = pool
        if session.row < 0:
            session.row = self._pool.add_row()
            self._owners.append(session)
            session.cache = session.cached = None  # its row starts empty: read from the start
        return session.row

    def _release(self, session: _CausalDraftSession) -> None:
        if session.row < 0 or self._pool is None:
            return
        moved = self._pool.remove_row(session.row)
        last = self._owners.pop()
        if moved is not None:
            self._owners[session.row] = last
            last.row = session.row
        session.row = -1

    @torch.inference_mode()
    def _draft_rows(
        self, sessions: list[_CausalDraftSession], requests: list[DraftRequest]
    ) -> list[DraftProposal]:
        assert self.scorer is not None
        out = [empty_proposal(r.context.device) for r in requests]
        rows: list[int] = []  # request indices that draft
        contexts: list[torch.Tensor] = []
        fresh: list[torch.Tensor] = []  # each row's committed ids not cached yet
        for i, (session, request) in enumerate(zip(sessions, requests, strict=True)):
            k = min(request.k, self.traits.max_block_size)
            if k <= 0:
                continue
            row = self._row_of(session)
            assert self._pool is not None
            context = request.context
            limit = self.max_positions - k - 1
            if context.shape[0] > limit:
                context = context[-(limit // 2) :]  # keep the recent half; restart the row
                session.cached = None
            cached = session.cached
            start = 0
            if cached is not None and _is_prefix(cached, context):
                start = min(cached.shape[0], context.shape[0] - 1)  # the newest is re-fed
            self._pool.lengths[row] = start
            rows.append(i)
            contexts.append(context)
            fresh.append(context[start:].to(self.device))
        if not rows:
            return out
        pool = self._pool
        assert pool is not None
        index = [sessions[i].row for i in rows]
        pad = self.scorer.pad_id
        # The committed ids before each row's newest, right-padded, in one forward.
        width = max(ids.shape[0] - 1 for ids in fresh)
        if width > 0:
            fed = torch.full((pool.rows, width), pad, dtype=torch.long, device=self.device)
            for row, ids in zip(index, fresh, strict=True):
                fed[row, : ids.shape[0] - 1] = ids[:-1]
            self.scorer.forward(fed, pool, 0, prefill=True)
            for row, ids in zip(index, fresh, strict=True):
                pool.lengths[row] += ids.shape[0] - 1
        # Then one position at a time: the newest id, then each drafted one.
        ks = [min(requests[i].k, self.traits.max_block_size) for i in rows]
        current = torch.stack([ids[-1] for ids in fresh])
        drafted: list[list[torch.Tensor]] = [[] for _ in rows]
        dists: list[list[torch.Tensor]] = [[] for _ in rows]
        where = torch.tensor(index, device=self.device)
        for step in range(max(ks)):
            fed = torch.full((pool.rows, 1), pad, dtype=torch.long, device=self.device)
            fed[where, 0] = current
            logits, _ = self.scorer.forward(fed, pool, 0)
            for row in index:
                pool.lengths[row] += 1
            last = logits[where, 0].float()  # (R, V)
            chosen = last.argmax(dim=-1)
            for r, i in enumerate(rows):
                params = requests[i].params
                if step >= ks[r] or params.greedy:
                    continue
                probs = logits_to_probs(last[r], params)
                chosen[r] = sample(probs, requests[i].generator)
                dists[r].append(probs)
            for r in range(len(rows)):
                if step < ks[r]:
                    drafted[r].append(chosen[r])
            current = chosen
        for r, i in enumerate(rows):
            session, device = sessions[i], requests[i].context.device
            pool.lengths[session.row] = contexts[r].shape[0]  # the drafts may be rejected
            session.cached = contexts[r].clone()
            q = torch.stack(dists[r]).to(device) if dists[r] else None
            out[i] = DraftProposal(torch.stack(drafted[r]).to(device), q)
        return out


def _is_prefix(prefix: torch.Tensor, full: torch.Tensor) -> bool:
    n = prefix.shape[0]
    return n <= full.shape[0] and bool((full[:n] == prefix).all())


class _CausalDraftSession:
    """One generation: a row of the drafter's batched cache, or a cache of its own."""

    def __init__(self, drafter: CausalDrafter) -> None:
        self.drafter = drafter
        self.row = -1  # its row in the drafter's batched cache (-1: none yet)
        self.cache: Any = None  # its own cache, where the model cannot share the batched one
        self.cached: torch.Tensor | None = None  # the committed ids its cache holds

    def close(self) -> None:
        self.drafter._release(self)
        self.cache = self.cached = None

    def propose(self, request: DraftRequest) -> DraftProposal:
        return self.drafter.propose_batch([self], [request])[0]

    def _reset(self) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.drafter.model.config)
        self.cached = None

    @torch.inference_mode()
    def _propose_alone(self, request: DraftRequest) -> DraftProposal:
        context, k, params = request.context, request.k, request.params
        k = min(k, self.drafter.traits.max_block_size)
        if k <= 0:
            return empty_proposal(context.device)
        model, device = self.drafter.model, self.drafter.device
        limit = self.drafter.max_positions - k - 1
        if context.shape[0] > limit:
            context = context[-(limit // 2) :]  # keep the recent half; restart the cache
            self._reset()
        if self.cache is None or self.cached is None or not _is_prefix(self.cached, context):
            self._reset()
        assert self.cache is not None
        start = 0 if self.cached is None else self.cached.shape[0]
        new = context[start:].to(device)
        tokens, dists = [], []
        kw = {self.drafter.cache_keyword: self.cache}
        logits = model(input_ids=new[None], use_cache=True, **kw).logits[0, -1]
        for i in range(k):
            logits = logits.float()
            if params.greedy:
                token = logits.argmax()
            else:
                probs = logits_to_probs(logits, params)
                token = sample(probs, request.generator)
                dists.append(probs)
            tokens.append(token)
            if i + 1 < k:
                logits = model(input_ids=token.view(1, 1), use_cache=True, **kw).logits[0, -1]
        # Roll the cache back to the committed context: the drafted tokens may be rejected.
        drafted_in_cache = k - 1
        if drafted_in_cache:
            self.cache.crop(-drafted_in_cache)
        self.cached = context.clone()
        q = torch.stack(dists).to(context.device) if dists else None
        return DraftProposal(torch.stack(tokens).to(context.device), q)
