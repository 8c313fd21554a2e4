"""Resumed training from the shipped mid-training MLP: original against teleported.

Teleports ``sample_checkpoints/mlp_digits_mid.safetensors`` twice (library API, calibration and
held-out files as in ``make demo``): with the paper's gradient-norm objective, and with the
defaults (look-ahead objective). Then it resumes SGD from both weight sets
with the same seed and the same batch order per seed, and records the full training-set loss
after every step. Run from the repository root::

    .venv/bin/python bench/resume_mlp.py [--steps 100] [--seeds 0 1 2] [--lr 0.05]

Prints a Markdown table (mean over steps 1-10 and 91-100, per seed and mean) and writes
bench/results/resume_mlp.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from teleport_cli import TeleportConfig, teleport
from teleport_cli.data.tensors import load_tensor_data
from teleport_cli.models.loading import load_model

ROOT = Path(__file__).resolve().parents[1]
S = ROOT / "sample_checkpoints"


def resume(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float, seed: int, batch: int) -> list[float]:
    """SGD for ``steps`` minibatch steps; the full training-set loss after each step."""
    model = copy.deepcopy(model).train()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(len(y), generator=g) for _ in range(steps * batch // len(y) + 1)])
    losses = []
    for k in range(steps):
        idx = order[k * batch : (k + 1) * batch]
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        with torch.no_grad():
            losses.append(F.cross_entropy(model(x), y).item())
    return losses


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(1)

    model = load_model(S / "mlp_digits_mid.safetensors")[0]
    cal = load_tensor_data(S / "digits_calibration.safetensors")
    hold = load_tensor_data(S / "digits_holdout.safetensors")
    train = load_tensor_data(S / "digits_train.safetensors")
    configs = {
        "grad-norm (the paper's objective; 50 steps, max step 0.5)": TeleportConfig(objective="grad-norm", steps=50, max_step=0.5),
        "defaults (look-ahead objective, lr 1/lambda_max; 100 steps, max step 1.0)": TeleportConfig(),
    }
    report = {}
    for label, config in configs.items():
        t0 = time.perf_counter()
        out = teleport(model, cal, config, holdout=hold)
        seconds = time.perf_counter() - t0
        assert out.verified
        rows = []
        for seed in args.seeds:
            a = resume(model, train.inputs, train.targets, args.steps, args.lr, seed, args.batch)
            b = resume(out.model, train.inputs, train.targets, args.steps, args.lr, seed, args.batch)
            rows.append({"seed": seed, "original": a, "teleported": b})

        def m(xs, lo, hi):
            return statistics.fmean(xs[lo - 1 : hi])

        lines = ["| seed | original, steps 1-10 | teleported, steps 1-10 | original, steps 91-100 | teleported, steps 91-100 |", "| --- | --- | --- | --- | --- |"]
        for r in rows:
            lines.append(f"| {r['seed']} | {m(r['original'], 1, 10):.4f} | {m(r['teleported'], 1, 10):.4f} | {m(r['original'], 91, 100):.4f} | {m(r['teleported'], 91, 100):.4f} |")
        mean = lambda key, lo, hi: statistics.fmean(m(r[key], lo, hi) for r in rows)  # noqa: E731
        lines.append(f"| mean | {mean('original', 1, 10):.4f} | {mean('teleported', 1, 10):.4f} | {mean('original', 91, 100):.4f} | {mean('teleported', 91, 100):.4f} |")
        with torch.no_grad():
            start = [F.cross_entropy(m_(train.inputs), train.targets).item() for m_ in (model, out.model)]
        print(f"\n{label}: grad-norm ratio {out.stats.grad_norm_ratio:.2f}, {seconds:.2f} s; "
              f"training-set loss before resuming: original {start[0]:.4f}, teleported {start[1]:.4f}\n")
        print("\n".join(lines))
        report[label] = {"teleport_seconds": seconds, "grad_norm_ratio": out.stats.grad_norm_ratio, "runs": rows}
    res = ROOT / "bench" / "results"
    res.mkdir(parents=True, exist_ok=True)
    (res / "resume_mlp.json").write_text(json.dumps({"args": vars(args), "configs": report}))


if __name__ == "__main__":
    main()
