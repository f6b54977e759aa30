"""Drafters: diffusion (masked LM), n-gram prompt lookup, and a small causal LM."""

from .base import Drafter, DraftProposal, DraftSession
from .causal import CausalDrafter
from .diffusion import DiffusionDrafter
from .ngram import NgramDrafter

__all__ = [
    "CausalDrafter",
    "DiffusionDrafter",
    "DraftProposal",
    "DraftSession",
    "Drafter",
    "NgramDrafter",
]
