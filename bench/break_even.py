"""When does a teleport pay for itself? The net ratio against the training horizon K.

Resumed SGD (lr 0.05, batch 32, seeds 0-2) from the MLP mid-training checkpoint for
K = 200, 1000, 3000 and 10000 steps, and from timm ``test_resnet`` (mid-training, Fashion-MNIST)
for K = 3000 with the cheap teleport (its loss still falls over 3000 SGD steps: 0.54 -> 0.39 over
the first 1000), with two teleports:

* ``default``: `teleport apply`'s defaults (look-ahead objective at the training lr, 100 steps,
  step 0.01), with the stability check that ``--lr`` switches on;
* ``cheap``: ``--objective grad-norm --steps 10 --step-size 0.1`` (the cheapest setting of the
  sweep in docs/benchmarks.md that still raised the gradient norm about 3x).

Each (K, teleport) cell is cached in bench/results/break_even/ (delete a file to rerun it); the
table goes to docs/break_even.md. Timings need a quiet machine: one torch thread, nothing else
running. From the repository root::

    .venv/bin/python bench/break_even.py
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import torch

from teleport_cli import TeleportConfig
from teleport_cli.bench.resume import run_bench
from teleport_cli.bench.settings import BenchSettings
from teleport_cli.data.sources import load_data
from teleport_cli.models.loading import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_all import DATA, fmnist_tensors  # noqa: E402  (the timm training split, built from the Debian package)

ROOT = Path(__file__).resolve().parents[1]
S = ROOT / "sample_checkpoints"
CELLS = ROOT / "bench" / "results" / "break_even"
# (checkpoint, training set, held-out set); (checkpoint key, K, teleport) cells in this order
MODELS = {
    "mlp": (S / "mlp_digits_mid.safetensors", S / "digits_train.safetensors", S / "digits_holdout.safetensors"),
    "test_resnet": (S / "fmnist_test_resnet_mid.safetensors", DATA / "fmnist_train_28.safetensors", DATA / "fmnist_holdout_28.safetensors"),
}
GRID = [("mlp", k, t) for k in (200, 1000, 3000, 10000) for t in ("default", "cheap")] + [("test_resnet", 3000, "cheap")]
SEEDS = (0, 1, 2)
LR = 0.05
TELEPORTS = {
    "default": TeleportConfig(lr=LR),
    "cheap": TeleportConfig(objective="grad-norm", steps=10, step_size=0.1),
}
FLAGS = {"default": "(defaults) --lr 0.05", "cheap": "--objective grad-norm --steps 10 --step-size 0.1"}


def cell(key: str, k: int, name: str) -> dict:
    path = CELLS / f"{key}__K{k}__{name}.json"
    if path.exists():
        return json.loads(path.read_text())
    ckpt, train_file, hold_file = MODELS[key]
    if not train_file.exists():
        fmnist_tensors()
    model = load_model(ckpt)[0]
    train = load_data(train_file, what="training").data
    hold = load_data(hold_file, what="held-out").data
    settings = BenchSettings(optimizer="sgd", lr=LR, steps=k, seeds=SEEDS, holdout_every=max(1, k // 20),
                             variants=("original", "nullspace", "random"))
    start = time.perf_counter()
    doc = run_bench(model, train, hold, TELEPORTS[name], settings)
    doc["wall_seconds"] = time.perf_counter() - start
    for v in doc["variants"].values():  # the curves are not needed here and are large at K = 10000
        v.pop("train_curve_mean", None)
        v.pop("holdout_curve_mean", None)
    CELLS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return doc


def _f(x, digits=2):
    return "never" if x is None else f"{x:.{digits}f}"


def main() -> None:
    torch.set_num_threads(1)
    rows, total = [], 0.0
    for key, k, name in GRID:
        doc = cell(key, k, name)
        total += doc["wall_seconds"]
        o, n, r = (doc["variants"][v] for v in ("original", "nullspace", "random"))
        rows.append(
            f"| {key} | {k} | {name} | {n['grad_norm_ratio']:.2f} | {n['teleport_seconds'] * 1e3:.0f} | {o['seconds_per_step'] * 1e3:.2f} | "
            f"{n['teleport_equivalent_steps']:.0f} | {_f(n.get('steps_to_target_ratio'))} | {_f(r.get('steps_to_target_ratio'))} | "
            f"**{_f(n.get('net_ratio'))}** | {o['holdout_final_mean']:.4f} → {n['holdout_final_mean']:.4f} ± {n['holdout_final_std']:.4f} |"
        )
        print(rows[-1], flush=True)
    lines = [
        "# Break-even: when a teleport pays for its own cost",
        "",
        f"Machine: {platform.machine()}, 1 torch thread, torch {torch.__version__}. Mid-training checkpoints "
        f"(`mlp_digits_mid`, `fmnist_test_resnet_mid`), resumed SGD at lr {LR}, batch 32, seeds {list(SEEDS)}, "
        f"256 calibration samples drawn from the training split, the held-out sets of docs/benchmarks.md. Run time: {total / 60:.1f} min. "
        "Command: `.venv/bin/python bench/break_even.py`.",
        "",
        "Teleports: " + "; ".join(f"`{n}` = `teleport apply {FLAGS[n]}`" for n in TELEPORTS) + ".",
        "",
        "Columns: teleport ms = the teleport's wall-clock (capture, bases, ascent, verification, and the stability "
        "check that `--lr` turns on); ms/step = one resumed SGD step of the original run (held-out evaluation "
        "excluded); ≈ steps = teleport ms / ms per step; steps→target = steps until the teleported run's "
        "10%-window mean first reaches the original run's final loss, / K; net = (steps + ≈ steps) / K, below 1 "
        "is a real saving; random = a random move inside the same null spaces with the teleport's per-layer norm.",
        "",
        "| checkpoint | K | teleport | grad-norm × | teleport ms | ms/step | ≈ steps | steps→target | random move | net | held-out loss: original → teleported ± std |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
    ]
    (ROOT / "docs" / "break_even.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
