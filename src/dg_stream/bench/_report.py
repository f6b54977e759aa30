"""The results: a Markdown table, the JSON document and the PNG plots.

The helpers every mode of the harness writes its report with come first (a Markdown table, a
percentile, the machine line, the JSON file, a saved figure, progress lines); then the
speed-up benchmark's own report. The concurrency mode's report is in ``_concurrency``.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "fmt",
    "machine_text",
    "markdown",
    "markdown_table",
    "percentile",
    "plot",
    "repeats_text",
    "save_figure",
    "speedup_figure",
    "stderr_log",
    "write_document",
    "write_json",
]


# -- shared by the modes ----------------------------------------------------------------------


def markdown_table(header: Sequence[str], align: str, rows: Iterable[Sequence[Any]]) -> list[str]:
    """The lines of a Markdown table: ``align`` has one letter a column, ``l`` (left) or ``r``
    (right); each row's cells are written with ``str``."""
    if len(align) != len(header) or set(align) - {"l", "r"}:
        raise ValueError(f"align {align!r} does not fit {len(header)} columns")
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "".join("---:|" if a == "r" else "---|" for a in align),
    ]
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"a row of {len(row)} cells in a table of {len(header)} columns")
        lines.append("| " + " | ".join(str(cell) for cell in row) + " |")
    return lines


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile, interpolated linearly between the closest ranks (numpy's
    default method); ``None`` without values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (position - low))


def fmt(value: float | None, spec: str = ".1f") -> str:
    """``value`` formatted with ``spec``, or ``n/a`` when it is missing."""
    return "n/a" if value is None else format(value, spec)


def machine_text(machine: dict[str, Any], device: str, dtype: str, threads: Any) -> str:
    """The part of a report's first line that says where it ran, e.g. ``cpu float32, 2
    threads, <cpu model>, torch 2.x, transformers 5.x, load average 0.4 at start``."""
    text = (
        f"{device} {str(dtype).removeprefix('torch.')}, {threads} threads, "
        f"{machine.get('gpu') or machine['cpu']}, torch {machine['torch']}, "
        f"transformers {machine['transformers']}"
    )
    load = machine.get("load_average_at_start")
    if load:
        text += f", load average {load[0]:.1f} at start"
    return text


def write_document(document: dict[str, Any], path: Path) -> Path:
    """``document`` as indented UTF-8 JSON at ``path`` (its folder made when missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1, ensure_ascii=False) + "\n")
    return path


def save_figure(fig: Any, path: Path) -> Path:
    """Save a matplotlib figure as a PNG at ``path`` and close it."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def stderr_log(mode: str) -> Callable[[str], None]:
    """A progress logger: ``[<mode> HH:MM:SS] message`` lines on standard error."""

    def log(message: str) -> None:
        print(f"[{mode} {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    return log


# -- the speed-up benchmark -------------------------------------------------------------------


def repeats_text(config: dict[str, Any]) -> str:
    """How many repeats ran, e.g. ``2 repeats (medians)``, or ``greedy 1 of 2 repeats,
    sampling 1 of 2 (time budget; medians)`` when the budget stopped a phase early."""
    asked = int(config["repeats"])
    ran: dict[str, int] = config.get("repeats_run") or {}
    if all(n == asked for n in ran.values()):
        return f"{asked} repeat{'' if asked == 1 else 's'} (medians)"
    parts = [f"{mode} {n} of {asked}" for mode, n in ran.items()]
    parts[0] += " repeats"
    return ", ".join(parts) + " (time budget; medians)"


def markdown(result: dict[str, Any]) -> str:
    """One table per mode, then the targets and the profile."""
    machine = result["machine"]
    config = result["config"]
    lines = [
        f"dg_stream bench `{result['name']}`: {config['num_prompts']} prompts, "
        f"{config['max_new_tokens']} new tokens, {repeats_text(config)}, "
        + machine_text(machine, machine["device"], config["dtype"], config["threads"]),
        "",
    ]
    header = (
        "method",
        "tokens/s",
        "speed-up",
        "per-prompt speed-up",
        "accepted/call",
        "first chunk ms",
        "peak RSS MiB (+generation)",
        "identical",
    )
    for mode, rows in result["results"].items():
        greedy = mode == "greedy"
        title = "greedy" if greedy else f"sampling, temperature {config['temperature']:g}"
        cells = []
        for row in rows:
            runs = row["speedup_runs"]
            spread = f" ({min(runs):.2f}–{max(runs):.2f})" if len(runs) > 1 else ""
            cells.append(
                (
                    row["method"],
                    f"{row['tokens_per_second']:.0f}",
                    f"{row['speedup']:.2f}×{spread}",
                    f"{row.get('speedup_per_prompt_median', row['speedup']):.2f}×",
                    f"{row['mean_accepted_per_call']:.2f}",
                    f"{row['first_chunk_ms']:.1f}",
                    _rss(row),
                    f"{row['identical']}/{row['generations']}" if greedy else "— (sampled)",
                )
            )
        lines += [f"**{title}**", "", *markdown_table(header, "lrrrrrrl", cells), ""]
    targets = targets_summary(result)
    if targets:
        lines += ["**targets**", ""]
        lines += [
            f"- {t['target']}: {t['measured']} — {'met' if t['met'] else 'MISSED'}" for t in targets
        ]
        lines.append("")
    profile = result.get("profile")
    if profile:
        cfg = profile["config"]
        lines += [
            f"**profile** (k={cfg['block_size']} s={cfg['steps']}"
            f"{' adaptive' if cfg['adaptive'] else ''}, {cfg['prompt_tokens']}-token prompt, "
            f"{cfg['generated_tokens']} tokens, through `generate()`)",
            "",
            *markdown_table(
                ("part", "share of wall time"),
                "lr",
                [(part, f"{100 * share:.1f}%") for part, share in profile["shares"].items()],
            ),
            "",
            f"async layer: {1000 * profile['sync_seconds']:.1f} ms synchronous (on the model "
            f"thread) vs "
            f"{1000 * profile['async_seconds']:.1f} ms through the stream: "
            f"{100 * profile['async_overhead']:+.1f}% "
            f"({'under' if profile['async_overhead_met'] else 'OVER'} the 5% budget)",
            "",
        ]
        if profile.get("engine_efficiency") is not None:
            lines[-2] += (
                f". Engine efficiency (verifier + drafter forwards ÷ decode time): "
                f"{profile['engine_efficiency']:.2f} in the loop, "
                f"{profile['stream_efficiency']:.2f} through the stream"
            )
        eco = profile.get("economics")
        if eco:
            lines += [
                f"drafter economics, in plain decoding steps ({eco['plain_step_ms']:.2f} ms, of "
                f"which {eco['plain_forward_ms']:.2f} ms forward): a call keeps "
                f"{eco['tokens_per_call']:.2f} tokens and costs "
                f"{eco['verify_cost_steps']:.2f} (verify) + {eco['draft_cost_steps']:.2f} "
                f"(draft) + {eco['overhead_cost_steps']:.2f} (engine) steps → "
                f"{eco['predicted_speedup']:.2f}× predicted (prefill excluded)",
                "",
            ]
    for note in result.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def _rss(row: dict[str, Any]) -> str:
    peak = row.get("peak_rss_mib")
    if peak is None:
        return "—"
    text = f"{peak:.0f} (+{row.get('generation_rss_mib', 0.0):.1f})"
    if "peak_gpu_mib" in row:
        text += f", GPU {row['peak_gpu_mib']:.0f}"
    return text


#: Families that draft with dg_stream's own drafters (the targets are theirs).
DRAFTING = ("hybrid", "dflash")
#: The headline method: ``generate()`` with the backend's default options.
DEFAULT_METHOD = "dg_stream default"


def _row(rows: list[dict[str, Any]], predicate: Any) -> dict[str, Any] | None:
    found = [r for r in rows if predicate(r)]
    return max(found, key=lambda r: r["speedup"]) if found else None


def targets_summary(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets, each with the measured figure (only those that were measured). The
    headline is ``dg_stream default``: ``generate()`` with the backend's default options,
    what a user runs."""
    out: list[dict[str, Any]] = []
    greedy = result["results"].get("greedy", [])
    best = _row(greedy, lambda r: r["family"] in DRAFTING)
    if best is None:
        return out
    default = _row(greedy, lambda r: r["method"] == DEFAULT_METHOD)
    if default is not None:
        fixed = [r for r in greedy if r["family"] == "hybrid" and r["method"] != DEFAULT_METHOD]
        fixed = [r for r in fixed if not r["adaptive"]]
        out.append(
            {
                "target": "generate(), default options ≥ 1.8× plain decoding (greedy), identical",
                "measured": f"{default['speedup']:.2f}×, identical "
                f"{default['identical']}/{default['generations']}",
                "met": default["speedup"] >= 1.8 and default["identical"] == default["generations"],
            }
        )
        if fixed:
            top = max(fixed, key=lambda r: r["speedup"])
            ratio = default["speedup"] / top["speedup"]
            out.append(
                {
                    "target": "the default ≥ 0.95× the best fixed block size, never below plain",
                    "measured": f"{ratio:.2f}× {top['method']} ({top['speedup']:.2f}×); "
                    f"{default['speedup']:.2f}× plain",
                    "met": ratio >= 0.95 and default["speedup"] >= 1.0,
                }
            )
        sampled_default = _row(
            result["results"].get("sampling", []), lambda r: r["method"] == DEFAULT_METHOD
        )
        if sampled_default is not None:
            out.append(
                {
                    "target": "generate(), default options ≥ 1.3× plain decoding (sampled)",
                    "measured": f"{sampled_default['speedup']:.2f}×",
                    "met": sampled_default["speedup"] >= 1.3,
                }
            )
    out.append(
        {
            "target": "hybrid ≥ 3× plain decoding (greedy), identical output",
            "measured": f"{best['speedup']:.2f}× ({best['method']}), identical "
            f"{best['identical']}/{best['generations']}",
            "met": best["speedup"] >= 3.0 and best["identical"] == best["generations"],
        }
    )
    for label, name in (
        ("transformers assisted generation", "transformers assisted"),
        ("prompt lookup", "transformers prompt lookup"),
    ):
        peer = _row(greedy, lambda r, n=name: r["method"].startswith(n))
        if peer is not None:
            ratio = best["speedup"] / peer["speedup"]
            out.append(
                {
                    "target": f"hybrid ≥ 1.5× {label}",
                    "measured": f"{ratio:.2f}× ({best['speedup']:.2f} vs {peer['speedup']:.2f})",
                    "met": ratio >= 1.5,
                }
            )
    most = max(
        (r for r in greedy if r["family"] in DRAFTING), key=lambda r: r["mean_accepted_per_call"]
    )
    out.append(
        {
            "target": "mean accepted per verifier call ≥ 4 at the best block size",
            "measured": f"{most['mean_accepted_per_call']:.2f} ({most['method']}); "
            f"{best['mean_accepted_per_call']:.2f} at the fastest",
            "met": most["mean_accepted_per_call"] >= 4.0,
        }
    )
    sampled = _row(result["results"].get("sampling", []), lambda r: r["family"] in DRAFTING)
    if sampled is not None:
        out.append(
            {
                "target": "sampling (T=0.8): hybrid ≥ 1.8× plain decoding",
                "measured": f"{sampled['speedup']:.2f}× ({sampled['method']})",
                "met": sampled["speedup"] >= 1.8,
            }
        )
    profile = result.get("profile")
    if profile:
        out.append(
            {
                "target": "async layer < 5% of the synchronous engine's time",
                "measured": f"{100 * profile['async_overhead']:+.1f}%",
                "met": bool(profile["async_overhead_met"]),
            }
        )
        efficiency = profile.get("engine_efficiency")
        if efficiency is not None:
            out.append(
                {
                    "target": "engine efficiency ≥ 0.9 at one stream (verify + draft ÷ round)",
                    "measured": f"{efficiency:.2f} (stream: "
                    f"{profile.get('stream_efficiency', float('nan')):.2f})",
                    "met": efficiency >= 0.9,
                }
            )
    return out


def write_json(result: dict[str, Any], path: Path) -> Path:
    """The result with its targets, as JSON at ``path``."""
    return write_document({**result, "targets": targets_summary(result)}, path)


_COLORS = {
    "baseline": "#7f7f7f",
    "hybrid": "#1f77b4",
    "dflash": "#9467bd",
    "ngram": "#2ca02c",
    "causal": "#d62728",
    "transformers": "#ff7f0e",
}


def speedup_figure(result: dict[str, Any]) -> Any:
    """The speed-up per method as horizontal bars, greedy and sampling side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(result["results"])
    greedy = result["results"]["greedy"]
    names = [r["method"] for r in greedy]
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(names) + 1.8))
    height = 0.8 / len(modes)
    for m, mode in enumerate(modes):
        by_name = {r["method"]: r for r in result["results"][mode]}
        for i, name in enumerate(names):
            row = by_name.get(name)
            if row is None:
                continue
            y = i + (m - (len(modes) - 1) / 2) * height
            ax.text(row["speedup"], y, f" {row['speedup']:.2f}×", va="center", fontsize=7)
            ax.barh(
                y,
                row["speedup"],
                height=height,
                color=_COLORS.get(row["family"], "#9467bd"),
                alpha=1.0 if m == 0 else 0.5,
                hatch=None if m == 0 else "//",
                label=mode if i == 0 or name == names[0] else None,
            )
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("speed-up over dg_stream plain decoding (tokens/s ratio, median of repeats)")
    config = result["config"]
    ax.set_title(
        f"{result['name']}: {config['num_prompts']} prompts × {config['max_new_tokens']} tokens, "
        f"{result['machine']['device']}, {config['threads']} threads",
        fontsize=9,
    )
    handles = [
        plt.Rectangle((0, 0), 1, 1, color="#444444", alpha=1.0 if m == 0 else 0.5)
        for m in range(len(modes))
    ]
    # Beside the bars, not over them: no bar or label is hidden whatever the speed-ups.
    ax.legend(
        handles, modes, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0
    )
    # Room on the right for the longest bar's label.
    longest = max(r["speedup"] for rows in result["results"].values() for r in rows)
    ax.set_xlim(0, max(longest, 1.0) * 1.18)
    fig.tight_layout()
    return fig


def plot(result: dict[str, Any], stem: Path) -> list[Path]:
    """``<stem>-speedup.png`` (speed-up per method) and ``<stem>-blocks.png`` (accepted per
    call and speed-up against block size)."""
    paths = [save_figure(speedup_figure(result), stem.with_name(stem.name + "-speedup.png"))]
    fig = blocks_figure(result)
    if fig is not None:
        paths.append(save_figure(fig, stem.with_name(stem.name + "-blocks.png")))
    return paths


def _spread(values: list[float], gap: float) -> list[float]:
    """``values`` (ascending) moved up as little as possible to lie ``gap`` or more apart."""
    out: list[float] = []
    for value in values:
        out.append(value if not out else max(value, out[-1] + gap))
    return out


def blocks_figure(result: dict[str, Any]) -> Any:
    """Accepted drafts per call and speed-up against the block size, for dg_stream's drafters,
    with the other methods as labelled horizontal lines; ``None`` without drafter rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    greedy = result["results"]["greedy"]
    hybrids = [r for r in greedy if r["family"] in DRAFTING and not r["adaptive"]]
    if not hybrids:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for family, steps in sorted({(r["family"], r["steps"]) for r in hybrids}):
        rows = sorted(
            (r for r in hybrids if r["family"] == family and r["steps"] == steps),
            key=lambda r: r["block_size"],
        )
        xs = [r["block_size"] for r in rows]
        label = "DFlash" if family == "dflash" else f"diffusion, {steps} step(s)"
        left.plot(xs, [r["mean_accepted_per_call"] for r in rows], "o-", label=label)
        right.plot(xs, [r["speedup"] for r in rows], "o-", label=label)
    lines = sorted(
        (r for r in greedy if r["family"] in ("ngram", "causal", "transformers")),
        key=lambda r: r["speedup"],
    )
    lines = [r for r in lines if r["method"] != "transformers generate"]
    for row in lines:
        right.axhline(row["speedup"], linestyle="--", linewidth=0.9, color=_COLORS[row["family"]])
    right.axhline(1.0, color="black", linewidth=0.8)
    # Methods of (nearly) equal speed-up would write their names on top of each other:
    # each label sits on its line unless the one below is too close, then just above it.
    fig.tight_layout()
    bottom, top = right.get_ylim()
    height = right.get_window_extent().height / fig.dpi * 72  # in points
    gap = 9.5 / height * (top - bottom)  # one 7-point line of text, and some air
    placed = _spread([r["speedup"] for r in lines], gap)
    if placed and placed[-1] + gap > top:  # room for the highest label inside the axes
        right.set_ylim(bottom, placed[-1] + 1.5 * gap)
    for row, y in zip(lines, placed, strict=True):
        right.annotate(
            row["method"],
            (right.get_xlim()[0], y),
            fontsize=7,
            va="bottom",
            color=_COLORS[row["family"]],
        )
    left.set_xlabel("block size k")
    left.set_ylabel("mean accepted draft tokens per verifier call")
    right.set_xlabel("block size k")
    right.set_ylabel("speed-up over plain decoding (greedy)")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.suptitle(f"{result['name']}: dg_stream drafters, greedy", fontsize=10)
    fig.tight_layout()
    return fig
