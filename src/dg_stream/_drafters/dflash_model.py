"""The DFlash drafter network and its checkpoint format (verifier-conditioned block diffusion).

The drafter owns no embedding and no output matrix: it reads

- the verifier's hidden states of the committed positions at ``target_layer_ids`` (layer i is
  ``hidden_states[i + 1]``, the output of decoder layer i), concatenated raw, projected by
  ``fc`` (len(layers)·H -> H) and normalised by ``hidden_norm``: the *context*;
- the verifier's input embeddings of the block [newest committed token, mask, ..., mask].

Each of its Qwen3-style decoder layers attends from the block (queries) to [context ; block]
(keys and values, both through the layer's own k/v projections and per-head ``k_norm``), with
no causal mask; the block's hidden states then go through ``norm`` and the verifier's LM head.
Context keys and values depend on the context alone, so inference keeps them in a
``ContextCache`` that grows with every commit, while the block's are dropped after each call.

Training reads many blocks of one sequence in a single pass: every block's queries see the
context before its anchor and their own block, nothing else (``block_attention_mask``).

The checkpoint layout (``config.json`` with Qwen3 fields, ``architectures:
["DFlashDraftModel"]``, ``dflash_config``; ``model.safetensors`` with ``layers.{i}.…``, ``fc``,
``hidden_norm``, ``norm``) is the published one, so checkpoints move both ways between dg_stream
and the reference implementation. No remote code is ever run.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

__all__ = [
    "ARCHITECTURE",
    "ContextCache",
    "DFlashModel",
    "DFlashSpec",
    "block_attention_mask",
    "default_target_layers",
    "dflash_config",
    "is_dflash_checkpoint",
    "load_dflash",
    "save_dflash",
]

ARCHITECTURE = "DFlashDraftModel"
WEIGHTS_FILE = "model.safetensors"


def default_target_layers(verifier_layers: int, count: int) -> list[int]:
    """``count`` verifier layers spread from the second to the fourth-from-last: shallow
    layers carry the tokens, deep ones the verifier's plan, the last few little beyond the
    logits the verifier computes anyway."""
    if verifier_layers < 1 or count < 1:
        raise ValueError("a verifier with layers and at least one target layer are needed")
    low, high = min(1, verifier_layers - 1), max(min(1, verifier_layers - 1), verifier_layers - 3)
    if count == 1:
        return [verifier_layers // 2]
    return sorted({round(low + i * (high - low) / (count - 1)) for i in range(count)})


@dataclass(frozen=True)
class DFlashSpec:
    """What a DFlash checkpoint says beyond its transformer shape."""

    target_layer_ids: tuple[int, ...]
    mask_token_id: int
    block_size: int  # counts the newest committed token: a block drafts block_size - 1 tokens
    output_multiplier: float | None = None
    final_logit_softcapping: float | None = None

    @property
    def feature_layers(self) -> tuple[int, ...]:
        """Indices into transformers' ``hidden_states`` (0 is the embeddings)."""
        return tuple(i + 1 for i in self.target_layer_ids)

    @classmethod
    def from_config(cls, config: Any) -> DFlashSpec:
        dflash = dict(getattr(config, "dflash_config", None) or {})
        layers = dflash.get("target_layer_ids")
        if layers is None:
            target = getattr(config, "num_target_layers", None)
            if target is None:
                raise ValueError("dflash_config has no target_layer_ids and no num_target_layers")
            layers = default_target_layers(int(target), int(config.num_hidden_layers))

        # Each setting from dflash_config, else the top level (older files), as the reference
        # code reads them.
        def setting(name: str, default: Any = None) -> Any:
            value = dflash.get(name)
            return value if value is not None else getattr(config, name, default)

        mask = setting("mask_token_id")
        if mask is None:
            raise ValueError("dflash_config has no mask_token_id")
        block = setting("block_size", 16)
        if int(block) < 2:
            raise ValueError(f"block_size must be 2 or more, got {block!r}")
        multiplier = setting("output_multiplier")
        cap = setting("final_logit_softcapping")
        return cls(
            target_layer_ids=tuple(int(i) for i in layers),
            mask_token_id=int(mask),
            block_size=int(block),
            output_multiplier=None if multiplier is None else float(multiplier),
            final_logit_softcapping=float(cap) if cap is not None and float(cap) > 0 else None,
        )

    def to_config_fields(self, verifier_layers: int) -> dict[str, Any]:
        dflash: dict[str, Any] = {
            "target_layer_ids": list(self.target_layer_ids),
            "mask_token_id": self.mask_token_id,
            "block_size": self.block_size,
        }
        if self.output_multiplier is not None:
            dflash["output_multiplier"] = self.output_multiplier
        if self.final_logit_softcapping is not None:
            dflash["final_logit_softcapping"] = self.final_logit_softcapping
        return {
            "architectures": [ARCHITECTURE],
            "dflash_config": dflash,
            # Top level too: the published checkpoints and reference code read it there.
            "block_size": self.block_size,
            "num_target_layers": verifier_layers,
        }


class ContextCache:
    """One generation's context keys and values per drafter layer, (1, kv_heads, C, d) each,
    with the positions they were rotated for.

    ``keys``, ``values`` and ``positions`` are views of buffers that grow by doubling, so a
    commit writes its new positions in place instead of copying everything cached so far
    (a ``torch.cat`` per layer per call copied the whole context every round); ``nbytes`` is
    what the buffers hold, whatever is filled."""

    def __init__(self, layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * layers
        self.values: list[torch.Tensor | None] = [None] * layers
        self.positions: torch.Tensor | None = None  # (C,)
        self._key_buffers: list[torch.Tensor | None] = [None] * layers
        self._value_buffers: list[torch.Tensor | None] = [None] * layers
        self._position_buffer: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.positions is None else int(self.positions.shape[0])

    @property
    def next_position(self) -> int:
        """The position after the newest cached one (0 when empty)."""
        return 0 if self.positions is None else int(self.positions[-1]) + 1

    @property
    def nbytes(self) -> int:
        """Bytes the buffers hold (allocated, not just filled)."""
        buffers = [*self._key_buffers, *self._value_buffers, self._position_buffer]
        return sum(b.numel() * b.element_size() for b in buffers if b is not None)

    def extend(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        current = self.keys[layer]
        filled = 0 if current is None else int(current.shape[2])
        self._key_buffers[layer] = keys = _append(self._key_buffers[layer], filled, key, dim=2)
        self._value_buffers[layer] = values = _append(
            self._value_buffers[layer], filled, value, dim=2
        )
        end = filled + key.shape[2]
        self.keys[layer], self.values[layer] = keys[:, :, :end], values[:, :, :end]

    def extend_positions(self, positions: torch.Tensor) -> None:
        filled = self.length
        self._position_buffer = _append(self._position_buffer, filled, positions, dim=0)
        self.positions = self._position_buffer[: filled + positions.shape[0]]


def _append(buffer: torch.Tensor | None, filled: int, new: torch.Tensor, dim: int) -> torch.Tensor:
    """``new`` written after the first ``filled`` entries of ``buffer`` along ``dim``; the
    buffer doubles (at least 64) when it is full. Returns the buffer it was written to."""
    end = filled + new.shape[dim]
    if buffer is None or end > buffer.shape[dim]:
        shape = list(new.shape)
        shape[dim] = max(64, 2 * end)
        grown = new.new_empty(shape)
        if buffer is not None and filled:
            grown.narrow(dim, 0, filled).copy_(buffer.narrow(dim, 0, filled))
        buffer = grown
    buffer.narrow(dim, filled, new.shape[dim]).copy_(new)
    return buffer


class _Attention(nn.Module):
    """Queries from the block; keys and values from [context ; block]; per-head q/k norms."""

    def __init__(self, config: Any, sliding_window: int | None) -> None:
        super().__init__()
        from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(config.num_key_value_heads)
        self.head_dim = int(
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        )
        hidden, bias = int(config.hidden_size), bool(getattr(config, "attention_bias", False))
        self.q_proj = nn.Linear(hidden, self.heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, hidden, bias=bias)
        self.q_norm = Qwen3RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = Qwen3RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.sliding_window = sliding_window

    def _keys_values(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, H) -> rotated keys and values, (B, kv_heads, T, d) each."""
        b, t, _ = x.shape
        k = self.k_norm(self.k_proj(x).view(b, t, self.kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        return _rotate(k, *rope), v

    def _queries(
        self, block: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        b, q_len, _ = block.shape
        q = self.q_norm(self.q_proj(block).view(b, q_len, self.heads, self.head_dim))
        return _rotate(q.transpose(1, 2), *rope)

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """(B, heads, Q, d) queries over (B, kv_heads, K, d) keys and values -> (B, Q, H)."""
        groups = self.heads // self.kv_heads
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        b, _, q_len, _ = q.shape
        return out.transpose(1, 2).reshape(b, q_len, self.heads * self.head_dim)

    def forward(
        self,
        block: torch.Tensor,
        block_rope: tuple[torch.Tensor, torch.Tensor],
        context: torch.Tensor | None,
        context_rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        cache: ContextCache | None,
        layer: int,
    ) -> torch.Tensor:
        q = self._queries(block, block_rope)
        k, v = self._keys_values(block, block_rope)
        k_ctx: torch.Tensor | None = None
        v_ctx: torch.Tensor | None = None
        if context is not None:
            assert context_rope is not None
            k_ctx, v_ctx = self._keys_values(context, context_rope)
            if cache is not None:
                cache.extend(layer, k_ctx, v_ctx)
        if cache is not None and cache.keys[layer] is not None:
            k_ctx, v_ctx = cache.keys[layer], cache.values[layer]
        if k_ctx is not None and v_ctx is not None:
            k, v = torch.cat([k_ctx, k], dim=2), torch.cat([v_ctx, v], dim=2)
        return self.o_proj(self._attend(q, k, v, mask))

    def forward_rows(
        self,
        block: torch.Tensor,
        block_rope: tuple[torch.Tensor, torch.Tensor],
        context: torch.Tensor | None,
        context_rope: tuple[torch.Tensor, torch.Tensor] | None,
        splits: list[int],
        caches: list[ContextCache],
        masks: list[torch.Tensor | None],
        layer: int,
    ) -> torch.Tensor:
        """``forward`` for B generations at once, each with its own cache: the projections
        of every row's block (B, Q, H) and of all new context rows ((1, sum(splits), H),
        ``splits[i]`` of them row i's) in one call each; attention row by row, since each
        row's cached context has its own length."""
        q = self._queries(block, block_rope)
        k, v = self._keys_values(block, block_rope)
        if context is not None:
            assert context_rope is not None
            k_new, v_new = self._keys_values(context, context_rope)
            for cache, k_row, v_row in zip(
                caches, k_new.split(splits, dim=2), v_new.split(splits, dim=2), strict=True
            ):
                if k_row.shape[2]:
                    cache.extend(layer, k_row, v_row)
        out = []
        for i, cache in enumerate(caches):
            k_row, v_row = k[i : i + 1], v[i : i + 1]
            k_ctx, v_ctx = cache.keys[layer], cache.values[layer]
            if k_ctx is not None and v_ctx is not None:
                k_row, v_row = torch.cat([k_ctx, k_row], dim=2), torch.cat([v_ctx, v_row], dim=2)
            out.append(self._attend(q[i : i + 1], k_row, v_row, masks[i]))
        return self.o_proj(torch.cat(out))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on (B, heads, T, d) with cos/sin (B, T, d)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class _Layer(nn.Module):
    def __init__(self, config: Any, sliding_window: int | None) -> None:
        super().__init__()
        from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP, Qwen3RMSNorm

        self.self_attn = _Attention(config, sliding_window)
        self.mlp = Qwen3MLP(config)
        self.input_layernorm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class DFlashModel(nn.Module):
    """The drafter's own layers; ``forward`` returns the block's normalised hidden states."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm, Qwen3RotaryEmbedding

        self.config = config
        self.spec = DFlashSpec.from_config(config)
        hidden = int(config.hidden_size)
        types = list(getattr(config, "layer_types", None) or [])
        window = getattr(config, "sliding_window", None)
        self.layers = nn.ModuleList(
            _Layer(
                config,
                int(window)
                if window and i < len(types) and types[i] == "sliding_attention"
                else None,
            )
            for i in range(int(config.num_hidden_layers))
        )
        self.fc = nn.Linear(len(self.spec.target_layer_ids) * hidden, hidden, bias=False)
        self.hidden_norm = Qwen3RMSNorm(hidden, eps=config.rms_norm_eps)
        self.norm = Qwen3RMSNorm(hidden, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen3RotaryEmbedding(config)

    @property
    def feature_size(self) -> int:
        return int(self.fc.in_features)

    def forward(
        self,
        block: torch.Tensor,
        block_positions: torch.Tensor,
        context: torch.Tensor | None = None,
        context_positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        cache: ContextCache | None = None,
    ) -> torch.Tensor:
        """block: (B, Q, H) verifier embeddings of the block(s) at ``block_positions`` (B, Q).
        context: (B, C, F) raw verifier features at ``context_positions`` (B, C): all of the
        context, or with ``cache`` only what is new (it is appended there).
        mask: (B, 1, Q, K) True where a query may attend, K = cached + C + Q keys; ``None``
        lets every query see every key (sliding-window layers still limit it)."""
        x = block
        block_rope = self.rotary_emb(x, block_positions)
        ctx = ctx_rope = None
        if context is not None and context.shape[1]:
            assert context_positions is not None
            ctx = self.hidden_norm(self.fc(context.to(x.dtype)))
            ctx_rope = self.rotary_emb(ctx, context_positions)
            if cache is not None:
                cache.extend_positions(context_positions[0])
        for index, module in enumerate(self.layers):
            layer = cast(_Layer, module)
            attn = layer.self_attn
            layer_mask = mask
            if attn.sliding_window is not None:
                layer_mask = _within_window(
                    mask, block_positions, context_positions, cache, attn.sliding_window
                )
            h = attn(layer.input_layernorm(x), block_rope, ctx, ctx_rope, layer_mask, cache, index)
            x = x + h
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.norm(x)

    def forward_rows(
        self,
        block: torch.Tensor,
        block_positions: torch.Tensor,
        contexts: list[tuple[torch.Tensor, torch.Tensor] | None],
        caches: list[ContextCache],
    ) -> torch.Tensor:
        """``forward`` with a cache for several generations at once: block (B, Q, H) at
        ``block_positions`` (B, Q); ``contexts[i]``: row i's new (n_i, F) raw features and
        their (n_i,) positions, or None; each is appended to ``caches[i]``. What each row
        gets equals a ``forward`` of that row alone, up to float rounding."""
        x = block
        block_rope = self.rotary_emb(x, block_positions)
        splits = [0 if c is None else int(c[0].shape[0]) for c in contexts]
        ctx = ctx_rope = None
        if any(splits):
            rows = torch.cat([c[0] for c in contexts if c is not None])[None]
            positions = torch.cat([c[1] for c in contexts if c is not None])[None]
            ctx = self.hidden_norm(self.fc(rows.to(x.dtype)))
            ctx_rope = self.rotary_emb(ctx, positions)
            for cache, context in zip(caches, contexts, strict=True):
                if context is not None and context[1].shape[0]:
                    cache.extend_positions(context[1])
        for index, module in enumerate(self.layers):
            layer = cast(_Layer, module)
            attn = layer.self_attn
            masks: list[torch.Tensor | None] = [None] * len(caches)
            window = attn.sliding_window
            if window is not None:
                masks = [
                    _within_window(None, block_positions[i : i + 1], None, cache, window)
                    for i, cache in enumerate(caches)
                ]
            h = attn.forward_rows(
                layer.input_layernorm(x), block_rope, ctx, ctx_rope, splits, caches, masks, index
            )
            x = x + h
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.norm(x)

    def logits(self, hidden: torch.Tensor, head: nn.Module) -> torch.Tensor:
        """The verifier's LM head on the drafter's hidden states, with the checkpoint's output
        scaling and soft cap."""
        logits = head(hidden)
        if self.spec.output_multiplier is not None:
            logits = logits * self.spec.output_multiplier
        cap = self.spec.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits


def _within_window(
    mask: torch.Tensor | None,
    block_positions: torch.Tensor,
    context_positions: torch.Tensor | None,
    cache: ContextCache | None,
    window: int,
) -> torch.Tensor:
    """``mask`` restricted to keys less than ``window`` positions behind each query."""
    if cache is not None and cache.positions is not None:
        ctx = cache.positions[None]
    elif context_positions is not None:
        ctx = context_positions
    else:
        ctx = block_positions[:, :0]
    keys = torch.cat([ctx.expand(block_positions.shape[0], -1), block_positions], dim=1)
    near = (block_positions[:, :, None] - keys[:, None, :]) < window  # (B, Q, K)
    near = near[:, None]
    return near if mask is None else mask & near


def block_attention_mask(
    anchors: torch.Tensor, block_size: int, context_length: int
) -> torch.Tensor:
    """Training mask for many blocks of one sequence in one pass.

    anchors: (B, N) position of each block's first (clean) token. Keys are the C context
    positions followed by the N·block_size block slots. Returns (B, 1, N·block_size, C + N·bs):
    block j's queries see context positions before its anchor (the newest token's own
    features do not exist yet when it drafts) and every slot of block j, nothing else.
    """
    b, n = anchors.shape
    q = n * block_size
    block_of_query = torch.arange(q, device=anchors.device) // block_size  # (Q,)
    ctx_pos = torch.arange(context_length, device=anchors.device)
    sees_ctx = ctx_pos[None, None, :] < anchors[:, block_of_query, None]  # (B, Q, C)
    sees_block = block_of_query[:, None] == block_of_query[None, :]  # (Q, Q)
    mask = torch.cat([sees_ctx, sees_block[None].expand(b, -1, -1)], dim=2)
    return mask[:, None]


# -- checkpoints ---------------------------------------------------------------------------


def dflash_config(
    verifier_config: Any,
    *,
    layers: int,
    mask_token_id: int,
    block_size: int,
    target_layer_ids: list[int] | None = None,
) -> Any:
    """A Qwen3 config for a DFlash drafter of ``verifier_config``'s width, heads and RoPE."""
    from transformers import Qwen3Config

    depth = int(verifier_config.num_hidden_layers)
    heads = int(verifier_config.num_attention_heads)
    hidden = int(verifier_config.hidden_size)
    targets = target_layer_ids or default_target_layers(depth, layers)
    rope = getattr(verifier_config, "rope_parameters", None) or {
        "rope_type": "default",
        "rope_theta": float(getattr(verifier_config, "rope_theta", 10000.0) or 10000.0),
    }
    spec = DFlashSpec(tuple(targets), mask_token_id, block_size)
    return Qwen3Config(
        vocab_size=int(verifier_config.vocab_size),
        hidden_size=hidden,
        intermediate_size=int(getattr(verifier_config, "intermediate_size", 4 * hidden)),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=int(getattr(verifier_config, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(verifier_config, "head_dim", None) or hidden // heads),
        rms_norm_eps=float(getattr(verifier_config, "rms_norm_eps", 1e-6) or 1e-6),
        max_position_embeddings=int(
            getattr(verifier_config, "max_position_embeddings", 2048) or 2048
        ),
        rope_parameters=dict(rope),
        tie_word_embeddings=False,
        **spec.to_config_fields(depth),
    )


def is_dflash_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` holds a config naming a DFlash-family drafter."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        fields = json.loads(config.read_text())
    except (OSError, ValueError):
        return False
    return "dflash_config" in fields or any(
        "DFlash" in str(a) for a in fields.get("architectures") or []
    )


def load_dflash(path: str | os.PathLike[str], device: Any, dtype: Any) -> DFlashModel:
    """A DFlash checkpoint (config + safetensors) as a ``DFlashModel``; ``ValueError`` says
    what is wrong with one that does not fit the format."""
    from safetensors.torch import load_file
    from transformers import Qwen3Config

    folder = Path(path)
    fields = json.loads((folder / "config.json").read_text())
    architectures = fields.get("architectures") or [ARCHITECTURE]
    if architectures != [ARCHITECTURE]:
        raise ValueError(
            f"{folder} is a {architectures[0]} checkpoint; dg_stream runs {ARCHITECTURE} only"
        )
    try:
        config = Qwen3Config.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # transformers' config validation raises several kinds
        raise ValueError(f"its config.json is not a valid Qwen3 config: {exc}") from exc
    model = DFlashModel(config)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise ValueError(f"{folder} has no {WEIGHTS_FILE}")
    state = load_file(str(weights))
    own = {k for k in model.state_dict() if "rotary_emb" not in k}
    missing, unexpected = sorted(own - state.keys()), sorted(state.keys() - own)
    if missing or unexpected:
        raise ValueError(
            f"{weights} does not match its config: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}"
        )
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes that contradict the config
        raise ValueError(f"{weights} does not match its config: {exc}") from exc
    return model.to(device=device, dtype=dtype).eval()


def save_dflash(model: DFlashModel, path: str | os.PathLike[str], verifier_layers: int) -> None:
    """Write ``model`` in the published layout (fp16 weights unless they are bf16)."""
    from safetensors.torch import save_file

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    fields = model.config.to_dict()
    fields.update(model.spec.to_config_fields(verifier_layers))
    fields["model_type"] = "qwen3"
    fields.pop("dtype", None)
    (folder / "config.json").write_text(json.dumps(fields, indent=2, sort_keys=True) + "\n")
    state = {
        k: (v if v.dtype == torch.bfloat16 else v.to(torch.float16)).contiguous()
        for k, v in model.state_dict().items()
        if "rotary_emb" not in k
    }
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
