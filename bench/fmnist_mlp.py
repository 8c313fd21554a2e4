"""Zhao et al.'s Fashion-MNIST MLP (784-16-10-10) with 200 calibration samples: build, train, teleport.

Zhao, Ganev, Walters, Yu, Dehmamy, "Symmetry Teleportation for Accelerated Optimization"
(NeurIPS 2022) teleport a small MLP on Fashion-MNIST; this is the same network as the built-in
``mlp`` architecture with ``{"in_features": 784, "hidden": [16, 10], "num_classes": 10}``.

Per seed ``s`` the helper trains the MLP from a seeded init for ``EPOCHS`` epoch(s) of SGD on the
60,000 training images (pixels / 255, flattened), draws 200 calibration samples from the
training images (seeded) and takes 2,000 test images as held-out set, writes them as a
checkpoint and two tensor files, and runs ``teleport apply`` at defaults with ``--seed s``
(exactly as a user would, in a subprocess). Data: the Debian package ``dataset-fashion-mnist``
(gzip IDX files in /usr/share/datasets/fashion-mnist). From the repository root::

    .venv/bin/python bench/fmnist_mlp.py [--seeds 0,1,2,3,4] [--extra ARG ...]

Prints one row per seed and writes bench/results/fmnist_mlp.json. About a minute per seed on one
CPU thread (2-core machine).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from teleport_cli.models.builtin import MLP  # noqa: E402

DATA = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
KWARGS = {"in_features": 784, "hidden": [16, 10], "num_classes": 10}
CALIBRATION, HOLDOUT = 200, 2000
EPOCHS, LR, BATCH = 1, 0.1, 64


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip) as a numpy array (LeCun's format: magic, dims, big-endian sizes, bytes)."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_split(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs N x 784 float32 in [0, 1], targets N int64) of ``train`` or ``t10k``."""
    x = read_idx(DATA / f"{kind}-images-idx3-ubyte.gz").reshape(-1, 784).astype(np.float32) / 255.0
    y = read_idx(DATA / f"{kind}-labels-idx1-ubyte.gz").astype(np.int64)
    return torch.from_numpy(x.copy()), torch.from_numpy(y.copy())


def train_mlp(seed: int, x: torch.Tensor, y: torch.Tensor) -> MLP:
    """The MLP after ``EPOCHS`` epoch(s) of plain SGD (lr ``LR``, batch ``BATCH``), seeded init and order."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = MLP(**KWARGS)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for _ in range(EPOCHS):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), BATCH):
            idx = perm[i:i + BATCH]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def write_case(seed: int, folder: Path) -> tuple[Path, Path, Path]:
    """Checkpoint, calibration and held-out files for one seed, in ``folder``."""
    xtr, ytr = load_split("train")
    xte, yte = load_split("t10k")
    model = train_mlp(seed, xtr, ytr)
    g = torch.Generator().manual_seed(10_000 + seed)
    cal = torch.randperm(len(ytr), generator=g)[:CALIBRATION]
    hold = torch.randperm(len(yte), generator=g)[:HOLDOUT]
    ckpt, calf, holdf = folder / f"mlp_{seed}.safetensors", folder / f"cal_{seed}.safetensors", folder / f"hold_{seed}.safetensors"
    meta = {"format": "pt", "arch": "mlp", "model_kwargs": json.dumps(KWARGS),
            "training": json.dumps({"epochs": EPOCHS, "optimizer": "sgd", "lr": LR, "batch_size": BATCH, "seed": seed})}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt), metadata=meta)
    save_file({"inputs": xtr[cal].contiguous(), "targets": ytr[cal].contiguous()}, str(calf))
    save_file({"inputs": xte[hold].contiguous(), "targets": yte[hold].contiguous()}, str(holdf))
    return ckpt, calf, holdf


def run(seed: int, folder: Path, extra: tuple[str, ...] = ()) -> dict:
    ckpt, calf, holdf = write_case(seed, folder)
    out = folder / f"mlp_{seed}.teleported.safetensors"
    cmd = [sys.executable, "-m", "teleport_cli", "apply", str(ckpt), "--data", str(calf), "--holdout", str(holdf),
           "-o", str(out), "--json", "-q", "--device", "cpu", "--seed", str(seed), *extra]
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    doc = json.loads(p.stdout) if p.stdout.strip() else {}
    row = {"seed": seed, "exit_code": p.returncode, "stderr": p.stderr.strip()[-300:]}
    for k in ("verified", "grad_norm_ratio", "steps_accepted", "steps_rejected", "stop_reason", "seconds", "step_backs", "rejections", "guard_samples"):
        row[k] = doc.get(k)
    for k in ("calibration", "holdout"):
        if k in doc:
            row[k + "_drift"] = doc[k]["relative_loss_drift"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--extra", action="append", default=[], help="one more argument for teleport apply (repeatable)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "fmnist_mlp.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in (int(s) for s in args.seeds.split(",")):
            r = run(seed, Path(tmp), tuple(args.extra))
            rows.append(r)
            print(f"seed {seed} exit {r['exit_code']} ratio {r['grad_norm_ratio'] or float('nan'):.3g} "
                  f"steps {r['steps_accepted']}/{r['steps_rejected']} ({r['stop_reason']}) step-backs {r['step_backs']} "
                  f"cal drift {r.get('calibration_drift', float('nan')):.2e} held-out drift {r.get('holdout_drift', float('nan')):.2e} "
                  f"{r['seconds'] or 0:.0f} s", flush=True)
            if r["exit_code"] not in (0, 4, 5):
                print("   ", r["stderr"], flush=True)
    ratios = [r["grad_norm_ratio"] for r in rows if r["grad_norm_ratio"] is not None]
    print(f"exits {[r['exit_code'] for r in rows]} median ratio {statistics.median(ratios) if ratios else float('nan'):.3g}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
