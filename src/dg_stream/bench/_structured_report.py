"""The structured mode's report: the Markdown tables and the PNG plot.

Written with the helpers every mode of the harness shares (``_report``: the table, the number
format, the machine line, the saved figure); the JSON document is ``_report.write_document``
of what ``_structured.run_structured`` returns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ._report import fmt, machine_text, markdown_table, save_figure
from ._structured import (
    CONSTRAINED_PLAIN,
    LLG,
    LLG_FILL,
    MASK_METHODS,
    OURS,
    OURS_BLOCK,
    SUBJECT,
    UNCONSTRAINED_HYBRID,
    UNCONSTRAINED_PLAIN,
    UNPACK,
    XGR,
)

__all__ = ["MASK_HEADER", "SPEED_HEADER", "markdown", "plot"]

#: The speed table's columns.
SPEED_HEADER = (
    "method",
    "tokens/s",
    "× constrained plain",
    "× unconstrained plain",
    "accepted/call",
    "forced/call",
    "tokens/call",
    "identical",
    "valid (stop)",
    "hit the limit",
)
#: The mask table's first columns; one column per way measured follows.
MASK_HEADER = ("vocabulary", "logits")


def _ways(mask: dict[str, Any]) -> list[str]:
    return [way for way in MASK_METHODS if way in mask["ways"]]


def _mask_lines(mask: dict[str, Any]) -> list[str]:
    ways = _ways(mask)
    repeats = mask["repeats"]
    lines = [
        f"**Part 1: the mask per token** (µs per position: median / mean / p90 over the "
        f"schemas' positions × {repeats} walk{'' if repeats == 1 else 's'}; torch threads as "
        "labelled)",
        "",
    ]
    cells = []
    for vocab in mask["vocabularies"]:
        row = [vocab["label"], f"{vocab['vocab_size']:,}"]
        for way in ways:
            s = vocab["ways"].get(way)
            row.append(
                "n/a"
                if s is None
                else f"{s['median_us']:.1f} / {s['mean_us']:.1f} / {fmt(s['p90_us'], '.0f')}"
            )
        cells.append(row)
    lines += markdown_table((*MASK_HEADER, *ways), "lr" + "r" * len(ways), cells)
    lines.append("")
    for way in ways:
        lines.append(f"- {way}: {mask['ways'][way]}")
    if mask.get("xgrammar_unavailable"):
        lines.append(f"- {XGR}: not measured ({mask['xgrammar_unavailable']})")
    lines.append("")
    # Where our unpacking goes, per vocabulary: ours minus llguidance's own mask.
    overhead = []
    for vocab in mask["vocabularies"]:
        ours, own = vocab["ways"].get(OURS), vocab["ways"].get(LLG)
        if ours and own:
            overhead.append(
                f"{vocab['label']}: {ours['median_us'] - own['median_us']:.1f} µs "
                f"({ours['median_us'] / own['median_us']:.1f}× compute_bitmask)"
            )
    if overhead:
        lines += ["unpacking to bool (ours − compute_bitmask): " + "; ".join(overhead), ""]
    per_task = []
    for vocab in mask["vocabularies"]:
        for task in vocab["tasks"]:
            row = [
                vocab["label"],
                task["task"],
                task["document_tokens"],
                f"{task['compile_ms']:.0f}",
            ]
            for way in ways:
                s = task["ways"].get(way)
                row.append("n/a" if s is None else f"{s['median_us']:.1f}")
            per_task.append(row)
    lines += [
        "per schema (median µs per position; compile: ms to the first matcher)",
        "",
        *markdown_table(
            ("vocabulary", "schema", "tokens", "compile ms", *ways),
            "llrr" + "r" * len(ways),
            per_task,
        ),
        "",
    ]
    return lines


def _speed_lines(speed: dict[str, Any]) -> list[str]:
    s = speed["settings"]
    d = s["hybrid_defaults"]
    repeats = s["repeats"]
    lengths = [p["prompt_tokens"] for p in speed["prompts"]]
    lines = [
        f"**Part 2: speed** ({len(lengths)} held-out prompts of {min(lengths)}–{max(lengths)} "
        f"tokens, max_new_tokens {s['new_tokens']}, greedy, {repeats} repeat"
        f"{'' if repeats == 1 else 's'} interleaved (medians; min–max in brackets); hybrid "
        f"defaults: block {d['block_size']}, {d['steps']} step(s)"
        f"{', adaptive' if d['adaptive'] else ''})",
        "",
    ]
    cells = []
    for row in speed["results"]:
        runs = row["tokens_per_second_runs"]
        spread = f" ({min(runs):.0f}–{max(runs):.0f})" if len(runs) > 1 else ""
        same = "—"
        if row["identical"] is not None:
            same = f"{row['identical']}/{row['generations']}"
            if row["identical"] < row["generations"]:
                same += " ⚠ differs"
        valid = "—"
        if row["constrained"]:
            valid = f"{row['checked'] - row['violations']}/{row['checked']}"
            if row["violations"]:
                valid += " ⚠"
        cells.append(
            (
                row["method"],
                f"{row['tokens_per_second']:.1f}{spread}",
                f"{fmt(row['vs_constrained_plain'], '.2f')}×",
                f"{fmt(row['vs_unconstrained_plain'], '.2f')}×",
                fmt(row["accepted_per_call"], ".2f"),
                fmt(row["forced_per_call"], ".2f"),
                fmt(row["tokens_per_call"], ".2f"),
                same,
                valid,
                f"{row['generations'] - row['finished']}/{row['generations']}",
            )
        )
    lines += markdown_table(SPEED_HEADER, "lrrrrrrlll", cells)
    lines.append("")
    rows = {r["method"]: r for r in speed["results"]}
    subject, hybrid = rows.get(SUBJECT), rows.get(UNCONSTRAINED_HYBRID)
    if subject is not None:
        text = (
            "headline: constrained hybrid (defaults) runs "
            f"{fmt(subject['vs_constrained_plain'], '.2f')}× constrained plain and "
            f"{fmt(subject['vs_unconstrained_plain'], '.2f')}× unconstrained plain"
        )
        if hybrid is not None:
            text += (
                f"; unconstrained hybrid {fmt(hybrid['vs_unconstrained_plain'], '.2f')}× "
                "unconstrained plain"
            )
        plain = rows.get(CONSTRAINED_PLAIN)
        if plain is not None:
            text += (
                f"; constrained plain {fmt(plain['vs_unconstrained_plain'], '.2f')}× "
                "unconstrained plain"
            )
        lines += [text, ""]
    lines += [
        "accepted/call counts accepted drafted tokens (forced ones included); forced/call the "
        "drafted tokens the grammar dictated; tokens/call every committed token; valid: "
        "finished constrained replies that parse and validate against their schema.",
        "",
    ]
    for method, what in speed["methods"].items():
        lines.append(f"- {method}: {what}")
    lines.append("")
    for note in speed["notes"]:
        lines.append(f"note: {note}")
    return lines


def markdown(result: dict[str, Any]) -> str:
    """The report: the settings, the mask table(s), the speed table, the notes."""
    s = result["settings"]
    speed = result.get("speed")
    dtype = speed["settings"]["dtype"] if speed else "torch.float32"
    lines = [
        f"dg_stream structured `{result['name']}`: {', '.join(s['parts'])}, "
        + machine_text(result["machine"], s["device"], dtype, s["threads"]),
        "",
    ]
    if result.get("mask"):
        lines += _mask_lines(result["mask"])
    if speed:
        lines += _speed_lines(speed)
    return "\n".join(lines).rstrip() + "\n"


_WAY_COLORS = {
    LLG: "#7f7f7f",
    LLG_FILL: "#bcbd22",
    OURS: "#1f77b4",
    OURS_BLOCK: "#17becf",
    UNPACK: "#2ca02c",
    XGR: "#ff7f0e",
}
_METHOD_COLORS = {
    UNCONSTRAINED_PLAIN: "#7f7f7f",
    CONSTRAINED_PLAIN: "#bcbd22",
    SUBJECT: "#1f77b4",
    UNCONSTRAINED_HYBRID: "#2ca02c",
}


def plot(result: dict[str, Any], path: Path) -> Path:
    """Left: µs per mask by vocabulary, a bar a way; right: tokens/s a method (min–max)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mask, speed = result.get("mask"), result.get("speed")
    panels = [p for p in (mask, speed) if p]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(6 * max(1, len(panels)), 4.4))
    axes = list(axes) if len(panels) > 1 else [axes]
    at = 0
    if mask:
        axis = axes[at]
        at += 1
        ways = _ways(mask)
        vocabs = mask["vocabularies"]
        width = 0.8 / max(1, len(ways))
        for j, way in enumerate(ways):
            xs, ys = [], []
            for i, vocab in enumerate(vocabs):
                if way in vocab["ways"]:
                    xs.append(i + (j - (len(ways) - 1) / 2) * width)
                    ys.append(vocab["ways"][way]["median_us"])
            axis.bar(xs, ys, width, label=way, color=_WAY_COLORS.get(way))
        axis.set_xticks(range(len(vocabs)), [v["label"] for v in vocabs], rotation=15, ha="right")
        axis.tick_params(axis="x", labelsize=7)
        values = [w["median_us"] for v in vocabs for w in v["ways"].values()]
        if values and max(values) > 30 * max(min(values), 1e-3):
            axis.set_yscale("log")
        axis.set_ylabel("µs per mask (median over positions)")
        axis.set_title("the mask per token", fontsize=10)
        axis.grid(alpha=0.3, axis="y")
        axis.legend(fontsize=7)
    if speed:
        axis = axes[at]
        rows = speed["results"]
        for i, row in enumerate(rows):
            runs = row["tokens_per_second_runs"]
            mid = row["tokens_per_second"]
            axis.bar(
                i,
                mid,
                0.7,
                color=_METHOD_COLORS.get(row["method"], "#17becf"),
                yerr=[[mid - min(runs)], [max(runs) - mid]],
                capsize=3,
            )
        axis.set_xticks(range(len(rows)), [r["method"] for r in rows], rotation=20, ha="right")
        axis.tick_params(axis="x", labelsize=7)
        axis.set_ylabel("tokens/s (median of repeats, min–max)")
        s = speed["settings"]
        axis.set_title(f"speed, {s['new_tokens']} new tokens, greedy", fontsize=10)
        axis.grid(alpha=0.3, axis="y")
    s = result["settings"]
    fig.suptitle(
        f"structured `{result['name']}`: {s['device']}, {s['threads']} threads", fontsize=10
    )
    fig.tight_layout()
    return save_figure(fig, path)
