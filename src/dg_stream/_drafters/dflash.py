"""Drafting with a DFlash checkpoint: one forward fills the whole block.

A generation's session keeps the context keys and values of every committed position whose
verifier features it has read (``ContextCache``); each proposal appends the positions committed
since the last one, embeds [newest token, mask × (block − 1)] with the verifier's own
embeddings, and reads the first k slots through the verifier's LM head. Every position is
drawn given the context alone, never given another drafted token, so the recorded q is exactly
what each token was drawn from and the speculative-sampling rule applies unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch

from .._sampling import logits_to_probs, sample
from .base import (
    DrafterTraits,
    DraftProposal,
    DraftRequest,
    DraftSession,
    empty_proposal,
)
from .dflash_model import ContextCache, DFlashModel

__all__ = ["DFlashDrafter", "DFlashSession"]


class DFlashDrafter:
    """A ``DFlashModel`` bound to the verifier whose embeddings, head and states it reads.

    Raises ``ValueError`` (naming the mismatch) when the checkpoint was made for a verifier of
    another width or depth, or its mask id is not in the verifier's embedding table.
    """

    def __init__(self, model: DFlashModel, verifier_model: Any) -> None:
        self.model = model.eval()
        self.spec = model.spec
        config = verifier_model.config
        embed = verifier_model.get_input_embeddings()
        head = verifier_model.get_output_embeddings()
        if embed is None or head is None:
            raise ValueError("the verifier has no input embeddings or LM head to lend")
        hidden = int(getattr(config, "hidden_size", embed.weight.shape[1]))
        depth = int(getattr(config, "num_hidden_layers", 0) or 0)
        if int(model.config.hidden_size) != hidden:
            raise ValueError(
                f"the drafter's hidden size is {model.config.hidden_size}, the verifier's "
                f"{hidden}: it was made for another verifier"
            )
        wrong = [i for i in self.spec.target_layer_ids if not 0 <= i < depth]
        if wrong:
            raise ValueError(
                f"the drafter reads verifier layers {list(self.spec.target_layer_ids)}, but "
                f"the verifier has layers 0 to {depth - 1} (not {wrong})"
            )
        if model.feature_size != len(self.spec.target_layer_ids) * hidden:
            raise ValueError(
                f"the drafter's fc reads {model.feature_size} features, but "
                f"{len(self.spec.target_layer_ids)} layers of width {hidden} give "
                f"{len(self.spec.target_layer_ids) * hidden}"
            )
        rows = int(embed.weight.shape[0])
        if not 0 <= self.spec.mask_token_id < rows:
            raise ValueError(
                f"the drafter's mask token id {self.spec.mask_token_id} is not in the "
                f"verifier's embedding table of {rows} ids"
            )
        self.embed, self.head = embed, head
        self.max_block_size = largest = self.spec.block_size - 1
        # The whole trained block unless the config records a faster one (dg_stream's own
        # keys, as for diffusion drafters: measured, e.g. on 2 CPU cores).
        recommended = getattr(model.config, "dg_stream_block_size", None)
        adaptive = getattr(model.config, "dg_stream_adaptive", None)
        # Every committed position's features: the drafter attends over the whole context.
        limit = getattr(config, "max_position_embeddings", None)
        self.traits = DrafterTraits(
            max_block_size=self.max_block_size,
            vocab_size=int(head.weight.shape[0]),
            feature_layers=self.spec.feature_layers,
            feature_window=int(limit) if isinstance(limit, int) and limit > 0 else 1 << 30,
            feature_size=model.feature_size,
            # Each committed position's features once, as the verifier computed them (``fc``
            # was trained on raw hidden states, not unit-RMS ones).
            feature_stream=True,
            raw_features=True,
            batched=True,
            recommended_block_size=min(int(recommended or largest), largest),
            recommended_adaptive=None if adaptive is None else bool(adaptive),
        )
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype

    def session(self) -> DFlashSession:
        return DFlashSession(self)

    @torch.inference_mode()
    def propose_batch(
        self, sessions: Sequence[DraftSession], requests: Sequence[DraftRequest]
    ) -> list[DraftProposal]:
        """Several generations' blocks in one forward (``DFlashModel.forward_rows``: the
        projections and MLPs batched, attention per row over its own cached context); each
        row drafts what it drafts alone. ``sessions`` are this drafter's ``DFlashSession``s."""
        own = [cast(DFlashSession, s) for s in sessions]
        out: list[DraftProposal | None] = [None] * len(own)
        rows = []
        for i, (session, request) in enumerate(zip(own, requests, strict=True)):
            if min(request.k, self.max_block_size) <= 0 or session.cache is None:
                out[i] = empty_proposal(request.context.device)
            else:
                rows.append(i)
        if rows:
            blocks, positions, contexts = zip(
                *(own[i]._inputs(requests[i]) for i in rows), strict=True
            )
            caches = [cache for i in rows if (cache := own[i].cache) is not None]
            hidden = self.model.forward_rows(
                torch.cat(blocks), torch.cat(positions), list(contexts), caches
            )
            for r, i in enumerate(rows):
                out[i] = self._draw(hidden[r], requests[i])
        return [p for p in out if p is not None]

    def _draw(self, hidden: torch.Tensor, request: DraftRequest) -> DraftProposal:
        """A block from its (slots + 1, H) hidden states: the first k slots after the
        newest token, read through the verifier's head."""
        k = min(request.k, self.max_block_size)
        head_dtype = self.head.weight.dtype  # the drafter may run in another precision
        logits = self.model.logits(hidden[1 : k + 1].to(head_dtype), self.head).float()
        device = request.context.device
        if request.params.greedy:
            return DraftProposal(logits.argmax(dim=-1).to(device), None)
        q = logits_to_probs(logits, request.params)  # (k, V)
        return DraftProposal(sample(q, request.generator).to(device), q.to(device))


class DFlashSession:
    """One generation's drafter state: the context cache."""

    def __init__(self, drafter: DFlashDrafter) -> None:
        self.drafter = drafter
        self.cache: ContextCache | None = ContextCache(len(drafter.model.layers))

    def _new_context(
        self, features: torch.Tensor | None, newest: int
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The features (1, n, F) and positions (1, n) of committed positions the cache lacks.

        ``features`` cover the positions just before ``newest``; rows the cache already holds
        are skipped. A gap (positions never handed over) restarts the cache from these rows.
        """
        assert self.cache is not None
        if features is None or features.shape[0] == 0:
            return None, None
        first = newest - features.shape[0]
        if first > self.cache.next_position:  # a gap: what is cached no longer lines up
            self.cache = ContextCache(len(self.drafter.model.layers))
        skip = max(0, self.cache.next_position - first)
        rows = features[skip:]
        if rows.shape[0] == 0:
            return None, None
        device = self.drafter.device
        positions = torch.arange(first + skip, newest, device=device)[None]
        return rows.to(device)[None], positions

    def _inputs(
        self, request: DraftRequest
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """The block's embeddings (1, slots + 1, H) and positions (1, slots + 1), and the
        new context rows (n, F) with their positions (n,) (None: nothing new)."""
        drafter, context = self.drafter, request.context
        newest = int(context.shape[0]) - 1  # position of the newest committed token
        new, new_positions = self._new_context(request.features, newest)
        device = drafter.device
        # Always the whole trained block: its slots attend to each other, so a shorter block
        # would draft differently from what training taught; the first k are returned.
        slots = drafter.max_block_size
        ids = torch.full((slots + 1,), drafter.spec.mask_token_id, dtype=torch.long, device=device)
        ids[0] = context[-1]
        block = drafter.embed(ids)[None].to(drafter.dtype)
        positions = torch.arange(newest, newest + slots + 1, device=device)[None]
        fresh = None if new is None or new_positions is None else (new[0], new_positions[0])
        return block, positions, fresh

    @torch.inference_mode()
    def propose(self, request: DraftRequest) -> DraftProposal:
        """Draft up to ``k`` tokens after the context in one forward; the features are the
        verifier's raw states of the positions before the newest token. ``steps`` and
        ``confidence`` do not apply: one pass fills the block."""
        if min(request.k, self.drafter.max_block_size) <= 0 or self.cache is None:
            return empty_proposal(request.context.device)
        block, positions, fresh = self._inputs(request)
        new, new_positions = (None, None) if fresh is None else (fresh[0][None], fresh[1][None])
        hidden = self.drafter.model(block, positions, new, new_positions, cache=self.cache)
        return self.drafter._draw(hidden[0], request)

    def close(self) -> None:
        self.cache = None
