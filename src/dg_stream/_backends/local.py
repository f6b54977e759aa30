"""The local backend: verifier and drafter in this process, rounds on dg_stream's torch thread."""

from __future__ import annotations

import os
import weakref
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio.to_thread

from .._chunks import Chunk
from .._config import GenerationRequest, SpeculativeConfig, StaticShapes
from .._errors import DGStreamError, GenerationError
from .._loading import require_local_extra, resolve_device_dtype
from .._model_kinds import build_drafter, load_verifier
from ._model_thread import BatchLimits, ModelThread, run_on_torch_thread

if TYPE_CHECKING:
    from .._engine import GenerationSession
    from .._verifier import Verifier

__all__ = ["LocalBackend", "default_model_dir"]

_DEFAULT = object()


def default_model_dir() -> Path:
    """Where the embedded default pair lives inside the installed package."""
    return Path(__file__).resolve().parent.parent / "default_model"


class LocalBackend:
    """Speculative decoding with local models.

    ``verifier``: a path to a transformers causal-LM checkpoint or a loaded model.
    ``drafter``: a masked-LM (diffusion) checkpoint path or model, a DFlash checkpoint path
    (``DFlashDraftModel``, drafting from the verifier's hidden states), a small causal-LM path or
    model, ``"ngram"`` for prompt lookup, a ``Drafter`` object, or ``None`` for plain decoding.
    ``block_size``, ``steps``, ``adaptive`` and ``confidence`` are defaults that each request
    may override; ``block_size`` and ``adaptive`` default to what a diffusion checkpoint
    recommends (``dg_stream_block_size``, ``dg_stream_adaptive`` in its config), else 8 and
    off. An adaptive default applies where it cannot change a reproducible output: greedy
    decoding and unseeded sampling (a request may still ask for it explicitly).

    Concurrent generations are batched: each verifier call scores the next block of every
    running generation (one row each, see ``_batch_cache``), and one drafter call serves them
    row. ``max_batch`` caps the rows of one call and ``max_cached_tokens`` the key/value
    positions the shared cache may allocate (it holds rows x its longest row; a generation
    joins only while every row at its prompt plus ``max_new_tokens`` would fit, and one alone
    may span up to that many tokens: ``context_length``); further requests wait,
    up to ``max_waiting`` of them, then are refused with ``OverloadedError``. While others stream,
    a prompt is read ``prefill_chunk`` tokens per call (default 128 on a CPU, 512 on an
    accelerator), so their chunks keep coming; alone, it is read at once.
    ``max_batch=1`` turns batching off: generations take turns, one verifier call each.
    ``static_shapes`` (``True`` or a ``StaticShapes``) runs decode rounds on bucketed shapes,
    captured with ``torch.compile`` (CUDA graphs on a GPU): see ``_static_shapes``.
    """

    # Set by the loading that runs on the torch thread (see __init__).
    verifier: Verifier
    tokenizer: Any
    drafter: Any

    def __init__(
        self,
        verifier: Any = None,
        drafter: Any = None,
        *,
        tokenizer: Any = None,
        drafter_tokenizer: Any = None,
        device: Any = None,
        dtype: Any = None,
        block_size: int | None = None,
        steps: int = 1,
        adaptive: bool | None = None,
        confidence: float | None = None,
        window: int | None = None,
        max_batch: int = 32,
        max_cached_tokens: int | None = None,
        max_waiting: int = 256,
        prefill_chunk: int | None = None,
        static_shapes: StaticShapes | bool = False,
    ) -> None:
        require_local_extra()
        for name, value in (
            ("max_batch", max_batch),
            ("max_waiting", max_waiting),
            ("prefill_chunk", 1 if prefill_chunk is None else prefill_chunk),
            ("max_cached_tokens", 1 if max_cached_tokens is None else max_cached_tokens),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if verifier is None:
            verifier = default_model_dir() / "verifier"
            if drafter is None:
                drafter = _DEFAULT
        if drafter is _DEFAULT:
            drafter = default_model_dir() / "drafter"
        from .._engine import Engine
        from .._verifier import Verifier

        self.device, self.dtype = resolve_device_dtype(device, dtype)

        def load() -> tuple[Any, Any, Any]:
            model, tok = self._verifier_and_tokenizer(verifier, tokenizer)
            self.verifier = Verifier(model, tok)
            self.tokenizer = tok
            made = self._make_drafter(drafter, drafter_tokenizer, steps, confidence, window)
            return model, tok, made

        # Loaded on the torch thread, like every round after: a torch parallel region run on
        # this thread would leave a second OpenMP team behind (see _model_thread).
        model, tok, self.drafter = run_on_torch_thread(load)
        traits = self.drafter.traits if self.drafter is not None else None
        if block_size is None:
            block_size = (traits.recommended_block_size if traits else None) or 8
        if adaptive is None:
            adaptive = bool(traits.recommended_adaptive if traits else None)
        self.defaults = SpeculativeConfig(
            block_size=block_size, steps=steps, adaptive=adaptive, confidence=confidence
        )
        if prefill_chunk is None:
            # A CPU pays for every prompt token read, a GPU barely notices 512 of them.
            prefill_chunk = 128 if self.verifier.device.type == "cpu" else 512
        if static_shapes:
            shapes = static_shapes if isinstance(static_shapes, StaticShapes) else StaticShapes()
            self.verifier.use_static_shapes(shapes, shapes.width or block_size + 1)
        if not self.verifier.batchable:
            max_batch = 1  # see Verifier.batchable: these generations take turns
        self.limits = BatchLimits(max_batch, max_cached_tokens, max_waiting)
        self.engine = Engine(
            self.verifier,
            self.drafter,
            tok,
            self.defaults,
            prefill_chunk,
            context_length=self.context_length,
        )
        # Every round of every event loop runs on this one thread (started on first use).
        self.model_thread = ModelThread(self.engine, self.limits)
        weakref.finalize(self, self.model_thread.close)
        self.model_name = (
            str(verifier) if isinstance(verifier, (str, os.PathLike)) else type(model).__name__
        )

    @classmethod
    def default(cls, drafter: Any = _DEFAULT, **options: Any) -> LocalBackend:
        """The embedded default pair (``drafter=None``: verifier alone; ``"ngram"``: lookup)."""
        return cls(default_model_dir() / "verifier", drafter, **options)

    # -- construction -----------------------------------------------------------------------

    def _verifier_and_tokenizer(self, verifier: Any, tokenizer: Any) -> tuple[Any, Any]:
        return load_verifier(verifier, tokenizer, self.device, self.dtype)

    def _make_drafter(
        self,
        drafter: Any,
        drafter_tokenizer: Any,
        steps: int,
        confidence: float | None,
        window: int | None,
    ) -> Any:
        """The drafter, of whichever kind ``_model_kinds`` recognises in ``drafter``."""
        return build_drafter(
            drafter,
            verifier=self.verifier,
            tokenizer=self.tokenizer,
            drafter_tokenizer=drafter_tokenizer,
            device=self.device,
            dtype=self.dtype,
            steps=steps,
            confidence=confidence,
            window=window,
        )

    # -- running ----------------------------------------------------------------------------

    def admit(self, request: GenerationRequest) -> GenerationSession:
        """Validate, tokenize and check the request against ``context_length`` (no model
        work; raises InvalidRequestError): the backend's one admission decision, which
        ``stream`` then runs without deciding again."""
        return self.engine.session(request)

    async def stream(self, request: GenerationRequest | GenerationSession) -> AsyncIterator[Chunk]:
        """Chunks of one generation (a request, or what ``admit`` made of one); its rounds
        run on the torch thread, shared with every other generation of this backend."""
        from .._engine import GenerationSession

        session = request if isinstance(request, GenerationSession) else self.admit(request)
        ticket = self.model_thread.submit(session)  # refused here when it cannot be queued
        try:
            while True:
                item = await ticket.next()
                if isinstance(item, BaseException):
                    raise _failure(item, session.text)
                try:
                    chunk = session.emit(item)
                except DGStreamError:
                    raise
                except Exception as exc:
                    raise _failure(exc, session.text) from exc
                yield chunk
                if chunk.finish_reason is not None:
                    return
        finally:
            self.model_thread.cancel(ticket)
            # Closing returns once no work for this generation runs (at most the round under
            # way finishes), even when the closer is being cancelled.
            with anyio.CancelScope(shield=True):
                await ticket.wait_left()

    @property
    def context_length(self) -> int | None:
        """The most tokens one generation may span, prompt and completion together (None:
        unknown): the verifier's context, or less where ``max_cached_tokens`` is lower."""
        limit = self.verifier.max_length
        cap = self.limits.max_cached_tokens
        if cap is None:
            return limit
        return cap if limit is None else min(limit, cap)

    async def aclose(self) -> None:
        """Leave the torch thread (after the round under way); streams still running end with
        an error. The backend cannot be used afterwards."""
        await anyio.to_thread.run_sync(self.model_thread.close)

    def close(self) -> None:
        """``aclose`` for synchronous code."""
        self.model_thread.close()

    async def __aenter__(self) -> LocalBackend:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        drafter = type(self.drafter).__name__ if self.drafter is not None else None
        return (
            f"LocalBackend(verifier={self.model_name!r}, drafter={drafter}, device={self.device})"
        )


def _failure(exc: BaseException, text: str) -> BaseException:
    """What a reader sees of a failure: dg_stream's own errors as they are, anything else
    as a ``GenerationError`` with the text produced so far."""
    if isinstance(exc, (DGStreamError, anyio.get_cancelled_exc_class())):
        return exc
    error = GenerationError(f"model work failed: {exc!r}", text=text)
    error.__cause__ = exc
    return error
