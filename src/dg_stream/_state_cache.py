"""Per-generation caches for verifiers the batched cache cannot serve: recurrent and hybrid
models (Mamba, gated delta nets, RG-LRU, Falcon-H1, Jamba, Qwen3-Next), and attention
models whose forward cannot take the batched cache's 4-D masks (Falcon with ALiBi).

Each generation keeps transformers' own ``DynamicCache``, built from the model's config, and
the generations take turns: one forward per row, fed exactly its tokens, no padding. The
interface is ``BatchCache``'s (``lengths``, ``add_row``, ``remove_row``), so the round core
is the same for both; ``forward`` runs the model.

Rolling back a verified block. Attention states are cut to the kept length (``crop``). A
recurrent state cannot be cut: after a block of ``m`` tokens it has absorbed all of them. So
before each forward the row's recurrent and convolution states are copied (a few small
tensors per layer, independent of the context length); when the round keeps ``n < m`` of the
fed tokens, the copy is put back and those ``n`` tokens become the row's *debt*, fed in front
of its next forward. The re-feed thus costs no forward of its own: the next verify reads
``n + k + 1`` tokens instead of ``k + 1``. The alternative, capturing the state after every
position of the block, needs a hook inside each family's scan kernel (Mamba's selective scan,
the gated delta rule, RG-LRU each differ) and writes ``m`` states per layer per round; the
copy-and-debt scheme works for every family transformers ships and costs one state copy.

Resolution is lazy: a row's pending block is settled (kept whole, cropped, or restored with a
debt) when the row is next fed, from the length the round set; a row that sat out a round
was never fed, so it has nothing to settle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import (
    DynamicLayer,
    DynamicSlidingWindowLayer,
    LinearAttentionCacheLayerMixin,
)

__all__ = ["STEPWISE", "StateCache", "has_recurrent_layers", "recurrent_cache_problem"]

#: Families whose transformers forward reads several new tokens on top of a cached state as
#: if they were a prompt (RecurrentGemma's recurrent blocks restart their scan): a verified
#: block is fed to them one token at a time, as their own ``generate`` does.
STEPWISE = frozenset({"recurrent_gemma"})

#: State that RecurrentGemma keeps on its modules rather than in the cache: swapped in and
#: out around each row's forward, so that rows (and restored snapshots) keep their own.
MODULE_STATES = ("recurrent_states", "conv1d_state")


def recurrent_cache_problem() -> str | None:
    """Why this transformers cannot roll back recurrent states here (None: it can): older
    releases keep one state per layer under another interface."""
    from transformers.cache_utils import LinearAttentionLayer

    if not hasattr(LinearAttentionLayer(), "number_of_states"):
        import transformers

        return (
            f"transformers {transformers.__version__} keeps recurrent states in a form dg_stream "
            "cannot roll back; upgrade transformers (5.24 works) to verify with this model"
        )
    return None


def has_recurrent_layers(config: Any) -> bool:
    """Whether transformers' cache for this config keeps a recurrent (linear-attention,
    state-space) state in any layer."""
    cache = DynamicCache(config=config)
    return any(isinstance(layer, LinearAttentionCacheLayerMixin) for layer in cache.layers)


@dataclass(eq=False)
class _Snapshot:
    """A row's recurrent and convolution states before a forward, per layer and state index."""

    conv: dict[tuple[int, int], torch.Tensor | None]
    recurrent: dict[tuple[int, int], torch.Tensor | None]
    started: dict[tuple[int, int], bool]
    modules: list[torch.Tensor | None]


@dataclass(eq=False)
class _Row:
    cache: DynamicCache
    absorbed: int = 0  # tokens the cache's states have read
    debt: torch.Tensor | None = None  # kept tokens to feed in front of the next forward
    fed: torch.Tensor | None = None  # the pending forward's tokens, until it is settled
    snapshot: _Snapshot | None = field(default=None, repr=False)
    module_states: list[torch.Tensor | None] = field(default_factory=list, repr=False)


class StateCache:
    """One transformers cache per generation; rows are fed one at a time (see module)."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self.recurrent = has_recurrent_layers(config)
        self.stepwise = getattr(config, "model_type", None) in STEPWISE
        self._slots: list[tuple[Any, str]] | None = None  # (module, attribute) of MODULE_STATES
        self.lengths: list[int] = []  # what the round keeps per row (as in ``BatchCache``)
        self._rows: list[_Row] = []

    @property
    def rows(self) -> int:
        return len(self._rows)

    def add_row(self) -> int:
        cache = DynamicCache(config=self.config)
        for layer in cache.layers:
            # Sliding-window layers must keep what they would drop until a block is settled;
            # recurrent states are restored from a copy instead (see module).
            if isinstance(layer, DynamicSlidingWindowLayer):
                layer.activate_past_recording()
        self._rows.append(_Row(cache))
        self.lengths.append(0)
        return self.rows - 1

    def remove_row(self, row: int) -> int | None:
        last = self.rows - 1
        moved = None
        if row != last:
            self._rows[row], self.lengths[row] = self._rows[last], self.lengths[last]
            moved = last
        self._rows.pop()
        self.lengths.pop()
        return moved

    def cached_tokens(self) -> int:
        return sum(self.lengths)

    # -- a forward --------------------------------------------------------------------------

    def forward(
        self,
        model: Any,
        cache_keyword: str,
        ids: torch.Tensor,
        start: int,
        *,
        hidden_states: bool,
        keep_logits: int | None,
        max_length: int | None,
        prefill: bool = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Feed ``ids`` ((B, T)) to rows ``[start, start + B)`` one row at a time; returns
        logits (B, T, V) (the last ``keep_logits`` positions where the model can skip the
        others) and, with ``hidden_states``, each layer's (B, T, H)."""
        logits, hidden = [], []
        fed = ids.shape[1]
        for offset in range(ids.shape[0]):
            row = self._rows[start + offset]
            self._settle(row, self.lengths[start + offset])
            tokens = ids[offset]
            if row.debt is not None and row.debt.numel():
                tokens = torch.cat([row.debt.to(tokens.device), tokens])
            row.debt = None
            slots = self._module_slots(model)
            if self.recurrent:
                row.snapshot = _snapshot(row.cache, row.module_states)
            pieces = [tokens] if prefill or not self.stepwise else list(tokens.split(1))
            states = row.module_states or [None] * len(slots)
            for (module, name), value in zip(slots, states, strict=True):
                setattr(module, name, value)
            outs = [
                self._run(model, cache_keyword, row, piece, hidden_states, keep_logits, max_length)
                for piece in pieces
            ]
            row.module_states = [getattr(module, name) for module, name in slots]
            row.fed = tokens
            row_logits = torch.cat([out.logits[0] for out in outs])
            logits.append(row_logits[-min(fed, row_logits.shape[0]) :])
            if hidden_states:
                per_layer = zip(*(out.hidden_states for out in outs), strict=True)
                hidden.append(
                    torch.stack([torch.cat([h[0] for h in layer])[-fed:] for layer in per_layer])
                )
        stacked = torch.stack(logits)
        if not hidden_states:
            return stacked, None
        layers = torch.stack(hidden, dim=1)  # (layers, B, T, H)
        return stacked, list(layers.unbind(0))

    def _module_slots(self, model: Any) -> list[tuple[Any, str]]:
        if self._slots is None:
            self._slots = [
                (module, name)
                for module in model.modules()
                for name in MODULE_STATES
                if name in vars(module)
            ]
        return self._slots

    @staticmethod
    def _run(
        model: Any,
        cache_keyword: str,
        row: _Row,
        tokens: torch.Tensor,
        hidden_states: bool,
        keep_logits: int | None,
        max_length: int | None,
    ) -> Any:
        positions = torch.arange(row.absorbed, row.absorbed + tokens.shape[0])
        if max_length is not None:
            positions = positions.clamp_max(max_length - 1)
        out = model(
            input_ids=tokens[None],
            position_ids=positions[None].to(tokens.device),
            use_cache=True,
            output_hidden_states=hidden_states,
            **({"logits_to_keep": keep_logits} if keep_logits else {}),
            **{cache_keyword: row.cache},
        )
        row.absorbed += tokens.shape[0]
        return out

    def _settle(self, row: _Row, length: int) -> None:
        """Make the row's states hold exactly ``length`` tokens: keep, crop or restore the
        pending forward (whose tokens start at ``absorbed - len(fed)``)."""
        if row.fed is None:
            return
        fed, snapshot = row.fed, row.snapshot
        row.fed = row.snapshot = None
        base = row.absorbed - fed.shape[0]
        kept = length - base
        if not 0 <= kept <= fed.shape[0]:
            raise RuntimeError(f"a row kept {kept} of the {fed.shape[0]} tokens it was fed")
        dropped = fed.shape[0] - kept
        if dropped == 0:
            _trim(row.cache)
            return
        if snapshot is None:  # attention only: cut every layer back
            _crop_attention(row.cache, dropped)
            _trim(row.cache)
            row.absorbed = length
            return
        _crop_attention(row.cache, fed.shape[0])
        _restore(row.cache, snapshot)
        row.module_states = snapshot.modules
        _trim(row.cache)
        row.absorbed = base
        row.debt = fed[:kept]


# -- transformers cache layers --------------------------------------------------------------


def _linear_states(cache: DynamicCache) -> list[tuple[int, LinearAttentionCacheLayerMixin]]:
    return [
        (index, layer)
        for index, layer in enumerate(cache.layers)
        if isinstance(layer, LinearAttentionCacheLayerMixin)
    ]


def _snapshot(cache: DynamicCache, modules: list[torch.Tensor | None]) -> _Snapshot:
    conv: dict[tuple[int, int], torch.Tensor | None] = {}
    recurrent: dict[tuple[int, int], torch.Tensor | None] = {}
    started: dict[tuple[int, int], bool] = {}
    for index, layer in _linear_states(cache):
        for state in range(layer.number_of_states):
            key = (index, state)
            c, r = layer.conv_states[state], layer.recurrent_states[state]
            conv[key] = None if c is None else c.clone()
            recurrent[key] = None if r is None else r.clone()
            started[key] = bool(layer.has_previous_state[state])
    kept = [None if state is None else state.clone() for state in modules]
    return _Snapshot(conv, recurrent, started, kept)


def _restore(cache: DynamicCache, snapshot: _Snapshot) -> None:
    for index, layer in _linear_states(cache):
        for state in range(layer.number_of_states):
            key = (index, state)
            conv, recurrent = snapshot.conv[key], snapshot.recurrent[key]
            if conv is not None:
                layer.conv_states[state] = conv
            if recurrent is not None:
                layer.recurrent_states[state] = recurrent
            layer.has_previous_state[state] = snapshot.started[key]


def _crop_attention(cache: DynamicCache, tokens: int) -> None:
    """Remove the newest ``tokens`` from every attention part (a hybrid layer's recurrent
    part is left to ``_restore``)."""
    for layer in cache.layers:
        if isinstance(layer, DynamicSlidingWindowLayer):
            DynamicSlidingWindowLayer.crop(layer, -tokens)
        elif isinstance(layer, DynamicLayer):
            DynamicLayer.crop(layer, -tokens)


def _trim(cache: DynamicCache) -> None:
    """Let sliding-window layers (and a hybrid one's convolution states, which share its
    recording) drop what they no longer need."""
    for layer in cache.layers:
        if isinstance(layer, DynamicSlidingWindowLayer) and layer.record_past:
            DynamicSlidingWindowLayer.crop(layer, 0)
            if isinstance(layer, LinearAttentionCacheLayerMixin):
                LinearAttentionCacheLayerMixin.crop(layer, 0)
