"""A masked-diffusion drafter: fill a masked block after the recent context in a few steps.

The model is any bidirectional masked LM (``AutoModelForMaskedLM``). Its input is the last
``window`` context tokens followed by ``k`` mask tokens; each denoising step predicts every
masked position at once and unmasks the most confident ones (all those above ``confidence``,
at least an even share of the rest), so ``steps=1`` fills the whole block in one forward.

A feature-conditioned drafter (config ``dg_stream_feature_layers``, DFlash-style) also reads
the verifier's hidden states at those layers for its context tokens: a learned projection adds
them to the token embeddings, and the latest of them to every slot of the block. The newest
token has none yet (the verifier has not read it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from .._config import SamplingParams
from .._sampling import logits_to_probs, sample
from .base import DrafterTraits, DraftProposal, DraftRequest, DraftSession, empty_proposal
from .lean_bert import maybe_lean

__all__ = ["DiffusionDrafter", "place_features"]


def place_features(projected: torch.Tensor, length: int, context: int) -> torch.Tensor:
    """Where projected verifier features enter a drafter input of ``length`` positions whose
    first ``context`` are the context: (..., m, H) features of the m tokens before the newest
    -> (..., length, H) additions to the token embeddings.

    They sit on their own positions, the newest token gets none (the verifier has not read
    it), and the latest of them goes to every block slot. Training and drafting share this
    one rule.
    """
    m = projected.shape[-2]
    extra = projected.new_zeros(*projected.shape[:-2], length, projected.shape[-1])
    if m:
        extra[..., context - 1 - m : context - 1, :] = projected
        extra[..., context:, :] = projected[..., -1:, :]
    return extra


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
        feature_projection: torch.Tensor | None = None,
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
        layers = getattr(model.config, "dg_stream_feature_layers", None) or ()
        self.feature_layers: tuple[int, ...] = tuple(int(layer) for layer in layers)
        if self.feature_layers and feature_projection is None:
            raise ValueError(
                "this drafter reads verifier features (config dg_stream_feature_layers) but "
                "no feature projection was given; load it from its checkpoint folder"
            )
        # Rows of features read: the context positions before the newest token, up to the
        # number the drafter was trained with.
        rows = getattr(model.config, "dg_stream_feature_window", None) or self.window - 1
        self.feature_window = min(int(rows), self.window - 1) if self.feature_layers else 0
        self.projection: torch.Tensor | None = None
        if self.feature_layers and feature_projection is not None:
            hidden = int(model.config.hidden_size)
            if feature_projection.ndim != 2 or feature_projection.shape[0] != hidden:
                raise ValueError(
                    f"the feature projection's shape {tuple(feature_projection.shape)} does "
                    f"not map onto the drafter's hidden size {hidden}"
                )
            dtype = next(model.parameters()).dtype
            self.projection = feature_projection.to(self.device, dtype)

    @property
    def feature_size(self) -> int:
        """Width of the verifier features the drafter reads (0: none)."""
        return 0 if self.projection is None else int(self.projection.shape[1])

    @property
    def traits(self) -> DrafterTraits:
        return DrafterTraits(
            max_block_size=self.max_block_size,
            vocab_size=self.vocab_size,
            feature_layers=self.feature_layers,
            feature_window=self.feature_window,
            feature_size=self.feature_size if self.projection is not None else None,
            exact_q=True,  # one-step drafts; multi-step ones unmask out of order (no q)
            batched=True,
            recommended_block_size=self.recommended_block_size,
            recommended_adaptive=self.recommended_adaptive,
        )

    def session(self) -> DiffusionDrafter:
        return self  # stateless: the context is re-read each proposal (it is short)

    def close(self) -> None:
        return None

    def _extra_embeddings(
        self, features: torch.Tensor | None, length: int, context: int
    ) -> torch.Tensor | None:
        """The projected features the drafter was trained with (see ``place_features``)."""
        if self.projection is None:
            return None
        m = 0 if features is None else min(features.shape[0], context - 1, self.feature_window)
        if features is None or m <= 0:
            rows = torch.zeros(0, self.projection.shape[1], device=self.device)
        else:
            rows = features[-m:]
        projected = rows.to(self.device, self.projection.dtype) @ self.projection.T
        return place_features(projected, length, context)

    def _logits(
        self, ids: torch.Tensor, last: int, extra: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(T,) ids -> (last, V) float logits of the last positions; the mask never proposed."""
        if self._lean is not None:
            logits = self._lean(ids, last, extra)
        elif extra is not None:
            embeds = self.model.get_input_embeddings()(ids) + extra
            logits = self.model(inputs_embeds=embeds[None]).logits[0, -last:]
        else:
            logits = self.model(input_ids=ids[None]).logits[0, -last:]
        return self._proposable(logits)

    def _proposable(self, logits: torch.Tensor) -> torch.Tensor:
        """(k, V') float logits over the verifier's ids, the mask never proposed."""
        logits = logits[:, : self.output_vocab_size].float()
        if self.mask_token_id < logits.shape[-1]:
            logits[:, self.mask_token_id] = float("-inf")
        return logits

    def _logits_batch(
        self, rows: list[tuple[torch.Tensor, int, torch.Tensor | None]]
    ) -> list[torch.Tensor]:
        """Rows of (ids (T_i,), drafted k_i, extra (T_i, H) or None) in one forward, right
        padded, each row attending to its own positions: [(k_i, V)] logits."""
        lengths = torch.tensor([ids.shape[0] for ids, _, _ in rows], device=self.device)
        width = int(lengths.max())
        ids = torch.full((len(rows), width), self.mask_token_id, device=self.device)
        extra = None
        if any(e is not None for _, _, e in rows):
            hidden = next(e for _, _, e in rows if e is not None).shape[-1]
            extra = torch.zeros(len(rows), width, hidden, device=self.device)
        for r, (row_ids, _, row_extra) in enumerate(rows):
            ids[r, : row_ids.shape[0]] = row_ids
            if extra is not None and row_extra is not None:
                extra[r, : row_extra.shape[0]] = row_extra
        # The drafted positions of every row: (sum k_i,) row and column indices.
        row_index = torch.cat(
            [torch.full((k,), r, device=self.device) for r, (_, k, _) in enumerate(rows)]
        )
        column = torch.cat(
            [torch.arange(t.shape[0] - k, t.shape[0], device=self.device) for t, k, _ in rows]
        )
        if self._lean is not None:
            dtype = self._lean.word.dtype
            hidden_states = self._lean.encode_batch(
                ids, lengths, None if extra is None else extra.to(dtype)
            )
            logits = self._lean.head(hidden_states[row_index, column])
        else:
            mask = (torch.arange(width, device=self.device)[None, :] < lengths[:, None]).long()
            if extra is not None:
                dtype = next(self.model.parameters()).dtype
                embeds = self.model.get_input_embeddings()(ids) + extra.to(dtype)
                out = self.model(inputs_embeds=embeds, attention_mask=mask)
            else:
                out = self.model(input_ids=ids, attention_mask=mask)
            logits = out.logits[row_index, column]
        return list(self._proposable(logits).split([k for _, k, _ in rows]))

    @torch.inference_mode()
    def propose_batch(
        self, sessions: Sequence[DraftSession], requests: Sequence[DraftRequest]
    ) -> list[DraftProposal]:
        """Several generations' blocks (the sessions are this drafter: it keeps no per-row
        state): the one-step rows in one forward, others alone."""
        proposals: list[DraftProposal | None] = [None] * len(requests)
        together: list[tuple[int, DraftRequest]] = []
        for i, request in enumerate(requests):
            k = min(request.k, self.max_block_size)
            if k > 0 and min(request.steps or self.steps, k) <= 1:
                together.append((i, request._replace(k=k)))
            else:
                proposals[i] = self.propose(request)
        rows = []
        for _, request in together:
            ctx = request.context[-self.window :].to(self.device)
            n = ctx.shape[0]
            mask = torch.full((request.k,), self.mask_token_id, device=self.device)
            rows.append(
                (
                    torch.cat([ctx, mask]),
                    request.k,
                    self._extra_embeddings(request.features, n + request.k, n),
                )
            )
        if rows:
            for (i, request), logits in zip(together, self._logits_batch(rows), strict=True):
                proposals[i] = self._draw(
                    logits, request.params, request.generator, request.context.device
                )
        return [p for p in proposals if p is not None]

    @staticmethod
    def _draw(
        logits: torch.Tensor,
        params: SamplingParams,
        generator: torch.Generator | None,
        device: torch.device,
    ) -> DraftProposal:
        """A one-step block from its (k, V) logits."""
        if params.greedy:
            return DraftProposal(logits.argmax(dim=-1).to(device), None)
        # One step: every token is drawn from a distribution conditioned on the context
        # alone, so q is exact and the full speculative-sampling rule applies.
        q = logits_to_probs(logits, params)
        return DraftProposal(sample(q, generator).to(device), q.to(device))

    @torch.inference_mode()
    def propose(self, request: DraftRequest) -> DraftProposal:
        context, params, generator = request.context, request.params, request.generator
        steps, confidence = request.steps, request.confidence
        k = min(request.k, self.max_block_size)
        if k <= 0:
            return empty_proposal(context.device)
        steps = max(1, min(steps or self.steps, k))
        confidence = confidence if confidence is not None else self.confidence
        ctx = context[-self.window :].to(self.device)
        n = ctx.shape[0]
        ids = torch.cat([ctx, torch.full((k,), self.mask_token_id, device=self.device)])
        extra = self._extra_embeddings(request.features, n + k, n)
        if steps == 1:
            return self._draw(self._logits(ids, k, extra), params, generator, context.device)
        masked = torch.ones(k, dtype=torch.bool, device=self.device)
        for step in range(steps):
            logits = self._logits(ids, k, extra)
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
