"""What verifying a block costs a recurrent or hybrid verifier, against attention.

    python -m benchmarks.recurrent [--hidden 256] [--layers 4] [--context 256] [--block 8]
                                   [--repeats 15] [--threads 2] [--out DIR]

Random-init verifiers of about the same size (Llama; Mamba; Jamba and Qwen3-Next, hybrids)
read a context, then, interleaved and as medians over repeats:

- ``step``: one plain decoding forward (1 token);
- ``verify``: a block of ``block + 1`` tokens of which half the drafts are kept: on the
  batched cache a forward and a length change; on a per-generation ``StateCache`` the copy of
  the recurrent states, the forward of the block plus the previous round's kept tokens (the
  debt) and the restore.

Each ``verify ÷ step`` is what a round costs in plain steps: the lower, the more a drafter's
accepted tokens are worth. Writes ``<out>/recurrent-<name>.json`` and ``.png`` and prints a
Markdown table.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from dg_stream._argtypes import OneLineErrorParser, positive_int


def families(hidden: int, layers: int) -> dict[str, dict[str, Any]]:
    heads = max(1, hidden // 64)
    attention = dict(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        intermediate_size=3 * hidden,
        max_position_embeddings=4096,
    )
    return {
        "llama": dict(attention),
        "mamba": dict(hidden_size=hidden, num_hidden_layers=2 * layers, state_size=16, expand=2),
        "jamba": dict(
            attention,
            num_experts=1,
            num_experts_per_tok=1,
            attn_layer_period=2,
            attn_layer_offset=1,
            mamba_d_state=16,
            mamba_expand=2,
        ),
        "qwen3_next": dict(
            attention,
            head_dim=64,
            num_experts=1,
            num_experts_per_tok=1,
            moe_intermediate_size=3 * hidden,
            shared_expert_intermediate_size=0,
            linear_num_value_heads=heads,
            linear_num_key_heads=heads,
            linear_key_head_dim=64,
            linear_value_head_dim=64,
            layer_types=["linear_attention", "full_attention"] * (layers // 2),
        ),
    }


def build(family: str, config: dict[str, Any], vocab: int) -> Any:
    import transformers as tf

    torch.manual_seed(0)
    made = tf.AutoConfig.for_model(family, vocab_size=vocab, **config)
    return tf.AutoModelForCausalLM.from_config(made).eval()


def timer(verifier: Any, context: int, block: int) -> dict[str, Any]:
    """Closures timing one step and one verify round on a row that has read ``context``."""
    cache = verifier.new_cache()
    row = cache.add_row()
    ids = torch.randint(10, 1000, (1, context + 4096))
    verifier.forward(ids[:, :context], cache, row, prefill=True)
    cache.lengths[row] = length = context

    def step() -> float:
        nonlocal length
        started = time.perf_counter()
        verifier.forward(ids[:, length : length + 1], cache, row)
        seconds = time.perf_counter() - started
        length += 1
        cache.lengths[row] = length
        return seconds

    def verify() -> float:
        nonlocal length
        started = time.perf_counter()
        verifier.forward(ids[:, length : length + block + 1], cache, row)
        length += 1 + block // 2  # half the drafts kept: a rollback every round
        cache.lengths[row] = length
        return time.perf_counter() - started

    return {"step": step, "verify": verify}


def main(argv: list[str] | None = None) -> None:
    parser = OneLineErrorParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=positive_int, default=256)
    parser.add_argument("--layers", type=positive_int, default=4)
    parser.add_argument("--context", type=positive_int, default=256)
    parser.add_argument("--block", type=positive_int, default=8)
    parser.add_argument("--repeats", type=positive_int, default=15)
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--name", default="cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from dg_stream._verifier import Verifier

    timers: dict[str, dict[str, Any]] = {}
    sizes: dict[str, int] = {}
    paths: dict[str, str] = {}
    for family, config in families(args.hidden, args.layers).items():
        model = build(family, config, vocab=1024)
        verifier = Verifier(model)
        sizes[family] = sum(p.numel() for p in model.parameters())
        paths[family] = "batched" if verifier.turns_reason is None else "turn-taking"
        timers[family] = timer(verifier, args.context, args.block)
    samples: dict[str, dict[str, list[float]]] = {f: {"step": [], "verify": []} for f in timers}
    with torch.inference_mode():
        for _ in range(2):  # warm-up
            for family in timers:
                for kind in ("step", "verify"):
                    timers[family][kind]()
        for repeat in range(args.repeats):  # interleaved, the order rotating
            order = list(timers)[repeat % len(timers) :] + list(timers)[: repeat % len(timers)]
            for family in order:
                for kind in ("step", "verify"):
                    samples[family][kind].append(timers[family][kind]())
    rows = []
    for family, kinds in samples.items():
        step = statistics.median(kinds["step"])
        verify = statistics.median(kinds["verify"])
        rows.append(
            {
                "family": family,
                "path": paths[family],
                "parameters": sizes[family],
                "step_ms": 1e3 * step,
                "verify_ms": 1e3 * verify,
                "verify_per_step": verify / step,
            }
        )
    print(f"\nblock {args.block}, context {args.context}, {args.threads} threads, medians")
    print("| family | path | params | step ms | verify ms | verify ÷ step |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['family']} | {r['path']} | {r['parameters'] / 1e6:.1f}M | {r['step_ms']:.2f} "
            f"| {r['verify_ms']:.2f} | {r['verify_per_step']:.2f} |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"recurrent-{args.name}"
    result = {"settings": {k: str(v) for k, v in vars(args).items()}, "rows": rows}
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    plot(rows, stem.with_suffix(".png"))
    print(f"\nwrote {stem}.json and {stem}.png")


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = [f"{r['family']}\n({r['path']})" for r in rows]
    ax.bar(names, [r["verify_per_step"] for r in rows], color="tab:blue")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_ylabel("verify round ÷ one plain step")
    ax.set_title("Cost of verifying a block, in plain decoding steps")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
