"""Loading verifiers, drafters and tokenizers from local paths or objects (never a hub)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ._errors import ModelLoadError, VocabularyMismatchError, missing_extra

__all__ = [
    "check_vocabularies",
    "load_causal_lm",
    "load_dflash_drafter",
    "load_feature_projection",
    "load_masked_lm",
    "load_tokenizer",
    "require_local_extra",
    "resolve_device_dtype",
    "save_feature_projection",
]

#: Beside a feature-conditioned drafter's stock checkpoint: the (hidden, features) matrix that
#: maps the verifier's features into its embedding space.
FEATURE_PROJECTION_FILE = "feature_projection.safetensors"


def require_local_extra(
    what: str = "the local backend", extras: tuple[str, ...] = ("local",)
) -> None:
    """Raise MissingDependencyError naming the extra to install when torch or transformers
    is missing (``what`` needs them: the local backend, training, ...)."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        raise missing_extra(what, extras, exc) from exc


def resolve_device_dtype(device: Any, dtype: Any) -> tuple[Any, Any]:
    import torch

    try:
        dev = (
            torch.device(device)
            if device is not None
            else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        )
    except RuntimeError as exc:
        raise ModelLoadError(f"unknown device {device!r} ({exc})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(
            "CUDA is not available in this torch build"
            if not torch.backends.cuda.is_built()
            else "CUDA is not available: torch finds no GPU"
        )
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise ModelLoadError(f"no device {dev}: torch finds {torch.cuda.device_count()} GPU(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError("MPS is not available on this machine")
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}")
    if dtype is None:
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    return dev, dtype


def _check_path(path: str | os.PathLike[str], what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelLoadError(
            f"{what} path does not exist: {p} (dg_stream loads local "
            f"checkpoints only; download models beforehand)"
        )
    return p


def load_tokenizer(path: str | os.PathLike[str]) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(
            str(_check_path(path, "tokenizer")), local_files_only=True
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load a tokenizer from {path}: {exc}") from exc


def _load(auto_class: Any, path: str | os.PathLike[str], what: str, device: Any, dtype: Any) -> Any:
    from transformers.utils import logging as hf_logging

    p = _check_path(path, what)
    bar_was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a per-tensor bar is noise for small local checkpoints
    try:
        model = auto_class.from_pretrained(str(p), dtype=dtype, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"could not load the {what} from {p}: {exc}") from exc
    finally:
        if bar_was_enabled:
            hf_logging.enable_progress_bar()
    return model.to(device).eval()


def load_causal_lm(
    path: str | os.PathLike[str], device: Any, dtype: Any, what: str = "verifier"
) -> Any:
    from transformers import AutoModelForCausalLM

    return _load(AutoModelForCausalLM, path, what, device, dtype)


def load_masked_lm(path: str | os.PathLike[str], device: Any, dtype: Any) -> Any:
    from transformers import AutoModelForMaskedLM

    return _load(AutoModelForMaskedLM, path, "drafter", device, dtype)


def load_dflash_drafter(path: str | os.PathLike[str], device: Any, dtype: Any) -> Any:
    """A DFlash checkpoint's network (see ``_drafters.dflash_model``)."""
    from ._drafters.dflash_model import load_dflash

    p = _check_path(path, "drafter")
    try:
        return load_dflash(p, device, dtype)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"could not load the DFlash drafter {p}: {exc}") from exc


def save_feature_projection(directory: str | os.PathLike[str], weight: Any) -> None:
    from safetensors.torch import save_file

    save_file({"weight": weight.contiguous()}, str(Path(directory) / FEATURE_PROJECTION_FILE))


def load_feature_projection(directory: str | os.PathLike[str]) -> Any:
    """The drafter's feature projection, or ``None`` when the checkpoint has none."""
    path = Path(directory) / FEATURE_PROJECTION_FILE
    if not path.exists():
        return None
    from safetensors.torch import load_file

    try:
        return load_file(str(path))["weight"]
    except (OSError, KeyError, ValueError) as exc:
        raise ModelLoadError(f"could not load the feature projection {path}: {exc}") from exc


def check_vocabularies(
    verifier_tokenizer: Any,
    drafter_tokenizer: Any,
    verifier_vocab: int,
    drafter_vocab: int | None,
    ignore_ids: frozenset[int] = frozenset(),
) -> None:
    """Refuse a drafter whose token ids do not mean what the verifier's mean.

    With both tokenizers, every verifier token must have the same id in the drafter's (the
    drafter may add tokens, e.g. its mask token). Without them, vocabulary sizes must match.
    """
    if drafter_vocab is None:
        return  # lookup drafters propose context ids only
    if verifier_tokenizer is not None and drafter_tokenizer is not None:
        v, d = verifier_tokenizer.get_vocab(), drafter_tokenizer.get_vocab()
        wrong = [t for t, i in v.items() if i not in ignore_ids and d.get(t) != i]
        if wrong:
            raise VocabularyMismatchError(
                f"the drafter's tokenizer does not match the verifier's: {len(wrong)} token(s) "
                f"differ (e.g. {wrong[0]!r} is {v[wrong[0]]} for the verifier and "
                f"{d.get(wrong[0])} for the drafter)"
            )
        return
    if drafter_vocab != verifier_vocab:
        raise VocabularyMismatchError(
            f"the drafter's vocabulary ({drafter_vocab} ids) differs from the verifier's "
            f"({verifier_vocab} ids); pass tokenizers to compare them token by token"
        )
