"""Rerun the whole resumed-training benchmark on the shipped checkpoints and write docs/benchmarks.md.

Every cell (checkpoint x optimizer) runs `teleport bench` through the library with fixed K and
seeds, and is cached in bench/results/cells/ as JSON: rerunning skips finished cells, so an
interrupted run resumes where it stopped. Never runs in CI (tests/test_bench.py is the smoke
version). From the repository root::

    .venv/bin/python bench/run_all.py            # all cells, then docs/benchmarks.md
    .venv/bin/python bench/run_all.py --only mlp # one checkpoint
    .venv/bin/python bench/run_all.py --only gpt2 --optimizers adam  # one cell

A cell that neither this run computed nor the cache holds keeps its section and its row of the
summary table from the current docs/benchmarks.md, unchanged (``--only gpt2`` on a fresh clone
adds the GPT-2 cells and leaves the others as they were measured).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import time
from pathlib import Path

import torch

from teleport_cli import TeleportConfig
from teleport_cli.bench.plots import plot_curves
from teleport_cli.bench.resume import run_bench, steps_to_target
from teleport_cli.bench.settings import BenchSettings
from teleport_cli.checkpoints.tensor_files import load_checkpoint
from teleport_cli.data.sources import load_data
from teleport_cli.models.loading import load_model

ROOT = Path(__file__).resolve().parents[1]
S = ROOT / "sample_checkpoints"
CELLS = ROOT / "bench" / "results" / "cells"
DOCS = ROOT / "docs"
SEEDS = (0, 1, 2)
OPTIMIZERS = ("sgd", "momentum", "adam")
LR = {"sgd": 0.05, "momentum": 0.01, "adam": 1e-3}

DATA = ROOT / "bench" / "results" / "data"

ALL = ("original", "nullspace", "periodic", "random", "levelset", "symmetry")
CHEAP = ("original", "nullspace", "random", "levelset")  # periodic costs 7 teleports a run: MLP only

# name -> (checkpoint, training set, held-out set, K, optimizers, variants); training sets of the
# timm models are written into bench/results/data/ from the Debian package dataset-fashion-mnist
GRID = {
    "mlp": ("mlp_digits_mid.safetensors", S / "digits_train.safetensors", S / "digits_holdout.safetensors", 200, OPTIMIZERS, ALL),
    "resnet": ("fmnist_test_resnet_mid.safetensors", DATA / "fmnist_train_28.safetensors", DATA / "fmnist_holdout_28.safetensors", 200, OPTIMIZERS, CHEAP),
    "vit": ("fmnist_test_vit_mid.safetensors", DATA / "fmnist_train_28.safetensors", DATA / "fmnist_holdout_28.safetensors", 200, OPTIMIZERS, CHEAP),
    "convnext": ("fmnist_test_convnext_mid.safetensors", DATA / "fmnist_train_32.safetensors", DATA / "fmnist_holdout_32.safetensors", 200, OPTIMIZERS, CHEAP),
    "char_lm": ("char_lm_mid.safetensors", DATA / "shakespeare_train.safetensors", S / "shakespeare_holdout.safetensors", 200, OPTIMIZERS, CHEAP),
    # the transformers sample (GPT2LMHeadModel folder, bytes as tokens); added after the grid above, SGD and Adam only
    "gpt2": ("gpt2_shakespeare", DATA / "gpt2_shakespeare_train.safetensors", S / "gpt2_shakespeare_holdout.safetensors", 200, ("sgd", "adam"), CHEAP),
}


def shakespeare_train(n: int = 4096) -> None:
    """Training windows from the first 90% of the shipped excerpt (the split the char LM was trained on)."""
    import json as _json

    from safetensors.torch import save_file

    meta = load_checkpoint(S / "char_lm_mid.safetensors").metadata
    cfg = _json.loads(meta["data_config"])
    text = (S / "shakespeare_excerpt.txt").read_text(encoding="utf-8")
    ids = torch.tensor([cfg["vocab"].index(c) for c in text], dtype=torch.int64)
    train = ids[: int(0.9 * len(ids))]
    starts = torch.randperm(len(train) - cfg["context"] - 1, generator=torch.Generator().manual_seed(123))[:n]
    DATA.mkdir(parents=True, exist_ok=True)
    save_file({"tokens": torch.stack([train[s : s + cfg["context"] + 1] for s in starts.tolist()]).contiguous()},
              str(DATA / "shakespeare_train.safetensors"))


def gpt2_train(n: int = 4096) -> None:
    """Training windows (65 bytes) from the first 90% of the excerpt's bytes, the GPT-2 sample's training part."""
    from safetensors.torch import save_file

    ids = torch.tensor(list((S / "shakespeare_excerpt.txt").read_bytes()), dtype=torch.int64)
    train = ids[: int(0.9 * len(ids))]
    starts = torch.randperm(len(train) - 65, generator=torch.Generator().manual_seed(123))[:n]
    DATA.mkdir(parents=True, exist_ok=True)
    save_file({"tokens": torch.stack([train[s : s + 65] for s in starts.tolist()]).contiguous()}, str(DATA / "gpt2_shakespeare_train.safetensors"))


def fmnist_tensors() -> None:
    """The training split and held-out images of the shipped timm samples as tensor files (as trained)."""
    import importlib.util

    import numpy as np
    from safetensors.torch import save_file

    spec = importlib.util.spec_from_file_location("make_arch_samples", S / "make_arch_samples.py")
    mk = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mk)
    train_x, train_y = mk.read_idx(mk.FMNIST / "train-images-idx3-ubyte.gz"), mk.read_idx(mk.FMNIST / "train-labels-idx1-ubyte.gz")
    test_x, test_y = mk.read_idx(mk.FMNIST / "t10k-images-idx3-ubyte.gz"), mk.read_idx(mk.FMNIST / "t10k-labels-idx1-ubyte.gz")
    rng = np.random.default_rng(mk.SEED)  # the same draws as make_arch_samples.make_fmnist
    train_ids = np.sort(rng.permutation(len(train_y))[: mk.TRAIN_SIZE])
    rng.choice(train_ids, mk.CAL_SIZE, replace=False)
    hold_ids = np.sort(rng.permutation(len(test_y))[: mk.HOLD_SIZE])
    DATA.mkdir(parents=True, exist_ok=True)
    for size in (28, 32):
        save_file({"inputs": mk.preprocess(train_x[train_ids], size).contiguous(),
                   "targets": torch.tensor(train_y[train_ids], dtype=torch.int64)}, str(DATA / f"fmnist_train_{size}.safetensors"))
        save_file({"inputs": mk.preprocess(test_x[hold_ids], size).contiguous(),
                   "targets": torch.tensor(test_y[hold_ids], dtype=torch.int64)}, str(DATA / f"fmnist_holdout_{size}.safetensors"))


def run_cell(name: str, optimizer: str, config: TeleportConfig) -> dict:
    path = CELLS / f"{name}__{optimizer}.json"
    if path.exists():
        return json.loads(path.read_text())
    ckpt_file, train_file, hold_file, k, _, variants = GRID[name]
    model, ckpt, _, _ = load_model(S / ckpt_file)
    if not Path(train_file).exists():
        {"char_lm": shakespeare_train, "gpt2": gpt2_train}.get(name, fmnist_tensors)()
    train = load_data(train_file, what="training").data
    hold = load_data(hold_file, what="held-out").data
    if name == "char_lm" or ckpt.metadata.get("loss") == "lm":
        config = config.replace(loss="lm")
    settings = BenchSettings(optimizer=optimizer, lr=LR[optimizer], steps=k, seeds=SEEDS, holdout_every=max(1, k // 20), variants=variants)
    start = time.perf_counter()
    # the look-ahead's virtual steps are SGD steps: Adam's lr is no SGD step size, so 1/lambda_max is used
    doc = run_bench(model, train, hold, config.replace(lr=None if optimizer == "adam" else LR[optimizer]), settings)
    doc["wall_seconds"] = time.perf_counter() - start
    doc["checkpoint"] = ckpt_file
    CELLS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return doc


def fmt(mean, std=None, digits=3):
    if mean is None:
        return "never"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


NAMES = {"mlp": "MLP", "resnet": "test_resnet", "vit": "test_vit", "convnext": "test_convnext", "char_lm": "char_lm", "gpt2": "GPT-2 (transformers)"}


def previous_cells(path: Path = DOCS / "benchmarks.md") -> tuple[dict[tuple[str, str], tuple[str, str]], float]:
    """The current page's (summary row, section) per cell, and its run-time figure in minutes."""
    if not path.exists():
        return {}, 0.0
    text = path.read_text()
    minutes = re.search(r"Run time of all cells \(each computed once, then cached\): (\d+(?:\.\d+)?) min", text)
    out = {}
    for name, (_, _, _, _, opts, _) in GRID.items():
        for opt in opts:
            row = re.search(rf"^\| {re.escape(NAMES.get(name, name))}, {opt} \|.*$", text, re.M)
            sec = re.search(rf"^## {re.escape(name)}, {opt} \(.*?(?=^## |\Z)", text, re.M | re.S)
            if row and sec:
                out[(name, opt)] = (row.group(0), sec.group(0).rstrip("\n") + "\n")
    return out, float(minutes.group(1)) if minutes else 0.0


def own_ratio(doc: dict) -> float | None:
    """Where the original run's mean curve first touches its own final loss, as a share of K (None: never)."""
    w, k = doc["settings"]["window"], doc["settings"]["steps"]
    ref = doc["variants"]["original"]["train_curve_mean"]
    own = steps_to_target(ref, statistics.fmean(ref[-w:]), w)
    return None if own is None else own / k


def summary_table(cells: dict[tuple[str, str], dict], kept: dict | None = None) -> str:
    """The findings' overview: steps_to_target_ratio of the main variants per cell (mean over seeds);
    ``kept`` cells (not computed now) keep their row of the current page."""
    rows = ["| checkpoint, optimizer | null-space teleport | random null-space move | level-set | original touches its own final loss at | final loss: original → teleported |",
            "| --- | --- | --- | --- | --- | --- |"]
    for key in _order(cells, kept):
        if key not in cells:
            rows.append(kept[key][0])
            continue
        (name, opt), doc = key, cells[key]
        v = doc["variants"]
        r = [fmt(v[x].get("steps_to_target_ratio"), digits=2) if x in v else "-" for x in ("nullspace", "random", "levelset")]
        rows.append(f"| {NAMES.get(name, name)}, {opt} | {' | '.join(r)} | {fmt(own_ratio(doc), digits=2)} | "
                    f"{v['original']['final_loss_mean']:.3f} → {v['nullspace']['final_loss_mean']:.3f} |")
    return "\n".join(rows)


def _order(cells: dict, kept: dict | None) -> list[tuple[str, str]]:
    """Cells in grid order: those computed now and those kept from the current page."""
    return [(n, o) for n, spec in GRID.items() for o in spec[4] if (n, o) in cells or (kept and (n, o) in kept)]


def write_markdown(cells: dict[tuple[str, str], dict], seconds: float, command: str) -> None:
    previous, previous_minutes = previous_cells()
    kept = {k: v for k, v in previous.items() if k not in cells}
    minutes = sum(d.get("wall_seconds", 0.0) for d in cells.values()) / 60 + (previous_minutes if kept else 0.0)
    lines = [
        "# Resumed-training benchmark",
        "",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}. "
        f"Seeds {list(SEEDS)}; every variant resumes with the same seed and batch order. Run time of all cells "
        f"(each computed once, then cached): {minutes:.0f} min. Command: `{command}`"
        + (f" (the other {len(kept)} cells kept as the previous run measured them)." if kept else "."),
        "",
        "Columns: final training loss = mean over the last 10% of the K steps (mean ± std over seeds); "
        "steps→target = steps until the variant's curve (same 10% trailing mean) first reaches the original's final "
        "loss, divided by K (< 1 is faster; mean over seeds, 'never' if a seed never reached it); net = steps→target "
        "plus the teleport's wall-clock in equivalent training steps, divided by K.",
        "",
    ]
    findings = ROOT / "bench" / "findings.md"
    if findings.exists():
        lines += [findings.read_text().strip().replace("{summary_table}", summary_table(cells, kept)), ""]
    for name, opt in _order(cells, kept):
        if (name, opt) not in cells:
            lines += [kept[(name, opt)][1]]
            continue
        doc = cells[(name, opt)]
        s = doc["settings"]
        own = own_ratio(doc)
        lines += [f"## {name}, {opt} (lr {s['lr']:g}, K = {s['steps']}, batch {s['batch_size']})", ""]
        lines += ["| variant | final training loss | held-out loss | steps→target | per seed | teleport s | ≈ steps | net | grad-norm × |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for variant, v in doc["variants"].items():
            per = v.get("steps_to_target_ratio_per_seed")
            gn = v.get("grad_norm_ratio")
            lines.append(
                f"| {variant} | {fmt(v['final_loss_mean'], v['final_loss_std'], 4)} | {fmt(v['holdout_final_mean'], v['holdout_final_std'], 4)} | "
                f"{fmt(own) + ' (itself)' if variant == 'original' else fmt(v.get('steps_to_target_ratio'))} | "
                f"{'' if per is None else ', '.join('never' if p is None else f'{p:.2f}' for p in per)} | "
                f"{v['teleport_seconds']:.2f} | {v['teleport_equivalent_steps']:.0f} | "
                f"{'1' if variant == 'original' else fmt(v.get('net_ratio'))} | "
                f"{'' if gn is None else f'{gn:.2f}'} |"
            )
        lines += ["", f"![training loss, {name} {opt}](bench/{name}__{opt}__train_loss.png)", ""]
    (DOCS / "benchmarks.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--sgd-first-pass", action="store_true", help="only SGD cells and cells already cached")
    ap.add_argument("--optimizers", nargs="*", default=None, help="only these optimizers' cells (the others keep their sections)")
    args = ap.parse_args()
    torch.set_num_threads(1)  # tiny models: one thread is fastest and timings stay steady
    config = TeleportConfig()
    start = time.perf_counter()
    cells = {}
    for name in GRID:
        if args.only and name not in args.only:
            continue
        for opt in GRID[name][4]:
            if args.optimizers and opt not in args.optimizers:
                continue
            if args.sgd_first_pass and opt != "sgd" and not (CELLS / f"{name}__{opt}.json").exists():
                continue
            doc = run_cell(name, opt, config)
            cells[(name, opt)] = doc
            tmp = DOCS / "bench" / "tmp"
            for p in plot_curves(doc, tmp, title=f"{name}, {opt}"):
                p.replace(DOCS / "bench" / f"{name}__{opt}__{p.name}")
            tmp.rmdir()
            print(name, opt, {k: v.get("steps_to_target_ratio") for k, v in doc["variants"].items()}, flush=True)
    write_markdown(cells, time.perf_counter() - start, "bench/run_all.py" + (" --only " + " ".join(args.only) if args.only else "")
                   + (" --optimizers " + " ".join(args.optimizers) if args.optimizers else ""))


if __name__ == "__main__":
    main()
