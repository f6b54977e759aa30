"""The drafter contract: what a drafter declares once, and how it proposes blocks.

```
Drafter ── traits: DrafterTraits        what it reads and returns, declared once
        ── session() ─► DraftSession    one per generation, owns that row's state
        ── propose_batch(sessions, requests)   several rows at once (traits.batched)
DraftSession.propose(DraftRequest) ─► DraftProposal (tokens, q) on the verifier's device
```

The round core reads ``traits`` and nothing else about a drafter: no probing for optional
attributes. Drafters written against the earlier contract (attributes on the drafter,
``propose(context, k, params, generator, *, steps, confidence, features)`` on its sessions)
still work through ``as_drafter``, which reads them once and warns.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, cast

import torch

from .._config import SamplingParams

__all__ = [
    "DraftProposal",
    "DraftRequest",
    "DraftSession",
    "Drafter",
    "DrafterTraits",
    "as_drafter",
    "empty_proposal",
]


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
    """What one row asks of its drafter session.

    context: (n,) committed ids; k: most tokens to draft; params and generator: how to draw
    them (the row's own generator, on the verifier's device); steps and confidence: the
    request's denoising options (drafters that do not denoise ignore them); features:
    ((m, F)) the verifier's features of the last m context tokens before the newest one, for
    drafters that read them (``DrafterTraits.feature_layers``).
    """

    context: torch.Tensor
    k: int
    params: SamplingParams
    generator: torch.Generator | None
    steps: int | None = None
    confidence: float | None = None
    features: torch.Tensor | None = None


@dataclass(frozen=True)
class DrafterTraits:
    """What a drafter is, declared once.

    max_block_size: most tokens one proposal may hold (position limits of the model).
    vocab_size: ids the drafter can emit, ``None`` when it proposes context ids only.
    feature_layers: verifier layers whose features it reads (``verifier_features``); empty
    for drafters that read tokens only. feature_window: how many positions before the newest
    token a proposal reads features of. feature_size: their width, when the drafter knows it
    (a projection's), so that a verifier of another width is refused at load.
    feature_stream: it caches what it has read, so each committed position's features are
    handed over once (DFlash) instead of the newest ``feature_window`` every time.
    raw_features: it reads the verifier's hidden states as they are, not at unit RMS.
    exact_q: its sampled proposals' q is the distribution their tokens were drawn from; where
    False, any q a proposal carries is ignored and the draft judged as a point mass (exact for
    any draft), so a drafter that reports scores rather than that distribution stays lossless.
    batched: ``propose_batch`` drafts several rows in one forward; without it each row's
    session proposes on its own (a failure then ends that row alone).
    recommended_block_size, recommended_adaptive: the defaults its checkpoint records.
    """

    max_block_size: int
    vocab_size: int | None = None
    feature_layers: tuple[int, ...] = ()
    feature_window: int = 0
    feature_size: int | None = None
    feature_stream: bool = False
    raw_features: bool = False
    exact_q: bool = True
    batched: bool = False
    recommended_block_size: int | None = None
    recommended_adaptive: bool | None = None

    @property
    def reads_features(self) -> bool:
        return bool(self.feature_layers) and self.feature_window > 0


class DraftSession(Protocol):
    """Per-generation drafter state (a cache, say); never shared between generations."""

    def propose(self, request: DraftRequest) -> DraftProposal:
        """Draft up to ``request.k`` tokens following ``request.context``."""
        ...

    def close(self) -> None:
        """Release whatever the session holds."""
        ...


class Drafter(Protocol):
    """A source of draft blocks; ``session()`` is called once per generation.

    ``propose_batch`` is called only where ``traits.batched``; a drafter whose rows draft
    alone may leave it out (or return ``propose_each``)."""

    @property
    def traits(self) -> DrafterTraits: ...

    def session(self) -> DraftSession: ...

    def propose_batch(
        self, sessions: Sequence[DraftSession], requests: Sequence[DraftRequest]
    ) -> list[DraftProposal]:
        """One proposal per (session, request), several rows in one forward."""
        ...


def propose_each(
    sessions: Sequence[DraftSession], requests: Sequence[DraftRequest]
) -> list[DraftProposal]:
    """``propose_batch`` for drafters whose rows draft alone."""
    return [s.propose(r) for s, r in zip(sessions, requests, strict=True)]


def empty_proposal(device: torch.device | str = "cpu") -> DraftProposal:
    return DraftProposal(torch.empty(0, dtype=torch.long, device=device), None)


# -- the earlier contract --------------------------------------------------------------------


def as_drafter(drafter: Any) -> Drafter:
    """``drafter`` as a ``Drafter``: itself when it declares ``traits``; a drafter of the
    earlier contract is wrapped, with a ``FutureWarning`` (shown by default: drafters are
    built on dg_stream's torch thread, where a ``DeprecationWarning`` would be filtered
    out). Raises ``TypeError`` for anything else."""
    name = type(drafter).__name__
    if not callable(getattr(drafter, "session", None)):
        raise TypeError(f"{name} is not a drafter: it has no session()")
    traits = getattr(drafter, "traits", None)
    if isinstance(traits, DrafterTraits):
        if traits.batched and not callable(getattr(drafter, "propose_batch", None)):
            raise TypeError(f"{name} declares traits.batched but has no propose_batch()")
        return cast(Drafter, drafter)
    if traits is not None:
        raise TypeError(f"{name}.traits is a {type(traits).__name__}, not DrafterTraits")
    if not hasattr(drafter, "max_block_size"):
        raise TypeError(f"{name} is not a drafter: it declares no traits")
    warnings.warn(
        f"{name} follows the drafter contract before DrafterTraits: declare `traits` and take "
        "a DraftRequest in DraftSession.propose (the earlier contract will be removed)",
        FutureWarning,
        stacklevel=2,
    )
    return _EarlierDrafter(drafter)


class _EarlierDrafter:
    """A drafter of the earlier contract, read once."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        layers = tuple(getattr(inner, "feature_layers", ()) or ())
        window = int(getattr(inner, "feature_window", 0) or 0)
        self._batch = getattr(inner, "propose_batch", None)
        self.traits = DrafterTraits(
            max_block_size=int(inner.max_block_size),
            vocab_size=getattr(inner, "vocab_size", None),
            feature_layers=layers,
            feature_window=window,
            feature_size=getattr(inner, "feature_size", None),
            feature_stream=bool(getattr(inner, "feature_stream", False)),
            raw_features=bool(getattr(inner, "raw_features", False)),
            batched=self._batch is not None,
            recommended_block_size=getattr(inner, "recommended_block_size", None),
            recommended_adaptive=getattr(inner, "recommended_adaptive", None),
        )

    def session(self) -> DraftSession:
        return _EarlierSession(self.inner.session(), self.traits.reads_features)

    def propose_batch(
        self, sessions: Sequence[DraftSession], requests: Sequence[DraftRequest]
    ) -> list[DraftProposal]:
        if self._batch is None:
            return propose_each(sessions, requests)
        return list(self._batch(list(requests)))  # stateless: the session was itself


class _EarlierSession:
    def __init__(self, inner: Any, features: bool) -> None:
        self.inner, self.features = inner, features

    def propose(self, request: DraftRequest) -> DraftProposal:
        extra = {"features": request.features} if self.features else {}
        proposal: DraftProposal = self.inner.propose(
            request.context,
            request.k,
            request.params,
            request.generator,
            steps=request.steps,
            confidence=request.confidence,
            **extra,
        )
        return proposal

    def close(self) -> None:
        self.inner.close()
