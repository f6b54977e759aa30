"""Pure logits processing and sampling: tensors in, tensors out, randomness explicit.

The order matches transformers' ``generate``: repetition penalty, then temperature, top-k and
top-p, so that a verified position sees exactly the distribution plain decoding would.
"""

from __future__ import annotations

import torch

from ._config import SamplingParams

__all__ = ["apply_repetition_penalty", "logits_to_probs", "process_logits", "sample"]

# Within this range, logits no larger than _LOGIT_LIMIT divide by the temperature without
# overflowing float32; outside it they are shifted first.
_TEMPERATURE_PLAIN = (1e-4, 1e4)
_LOGIT_LIMIT = 1e30


def apply_repetition_penalty(
    logits: torch.Tensor, context: torch.Tensor, draft: torch.Tensor, penalty: float
) -> torch.Tensor:
    """Penalise, at each row ``i``, tokens seen in ``context`` or in ``draft[:i]``.

    logits: (T, V) for T verified positions; context: (n,) committed ids; draft: (T-1,) the
    drafted ids, so row ``i`` is conditioned on the context plus the first ``i`` draft tokens.
    """
    seen = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    seen[context] = True
    seen_rows = seen.expand(logits.shape[0], -1).clone()  # (T, V)
    for i in range(1, logits.shape[0]):
        seen_rows[i:, draft[i - 1]] = True
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    # An extreme penalty overflows to infinities, which no softmax survives: keep the order.
    limit = min(torch.finfo(penalised.dtype).max, _LOGIT_LIMIT)
    return torch.where(seen_rows, penalised.clamp(-limit, limit), logits)


def process_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k and top-p on (..., V) logits; filtered entries become ``-inf``.

    Greedy parameters return the logits unchanged: argmax is all that is needed. An extreme
    temperature (``1e-300``: greedy in effect; ``1e300``: uniform) divides logits shifted so
    that each row's largest is 0 (softmax does not change), with the temperature kept within
    float32's range, so that no row overflows to NaNs.
    """
    if params.greedy:
        return logits
    temperature = params.temperature
    if _TEMPERATURE_PLAIN[0] <= temperature <= _TEMPERATURE_PLAIN[1]:
        logits = logits.float() / temperature
    else:
        logits = logits.float()
        logits = (logits - logits.amax(dim=-1, keepdim=True)) / min(max(temperature, 1e-30), 1e30)
    if params.top_k is not None and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]  # (..., 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1 - params.top_p)
        remove_sorted[..., -1] = False  # always keep the most likely token
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def logits_to_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The sampling distribution (..., V) for non-greedy parameters."""
    return process_logits(logits, params).softmax(dim=-1)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row of (..., V) probabilities; returns (...,) ids."""
    flat = probs.reshape(-1, probs.shape[-1])
    draws = torch.multinomial(flat, 1, generator=generator)  # (N, 1)
    return draws.reshape(probs.shape[:-1])
