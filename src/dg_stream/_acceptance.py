"""Pure acceptance rules for speculative decoding (p = verifier, q = drafter).

Given verifier distributions for the ``k`` drafted positions plus one bonus position, decide how
many draft tokens to keep and which token the verifier adds. Both rules are lossless: the
committed tokens follow the verifier's own (processed) distribution exactly.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = [
    "Verdict",
    "accept_greedy",
    "accept_greedy_batch",
    "accept_sampled",
    "draw_after_rejection",
]


class Verdict(NamedTuple):
    """``accepted`` draft tokens are kept, then ``token`` is appended."""

    accepted: int
    token: int


def accept_greedy(target_logits: torch.Tensor, draft: torch.Tensor) -> Verdict:
    """Keep the longest draft prefix equal to the verifier's argmax, then its next argmax.

    target_logits: (k+1, V); draft: (k,).
    """
    choice = target_logits.argmax(dim=-1)  # (k+1,)
    k = draft.shape[0]
    matches = (choice[:k] == draft).to(torch.int64)
    accepted = int(matches.cumprod(dim=0).sum()) if k else 0
    return Verdict(accepted, int(choice[accepted]))


def accept_greedy_batch(
    target_logits: torch.Tensor, drafts: torch.Tensor, sizes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``accept_greedy`` for many rows at once, on their device, with no host sync.

    target_logits: (B, W, V) for [newest token, draft...] padded to W; drafts: (B, W - 1),
    each row's first ``sizes[b]`` entries its draft (the rest padding, never accepted).
    Returns (accepted (B,), token (B,)).
    """
    choice = target_logits.argmax(dim=-1)  # (B, W)
    width = drafts.shape[1]
    within = torch.arange(width, device=drafts.device)[None, :] < sizes[:, None]  # (B, W-1)
    matches = ((choice[:, :width] == drafts) & within).to(torch.int64)
    accepted = matches.cumprod(dim=1).sum(dim=1)  # (B,)
    token = choice.gather(1, accepted[:, None]).squeeze(1)
    return accepted, token


def accept_sampled(
    p: torch.Tensor, draft: torch.Tensor, q: torch.Tensor | None, generator: torch.Generator | None
) -> Verdict:
    """Speculative sampling (Leviathan et al. / Chen et al.).

    p: (k+1, V) verifier probabilities; draft: (k,); q: (k, V) the distributions the draft
    tokens were actually drawn from, each conditioned only on what precedes it — or ``None`` to
    treat the draft as a point mass (q = one-hot), which is exact for *any* draft, including
    one unmasked out of order by a diffusion drafter.
    Accept x_i when u_i <= p(x_i) / q(x_i); at the first rejection draw from
    normalize(max(0, p - q)); when all are accepted draw the bonus token from p[k].
    """
    k = draft.shape[0]
    positions = torch.arange(k, device=p.device)
    p_draft = p[positions, draft]  # (k,)
    q_draft = q[positions, draft] if q is not None else torch.ones_like(p_draft)
    # Drawn where the generator lives (the verifier's device: no host round trip).
    device = generator.device if generator is not None else p.device
    u = torch.rand(k, generator=generator, device=device).to(p.device)
    # u <= p/q, written without the division so q == 0 (never drawn) cannot produce NaN.
    ok = (u * q_draft <= p_draft).to(torch.int64)
    accepted = int(ok.cumprod(dim=0).sum()) if k else 0
    if accepted == k:
        token = torch.multinomial(p[k], 1, generator=generator)
        return Verdict(k, int(token))
    q_row = q[accepted] if q is not None else None
    return Verdict(accepted, draw_after_rejection(p[accepted], q_row, draft[accepted], generator))


def draw_after_rejection(
    p: torch.Tensor,
    q: torch.Tensor | None,
    rejected: torch.Tensor,
    generator: torch.Generator | None,
) -> int:
    """The token drawn where draft token ``rejected`` was rejected: from
    ``normalize(max(0, p - q))`` (p: (V,) the verifier's, q: (V,) the draft's distribution, or
    None for a point mass on ``rejected``)."""
    if q is not None:
        residual = (p - q).clamp_min(0)
    else:
        residual = p.clone()
        residual[rejected] = 0
    total = residual.sum()
    # A rejection with an all-zero residual has probability zero; guard against rounding.
    dist = residual / total if total > 0 else p
    return int(torch.multinomial(dist, 1, generator=generator))
