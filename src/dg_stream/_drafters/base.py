"""The drafter protocol: propose a block of tokens that the verifier will check."""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch

from .._config import SamplingParams

__all__ = ["DraftProposal", "DraftRequest", "DraftSession", "Drafter"]


class DraftProposal(NamedTuple):
    """A drafted block.

    tokens: (k,) ids, k may be smaller than asked (even 0).
    q: (k, V) the distribution each token was drawn from, conditioned only on what precedes
    it; ``None`` when that does not hold (out-of-order unmasking, lookup): the acceptance rule
    then treats the draft as a point mass, which stays exact.
    """

    tokens: torch.Tensor
    q: torch.Tensor | None = None


class DraftRequest(NamedTuple):
    """One row of a batched drafter call: ``DraftSession.propose``'s arguments."""

    context: torch.Tensor
    k: int
    params: SamplingParams
    generator: torch.Generator | None
    steps: int | None = None
    confidence: float | None = None
    features: torch.Tensor | None = None


class DraftSession(Protocol):
    """Per-generation drafter state (a cache, say); never shared between generations."""

    def propose(
        self,
        context: torch.Tensor,
        k: int,
        params: SamplingParams,
        generator: torch.Generator | None,
        *,
        steps: int | None = None,
        confidence: float | None = None,
        features: torch.Tensor | None = None,
    ) -> DraftProposal:
        """Draft up to ``k`` tokens following ``context`` ((n,) committed ids).

        ``steps`` and ``confidence`` are the request's denoising options; drafters that do not
        denoise ignore them. ``features`` ((m, F)) are the verifier's features of the last m
        context tokens before the newest one, given to drafters that ask for them.
        """
        ...

    def close(self) -> None:
        """Release whatever the session holds."""
        ...


class Drafter(Protocol):
    """A source of draft blocks; ``session()`` is called once per generation."""

    #: Number of ids the drafter can emit, or ``None`` when it proposes context ids only.
    vocab_size: int | None
    #: Most tokens one proposal may hold (position limits of the model).
    max_block_size: int
    #: Verifier layers whose features the drafter reads (see ``verifier_features``); empty
    #: for drafters that read tokens only. Optional: a drafter without it reads none.
    feature_layers: tuple[int, ...]
    #: How many positions before the newest token a proposal reads features for.
    feature_window: int
    # Two optional flags (absent means False): ``feature_stream``, the drafter caches what it
    # has read, so each committed position's features are handed over once (DFlash) instead
    # of the latest ``feature_window`` rows every time; ``raw_features``, it reads the
    # verifier's hidden states as they are rather than at unit RMS.
    # One optional method: ``propose_batch(requests: list[DraftRequest]) -> list[DraftProposal]``
    # drafts for several generations in one call (a stateless drafter whose session is
    # itself); without it, each generation's session proposes on its own.

    def session(self) -> DraftSession: ...


def empty_proposal(device: torch.device | str = "cpu") -> DraftProposal:
    return DraftProposal(torch.empty(0, dtype=torch.long, device=device), None)
