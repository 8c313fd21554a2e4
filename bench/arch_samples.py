"""`teleport apply` with default settings and no model flags on every shipped sample checkpoint.

Runs the CLI exactly as a user would (``python -m teleport_cli apply CKPT --data CAL --holdout
HOLD -o OUT --json``) and prints one row per checkpoint: verdict, gradient-norm ratio, steps,
calibration and held-out loss drift and accuracy. Writes bench/results/arch_samples.json.
Takes several minutes on CPU; not part of the test suite. From the repository root::

    .venv/bin/python bench/arch_samples.py [--seeds 0,1,2] [--extra ARG ...] [NAME ...]

``--seeds`` runs each checkpoint once per ``--seed`` (the seed of the guard split and of any random
choice); ``--extra`` passes one more argument to ``teleport apply`` (repeatable, e.g.
``--extra=--steps --extra=5``). The summary line per checkpoint gives the exit codes over the
seeds and the median gradient-norm ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
S = ROOT / "sample_checkpoints"
IMAGES = (S / "fmnist_calibration", S / "fmnist_holdout")
TEXT = (S / "shakespeare_calibration.safetensors", S / "shakespeare_holdout.safetensors")
SAMPLES = {
    **{f"fmnist_{a}_{s}": IMAGES for a in ("test_resnet", "test_convnext", "test_vit") for s in ("mid", "converged")},
    "char_lm_mid": TEXT,
    "char_lm_converged": TEXT,
}


def run(name: str, cal: Path, hold: Path, out_dir: Path, seed: int = 0, extra: tuple[str, ...] = ()) -> dict:
    out = out_dir / f"{name}.{seed}.teleported.safetensors"
    cmd = [sys.executable, "-m", "teleport_cli", "apply", str(S / f"{name}.safetensors"), "--data", str(cal),
           "--holdout", str(hold), "-o", str(out), "--json", "-q", "--device", "cpu", "--seed", str(seed), *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    doc = json.loads(p.stdout) if p.stdout.strip() else {}
    row = {"checkpoint": name, "seed": seed, "exit_code": p.returncode, "stderr": p.stderr.strip()[-300:]}
    if doc:
        row.update({
            "verified": doc["verified"], "grad_norm_before": doc["grad_norm_before"], "grad_norm_after": doc["grad_norm_after"],
            "grad_norm_ratio": doc["grad_norm_ratio"], "steps_accepted": doc["steps_accepted"], "steps_rejected": doc["steps_rejected"],
            "stop_reason": doc["stop_reason"], "seconds": doc["seconds"], "step_backs": doc.get("step_backs"), "rejections": doc.get("rejections"),
            "layers_teleported": sum(l["teleported"] for l in doc["layers"]), "layers": len(doc["layers"]),
        })
        for key in ("calibration", "holdout"):
            c = doc[key]
            row[key] = {k: c[k] for k in ("samples", "loss_before", "loss_after", "relative_loss_drift", "accuracy_before", "accuracy_after", "max_abs_logit_diff", "passed")}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help="checkpoints to run (default: all shipped samples)")
    ap.add_argument("--seeds", default="0", help="comma-separated --seed values (default 0)")
    ap.add_argument("--extra", action="append", default=[], help="one more argument for teleport apply (repeatable)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "arch_samples.json"), help="JSON file to write")
    args = ap.parse_args()
    names = args.names or list(SAMPLES)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            mine = []
            for seed in seeds:
                row = run(name, *SAMPLES[name], Path(tmp), seed, tuple(args.extra))
                rows.append(row)
                mine.append(row)
                c, h = row.get("calibration", {}), row.get("holdout", {})
                print(f"{name:32s} seed {seed} exit {row['exit_code']} ratio {row.get('grad_norm_ratio', float('nan')):.3g} "
                      f"steps {row.get('steps_accepted')}/{row.get('steps_rejected')} ({row.get('stop_reason')}) "
                      f"cal drift {c.get('relative_loss_drift', float('nan')):.2e} held-out drift {h.get('relative_loss_drift', float('nan')):.2e} "
                      f"acc {h.get('accuracy_before', float('nan')):.3f}->{h.get('accuracy_after', float('nan')):.3f} "
                      f"layers {row.get('layers_teleported')}/{row.get('layers')} {row.get('seconds', 0):.0f} s", flush=True)
                if row["exit_code"] not in (0, 4, 5):
                    print("   ", row["stderr"], flush=True)
            ratios = [r["grad_norm_ratio"] for r in mine if "grad_norm_ratio" in r]
            print(f"{name:32s} exits {[r['exit_code'] for r in mine]} median ratio "
                  f"{statistics.median(ratios) if ratios else float('nan'):.3g} range {min(ratios, default=float('nan')):.3g}-{max(ratios, default=float('nan')):.3g}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
