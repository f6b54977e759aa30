"""One KV cache for many generations: a row per sequence, each with its own length.

Layout. Every attention layer keeps one preallocated buffer per keys and values,
``(rows, kv_heads, capacity, head_dim)``; row ``r`` holds its sequence's states at positions
``0 .. lengths[r] - 1`` and whatever is beyond is stale. A forward appends each row's new
tokens at that row's own offset (a scatter), returns views of the buffers, and the attention
mask (built here, 4-D, additive) lets a query at offset ``lengths[r] + t`` see exactly the
positions ``<= lengths[r] + t`` of its own row (and, for a sliding-window layer, only the
newest ``window`` of them). Rolling a row back is setting its length: the stale states are
masked until they are overwritten.

Why this layout rather than the alternatives:

- Left-padded ``DynamicCache`` batches (what ``generate`` uses) need every row to grow by the
  same amount per call. Speculative rows keep different numbers of tokens each round, so they
  would have to be re-padded (a copy of the whole cache) every round.
- Gathering per-sequence caches into a batch each round copies the whole cache twice a round.
- transformers' paged continuous-batching cache runs its own scheduler and generation loop
  and has no per-request rollback of rejected drafts.

Here nothing is copied per round: the cost of raggedness is attention over the longest row's
span (masked), which is small next to the model's matmuls over the fed tokens. Any
transformers causal LM that takes a ``Cache`` object and a 4-D mask works (models in
transformers 5 pass a 4-D mask through unchanged; those with per-layer attention types take a
mask per type). Rows are kept contiguous: a leaving row's slot is filled by the last row (one
row copied), so a round runs on the view ``[0, rows)`` of the buffers.

Memory: ``rows x capacity`` positions per layer. Capacity grows by doubling when a row would
outgrow it, rows likewise; both shrink when the batch falls to a quarter of them, and the
buffers are freed when the last row leaves. With ``max_positions`` (a backend's
``max_cached_tokens``) the allocation itself is bounded: where doubling would pass it, the
buffers grow to exactly the rows needed and as much capacity as the bound leaves them, and a
growth that cannot fit raises ``CacheFullError`` before anything is changed. The caller admits
rows so that it never has to (``rows x`` the longest reservation within the bound). While
buffers are copied to their new size both exist: growth briefly holds old plus new.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

__all__ = ["BatchCache", "CacheFullError", "attention_masks"]

_MIN_CAPACITY = 64


class _RowLayer(CacheLayerMixin):
    """One attention layer's buffers, written at per-row offsets the owning cache sets."""

    is_compileable = False
    is_sliding = False

    def __init__(self, owner: BatchCache) -> None:
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        owner = self.owner
        owner.peak_positions = max(owner.peak_positions, owner.row_capacity * owner.capacity)
        self.keys = key_states.new_zeros(
            (self.owner.row_capacity, key_states.shape[1], self.owner.capacity, key_states.shape[3])
        )
        self.values = value_states.new_zeros(
            (
                self.owner.row_capacity,
                value_states.shape[1],
                self.owner.capacity,
                value_states.shape[3],
            )
        )
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """key_states: (B, H, T, D) for rows ``[start, start + B)``; returns (B, H, span, D)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        assert self.keys is not None and self.values is not None
        owner = self.owner
        rows = slice(owner.start, owner.start + key_states.shape[0])
        index = owner.write_index  # (B, 1, T, 1)
        keys, values = self.keys[rows], self.values[rows]
        keys.scatter_(2, index.expand_as(key_states), key_states)
        values.scatter_(2, index.expand_as(value_states), value_states)
        return keys[:, :, : owner.span], values[:, :, : owner.span]

    def resize(self, rows: int, capacity: int) -> None:
        """Reallocate to ``rows`` x ``capacity``, keeping what fits."""
        if not self.is_initialized:
            return
        assert self.keys is not None and self.values is not None
        old_rows, old_cap = min(rows, self.keys.shape[0]), min(capacity, self.keys.shape[2])
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_zeros((rows, old.shape[1], capacity, old.shape[3]))
            new[:old_rows, :, :old_cap] = old[:old_rows, :, :old_cap]
            setattr(self, name, new)

    def move_row(self, source: int, target: int, length: int) -> None:
        if self.is_initialized and length > 0:
            assert self.keys is not None and self.values is not None
            self.keys[target, :, :length] = self.keys[source, :, :length]
            self.values[target, :, :length] = self.values[source, :, :length]

    def release(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.span, 0

    def get_seq_length(self) -> int:
        return max(self.owner.lengths, default=0)

    def get_max_length(self) -> int:
        return -1


class CacheFullError(RuntimeError):
    """A growth of the cache would pass its ``max_positions``."""


class BatchCache(Cache):
    """Keys and values of up to ``rows`` sequences, each row with its own length.

    Use: ``prepare(start, count, fed, device)`` before a forward over rows
    ``[start, start + count)`` feeding ``fed`` tokens each; afterwards the caller sets
    ``lengths[row]`` to what each row keeps. ``get_seq_length`` (which models read for
    default positions; the verifier always passes explicit ones) is the longest row.
    """

    def __init__(self, config: Any, max_positions: int | None = None) -> None:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        layers = int(text.num_hidden_layers)
        self.max_positions = max_positions
        self.peak_positions = 0  # the largest rows x capacity allocated so far
        self.row_capacity = 1
        self.capacity = _MIN_CAPACITY
        self.lengths: list[int] = []
        self.start = 0
        self.span = 0
        self.write_index = torch.zeros(1, 1, 1, 1, dtype=torch.long)
        super().__init__(layers=[_RowLayer(self) for _ in range(layers)])

    # -- rows -------------------------------------------------------------------------------

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @torch.inference_mode()  # the buffers are inference tensors, made during a forward
    def add_row(self) -> int:
        """A new empty row; returns its index."""
        # Grow first: a failure leaves no stray row.
        self._fit(self.rows + 1, max(self.lengths, default=0))
        self.lengths.append(0)
        return self.rows - 1

    @torch.inference_mode()
    def remove_row(self, row: int) -> int | None:
        """Drop ``row``; the last row moves into its place. Returns the index that moved
        (now ``row``), or None. The buffers are freed when no row is left."""
        last = self.rows - 1
        moved = None
        if row != last:
            for layer in self._row_layers():
                layer.move_row(last, row, self.lengths[last])
            self.lengths[row] = self.lengths[last]
            moved = last
        self.lengths.pop()
        if not self.lengths:
            for layer in self._row_layers():
                layer.release()
            self.row_capacity, self.capacity = 1, _MIN_CAPACITY
            return moved
        # Give memory back once the batch is a quarter of what it was (rows or length), so a
        # long generation that left does not keep its span allocated for everyone else.
        rows, capacity = self.row_capacity, self.capacity
        if 4 * self.rows <= rows:
            rows = max(1, 2 * self.rows)
        longest = max(self.lengths)
        if 4 * longest <= capacity and capacity > _MIN_CAPACITY:
            capacity = max(_MIN_CAPACITY, 2 * longest)
        if (rows, capacity) != (self.row_capacity, self.capacity):
            self._resize(rows, capacity)
        return moved

    def cached_tokens(self) -> int:
        return sum(self.lengths)

    # -- a forward --------------------------------------------------------------------------

    def prepare(
        self, start: int, count: int, fed: int, device: torch.device, *, full_span: bool = False
    ) -> torch.Tensor:
        """Make room for ``fed`` tokens in each of rows ``[start, start + count)`` at their
        lengths; returns their positions (count, fed). Rows past the last one (padding of a
        static-shape round) count as empty. ``full_span``: attention reads the whole
        capacity, not just up to the longest row (a shape that changes only when the
        capacity does)."""
        lengths = torch.zeros(count, dtype=torch.long)
        held = self.lengths[start : start + count]
        lengths[: len(held)] = torch.tensor(held, dtype=torch.long)
        needed = int(lengths.max()) + fed
        self._fit(max(self.rows, start + count), needed)
        positions = lengths[:, None] + torch.arange(fed)  # (B, T)
        self.start, self.span = start, self.capacity if full_span else needed
        self.write_index = positions.to(device)[:, None, :, None]  # (B, 1, T, 1)
        return positions

    def allocated(self) -> bool:
        """Whether every layer's buffers exist (the first forward of a batch makes them)."""
        return all(layer.is_initialized for layer in self._row_layers())

    def _fit(self, rows: int, capacity: int) -> None:
        """Make room for ``rows`` rows of ``capacity`` positions: by doubling, or within
        ``max_positions`` exactly (see module); nothing changes when it cannot fit."""
        new_rows, new_capacity = self.row_capacity, self.capacity
        while new_rows < rows:
            new_rows *= 2
        while new_capacity < capacity:
            new_capacity *= 2
        bound = self.max_positions
        if bound is not None and new_rows * new_capacity > bound:
            new_rows = rows
            new_capacity = max(capacity, min(new_capacity, bound // rows))
            if new_rows * new_capacity > bound:
                raise CacheFullError(
                    f"{rows} rows of {capacity} positions pass the cache's bound of {bound}"
                )
        if (new_rows, new_capacity) != (self.row_capacity, self.capacity):
            self._resize(new_rows, new_capacity)

    def _resize(self, rows: int, capacity: int) -> None:
        for layer in self._row_layers():
            layer.resize(rows, capacity)
        self.row_capacity, self.capacity = rows, capacity
        self.peak_positions = max(self.peak_positions, rows * capacity)

    def _row_layers(self) -> list[_RowLayer]:
        return [layer for layer in self.layers if isinstance(layer, _RowLayer)]


def attention_masks(
    config: Any, positions: torch.Tensor, span: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor | dict[str, torch.Tensor]:
    """The 4-D additive masks (B, 1, T, span) for queries at ``positions`` (B, T) over a
    ``BatchCache`` span: a query sees its row's positions up to its own, and a sliding-window
    layer only the newest ``sliding_window`` of them (``j > i - window``, as transformers
    masks). Models with per-layer attention types get one mask per type."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    query = positions.to(device)[:, None, :, None]  # (B, 1, T, 1)
    key = torch.arange(span, device=device)[None, None, None, :]  # (1, 1, 1, span)
    causal = key <= query
    window = getattr(text, "sliding_window", None)
    layer_types = getattr(text, "layer_types", None)
    minimum = torch.finfo(dtype).min

    def additive(allowed: torch.Tensor) -> torch.Tensor:
        return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(
            ~allowed, minimum
        )

    def sliding() -> torch.Tensor:
        assert window is not None
        return additive(causal & (key > query - int(window)))

    if layer_types is not None:
        masks = {"full_attention": additive(causal)}
        if "sliding_attention" in layer_types and window:
            masks["sliding_attention"] = sliding()
        return masks if len(masks) > 1 else masks["full_attention"]
    if isinstance(window, int) and window > 0:
        return sliding()  # e.g. Mistral, Phi-3: one window for every layer
    return additive(causal)
