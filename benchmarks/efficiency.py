"""Engine efficiency at real sizes, without downloads: what the engine allows any drafter.

Random-weight verifiers built from the published configs of Qwen3-0.6B and Qwen3-8B (written
out below; nothing is fetched), decoded greedily from a random prompt:

- **plain**: ``LocalBackend(model, None)`` through ``dg_stream.generate()``; its tokens are the
  verifier's own greedy continuation;
- **oracle k**: the same model with an ``OracleDrafter`` that proposes the next k tokens of that
  continuation, so every round accepts k drafts and commits k + 1 tokens (``block_size=k``,
  not adaptive). Verifying k + 1 tokens in one forward may round differently from decoding
  them one by one (bf16): where a round rejects, the continuation is replaced by what the
  rounds committed and the pass is run again (at most ``REFINE`` times; both the divergences
  from plain decoding and the acceptance of the timed passes are reported);
- **dflash k** (``dflash=True``): a random DFlash drafter of the published Qwen3-8B-DFlash-b16
  shape (5 layers, block 16, verifier layers 1, 9, 17, 25, 33) runs its forward for every
  proposal, and the oracle's tokens are proposed instead of its own
  (``OracleOverDrafter``): rounds cost what they cost with a real DFlash drafter, and accept
  like the oracle.

Figures per k: decode tokens/s (after the first chunk, so the prompt's prefill is not counted)
and its ratio to plain (and ``(k + 1) ÷ round``, the tokens/s had every draft been kept: a bf16
near-tie left after the refinement costs acceptance, not time); the round's wall time (decode
time ÷ rounds); the verify forward (transformers' forward of k + 1 tokens on a
``DynamicCache`` at the same context, no engine, synchronised) and the draft forward (the
drafter's own ``propose``, synchronised), timed bare; ``overhead = round ÷ (verify + draft)``
(1 is an engine that adds nothing; its inverse is the efficiency), and
``ideal = (k + 1) × step ÷ (verify + draft)``: the speed-up a zero-overhead engine would reach
with this drafter. The engine's own per-round timings (``StepStats``) are
kept beside them.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

#: Published model shapes (Hugging Face config.json of each), as Qwen3Config fields. No end
#: of sequence: a random model must run the whole length.
QWEN3_0_6B: dict[str, Any] = dict(
    vocab_size=151936,
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=40960,
    rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    tie_word_embeddings=True,
)
QWEN3_8B: dict[str, Any] = dict(
    vocab_size=151936,
    hidden_size=4096,
    intermediate_size=12288,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=40960,
    rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    tie_word_embeddings=False,
)
#: A toy of the same family for the CPU smoke run.
TOY: dict[str, Any] = dict(
    vocab_size=1024,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    tie_word_embeddings=False,
)
MODELS: dict[str, dict[str, Any]] = {"qwen3-0.6b": QWEN3_0_6B, "qwen3-8b": QWEN3_8B, "toy": TOY}

#: z-lab/Qwen3-8B-DFlash-b16: 5 Qwen3 layers of the verifier's width, block 16 (15 drafts).
DFLASH: dict[str, dict[str, Any]] = {
    "qwen3-8b": dict(layers=5, block_size=16, target_layer_ids=[1, 9, 17, 25, 33], mask=151669),
    "toy": dict(layers=1, block_size=9, target_layer_ids=[1, 2], mask=1023),
}

#: Passes at most re-run with what the rounds committed, where a round rejected.
REFINE = 2


def _log_default(message: str) -> None:
    import sys

    print(f"[efficiency {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _sync(device: Any) -> None:
    import torch

    if getattr(device, "type", None) == "cuda":
        torch.cuda.synchronize(device)


def build_verifier(name: str, device: Any, dtype: Any, seed: int = 0) -> Any:
    """A random-weight causal LM of a published shape, made on ``device`` (no download)."""
    import torch
    import transformers

    config = transformers.Qwen3Config(
        **MODELS[name], eos_token_id=None, bos_token_id=None, pad_token_id=None
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.eos_token_id = None
    return model.eval()


def build_dflash(name: str, verifier: Any, dtype: Any, seed: int = 1) -> Any:
    """A random DFlash drafter network of the published shape for ``verifier``."""
    import torch

    from dg_stream._drafters.dflash_model import DFlashModel, dflash_config

    shape = DFLASH[name]
    config = dflash_config(
        verifier.config,
        layers=shape["layers"],
        mask_token_id=shape["mask"],
        block_size=shape["block_size"],
        target_layer_ids=list(shape["target_layer_ids"]),
    )
    device = next(verifier.parameters()).device
    torch.manual_seed(seed)
    with torch.device(device):
        model = DFlashModel(config)
    return model.to(dtype=dtype).eval()


def random_prompt(vocab: int, length: int, seed: int) -> list[int]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (length,), generator=g).tolist()


# -- one stream -------------------------------------------------------------------------------


@dataclass
class Pass:
    """One generation through ``dg_stream.generate()``."""

    tokens: list[int]
    wall: float
    first_chunk: float
    first_tokens: int  # tokens in the first chunk (prefill + first round)
    rounds: int  # verifier calls
    accepted: int
    drafted: int
    verify_seconds: list[float] = field(default_factory=list)  # per round after the first
    draft_seconds: list[float] = field(default_factory=list)

    @property
    def decode_seconds(self) -> float:
        return self.wall - self.first_chunk

    @property
    def decode_tokens(self) -> int:
        return len(self.tokens) - self.first_tokens

    @property
    def decode_rounds(self) -> int:
        return max(0, self.rounds - 1)

    @property
    def tokens_per_second(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0

    @property
    def round_ms(self) -> float:
        rounds = self.decode_rounds
        return 1000 * self.decode_seconds / rounds if rounds else 0.0


def stream_once(backend: Any, prompt: list[int], new_tokens: int, **options: Any) -> Pass:
    import anyio

    import dg_stream

    device = backend.verifier.device

    async def read() -> Pass:
        tokens: list[int] = []
        first, first_tokens = 0.0, 0
        verify: list[float] = []
        draft: list[float] = []
        _sync(device)
        started = time.perf_counter()
        stream = dg_stream.generate(
            list(prompt), backend=backend, max_new_tokens=new_tokens, temperature=0, **options
        )
        async with stream:
            async for chunk in stream:
                if not tokens:
                    first = time.perf_counter() - started
                    first_tokens = len(chunk.token_ids)
                elif chunk.step is not None:
                    verify.append(chunk.step.verify_seconds)
                    draft.append(chunk.step.draft_seconds)
                tokens.extend(chunk.token_ids)
        _sync(device)
        wall = time.perf_counter() - started
        stats = stream.stats
        return Pass(
            tokens=tokens,
            wall=wall,
            first_chunk=first,
            first_tokens=first_tokens,
            rounds=stats.verifier_calls if stats is not None else 0,
            accepted=stats.accepted_tokens if stats is not None else 0,
            drafted=stats.drafted_tokens if stats is not None else 0,
            verify_seconds=verify,
            draft_seconds=draft,
        )

    return anyio.run(read)


def _first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


# -- bare forwards ----------------------------------------------------------------------------


def _median_ms(run: Callable[[], None], device: Any, repeats: int, warmup: int = 2) -> float:
    times = []
    for i in range(warmup + repeats):
        _sync(device)
        started = time.perf_counter()
        run()
        _sync(device)
        if i >= warmup:
            times.append(1000 * (time.perf_counter() - started))
    return statistics.median(times)


def bare_verify_ms(
    model: Any, context: list[int], widths: Sequence[int], repeats: int
) -> dict[int, float]:
    """transformers' forward of ``w`` tokens after ``context`` on a ``DynamicCache`` (cropped
    back after each call), logits for every position as verification needs: ms per width."""
    import torch
    from transformers import DynamicCache

    from dg_stream._verifier import cache_keyword

    device = next(model.parameters()).device
    keyword = cache_keyword(model)
    ids = torch.tensor([context], device=device)
    try:
        cache = DynamicCache(config=model.config)
    except TypeError:  # older signatures take no config
        cache = DynamicCache()
    out: dict[int, float] = {}
    with torch.inference_mode():
        model(input_ids=ids, use_cache=True, **{keyword: cache})
        for width in widths:
            block = ids[:, -width:]

            def run(block: torch.Tensor = block, width: int = width) -> None:
                model(input_ids=block, use_cache=True, **{keyword: cache})
                cache.crop(-width)  # drop what was just fed (a negative count, in any version)

            out[width] = _median_ms(run, device, repeats)
    return out


def bare_draft_ms(
    drafter: Any, verifier: Any, context: list[int], ks: Sequence[int], repeats: int
) -> dict[int, float]:
    """A DFlash drafter's ``propose`` of k tokens (greedy), its context cache primed with
    ``context`` and grown by k + 1 committed positions per call, as in decoding: ms per k."""
    import torch

    from dg_stream._config import SamplingParams
    from dg_stream._drafters.base import DraftRequest

    device = drafter.device
    width = len(drafter.traits.feature_layers) * int(verifier.config.hidden_size)
    params = SamplingParams(temperature=0.0)
    g = torch.Generator().manual_seed(3)
    vocab = int(verifier.config.vocab_size)
    out: dict[int, float] = {}
    with torch.inference_mode():
        for k in ks:
            session = drafter.session()
            ids = torch.tensor(context, device=device)
            features = torch.randn(len(context) - 1, width, device=device, dtype=drafter.dtype)
            session.propose(DraftRequest(ids, k, params, None, features=features))
            state = {"ids": ids}

            def run(session: Any = session, k: int = k, state: dict[str, Any] = state) -> None:
                grown = torch.randint(2, vocab, (k + 1,), generator=g).to(device)
                state["ids"] = torch.cat([state["ids"], grown])
                rows = torch.randn(k + 1, width, device=device, dtype=drafter.dtype)
                session.propose(DraftRequest(state["ids"], k, params, None, features=rows))

            out[k] = _median_ms(run, device, repeats)
            session.close()
    return out


# -- one model --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    models: tuple[str, ...] = ("qwen3-0.6b", "qwen3-8b")
    ks: tuple[int, ...] = (4, 8, 16)
    prompt_tokens: int = 128
    new_tokens: int = 256
    repeats: int = 2
    bare_repeats: int = 10
    device: str = "cuda"
    dtype: str | None = None  # bf16 on CUDA, float32 on a CPU
    dflash: bool = False  # time a random DFlash drafter of the published shape (qwen3-8b, toy)
    static_k: int | None = 8  # also time this k with static shapes (compiled; None: skip)
    static_backend: str = "inductor"  # torch.compile's backend for it ("eager": capture only)


def _summary(passes: list[Pass]) -> dict[str, Any]:
    def median(values: list[float]) -> float | None:
        return statistics.median(values) if values else None

    verify = [1000 * s for p in passes for s in p.verify_seconds]
    draft = [1000 * s for p in passes for s in p.draft_seconds]
    return {
        "tokens_per_second": median([p.tokens_per_second for p in passes]),
        "tokens_per_second_runs": [round(p.tokens_per_second, 2) for p in passes],
        "round_ms": median([p.round_ms for p in passes]),
        "rounds": passes[0].rounds if passes else None,
        "tokens": len(passes[0].tokens) if passes else None,
        "accepted_per_round": (passes[0].accepted / passes[0].rounds)
        if passes and passes[0].rounds
        else None,
        "acceptance": (passes[0].accepted / passes[0].drafted)
        if passes and passes[0].drafted
        else None,
        "first_chunk_ms": median([1000 * p.first_chunk for p in passes]),
        "engine_verify_ms": median(verify),
        "engine_draft_ms": median(draft),
    }


def measure_static(
    backend: Any,
    oracle: Any,
    prompt: list[int],
    reference: list[int],
    k: int,
    settings: Settings,
    result: dict[str, Any],
    log: Callable[[str], None],
    name: str,
) -> dict[str, Any]:
    """Oracle rounds at ``k`` on decode shapes fixed and captured (``StaticShapes``, CUDA
    graphs on a GPU): the first pass compiles (timed apart), then the timed passes; ratios to
    plain and to the dynamic rounds at the same k."""
    oracle.set_sequences([prompt + reference])
    started = time.perf_counter()
    first = stream_once(backend, prompt, settings.new_tokens, block_size=k)
    compile_seconds = time.perf_counter() - started
    timed = [
        stream_once(backend, prompt, settings.new_tokens, block_size=k)
        for _ in range(max(1, settings.repeats))
    ]
    row: dict[str, Any] = {"k": k, "compile_seconds": round(compile_seconds, 2), **_summary(timed)}
    row["divergence_from_plain"] = _first_difference(first.tokens, reference)
    plain_tps = result["plain"]["tokens_per_second"]
    dynamic = next((r for r in result.get("k", []) if r["k"] == k), None)
    row["speedup"] = row["tokens_per_second"] / plain_tps if plain_tps else None
    row["vs_dynamic"] = row["tokens_per_second"] / dynamic["tokens_per_second"] if dynamic else None
    log(
        f"{name} static k={k}: {row['tokens_per_second']:.1f} tok/s "
        f"({row['speedup']:.2f}× plain, {row['vs_dynamic'] or 0:.2f}× dynamic), "
        f"compiled in {compile_seconds:.0f}s"
    )
    return row


def measure_model(
    name: str,
    settings: Settings,
    deadline: float,
    save: Callable[[dict[str, Any]], None],
    log: Callable[[str], None] = _log_default,
) -> dict[str, Any]:
    """Plain decoding, then every k (oracle or DFlash-over-oracle) on one model; ``save`` is
    called with the partial result after each measurement."""
    import torch

    from dg_stream import LocalBackend, StaticShapes
    from dg_stream._drafters import DFlashDrafter
    from dg_stream._loading import resolve_device_dtype
    from dg_stream.bench._oracle import OracleDrafter, OracleOverDrafter

    device, dtype = resolve_device_dtype(settings.device, settings.dtype)
    result: dict[str, Any] = {
        "model": name,
        "config": {k: v for k, v in MODELS[name].items() if k != "rope_parameters"},
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "prompt_tokens": settings.prompt_tokens,
        "new_tokens": settings.new_tokens,
        "drafter": "dflash-over-oracle" if settings.dflash else "oracle",
        "complete": False,
        "skipped": [],
    }
    started = time.perf_counter()
    model = build_verifier(name, device, dtype)
    result["build_seconds"] = round(time.perf_counter() - started, 2)
    result["parameters"] = sum(p.numel() for p in model.parameters())
    log(f"{name}: built {result['parameters'] / 1e9:.2f}B parameters in {result['build_seconds']}s")
    prompt = random_prompt(int(model.config.vocab_size), settings.prompt_tokens, seed=7)
    new = settings.new_tokens
    backends: list[Any] = []
    inner = None
    try:
        plain = LocalBackend(model, None, device=device)
        backends.append(plain)
        stream_once(plain, prompt, min(8, new))  # warm-up: allocations, kernels, the thread
        passes = [stream_once(plain, prompt, new) for _ in range(max(1, settings.repeats))]
        reference = passes[0].tokens
        result["plain"] = _summary(passes)
        result["plain"]["deterministic"] = all(p.tokens == reference for p in passes)
        result["attn_implementation"] = str(model.config._attn_implementation)
        save(result)
        log(f"{name} plain: {result['plain']['tokens_per_second']:.1f} tok/s")

        ks = list(settings.ks)
        oracle = OracleDrafter([prompt + reference], device=device, max_block_size=max(ks))
        drafter: Any = oracle
        if settings.dflash:
            inner = DFlashDrafter(build_dflash(name, model, dtype), model)
            drafter = OracleOverDrafter(inner, oracle)
            result["dflash"] = {
                **{k: v for k, v in DFLASH[name].items()},
                "parameters": sum(p.numel() for p in inner.model.parameters()),
            }
            largest = drafter.traits.max_block_size
            ks = [k for k in ks if k <= largest] or [largest]
        hybrid = LocalBackend(model, drafter, device=device, block_size=max(ks), adaptive=False)
        backends.append(hybrid)

        # Bare forwards at the middle of the generation's context.
        context = prompt + reference[: new // 2]
        widths = sorted({1, *(k + 1 for k in ks)})
        verify = bare_verify_ms(model, context, widths, settings.bare_repeats)
        result["bare_verify_ms"] = {str(w): round(v, 4) for w, v in verify.items()}
        draft = {k: 0.0 for k in ks}
        if inner is not None:
            draft = bare_draft_ms(inner, model, context, ks, settings.bare_repeats)
            result["bare_draft_ms"] = {str(k): round(v, 4) for k, v in draft.items()}
        step = verify[1]
        result["plain"]["overhead"] = result["plain"]["round_ms"] / step if step else None
        save(result)

        rows = []
        result["k"] = rows
        for k in ks:
            if time.monotonic() > deadline:
                result["skipped"].append(f"k={k}: out of time")
                log(f"{name}: out of time before k={k}")
                break
            sequence = list(reference)
            divergences: list[int | None] = []
            for _ in range(1 + REFINE):  # the first pass also warms this k up
                oracle.set_sequences([prompt + sequence])
                got = stream_once(hybrid, prompt, new, block_size=k)
                differs = _first_difference(got.tokens, sequence)
                divergences.append(differs)
                if differs is None:
                    break
                sequence = got.tokens
            oracle.set_sequences([prompt + sequence])
            timed = [
                stream_once(hybrid, prompt, new, block_size=k)
                for _ in range(max(1, settings.repeats))
            ]
            row: dict[str, Any] = {"k": k, **_summary(timed)}
            row["divergence_from_plain"] = _first_difference(timed[0].tokens, reference)
            row["refinements"] = divergences
            bare = verify[k + 1] + draft[k]
            row["bare_verify_ms"] = verify[k + 1]
            row["bare_draft_ms"] = draft[k]
            row["verify_cost_in_steps"] = verify[k + 1] / step if step else None
            row["overhead"] = row["round_ms"] / bare if bare else None
            row["efficiency"] = bare / row["round_ms"] if row["round_ms"] else None
            plain_tps = result["plain"]["tokens_per_second"]
            row["speedup"] = row["tokens_per_second"] / plain_tps if plain_tps else None
            row["ideal_speedup"] = (k + 1) * step / bare if bare else None
            # What the rounds would deliver had every draft been kept (a bf16 near-tie that
            # the refinement did not remove costs a round's acceptance, not its time).
            row["tokens_per_second_all_accepted"] = (
                1000 * (k + 1) / row["round_ms"] if row["round_ms"] else None
            )
            rows.append(row)
            save(result)
            log(
                f"{name} k={k}: {row['tokens_per_second']:.1f} tok/s "
                f"({row['speedup']:.2f}× plain, ideal {row['ideal_speedup']:.2f}×), "
                f"round {row['round_ms']:.2f} ms = {row['overhead']:.2f}× verify+draft, "
                f"{row['accepted_per_round']:.2f} accepted per round"
            )
        result["complete"] = len(rows) == len(ks)
        static_k = settings.static_k
        if static_k is not None and static_k in ks and time.monotonic() < deadline:
            backend = LocalBackend(
                model,
                drafter,
                device=device,
                block_size=static_k,
                adaptive=False,
                static_shapes=StaticShapes(width=static_k + 1, backend=settings.static_backend),
            )
            backends.append(backend)
            result["static"] = measure_static(
                backend, oracle, prompt, reference, static_k, settings, result, log, name
            )
            save(result)
        if device.type == "cuda":
            result["peak_gpu_memory_gib"] = round(
                torch.cuda.max_memory_allocated(device) / 2**30, 2
            )
        save(result)
        return result
    finally:
        for backend in backends:
            backend.close()
        del model, inner, backends
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
