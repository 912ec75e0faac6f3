"""What a training run reports: scalars to progress.csv (step,name,value; no wall-clock values, so equal seeds give
equal files) and to TensorBoard when `tensorboard` is installed (`Logger`), a progress bar on stderr
(`progress_bar`), and the learning curve as a PNG (`plot_learning_curve`)."""

from __future__ import annotations

import csv
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np


class Logger:
    """Scalars to progress.csv (step,name,value) and to TensorBoard when it is installed."""

    def __init__(self, out: Path | None, tensorboard: bool, args):
        """`args`: the run's arguments (a dataclass), written to TensorBoard as text."""
        self.rows: list[tuple[int, str, float]] = []
        self.file = self.writer = None
        if out is not None:
            self.file = open(out / "progress.csv", "w", newline="")  # noqa: SIM115 - closed in close()
            self.csv = csv.writer(self.file)
            self.csv.writerow(["step", "name", "value"])
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError:  # tensorboard is optional
                    pass
                else:
                    self.writer = SummaryWriter(str(out / "tb"))
                    self.writer.add_text("hyperparameters", json.dumps(dataclasses.asdict(args)))

    def scalar(self, name: str, value: float, step: int) -> None:
        self.rows.append((step, name, float(value)))
        if self.file is not None:
            self.csv.writerow([step, name, repr(float(value))])
        if self.writer is not None:
            self.writer.add_scalar(name, value, step)

    def curve(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        pts = [(s, v) for s, n, v in self.rows if n == name]
        return (np.array([p[0] for p in pts]), np.array([p[1] for p in pts])) if pts else (np.zeros(0), np.zeros(0))

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()


def progress_bar(total: int, label: str):
    """A click progress bar on stderr (click is already a dependency), entered; `render_finish()` ends it."""
    import click

    bar = click.progressbar(length=total, label=label, file=sys.stderr, item_show_func=lambda s: s)
    bar.__enter__()
    return bar


def plot_learning_curve(logger: Logger, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps, returns = logger.curve("charts/episodic_return")
    if len(returns):
        ax.plot(steps, returns, ".", alpha=0.15, color="tab:blue", label="training episodes")
        k = max(1, len(returns) // 50)
        smooth = np.convolve(returns, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], smooth, color="tab:blue", label=f"training (mean of {k})")
    steps, mean = logger.curve("eval/return_mean")
    _, std = logger.curve("eval/return_std")
    if len(mean):
        ax.errorbar(steps, mean, yerr=std, fmt="o-", color="tab:red", capsize=3, label="deterministic evaluation")
    ax.set_xlabel("environment steps")
    ax.set_ylabel("episode return")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
