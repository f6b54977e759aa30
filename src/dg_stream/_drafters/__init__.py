"""Drafters: diffusion (masked LM), DFlash (verifier-conditioned block diffusion), n-gram
prompt lookup, and a small causal LM."""

from .base import Drafter, DrafterTraits, DraftProposal, DraftRequest, DraftSession, as_drafter
from .causal import CausalDrafter
from .dflash import DFlashDrafter
from .diffusion import DiffusionDrafter
from .ngram import NgramDrafter

__all__ = [
    "CausalDrafter",
    "DFlashDrafter",
    "DiffusionDrafter",
    "DraftProposal",
    "DraftRequest",
    "DraftSession",
    "Drafter",
    "DrafterTraits",
    "NgramDrafter",
    "as_drafter",
]
