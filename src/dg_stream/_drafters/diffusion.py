"""A masked-diffusion drafter: fill a masked block after the recent context in a few steps.

The model is any bidirectional masked LM (``AutoModelForMaskedLM``). Its input is the last
``window`` context tokens followed by ``k`` mask tokens; each denoising step predicts every
masked position at once and unmasks the most confident ones (all those above ``confidence``,
at least an even share of the rest), so ``steps=1`` fills the whole block in one forward.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .._config import SamplingParams
from .._sampling import logits_to_probs, sample
from .base import DraftProposal, empty_proposal
from .lean_bert import maybe_lean

__all__ = ["DiffusionDrafter"]


class DiffusionDrafter:
    """Drafts with a masked LM. ``steps``/``confidence`` can be overridden per request."""

    def __init__(
        self,
        model: Any,
        *,
        mask_token_id: int,
        window: int | None = None,
        steps: int = 1,
        confidence: float | None = None,
        output_vocab_size: int | None = None,
    ) -> None:
        self.model = model.eval()
        self.mask_token_id = int(mask_token_id)
        self.vocab_size: int | None = int(model.config.vocab_size)
        # Ids the verifier can score; a drafter-only id (its mask token, say) is never proposed.
        self.output_vocab_size = int(output_vocab_size or self.vocab_size)
        max_positions = int(getattr(model.config, "max_position_embeddings", 512) or 512)
        configured = getattr(model.config, "dg_stream_window", None)
        self.window = int(window or configured or max(1, min(64, max_positions // 2)))
        self.max_block_size = max(1, max_positions - self.window)
        # The block size and adaptive setting found fastest with this checkpoint, when its
        # config records them.
        recommended = getattr(model.config, "dg_stream_block_size", None)
        self.recommended_block_size: int | None = (
            min(int(recommended), self.max_block_size) if recommended else None
        )
        adaptive = getattr(model.config, "dg_stream_adaptive", None)
        self.recommended_adaptive: bool | None = None if adaptive is None else bool(adaptive)
        if self.window >= max_positions:
            raise ValueError(
                f"window {self.window} leaves no room for a block within the "
                f"drafter's {max_positions} positions"
            )
        self.steps = steps
        self.confidence = confidence
        self.device = next(model.parameters()).device
        self._lean = maybe_lean(model)

    def session(self) -> DiffusionDrafter:
        return self  # stateless: the context is re-read each proposal (it is short)

    def close(self) -> None:
        return None

    def _logits(self, ids: torch.Tensor, last: int) -> torch.Tensor:
        """(T,) ids -> (last, V) float logits of the last positions; the mask never proposed."""
        if self._lean is not None:
            logits = self._lean(ids, last)
        else:
            logits = self.model(input_ids=ids[None]).logits[0, -last:]
        logits = logits[:, : self.output_vocab_size].float()
        if self.mask_token_id < logits.shape[-1]:
            logits[:, self.mask_token_id] = float("-inf")
        return logits

    @torch.inference_mode()
    def propose(
        self,
        context: torch.Tensor,
        k: int,
        params: SamplingParams,
        generator: torch.Generator | None,
        *,
        steps: int | None = None,
        confidence: float | None = None,
    ) -> DraftProposal:
        k = min(k, self.max_block_size)
        if k <= 0:
            return empty_proposal(context.device)
        steps = max(1, min(steps or self.steps, k))
        confidence = confidence if confidence is not None else self.confidence
        ctx = context[-self.window :].to(self.device)
        n = ctx.shape[0]
        ids = torch.cat([ctx, torch.full((k,), self.mask_token_id, device=self.device)])
        if steps == 1:
            logits = self._logits(ids, k)  # (k, V)
            if params.greedy:
                return DraftProposal(logits.argmax(dim=-1).to(context.device), None)
            # One step: every token is drawn from a distribution conditioned on the context
            # alone, so q is exact and the full speculative-sampling rule applies.
            q = logits_to_probs(logits, params)
            return DraftProposal(sample(q, generator).to(context.device), q.to(context.device))
        masked = torch.ones(k, dtype=torch.bool, device=self.device)
        for step in range(steps):
            logits = self._logits(ids, k)
            probs = logits.softmax(dim=-1) if params.greedy else logits_to_probs(logits, params)
            conf, choice = probs.max(dim=-1)  # (k,), (k,)
            conf = conf.masked_fill(~masked, -1.0)
            remaining = int(masked.sum())
            take = math.ceil(remaining / (steps - step))
            chosen = torch.topk(conf, take).indices
            if confidence is not None:
                chosen = torch.unique(torch.cat([chosen, (conf >= confidence).nonzero().flatten()]))
            ids[n + chosen] = choice[chosen]
            masked[chosen] = False
            if not masked.any():
                break
        # Tokens were chosen in confidence order, some conditioned on tokens to their right:
        # no honest q(x_i | x_<i) exists, so the verifier treats the block as a point mass.
        return DraftProposal(ids[n:].to(context.device), None)
