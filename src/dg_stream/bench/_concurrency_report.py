"""The concurrency mode's report: the Markdown table and the PNG plot.

Written with the helpers every mode of the harness shares (``_report``: the table, the number
format, the machine line, the saved figure); the JSON document is ``_report.write_document``
of what ``_concurrency.run_concurrency`` returns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ._concurrency import BASELINE, PEER, PLAIN, SUBJECT
from ._report import fmt, machine_text, markdown_table, save_figure

__all__ = ["TABLE_HEADER", "markdown", "plot"]

#: The report's table.
TABLE_HEADER = (
    "streams",
    "method",
    "tokens/s",
    "× one-at-a-time",
    "first chunk p50 ms",
    "first chunk p95 ms",
    "gap p50 ms",
    "gap p95 ms",
    "rows/call",
    "tokens/forward",
    "identical",
)


def markdown(result: dict[str, Any]) -> str:
    """The report: the settings, one table row per level and method, the ratios, the targets."""
    s = result["settings"]
    repeats = s["repeats"]
    lengths = [p["prompt_tokens"] for p in result["prompts"]]
    lines = [
        f"dg_stream concurrency `{result['name']}`: streams {', '.join(map(str, s['streams']))}, "
        f"{s['new_tokens']} new tokens, {repeats} repeat{'' if repeats == 1 else 's'} "
        "(medians), greedy, "
        + machine_text(result["machine"], s["device"], s["dtype"], s["threads"]),
        "",
        f"prompts: {len(lengths)} held-out ({s['prompt_kind']}), {min(lengths)}–{max(lengths)} "
        f"tokens; the first C at C streams. Hybrid: block size {s['hybrid']['block_size']}"
        f"{' adaptive' if s['hybrid']['adaptive'] else ''}.",
        "",
    ]
    footnotes: dict[str, int] = {}
    cells = []
    for row in result["results"]:
        rows_cell = fmt(row["rows_per_call"], ".2f")
        why = row["unavailable"].get("rows_per_call")
        if why is not None:
            mark = footnotes.setdefault(why, len(footnotes) + 1)
            rows_cell = f"n/a [{mark}]"
        runs = row["tokens_per_second_runs"]
        spread = f" ({min(runs):.0f}–{max(runs):.0f})" if len(runs) > 1 else ""
        same = f"{row['identical']}/{row['generations']}"
        if row["identical"] < row["generations"]:
            same += " ⚠ differs"
        cells.append(
            (
                row["streams"],
                row["method"],
                f"{row['tokens_per_second']:.0f}{spread}",
                f"{fmt(row['vs_one_at_a_time'], '.2f')}×",
                fmt(row["first_chunk_p50_ms"]),
                fmt(row["first_chunk_p95_ms"]),
                fmt(row["gap_p50_ms"]),
                fmt(row["gap_p95_ms"]),
                rows_cell,
                fmt(row["tokens_per_forward"], ".2f"),
                same,
            )
        )
    lines += markdown_table(TABLE_HEADER, "rlrrrrrrrrl", cells)
    lines.append("")
    for why, mark in footnotes.items():
        lines.append(f"[{mark}] {why}")
    if footnotes:
        lines.append("")
    ratios = result["batched_vs_one_at_a_time"]
    lines += [
        "**batched hybrid ÷ one-at-a-time hybrid** (aggregate tokens/s, median of per-repeat "
        "ratios)",
        "",
        *markdown_table(
            ("streams", *ratios),
            "l" + "r" * len(ratios),
            [("ratio", *(f"{fmt(v, '.2f')}×" for v in ratios.values()))],
        ),
        "",
        "**targets**",
        "",
    ]
    for t in result["targets"]:
        measured = f": {t['measured']}" if t["measured"] else ""
        lines.append(f"- {t['target']}{measured} — {t['status']}")
    lines.append("")
    for message in result["transformers_log"]:
        lines.append(f"transformers said: {message}")
    for note in result["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines).rstrip() + "\n"


_COLORS = {SUBJECT: "#1f77b4", PLAIN: "#7f7f7f", BASELINE: "#2ca02c", PEER: "#ff7f0e"}


def plot(result: dict[str, Any], path: Path) -> Path:
    """Aggregate tokens/s and the p95 gap against the number of streams, one line a method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = result["settings"]["streams"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for method in result["methods"]:
        mine = sorted(
            (r for r in result["results"] if r["method"] == method), key=lambda r: r["streams"]
        )
        xs = [r["streams"] for r in mine]
        style = {"color": _COLORS.get(method), "marker": "o", "label": method}
        left.plot(xs, [r["tokens_per_second"] for r in mine], **style)
        gaps = [(r["streams"], r["gap_p95_ms"]) for r in mine if r["gap_p95_ms"] is not None]
        if gaps:
            right.plot([g[0] for g in gaps], [g[1] for g in gaps], **style)
    for axis in (left, right):
        axis.set_xscale("log", base=2)
        axis.set_xticks(levels, [str(level) for level in levels])
        axis.set_xlabel("concurrent streams")
        axis.grid(alpha=0.3)
    left.set_ylabel("aggregate tokens/s (median of repeats)")
    left.set_ylim(bottom=0)
    right.set_ylabel("p95 gap between chunks of a stream (ms)")
    right.set_ylim(bottom=0)
    left.legend(fontsize=8)
    s = result["settings"]
    fig.suptitle(
        f"concurrency `{result['name']}`: {s['new_tokens']} new tokens a stream, greedy, "
        f"{s['device']}, {s['threads']} threads",
        fontsize=10,
    )
    fig.tight_layout()
    return save_figure(fig, path)
