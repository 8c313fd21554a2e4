"""Cost and effect of the Hessian-vector-product modes (docs/hvp.md).

1. CPU seconds (time.process_time, one torch thread) of one gradient, one forward-difference HVP
   (one gradient pass at w + eps v) and one exact double-backward HVP over the calibration set,
   on the MLP, test_resnet and test_vit samples (median of 3, with min-max).
2. `apply` at defaults with --hvp auto against --hvp exact: CPU seconds, gradient-norm gain and
   the auto choice; on test_resnet over seeds 0, 1, 2 (the gain against the seed spread).

Run: PYTHONPATH=. python bench/hvp.py [--out bench_hvp.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from teleport_cli.checkpoints.containers import read_checkpoint
from teleport_cli.config import TeleportConfig
from teleport_cli.data.inputs import load_data_inputs
from teleport_cli.models.loading import load_model
from teleport_cli.nullspace.derivatives import full_gradient, hessian_vector_product
from teleport_cli.nullspace.hvp import HessianVectorProduct
from teleport_cli.nullspace.losses import LOSS_FUNCTIONS
from teleport_cli.pipeline import apply

S = Path(__file__).resolve().parents[1] / "sample_checkpoints"
SAMPLES = {
    "mlp": (S / "mlp_digits_mid.safetensors", S / "digits_calibration.safetensors", S / "digits_holdout.safetensors"),
    "test_resnet": (S / "fmnist_test_resnet_mid.safetensors", S / "fmnist_calibration", S / "fmnist_holdout"),
    "test_vit": (S / "fmnist_test_vit_mid.safetensors", S / "fmnist_calibration", S / "fmnist_holdout"),
}


def cpu(fn, repeats=3):
    out = []
    for _ in range(repeats):
        t = time.process_time()
        fn()
        out.append(time.process_time() - t)
    return {"median": statistics.median(out), "min": min(out), "max": max(out)}


def pass_costs(name):
    ckpt, data, hold = SAMPLES[name]
    model = load_model(str(ckpt))[0].eval()
    meta = read_checkpoint(str(ckpt)).metadata
    cal = load_data_inputs(meta, str(ckpt), str(data), str(hold), model).calibration.data
    batches, loss = cal.batches(256, "cpu"), LOSS_FUNCTIONS["ce"]
    params = [p for p in model.parameters() if p.requires_grad]
    n = len(cal)
    g = full_gradient(model, batches, loss, params, n).grads
    fd = HessianVectorProduct("forward")
    return {
        "samples": n,
        "gradient": cpu(lambda: full_gradient(model, batches, loss, params, n)),
        "hvp_forward": cpu(lambda: fd(model, batches, loss, params, g, params, n, grads=g)),
        "hvp_exact": cpu(lambda: hessian_vector_product(model, batches, loss, params, g, params, n)),
    }


def run_apply(name, mode, seed):
    ckpt, data, hold = SAMPLES[name]
    with tempfile.TemporaryDirectory() as tmp:
        t = time.process_time()
        r = apply(ckpt, data, Path(tmp) / "out.safetensors", TeleportConfig(hvp=mode, seed=seed), holdout=hold)
        sec = time.process_time() - t
    st = r.outcome.stats
    return {"sample": name, "hvp": mode, "seed": seed, "cpu_seconds": sec, "grad_norm_ratio": st.grad_norm_ratio,
            "steps_accepted": st.steps_accepted, "verified": r.outcome.verified, "choice": st.hvp}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench_hvp.json")
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    doc = {"threads": 1, "passes": {}, "apply": []}
    for name in SAMPLES:
        doc["passes"][name] = pass_costs(name)
        print(name, json.dumps(doc["passes"][name]), flush=True)
    for name in ("test_resnet", "test_vit", "mlp"):
        for seed in range(args.seeds if name == "test_resnet" else 1):
            for mode in ("exact", "auto"):
                doc["apply"].append(run_apply(name, mode, seed))
                row = dict(doc["apply"][-1])
                row["choice"] = {k: row["choice"].get(k) for k in ("mode", "disagreement")} if row["choice"] else None
                print(json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
