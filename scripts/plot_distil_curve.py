"""The learning curve of a ``dg-stream train distil`` run as a PNG (and a copy of its JSON).

Usage: python scripts/plot_distil_curve.py RUN_DIR OUT_STEM
   e.g. python scripts/plot_distil_curve.py runs/distil-bert-1 benchmarks/results/distil-bert-cpu

Writes OUT_STEM.json (the run's curve.json) and OUT_STEM.png: accepted drafts per verifier call
against examples seen and against training CPU-hours, with the starting drafter's level as a
reference line, since a curve only means something against where it began.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run, stem = Path(argv[0]), Path(argv[1])
    curve = json.loads((run / "curve.json").read_text())
    stem.with_suffix(".json").write_text(json.dumps(curve, indent=1) + "\n")
    points = [p for p in curve["points"] if "mean_accepted_per_call" in p]
    accepted = [p["mean_accepted_per_call"] for p in points]
    axes_data = [
        ([p["examples"] / 1e6 for p in points], "examples seen (millions)"),
        ([p["train_cpu_seconds"] / 3600 for p in points], "training CPU-hours"),
    ]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, (x, label) in zip(axes, axes_data, strict=True):
        ax.plot(x, accepted, marker="o")
        if points:
            ax.axhline(accepted[0], color="grey", linestyle="--", label="start")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"accepted per verifier call (block {curve['block']}, greedy)")
    axes[0].legend()
    fig.suptitle(f"{run.name}: {curve['prompts']} held-out prompts, {curve['new_tokens']} tokens")
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=100)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
