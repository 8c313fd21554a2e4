"""PNG plots of a benchmark document: smoothed training-loss and held-out-loss curves per variant."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..checkpoints.atomic import write_file_atomic  # noqa: E402
from .resume import smoothed  # noqa: E402
from .settings import PLOT_FILES as PLOTS  # noqa: E402


def _save(fig, path: Path, force: bool) -> None:
    """Write the figure atomically (an existing file is replaced only with ``force``)."""
    try:
        write_file_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110), force=force)
    finally:
        plt.close(fig)


def plot_curves(doc: dict, out_dir: str | Path, title: str = "", *, force: bool = False) -> list[Path]:
    """Write ``train_loss.png`` and ``holdout_loss.png`` into ``out_dir``; return their paths.

    Training curves are the mean over seeds, smoothed with the benchmark's trailing window.
    Each file is written atomically, over an existing one only with ``force``.

    Raises:
        OutputError: a file is there (without ``force``) or cannot be written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    w = doc["settings"]["window"]
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, v in doc["variants"].items():
        curve = smoothed(v["train_curve_mean"], w)
        ax.plot(range(w, w + len(curve)), curve, label=name)
    ax.set_yscale("log")  # a teleport that makes SGD spike would squash every other curve
    ax.set_xlabel("resumed training step")
    ax.set_ylabel(f"training loss (mean of last {w} steps, log scale)")
    ax.set_title(title or "training loss after teleport")
    ax.legend()
    fig.tight_layout()
    paths.append(out / PLOTS[0])
    _save(fig, paths[-1], force)

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, v in doc["variants"].items():
        steps, losses = zip(*v["holdout_curve_mean"])
        ax.plot(steps, losses, marker=".", label=name)
    ax.set_xlabel("resumed training step")
    ax.set_ylabel("held-out loss")
    ax.set_title(title or "held-out loss after teleport")
    ax.legend()
    fig.tight_layout()
    paths.append(out / PLOTS[1])
    _save(fig, paths[-1], force)
    return paths
