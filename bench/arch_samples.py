"""`teleport apply` with default settings and no model flags on every shipped sample checkpoint.

Runs the CLI exactly as a user would (``python -m teleport_cli apply CKPT --data CAL --holdout
HOLD -o OUT --json``) and prints one row per checkpoint: verdict, gradient-norm ratio, steps,
calibration and held-out loss drift and accuracy. Writes bench/results/arch_samples.json.
Takes several minutes on CPU; not part of the test suite. From the repository root::

    .venv/bin/python bench/arch_samples.py [NAME ...]
"""

from __future__ import annotations

import json
import os
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


def run(name: str, cal: Path, hold: Path, out_dir: Path) -> dict:
    out = out_dir / f"{name}.teleported.safetensors"
    cmd = [sys.executable, "-m", "teleport_cli", "apply", str(S / f"{name}.safetensors"), "--data", str(cal),
           "--holdout", str(hold), "-o", str(out), "--json", "-q", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    doc = json.loads(p.stdout) if p.stdout.strip() else {}
    row = {"checkpoint": name, "exit_code": p.returncode, "stderr": p.stderr.strip()[-300:]}
    if doc:
        row.update({
            "verified": doc["verified"], "grad_norm_before": doc["grad_norm_before"], "grad_norm_after": doc["grad_norm_after"],
            "grad_norm_ratio": doc["grad_norm_ratio"], "steps_accepted": doc["steps_accepted"], "steps_rejected": doc["steps_rejected"],
            "stop_reason": doc["stop_reason"], "seconds": doc["seconds"],
            "layers_teleported": sum(l["teleported"] for l in doc["layers"]), "layers": len(doc["layers"]),
        })
        for key in ("calibration", "holdout"):
            c = doc[key]
            row[key] = {k: c[k] for k in ("samples", "loss_before", "loss_after", "relative_loss_drift", "accuracy_before", "accuracy_after", "max_abs_logit_diff", "passed")}
    return row


def main() -> None:
    names = sys.argv[1:] or list(SAMPLES)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            row = run(name, *SAMPLES[name], Path(tmp))
            rows.append(row)
            c, h = row.get("calibration", {}), row.get("holdout", {})
            print(f"{name:32s} exit {row['exit_code']} ratio {row.get('grad_norm_ratio', float('nan')):.3g} "
                  f"steps {row.get('steps_accepted')}/{row.get('steps_rejected')} ({row.get('stop_reason')}) "
                  f"cal drift {c.get('relative_loss_drift', float('nan')):.2e} held-out drift {h.get('relative_loss_drift', float('nan')):.2e} "
                  f"acc {h.get('accuracy_before', float('nan')):.3f}->{h.get('accuracy_after', float('nan')):.3f} "
                  f"layers {row.get('layers_teleported')}/{row.get('layers')} {row.get('seconds', 0):.0f} s", flush=True)
            if row["exit_code"] not in (0, 4, 5):
                print("   ", row["stderr"], flush=True)
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "arch_samples.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
