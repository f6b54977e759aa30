"""The methods under test: each turns prompt ids into generated ids, timed the same way.

Every method runs on the *same* verifier model object. dg_stream methods go the way users
go: ``dg_stream.generate()`` on a ``LocalBackend`` read to the end as an async stream (the
rounds on the backend's model thread; the synchronous engine loop is measured beside it in
the profile). transformers methods call ``model.generate`` with a streamer that notes the
time of the first generated token, and a forward hook that counts the verifier's forward
passes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .._config import SpeculativeConfig

__all__ = ["DgMethod", "Generation", "HFMethod", "Method", "Sampling"]


@dataclass(frozen=True)
class Sampling:
    """Greedy (``temperature == 0``) or plain temperature sampling with a per-prompt seed."""

    temperature: float = 0.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def mode(self) -> str:
        return "greedy" if self.greedy else f"sampling (T={self.temperature:g})"


@dataclass
class Generation:
    """One timed generation."""

    tokens: list[int]
    seconds: float
    first_chunk_seconds: float
    verifier_calls: int
    accepted: int  # draft tokens the verifier accepted


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Method:
    """A named way to generate; ``family`` groups methods in tables and plots."""

    name: str
    family: str  # "baseline" | "hybrid" | "ngram" | "transformers"
    block_size: int | None = None
    steps: int | None = None
    adaptive: bool = False
    description: str = ""
    model_bytes: int = 0  # parameters of every model this method runs
    extra: dict[str, Any] = field(default_factory=dict)

    def generate(
        self, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling, seed: int
    ) -> Generation:
        raise NotImplementedError


class DgMethod(Method):
    """dg_stream's engine: plain decoding (no drafter), hybrid (diffusion) or n-gram."""

    def __init__(self, backend: Any, spec: SpeculativeConfig, **fields: Any) -> None:
        super().__init__(**fields)
        self.backend = backend
        self.spec = spec

    def generate(
        self, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling, seed: int
    ) -> Generation:
        import anyio

        from .._generate import generate

        options = {
            name: getattr(self.spec, name)
            for name in self.spec.__struct_fields__
            if getattr(self.spec, name) is not None
        }
        device = self.backend.verifier.device

        async def read() -> Generation:
            tokens: list[int] = []
            first = 0.0
            _sync(device)
            started = time.perf_counter()
            stream = generate(
                list(prompt_ids),
                backend=self.backend,
                max_new_tokens=max_new_tokens,
                temperature=sampling.temperature,
                seed=seed,
                **options,
            )
            async with stream:
                async for chunk in stream:
                    if not tokens:
                        first = time.perf_counter() - started
                    tokens.extend(chunk.token_ids)
            _sync(device)
            seconds = time.perf_counter() - started
            stats = stream.stats
            calls = stats.verifier_calls if stats is not None else 0
            accepted = stats.accepted_tokens if stats is not None else 0
            return Generation(tokens, seconds, first, calls, accepted)

        return anyio.run(read)


class _FirstToken:
    """A transformers streamer that records when the first generated token arrives."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.first: float | None = None
        self._seen_prompt = False

    def put(self, value: Any) -> None:
        if not self._seen_prompt:  # generate() puts the prompt first
            self._seen_prompt = True
        elif self.first is None:
            self.first = time.perf_counter() - self.started

    def end(self) -> None:
        return None


class HFMethod(Method):
    """``model.generate``: plain, assisted (``assistant_model``) or prompt lookup."""

    def __init__(
        self, model: Any, generate_kwargs: dict[str, Any], assistant: Any = None, **fields: Any
    ) -> None:
        super().__init__(**fields)
        self.model = model
        self.assistant = assistant
        self.generate_kwargs = generate_kwargs
        self.device = next(model.parameters()).device
        self._calls = 0
        model.register_forward_pre_hook(self._count)

    def _count(self, module: Any, args: Any) -> None:
        self._calls += 1

    def generate(
        self, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling, seed: int
    ) -> Generation:
        from .._backends._model_thread import run_on_torch_thread

        # On dg_stream's torch thread, like dg_stream's own methods: a second thread running
        # torch would slow both (see _model_thread) and favour neither.
        return run_on_torch_thread(self._generate, prompt_ids, max_new_tokens, sampling, seed)

    @torch.inference_mode()
    def _generate(
        self, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling, seed: int
    ) -> Generation:
        ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
        options: dict[str, Any] = dict(
            max_new_tokens=max_new_tokens, attention_mask=torch.ones_like(ids)
        )
        if sampling.greedy:
            options["do_sample"] = False
        else:
            # Nothing but temperature: top-k 50 is transformers' default, not plain sampling.
            options.update(do_sample=True, temperature=sampling.temperature, top_k=0, top_p=1.0)
        if self.assistant is not None:
            options["assistant_model"] = self.assistant
        options.update(self.generate_kwargs)
        torch.manual_seed(seed)
        _sync(self.device)
        started = time.perf_counter()
        streamer = _FirstToken(started)
        self._calls = 0
        out = self.model.generate(ids, streamer=streamer, **options)
        _sync(self.device)
        seconds = time.perf_counter() - started
        tokens = out[0, ids.shape[1] :].tolist()
        eos = self.model.generation_config.eos_token_id
        tokens = _through_eos(tokens, {eos} if isinstance(eos, int) else set(eos or ()))
        calls = max(1, self._calls)
        return Generation(
            tokens,
            seconds,
            streamer.first if streamer.first is not None else seconds,
            calls,
            max(0, len(tokens) - calls),
        )


def _through_eos(tokens: list[int], eos_ids: set[int]) -> list[int]:
    """Cut after the first end-of-sequence token (generate() pads after it in batches)."""
    for i, token in enumerate(tokens):
        if token in eos_ids:
            return tokens[: i + 1]
    return tokens
