"""The policy matrix as a picture (bench/policy_matrix.py writes it beside its table): per policy, the score of
every column (mean over seeds), and the --keep pick's per-seed scores on its held-out episodes with two standard
errors each (`policy_matrix.seed_error`), against the 98 % target. Where a row stands, and how much of its spread
is the episodes' noise, reads faster here than in 21 rows of numbers.

    python bench/policy_matrix.py --table-only          # writes bench/results/policy_matrix.png too
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from bitrl_compile.runtime.files import write_atomic

COLORS = {"ptq": "#e76f51", "per-channel": "#f4a261", "distill": "#457b9d", "mixed": "#a8dadc",
          "rl-finetune": "#8d99ae", "keep": "#2a9d8f"}
MARKERS = {"ptq": "x", "per-channel": "+", "distill": "s", "mixed": "^", "rl-finetune": "v", "keep": "D"}
LOW = -0.2  # scores below are drawn at the left edge (a plain compile can be far below random)


def write(matrix, units: list[dict], columns: list[str], out: Path) -> Path:
    """policy_matrix.png in `out`: one line per (algo, env) row of `matrix.group(units)`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(matrix.group(units).items())
    fig, ax = plt.subplots(figsize=(9, 0.38 * len(rows) + 1.6))
    ax.axvline(100 * matrix.TARGET, color="#555555", lw=1, ls="--", zorder=0)
    ax.axvspan(100 * matrix.TARGET, 130, color="#2a9d8f", alpha=0.06, zorder=0)
    for y, (_, us) in enumerate(rows):
        for c in columns:
            s = matrix._scores(us, c)
            if not np.isfinite(s).any():
                continue
            mean = 100 * max(LOW, float(np.nanmean(s)))
            old = c == "keep" and any(not u["columns"].get("keep", {}).get("heldout") for u in us)
            label = matrix.LABELS[c] + (" (mean; hollow: some seeds not yet scored held-out)" if c == "keep" else "")
            colors = {"facecolors": "none", "edgecolors": COLORS[c]} if old else {"color": COLORS[c]}
            ax.scatter([mean], [y], marker=MARKERS[c], s=60 if c == "keep" else 30, zorder=3, label=label, **colors)
        kept = [u for u in us if u["columns"].get("keep", {}).get("step") and u["columns"]["keep"].get("heldout")]
        for i, u in enumerate(kept):  # the per-seed held-out scores of the --keep pick, spread a little
            score, error = matrix._scores([u], "keep")[0], matrix.seed_error(u, "keep")
            dy = y + 0.12 * (i - (len(kept) - 1) / 2) / max(1, len(kept) - 1) * 2
            ax.errorbar([100 * score], [dy], xerr=[[200 * error if np.isfinite(error) else 0]], fmt="o", ms=2.5,
                        color=COLORS["keep"], alpha=0.55, lw=0.8, zorder=2,
                        label="--keep 0.98, each seed ± 2 standard errors")
    names = [f"{matrix.name_of(algo)} {env_id} ({len(us)})" for (algo, env_id), us in rows]
    ax.set_yticks(range(len(rows)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(100 * LOW - 3, 130)
    ax.set_xlabel("score: (R - R_random) / (R_fp32 - R_random), %  (left edge: below -20 %)")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=7, loc="lower left", frameon=False, ncol=2)
    ax.set_title("Issue 14's policy matrix: what each recovery keeps (seeds per row in brackets)", fontsize=10)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    path = out / "policy_matrix.png"
    write_atomic(path, buffer.getvalue())
    return path
