"""The reliability grid: `teleport apply` at defaults on every shipped sample x seeds 0, 1, 2, plus
Zhao et al.'s Fashion-MNIST MLP (784-16-10-10, 200 calibration samples) x seeds 0..4.

Every cell runs the CLI exactly as a user would, in a subprocess with ``OMP_NUM_THREADS=1``
(``apply CKPT --data CAL --holdout HOLD --seed S --json``, no other flag), and is cached as JSON in
bench/results/grid/ (delete a file to rerun it): an interrupted grid resumes where it stopped.
Two more cells per digits checkpoint run ``teleport bench`` (SGD, K 200, 3 seeds, variants
original and nullspace) for ``steps_to_target_ratio``, the one sample with a training set.
Writes docs/grid.md from whatever cells are cached. Never runs in CI. From the repository root::

    .venv/bin/python bench/grid.py               # all cells, then docs/grid.md
    .venv/bin/python bench/grid.py --table-only  # docs/grid.md from the cached cells
    .venv/bin/python bench/grid.py --only char_lm

The Fashion-MNIST cells need the Debian package ``dataset-fashion-mnist`` (bench/fmnist_mlp.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import arch_samples  # noqa: E402

S = ROOT / "sample_checkpoints"
CELLS = ROOT / "bench" / "results" / "grid"
DOC = ROOT / "docs" / "grid.md"
DIGITS = (S / "digits_calibration.safetensors", S / "digits_holdout.safetensors")
SAMPLES = {"mlp_digits_mid": DIGITS, "mlp_digits_converged": DIGITS, **arch_samples.SAMPLES}
SEEDS, MLP_SEEDS = (0, 1, 2), (0, 1, 2, 3, 4)
# seed-0 grad-norm ratios recorded in docs/samples.md before this grid (same defaults, same CLI)
RECORDED = {"fmnist_test_resnet_mid": 1.11, "fmnist_test_resnet_converged": 1.06, "fmnist_test_convnext_mid": 1.85,
            "fmnist_test_convnext_converged": 1.11, "fmnist_test_vit_mid": 1.26, "fmnist_test_vit_converged": 1.05,
            "char_lm_mid": 1.36, "char_lm_converged": 1.24}
# the Fashion-MNIST MLP: median over seeds 0-4 in docs/guard.md ("bound (default)"); digits MLP bench: docs/benchmarks.md
RECORDED_MEDIAN = {"fmnist_mlp": 1.07}
RECORDED_STEPS = {"mlp_digits_mid": 0.61}
BENCH = {f"bench_{n}": n for n in ("mlp_digits_mid", "mlp_digits_converged")}
# the same cells with the guard's bound at z = 2 (the default before --guard-z 1.5), on the code of
# commit ea55748 with TeleportConfig.guard_z = 2.0: exits and grad-norm ratios per seed; the
# bench cells' steps_to_target_ratio (mean, per seed)
Z2: dict[str, tuple[list[int], list[float]]] = {
    "mlp_digits_mid": ([0, 0, 0], [1.4613, 1.848, 2.3853]), "mlp_digits_converged": ([0, 0, 0], [1.0198, 1.0175, 1.0639]),
    "fmnist_test_resnet_mid": ([0, 0, 0], [1.1103, 1.0383, 1.0384]), "fmnist_test_resnet_converged": ([0, 0, 0], [1.0554, 1.0421, 1.0211]),
    "fmnist_test_convnext_mid": ([0, 0, 0], [1.8541, 2.1155, 2.1768]), "fmnist_test_convnext_converged": ([0, 0, 0], [1.1124, 1.0628, 1.0269]),
    "fmnist_test_vit_mid": ([0, 0, 0], [1.2602, 1.5119, 1.0601]), "fmnist_test_vit_converged": ([0, 0, 0], [1.0483, 1.1538, 1.0473]),
    "char_lm_mid": ([0, 0, 0], [1.3601, 1.4646, 1.4021]), "char_lm_converged": ([0, 0, 0], [1.244, 1.17, 1.2048]),
    "fmnist_mlp": ([0, 0, 0, 0, 0], [1.0479, 1.0452, 1.1432, 1.1059, 1.088]),
}
Z2_STEPS: dict[str, tuple[float, list[float]]] = {"mlp_digits_mid": (0.715, [0.73, 0.71, 0.705]),
                                                  "mlp_digits_converged": (0.1517, [0.255, 0.1, 0.1])}


CODE = ROOT  # the tree whose teleport_cli the cells run (--code)


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(CODE), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _commit() -> str:
    p = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return p.stdout.strip() if CODE == ROOT else f"tree {CODE.name}"


def _cpu(before: os.times_result) -> float:
    after = os.times()
    return (after.children_user - before.children_user) + (after.children_system - before.children_system)


def sample_cell(name: str, seed: int) -> dict:
    os.environ.update(_env())
    arch_samples.ROOT = CODE  # its PYTHONPATH and cwd
    t = os.times()
    with tempfile.TemporaryDirectory() as tmp:
        row = arch_samples.run(name, *SAMPLES[name], Path(tmp), seed)
    row["cpu_seconds"] = _cpu(t)
    return row


def mlp_cell(seed: int) -> dict:
    import fmnist_mlp

    os.environ.update(_env())
    fmnist_mlp.ROOT = CODE  # its PYTHONPATH and cwd
    with tempfile.TemporaryDirectory() as tmp:
        t = os.times()
        row = fmnist_mlp.run(seed, Path(tmp))
    row["checkpoint"] = "fmnist_mlp_784_16_10_10"
    row["cpu_seconds"] = _cpu(t)  # the teleport child only, not the in-process training
    return row


def bench_cell(name: str) -> dict:
    cmd = [sys.executable, "-m", "teleport_cli", "bench", str(S / f"{name}.safetensors"), "--data", str(S / "digits_train.safetensors"),
           "--holdout", str(S / "digits_holdout.safetensors"), "--optimizer", "sgd", "--steps", "200", "--seeds", "3",
           "--variants", "original,nullspace", "--json", "-q", "--device", "cpu"]
    t = os.times()
    p = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=CODE)
    doc = json.loads(p.stdout) if p.stdout.strip() else {}
    v = doc.get("variants", {})
    return {"checkpoint": name, "exit_code": p.returncode, "stderr": p.stderr.strip()[-300:], "cpu_seconds": _cpu(t),
            "steps_to_target_ratio": v.get("nullspace", {}).get("steps_to_target_ratio"),
            "steps_to_target_ratio_per_seed": v.get("nullspace", {}).get("steps_to_target_ratio_per_seed"),
            "original_self_ratio_per_seed": v.get("original", {}).get("self_steps_to_target_ratio_per_seed"),
            "grad_norm_ratio": v.get("nullspace", {}).get("grad_norm_ratio"), "verified": v.get("nullspace", {}).get("verified")}


def cells() -> dict[str, callable]:
    out = {}
    for name in SAMPLES:
        for seed in SEEDS:
            out[f"{name}.{seed}"] = (lambda n=name, s=seed: sample_cell(n, s))
    for seed in MLP_SEEDS:
        out[f"fmnist_mlp.{seed}"] = (lambda s=seed: mlp_cell(s))
    for key, name in BENCH.items():
        out[key] = (lambda n=name: bench_cell(n))
    return out


def _load(folder: Path | None = None) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((folder or CELLS).glob("*.json"))}


BEFORE = ROOT / "bench" / "results" / "grid-before"  # --tag before: the cells run on the older tree


def _f(x, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}g}"


def _before(before: dict[str, dict], name: str, seeds) -> str:
    ran = [before.get(f"{name}.{s}") for s in seeds]
    ran = [r for r in ran if r is not None]
    if not ran:
        return "-"
    ratios = [r["grad_norm_ratio"] for r in ran if r.get("grad_norm_ratio") is not None]
    med = _f(statistics.median(ratios)) if ratios else "-"
    return f"exits {', '.join(str(r['exit_code']) for r in ran)}; {', '.join(_f(x) for x in ratios)}; median {med}"


def _z2(name: str) -> str:
    if name not in Z2:
        return "-"
    exits, ratios = Z2[name]
    return f"exits {', '.join(map(str, exits))}; {', '.join(_f(x) for x in ratios)}; median {_f(statistics.median(ratios))}"


def _rejections(ran: list[dict]) -> str:
    total: dict[str, int] = {}
    for r in ran:
        for k, v in (r.get("rejections") or {}).items():
            total[k] = total.get(k, 0) + v
    return " / ".join(str(total.get(k, 0)) for k in ("trust", "guard", "calibration", "objective")) if any(r.get("rejections") is not None for r in ran) else "-"


def write_doc(done: dict[str, dict], before: dict[str, dict] | None = None) -> None:
    before = before or {}
    rows, exits = [], {}
    names = [*SAMPLES, "fmnist_mlp"]
    for name in names:
        seeds = MLP_SEEDS if name == "fmnist_mlp" else SEEDS
        mine = [done.get(f"{name}.{s}") for s in seeds]
        ran = [r for r in mine if r is not None]
        for r in ran:
            exits[r["exit_code"]] = exits.get(r["exit_code"], 0) + 1
        ratios = [r.get("grad_norm_ratio") for r in ran if r.get("grad_norm_ratio") is not None]
        held = [r.get("holdout", {}).get("relative_loss_drift") if "holdout" in r else r.get("holdout_drift") for r in ran]
        held = [h for h in held if h is not None]
        backs = [r.get("step_backs") for r in ran]
        cpu = [r["cpu_seconds"] for r in ran if "cpu_seconds" in r]
        rows.append(
            f"| {name} | {len(ran)}/{len(seeds)} | {', '.join(str(r['exit_code']) for r in ran) or '-'} | "
            f"{', '.join(_f(x) for x in ratios) or '-'} | {_f(statistics.median(ratios)) if ratios else '-'} | "
            f"{_f(RECORDED.get(name)) if name in RECORDED else (_f(RECORDED_MEDIAN[name]) + ' (median)' if name in RECORDED_MEDIAN else '-')} | {_f(max(held), 2) if held else '-'} | {', '.join('-' if b is None else str(b) for b in backs) or '-'} | "
            f"{_rejections(ran)} | "
            f"{_f(min(cpu), 2) if cpu else '-'} / {_f(statistics.median(cpu), 2) if cpu else '-'} / {_f(max(cpu), 2) if cpu else '-'} | "
            f"{_z2(name)} | {_before(before, name, seeds)} |")
    total = sum(exits.values())
    exits_before = {}
    for key, r in before.items():
        if not key.startswith("bench_"):
            exits_before[r["exit_code"]] = exits_before.get(r["exit_code"], 0) + 1
    bench_rows = []
    for key, name in BENCH.items():
        r = done.get(key)
        if r is None:
            bench_rows.append(f"| {name} | not run | - | {_f(RECORDED_STEPS.get(name), 2)} | - | - | - | - |")
            continue
        per = r.get("steps_to_target_ratio_per_seed") or []
        own = r.get("original_self_ratio_per_seed") or []
        b = before.get(key)
        was = "-" if b is None else f"{_f(b.get('steps_to_target_ratio'), 2)} ({', '.join(_f(x, 2) for x in b.get('steps_to_target_ratio_per_seed') or [])})"
        z2 = "-" if name not in Z2_STEPS else f"{_f(Z2_STEPS[name][0], 2)} ({', '.join(_f(x, 2) for x in Z2_STEPS[name][1])})"
        bench_rows.append(f"| {name} | {r['exit_code']} | {_f(r.get('steps_to_target_ratio'), 2)} ({', '.join(_f(x, 2) for x in per)}) | {_f(RECORDED_STEPS.get(name), 2)} | "
                          f"{z2} | {was} | {', '.join(_f(x, 2) for x in own) or '-'} | {_f(r.get('grad_norm_ratio'))} |")
    commits = sorted({r.get("commit", "?") for r in done.values()})
    text = f"""# Reliability grid: defaults on every sample and seed

Generated by `bench/grid.py` (do not edit by hand). Every cell is `teleport apply CKPT --data CAL
--holdout HOLD --seed S --json` with no other flag, in a subprocess with `OMP_NUM_THREADS=1`, on
the 2-core x86_64 machine (no GPU) while other jobs shared it ({platform.python_version()},
code at {', '.join(commits)}). Data as in docs/samples.md; the Fashion-MNIST MLP (Zhao et al.,
784-16-10-10, one epoch of SGD, 200 calibration samples, 2,000 held-out test images) is built
per seed by `bench/fmnist_mlp.py`.

**Exits over {total} runs: {', '.join(f'{n} exit {c}' for c, n in sorted(exits.items())) or 'none yet'}.**
Before the guard ran at every tau with its confidence bound (the tree of commit 8f7bc1d, same
cells, `bench/grid.py --before TREE`): {', '.join(f'{n} exit {c}' for c, n in sorted(exits_before.items())) or 'not run'} over {sum(exits_before.values())} runs.

| checkpoint | runs | exits | grad-norm ratio per seed | median | recorded before | max held-out drift | step-backs per seed | rejected by trust / guard / calibration / objective | CPU s min / median / max | the z = 2 bound: exits; ratios; median | before the guard's bound: exits; ratios; median |
| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |
{chr(10).join(rows)}

"Recorded before" is the seed-0 figure docs/samples.md gave at the same defaults before this grid
(for the Fashion-MNIST MLP the median over seeds 0-4 in docs/guard.md). The
held-out gate is 2e-2 relative drift (`--holdout-tolerance`); exit 4 would mean a run failed it.
The last column counts the ratios of runs that exited 4 too (nothing was written for them).
The guard's confidence bound runs at z = 1.5 (`--guard-z`, docs/guard.md); the column "the z = 2
bound" is the same cells with the bound at z = 2, the default before (code of commit ea55748
with `TeleportConfig.guard_z = 2.0`, run just before this grid). "Rejected by" sums over the
seeds the rejected candidates by the rule that rejected them (the JSON's `rejections`): the
guard's bound, the guard's drift gate, the calibration drift, or no gain in the objective.
CPU seconds are those of the `teleport` process (user + system).

## steps_to_target_ratio

`teleport bench CKPT --data digits_train --holdout digits_holdout --optimizer sgd --steps 200
--seeds 3 --variants original,nullspace` (the digits MLP is the one sample shipped with a training
set): steps until training from the teleported point reaches the original run's final loss,
over K (< 1 is faster); the original's own curve touches its final loss at the ratio in the
seventh column.

| checkpoint | exit | nullspace (per seed) | recorded before (docs/benchmarks.md, MLP sgd) | the z = 2 bound (per seed) | before the guard's bound (per seed) | original itself per seed | grad-norm ratio |
| --- | --- | --- | --- | --- | --- | --- | --- |
{chr(10).join(bench_rows)}
"""
    DOC.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="run only cells whose name contains this")
    ap.add_argument("--table-only", action="store_true", help="write docs/grid.md from the cached cells")
    ap.add_argument("--before", default=None, help="a tree (folder holding teleport_cli/) to run the cells on instead, cached in bench/results/grid-before/")
    args = ap.parse_args()
    global CELLS, CODE
    cells_dir = CELLS
    if args.before:
        CODE, CELLS = Path(args.before).resolve(), BEFORE
    CELLS.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        commit = _commit()
        for key, fn in cells().items():
            path = CELLS / f"{key}.json"
            if args.only not in key or path.exists():
                continue
            if key.startswith("fmnist_mlp") and not Path("/usr/share/datasets/fashion-mnist").is_dir() and "FASHION_MNIST_DIR" not in os.environ:
                print(f"{key}: skipped (no Fashion-MNIST; install dataset-fashion-mnist)", flush=True)
                continue
            start = time.time()
            row = fn()
            row["commit"] = commit
            row["wall_seconds"] = time.time() - start
            path.write_text(json.dumps(row, indent=1))
            print(f"{key}: exit {row['exit_code']} ratio {_f(row.get('grad_norm_ratio'))} step-backs {row.get('step_backs')} "
                  f"{row['cpu_seconds']:.0f} CPU s", flush=True)
            if row["exit_code"] not in (0,):
                print("   ", row.get("stderr"), flush=True)
            write_doc(_load(cells_dir), _load(BEFORE))
    write_doc(_load(cells_dir), _load(BEFORE))


if __name__ == "__main__":
    main()
