"""Distillation data at batch speed: the verifier's greedy continuations, written in shards.

A drafter learns agreement with its verifier, so it learns from the verifier's own greedy
continuations of corpus contexts. Generating them is the slow part of distillation on a CPU,
so this module does it the cheap way and keeps what it made:

- **Many rows per forward.** Every row of a shard is a corpus window of the same length, so
  the batch needs no padding and no attention mask: one prefill of ``(rows, context)`` and
  then one ``(rows, 1)`` forward per new token.
- **A cache that does not copy.** transformers' ``DynamicCache`` concatenates every layer's
  keys and values at each step, which copies the whole cache per token: on 2 CPU cores that
  was 61% of a step at 128 rows and 300 positions. ``PreallocatedLayer`` writes each step
  into a buffer sized for the whole row and hands the attention a view of the filled part.
- **The verifier's distribution, not only its choice** (``top_k`` > 0): at every generated
  position the forward that chose the token has the whole distribution at hand, so its
  ``top_k`` most likely ids and their probabilities are kept too (fp16), at no extra forward:
  soft targets for a drafter that should agree with the verifier when it samples.
- **Compact, resumable storage.** Token ids are stored as int16 when the vocabulary fits
  (int32 otherwise), one safetensors file per shard with its layout in the metadata. Shard
  ``i``'s contexts come from a generator seeded with ``(seed, i)`` alone, so a shard is the
  same whether it is made in this run or in the next one, and a run that is stopped resumes
  at the first missing shard. A shard is written to a temporary name and renamed, so a
  stopped run never leaves a torn one.

Contexts are hundreds of tokens long (as at inference), and each continuation is long as
well: every position of a continuation is a training example whose verifier context is the
corpus context plus the continuation before it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from .._verifier import cache_keyword
from ._loop import TokenStream

__all__ = [
    "PreallocatedLayer",
    "ShardLayout",
    "SoftTargets",
    "batched_greedy",
    "continue_greedily",
    "generate_shards",
    "load_shards",
    "load_soft_targets",
    "shard_path",
]


@dataclass(frozen=True)
class ShardLayout:
    """What a shard holds: ``rows`` corpus contexts of ``context_tokens`` tokens, each
    continued greedily by the verifier for ``continuation_tokens`` tokens."""

    rows: int = 256
    context_tokens: int = 128
    continuation_tokens: int = 192
    seed: int = 0
    top_k: int = 0  # the verifier's most likely ids kept per generated position (0: none)

    @property
    def length(self) -> int:
        """Tokens per row: the context and its continuation."""
        return self.context_tokens + self.continuation_tokens

    @classmethod
    def from_saved(cls, saved: dict[str, Any]) -> ShardLayout:
        """A layout as written by this or an earlier version (fields added since take their
        defaults: shards made before ``top_k`` hold none)."""
        return cls(**saved)


class SoftTargets(NamedTuple):
    """The verifier's ``K`` most likely ids at each generated position and their
    probabilities: (N, continuation, K) each."""

    ids: torch.Tensor
    probs: torch.Tensor


def shard_path(folder: str | Path, index: int) -> Path:
    return Path(folder) / f"shard-{index:05d}.safetensors"


def _compact(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int16 ids when the vocabulary fits (a quarter of int64's bytes), int32 otherwise."""
    return ids.to(torch.int16 if vocab_size <= 2**15 else torch.int32)


def _full_attention_only(config: Any) -> bool:
    """Whether every layer attends to the whole row (no sliding windows, no recurrent
    layers), so that one growing buffer per layer is the whole cache."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types and any(t != "full_attention" for t in layer_types):
        return False
    return not getattr(config, "sliding_window", None)


def _cache(verifier: Any, capacity: int) -> Any:
    """A cache for ``capacity`` positions per row: preallocated where the verifier's layers
    are all full attention, transformers' own ``DynamicCache`` otherwise."""
    if _full_attention_only(verifier.config):
        layers = int(verifier.config.num_hidden_layers)
        return Cache(layers=[PreallocatedLayer(capacity) for _ in range(layers)])
    return DynamicCache(config=verifier.config)


class PreallocatedLayer(DynamicLayer):
    """A transformers cache layer with room for ``capacity`` positions per row, written in
    place and read as a view of the filled part (``DynamicLayer`` concatenates, i.e. copies
    the whole layer's cache at every step)."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.filled = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        b, h, _, d = key_states.shape  # (B, heads, T, head_dim)
        self.key_buffer = key_states.new_empty(b, h, self.capacity, d)
        self.value_buffer = value_states.new_empty(b, h, self.capacity, value_states.shape[3])

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.filled + key_states.shape[2]
        if end > self.capacity:
            raise ValueError(f"cache of {self.capacity} positions is full")
        self.key_buffer[:, :, self.filled : end] = key_states
        self.value_buffer[:, :, self.filled : end] = value_states
        self.filled = end
        self.keys = self.key_buffer[:, :, :end]
        self.values = self.value_buffer[:, :, :end]
        return self.keys, self.values


def batched_greedy(verifier: Any, contexts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """(N, C) equal-length contexts continued greedily by ``new_tokens``: (N, C + new)."""
    return continue_greedily(verifier, contexts, new_tokens)[0]


@torch.inference_mode()
def continue_greedily(
    verifier: Any, contexts: torch.Tensor, new_tokens: int, top_k: int = 0
) -> tuple[torch.Tensor, SoftTargets | None]:
    """(N, C) equal-length contexts continued greedily by ``new_tokens``: (N, C + new) ids,
    and with ``top_k`` the distribution each new token was chosen from (its ``top_k`` most
    likely ids, probabilities in float16).

    No padding and no mask: every row has the same length, so the causal mask of the
    prefill is the only one, and each later step attends to every cached position.
    """
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be positive, got {new_tokens}")
    cache = _cache(verifier, contexts.shape[1] + new_tokens)
    kw = {cache_keyword(verifier): cache, "use_cache": True, "logits_to_keep": 1}
    out = verifier(input_ids=contexts, **kw)
    n, device = contexts.shape[0], contexts.device
    ids = torch.empty(n, new_tokens, dtype=contexts.dtype, device=device)
    soft = None
    if top_k > 0:
        soft = SoftTargets(
            torch.empty(n, new_tokens, top_k, dtype=torch.long, device=device),
            torch.empty(n, new_tokens, top_k, dtype=torch.float16, device=device),
        )
    for i in range(new_tokens):
        logits = out.logits[:, -1]  # (N, V)
        token = logits.argmax(dim=-1, keepdim=True)  # (N, 1)
        ids[:, i : i + 1] = token
        if soft is not None:
            probs, best = logits.float().softmax(dim=-1).topk(top_k, dim=-1)
            soft.ids[:, i], soft.probs[:, i] = best, probs.half()
        if i < new_tokens - 1:  # the last token's own forward would be wasted
            out = verifier(input_ids=token, **kw)
    return torch.cat([contexts, ids], dim=1), soft


def _metadata(layout: ShardLayout, vocab_size: int, verifier_name: str) -> dict[str, str]:
    return {
        "layout": json.dumps(asdict(layout)),
        "vocab_size": str(vocab_size),
        "verifier": verifier_name,
    }


def generate_shards(
    verifier: Any,
    stream: TokenStream,
    folder: str | Path,
    layout: ShardLayout,
    shards: int,
    *,
    stop_after: float | None = None,
    log: Callable[[str], None] = print,
    verifier_name: str = "",
) -> dict[str, float]:
    """Write shards ``0 .. shards-1`` of ``layout`` under ``folder``, skipping those that
    exist; stops early (resumably) once ``stop_after`` seconds are spent. Returns this
    call's shards, generated tokens, seconds and tokens/s."""
    from safetensors.torch import save_file

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    vocab = int(verifier.config.vocab_size)
    device = next(verifier.parameters()).device
    started = time.perf_counter()
    made = tokens = 0
    for index in range(shards):
        path = shard_path(out, index)
        if path.exists():
            continue
        if stop_after is not None and time.perf_counter() - started >= stop_after:
            break
        # Seeded by the shard alone: the same shard whichever run makes it.
        generator = torch.Generator().manual_seed(layout.seed * 1_000_003 + index)
        contexts = stream.windows(layout.rows, layout.context_tokens, generator).to(device)
        tick = time.perf_counter()
        ids, soft = continue_greedily(verifier, contexts, layout.continuation_tokens, layout.top_k)
        seconds = time.perf_counter() - tick
        tmp = path.with_name(path.name + ".tmp")
        tensors = {"ids": _compact(ids.cpu(), vocab).contiguous()}
        if soft is not None:
            tensors["top_ids"] = _compact(soft.ids.cpu(), vocab).contiguous()
            tensors["top_probs"] = soft.probs.cpu().contiguous()
        save_file(tensors, str(tmp), metadata=_metadata(layout, vocab, verifier_name))
        tmp.replace(path)
        made += 1
        tokens += layout.rows * layout.continuation_tokens
        rate = layout.rows * layout.continuation_tokens / seconds
        log(f"shard {index + 1}/{shards}: {rate:,.0f} generated tokens/s ({seconds:.1f}s)")
    seconds = time.perf_counter() - started
    return {
        "shards": made,
        "generated_tokens": tokens,
        "seconds": round(seconds, 1),
        "tokens_per_second": round(tokens / seconds, 1) if tokens else 0.0,
    }


def load_shards(folder: str | Path, count: int, layout: ShardLayout) -> torch.Tensor:
    """The first ``count`` shards as one (count * rows, length) int64 tensor; refuses shards
    of another layout (a run must read the data it was started on)."""
    return torch.cat([_read(folder, index, layout, "ids") for index in range(count)])


def load_soft_targets(folder: str | Path, count: int, layout: ShardLayout) -> SoftTargets | None:
    """The first ``count`` shards' soft targets (None for a layout without ``top_k``)."""
    if layout.top_k <= 0:
        return None
    return SoftTargets(
        torch.cat([_read(folder, i, layout, "top_ids") for i in range(count)]),
        torch.cat([_read(folder, i, layout, "top_probs") for i in range(count)]),
    )


def _read(folder: str | Path, index: int, layout: ShardLayout, name: str) -> torch.Tensor:
    """One tensor of shard ``index``, checked to be of ``layout``; ids as int64."""
    from safetensors import safe_open

    path = shard_path(folder, index)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: generate the data first")
    with safe_open(str(path), framework="pt") as f:
        saved = json.loads((f.metadata() or {}).get("layout", "{}"))
        try:
            same = bool(saved) and ShardLayout.from_saved(saved) == layout
        except TypeError:  # fields this version does not know
            same = False
        if not same:
            raise ValueError(f"{path} holds layout {saved}, not {asdict(layout)}")
        tensor = f.get_tensor(name)
    return tensor.long() if name.endswith("ids") else tensor
