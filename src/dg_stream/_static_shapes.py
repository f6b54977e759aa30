"""Static shapes for the decode round, so that the verifier forward can be captured.

A decode round's forward has three sizes that change from round to round: the rows of the
batch, the widest block, and the span of cache positions attended. A captured forward (CUDA
graphs, or any ``torch.compile`` without dynamic shapes) replays one shape only, so here each
is rounded to a bucket:

- rows to the next power of two (padding rows write into cache rows no generation holds, and
  their output is dropped);
- the block to one fixed width, ``width`` tokens (the newest token and up to ``width - 1``
  drafts; narrower rounds are padded, and their extra positions are never judged);
- the span to the cache's whole capacity, which already grows by doubling: attention reads
  masked slots instead of a span that changes every round.

So a batch compiles once per (rows bucket, capacity) pair: a handful per backend. What the
buckets do not cover runs the ordinary dynamic forward: prompt reading (its length varies with
every prompt), a round wider than ``width``, a per-generation ``StateCache``, and a cache whose
layers are not allocated yet (the first forward of a batch allocates them; allocation must not
happen inside a capture).

The arithmetic is the same as the dynamic path's, over a longer, masked span; in float32 a
greedy output stays identical (tested on the CPU against the dynamic path). The gain is the
launch overhead that capture removes: large on a GPU with small per-token work (the decode
round of a small or batched model), little on a CPU (not measured); ``compile=False`` keeps the
padded shapes without compiling (the tests' setting).
"""

from __future__ import annotations

from typing import Any

import torch

from ._batch_cache import BatchCache, attention_masks
from ._config import StaticShapes

__all__ = ["StaticForward", "rows_bucket"]


def rows_bucket(rows: int) -> int:
    """The padded row count: the next power of two."""
    return 1 << max(0, rows - 1).bit_length()


class StaticForward:
    """The verifier's decode forward over bucketed shapes (see module)."""

    def __init__(self, model: Any, shapes: StaticShapes, width: int, pad_id: int) -> None:
        self.model = model
        self.width = width
        self.pad_id = pad_id
        self.compiled: Any = model
        if shapes.compile:
            mode = shapes.mode
            device = next(model.parameters()).device
            if mode is None and device.type == "cuda" and shapes.backend == "inductor":
                mode = "reduce-overhead"
            self.compiled = torch.compile(model, backend=shapes.backend, mode=mode, dynamic=False)
        self.calls = 0  # forwards that ran on static shapes (tests read it)

    def serves(self, cache: Any, start: int, rows: int, fed: int) -> bool:
        """Whether this forward has static shapes: a decode round of a whole batched cache
        whose layers are allocated and hold the padded round without growing, no wider than
        ``width``."""
        return (
            isinstance(cache, BatchCache)
            and start == 0
            and rows == cache.rows
            and fed <= self.width
            and cache.allocated()
            # Room without growing (growth, and its bound, stay with the dynamic path).
            and rows_bucket(rows) <= cache.row_capacity
            and max(cache.lengths) + self.width <= cache.capacity
        )

    def __call__(
        self,
        ids: torch.Tensor,
        cache: BatchCache,
        *,
        config: Any,
        max_length: int | None,
        cache_keyword: str,
        hidden_states: bool,
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Logits (B, T, V) and, with ``hidden_states``, each layer's (B, T, H) of ``ids``
        ((B, T)) fed to the cache's rows ``[0, B)``."""
        rows, fed = ids.shape
        bucket = rows_bucket(rows)
        device = next(self.model.parameters()).device
        padded = torch.full((bucket, self.width), self.pad_id, dtype=torch.long, device=device)
        padded[:rows, :fed] = ids.to(device)
        positions = cache.prepare(0, bucket, self.width, device, full_span=True)
        masks = attention_masks(config, positions, cache.span, self.model.dtype, device)
        if max_length is not None:  # padding slots may run past the table; output unused
            positions = positions.clamp_max(max_length - 1)
        out = self.compiled(
            input_ids=padded,
            attention_mask=masks,
            position_ids=positions.to(device),
            use_cache=True,
            output_hidden_states=hidden_states,
            **{cache_keyword: cache},
        )
        self.calls += 1
        # A captured graph overwrites its outputs on the next replay: keep copies.
        logits = out.logits[:rows, :fed].clone()
        if not hidden_states:
            return logits, None
        return logits, [h[:rows, :fed].clone() for h in out.hidden_states]
