"""Learning curves of ``dg-stream train distil`` runs as one PNG (and their JSON).

Usage: python scripts/plot_distil_curve.py OUT_STEM RUN_DIR [RUN_DIR ...]
   e.g. python scripts/plot_distil_curve.py benchmarks/results/distil-bert-cpu runs/distil-bert-1

Writes OUT_STEM.json (each run's curve.json, by run name) and OUT_STEM.png: accepted drafts per
verifier call against examples seen and against training CPU-hours, one line per run, with the
starting drafter's level as a reference line, since a curve only means something against
where it began.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stem, runs = Path(argv[0]), [Path(a) for a in argv[1:]]
    curves = {run.name: json.loads((run / "curve.json").read_text()) for run in runs}
    stem.with_suffix(".json").write_text(json.dumps(curves, indent=1) + "\n")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    start = None
    for name, curve in curves.items():
        points = [p for p in curve["points"] if "mean_accepted_per_call" in p]
        accepted = [p["mean_accepted_per_call"] for p in points]
        if points and points[0]["step"] == 0:
            start = accepted[0]
        label = f"{name} (batch {curve['batch_size']})"
        axes[0].plot([p["examples"] / 1e6 for p in points], accepted, marker="o", label=label)
        axes[1].plot([p["train_cpu_seconds"] / 3600 for p in points], accepted, marker="o")
    for ax, label in zip(axes, ("examples seen (millions)", "training CPU-hours"), strict=True):
        if start is not None:
            ax.axhline(start, color="grey", linestyle="--", label="start drafter")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    first = next(iter(curves.values()))
    axes[0].set_ylabel(f"accepted per verifier call (block {first['block']}, greedy)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{first['prompts']} held-out prompts × {first['new_tokens']} tokens")
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=100)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
