"""The kinds of model dg_stream runs as a drafter, in one place.

Each kind says how to recognise it (a checkpoint folder or a loaded object), how to load it,
which ``Drafter`` runs it and which trainer makes it:

========== ===================================== ===================== ==========================
kind       recognised by                         drafter               trainer
========== ===================================== ===================== ==========================
causal     config names ``*ForCausalLM`` or      ``CausalDrafter``     ``train.drafter``
           ``*LMHeadModel``                                            (``--architecture causal``)
diffusion  any other transformers checkpoint     ``DiffusionDrafter``  ``train.drafter``
           (a masked LM, BERT by default)
dflash     a ``DFlashDraftModel`` config         ``DFlashDrafter``     ``train.dflash``
ngram      the string ``"ngram"``                ``NgramDrafter``      none (prompt lookup)
========== ===================================== ===================== ==========================

The verifier is always a causal LM (``load_verifier``). ``LocalBackend`` asks this module for
its drafter and ``train.drafter.train_drafter`` for the trainer of an architecture; neither
decides a kind itself.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._errors import ModelLoadError

if TYPE_CHECKING:
    from ._drafters.base import Drafter

from ._loading import (
    _check_path,
    check_vocabularies,
    load_causal_lm,
    load_dflash_drafter,
    load_feature_projection,
    load_masked_lm,
    load_tokenizer,
)

__all__ = [
    "KINDS",
    "TRAINABLE",
    "ModelKind",
    "build_drafter",
    "check_features",
    "checkpoint_kind",
    "load_verifier",
    "trainer",
]


@dataclass(frozen=True)
class ModelKind:
    """One kind of drafter model: its name (also ``--architecture`` when it can be trained)
    and the ``module:function`` under ``dg_stream.train`` that trains it (imported when
    asked for: training needs nothing the runtime does not)."""

    name: str
    summary: str
    trainer: str | None = None


KINDS: dict[str, ModelKind] = {
    kind.name: kind
    for kind in (
        ModelKind(
            "diffusion",
            "a masked-LM (BERT) drafter filling a block in parallel",
            "dg_stream.train.drafter:train_token_drafter",
        ),
        ModelKind(
            "causal",
            "a small causal LM drafting one token per call",
            "dg_stream.train.drafter:train_token_drafter",
        ),
        ModelKind(
            "dflash",
            "block diffusion reading the verifier's hidden states",
            "dg_stream.train.dflash:train_dflash",
        ),
        ModelKind("ngram", "prompt lookup: no model"),
    )
}

#: The kinds ``dg-stream train drafter --architecture`` makes, the default first.
TRAINABLE: tuple[str, ...] = tuple(k.name for k in KINDS.values() if k.trainer)


def trainer(architecture: str) -> Callable[..., dict[str, object]]:
    """The function that trains a drafter of ``architecture``; ``ValueError`` for a kind
    nothing trains."""
    kind = KINDS.get(architecture)
    if kind is None or kind.trainer is None:
        raise ValueError(f"architecture must be one of {TRAINABLE}, not {architecture!r}")
    module, _, function = kind.trainer.partition(":")
    found: Callable[..., dict[str, object]] = getattr(importlib.import_module(module), function)
    return found


# -- recognising ------------------------------------------------------------------------------


def _causal_architecture(names: Any) -> bool:
    return any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in (names or []))


def checkpoint_kind(path: str | os.PathLike[str]) -> str:
    """The kind of the drafter checkpoint at ``path``: dflash, causal or diffusion."""
    from ._drafters.dflash_model import is_dflash_checkpoint

    if is_dflash_checkpoint(path):
        return "dflash"
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(
            str(_check_path(path, "drafter")), local_files_only=True
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not read the drafter config at {path}: {exc}") from exc
    return "causal" if _causal_architecture(getattr(config, "architectures", None)) else "diffusion"


def _object_kind(model: Any) -> str:
    """The kind of a loaded drafter network."""
    from ._drafters.dflash_model import DFlashModel

    if isinstance(model, DFlashModel):
        return "dflash"
    return "causal" if _causal_architecture([type(model).__name__]) else "diffusion"


# -- loading and building ---------------------------------------------------------------------


def load_verifier(verifier: Any, tokenizer: Any, device: Any, dtype: Any) -> tuple[Any, Any]:
    """The verifier (a causal-LM path or model) and its tokenizer (a path, an object, or
    ``None``: the verifier checkpoint's own)."""
    if isinstance(verifier, (str, os.PathLike)):
        model = load_causal_lm(verifier, device, dtype)
        if tokenizer is None:
            tokenizer = load_tokenizer(verifier)
    else:
        model = verifier
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer)
    return model, tokenizer


def build_drafter(
    drafter: Any,
    *,
    verifier: Any,
    tokenizer: Any,
    drafter_tokenizer: Any,
    device: Any,
    dtype: Any,
    steps: int,
    confidence: float | None,
    window: int | None,
) -> Any:
    """The ``Drafter`` for ``drafter`` (see ``LocalBackend``), bound to ``verifier`` (a
    ``Verifier``) and refused with ``ModelLoadError`` where it cannot serve it."""
    from ._drafters import CausalDrafter, DFlashDrafter, DiffusionDrafter, NgramDrafter, as_drafter

    if drafter is None:
        return None
    if isinstance(drafter, str) and drafter == "ngram":
        return NgramDrafter()
    if hasattr(drafter, "session"):  # already a drafter (of this contract or the earlier)
        try:
            made = as_drafter(drafter)
        except TypeError as exc:
            raise ModelLoadError(f"cannot use this drafter: {exc}") from exc
        check_features(made, verifier.config)
        return made
    projection = None
    if isinstance(drafter, (str, os.PathLike)):
        path = drafter
        kind = checkpoint_kind(path)
        if kind == "dflash":
            drafter = load_dflash_drafter(path, device, dtype)
        else:
            projection = load_feature_projection(path)
            if drafter_tokenizer is None and (Path(path) / "tokenizer_config.json").exists():
                drafter_tokenizer = load_tokenizer(path)
            if kind == "causal":
                drafter = load_causal_lm(path, device, dtype, what="drafter")
            else:
                drafter = load_masked_lm(path, device, dtype)
    elif isinstance(drafter_tokenizer, (str, os.PathLike)):
        drafter_tokenizer = load_tokenizer(drafter_tokenizer)
    kind = _object_kind(drafter)
    if kind == "dflash":
        try:  # beside the verifier, in the precision it was given
            return DFlashDrafter(drafter.to(device), verifier.model)
        except ValueError as exc:
            raise ModelLoadError(f"cannot use this DFlash drafter: {exc}") from exc
    if not hasattr(drafter, "config"):
        raise ModelLoadError(f"cannot use {type(drafter).__name__} as a drafter")
    mask_id = _mask_token_id(drafter, drafter_tokenizer, tokenizer)
    ignore = frozenset({mask_id}) if mask_id is not None else frozenset()
    check_vocabularies(
        tokenizer, drafter_tokenizer, verifier.vocab_size, int(drafter.config.vocab_size), ignore
    )
    if kind == "causal":
        return CausalDrafter(drafter)
    if mask_id is None:
        raise ModelLoadError(
            "the diffusion drafter has no mask token: give its tokenizer a "
            "mask_token or set config.mask_token_id"
        )
    try:
        diffusion = DiffusionDrafter(
            drafter,
            mask_token_id=mask_id,
            window=window,
            steps=steps,
            confidence=confidence,
            output_vocab_size=verifier.vocab_size,
            feature_projection=projection,
        )
    except ValueError as exc:  # e.g. a feature-conditioned model without its projection
        raise ModelLoadError(f"cannot use this drafter: {exc}") from exc
    check_features(diffusion, verifier.config)
    return diffusion


def check_features(drafter: Drafter, config: Any) -> None:
    """A feature-conditioned drafter must fit the layers and width of the verifier whose
    ``config`` is given."""
    feature_layers = drafter.traits.feature_layers
    if not feature_layers:
        return
    layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    wanted = len(feature_layers) * hidden
    if layers and (max(feature_layers) > layers or min(feature_layers) < 0):
        raise ModelLoadError(
            f"the drafter reads verifier layers {list(feature_layers)}, but the "
            f"verifier has {layers} layers"
        )
    size = drafter.traits.feature_size  # known to drafters with a projection
    if size is not None and hidden and size != wanted:
        raise ModelLoadError(
            f"the drafter reads {size} verifier features per token, but "
            f"layers {list(feature_layers)} of this verifier give {wanted}: it was "
            "trained for another verifier"
        )


def _mask_token_id(model: Any, drafter_tokenizer: Any, tokenizer: Any) -> int | None:
    for source in (drafter_tokenizer, model.config, tokenizer):
        value = getattr(source, "mask_token_id", None) if source is not None else None
        if isinstance(value, int):
            return value
    return None
