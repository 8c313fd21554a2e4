"""Which guard rule makes the ascent end at a point that passes the held-out gate?

Runs ``teleport_cli.pipeline.apply`` in-process on the cases that failed the held-out gate
(exit 4) before the guard ran at every tau, once per rule, and counts exit codes, the median
gradient-norm ratio and the held-out drift. The held-out set only verifies the final point.

Cases:
* ``mlp``: Zhao et al.'s Fashion-MNIST MLP 784-16-10-10, 200 calibration samples, seeds 0-4
  (bench/fmnist_mlp.py), defaults (tau 0.99);
* ``test_convnext2``, ``convnext_zepto_rms``: random-init timm models (1 x 32 x 32 inputs), 24
  calibration samples of sample_checkpoints/fmnist_calibration, the shipped held-out set, tau 1;
* ``digits``: the shipped mlp_digits_mid with its calibration and held-out files, seeds 0-2,
  defaults (the sample whose gain the z = 2 bound cut most, docs/grid.md).

Rules (docs/guard.md):
* ``off``: no guard (today at tau 1);
* ``gate``: the guard's drift gate at the calibration tolerance, nothing else (today at tau < 1);
* ``margin``: the gate with a tolerance 5x under the calibration tolerance (1e-3);
* ``large``: the gate with a guard of 40% instead of 20%;
* ``bound``: the gate, and reject every step whose guard confidence bound exceeds the held-out
  tolerance (the default);
* ``step_back``: the gate, then back along the accepted path to the furthest point whose
  guard confidence bound is within the held-out tolerance;
* ``z1.5``, ``z1``: the bound with z = 1.5 or 1 instead of 2 (``--guard-z``);
* ``bound30``: the bound with a guard of 30% (``--guard-fraction 0.3``);
* ``tangent_mean``: the bound, with steps also tangent to the guard's mean loss
  (``--guard-tangent mean``);
* ``tangent_bound``: the bound, with steps also tangent to the guard's mean loss and to the
  variance of its per-sample changes (``--guard-tangent bound``).

Every rule starts from the same guard settings (20%, z = 2, no guard tangent), whatever the
defaults are, and changes only what it names.

From the repository root (one torch thread)::

    .venv/bin/python bench/guard_margin.py [--cases mlp,test_convnext2,convnext_zepto_rms,digits] [--rules ...]

Writes bench/results/guard_margin.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import fmnist_mlp  # noqa: E402

from teleport_cli import pipeline  # noqa: E402
from teleport_cli.config import TeleportConfig  # noqa: E402
from teleport_cli.errors import NoStepAccepted, VerificationFailed  # noqa: E402

S = ROOT / "sample_checkpoints"
RULES = {
    "off": ({"guard_fraction": 0.0}, {"guard_trust": None}),
    "gate": ({}, {"guard_trust": None}),
    "margin": ({}, {"guard_trust": None, "guard_tolerance": 1e-3}),
    "large": ({"guard_fraction": 0.4}, {"guard_trust": None}),
    "bound": ({}, {}),
    "step_back": ({}, {"guard_rule": "step_back"}),
    "z1.5": ({"guard_z": 1.5}, {}),
    "z1": ({"guard_z": 1.0}, {}),
    "bound30": ({"guard_fraction": 0.3}, {}),
    "tangent_mean": ({"guard_tangent": "mean"}, {}),
    "tangent_bound": ({"guard_tangent": "bound"}, {}),
}
BASE = {"guard_fraction": 0.2, "guard_z": 2.0, "guard_tangent": "off"}  # what each rule changes from
ORIGINAL_ASCEND = pipeline.ascend


def timm_case(name: str, folder: Path) -> Path:
    """A random-init timm checkpoint (seed 0) for 1-channel 32 x 32 inputs, with the samples' data config."""
    import timm
    from safetensors import safe_open
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, in_chans=1, num_classes=10)
    with safe_open(str(S / "fmnist_test_convnext_mid.safetensors"), "pt") as f:
        data_config = f.metadata()["data_config"]
    path = folder / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"format": "pt", "arch": name, "model_kwargs": json.dumps({"in_chans": 1, "num_classes": 10}), "data_config": data_config})
    return path


def one(rule: str, ckpt: Path, cal: Path, hold: Path, out: Path, config: TeleportConfig, samples: int | None) -> dict:
    cfg_changes, ascend_changes = RULES[rule]

    def ascend(*args, **kwargs):
        return ORIGINAL_ASCEND(*args, **{**kwargs, **ascend_changes})

    pipeline.ascend = ascend
    t0 = time.process_time()
    try:
        doc, code = pipeline.apply(ckpt, cal, out, config.replace(**{**BASE, **cfg_changes}), holdout=hold, force=True, samples=samples).to_dict(), 0
    except VerificationFailed as e:
        doc, code = e.result.to_dict(), 4
    except NoStepAccepted as e:
        doc, code = e.result.to_dict(), 5
    finally:
        pipeline.ascend = ORIGINAL_ASCEND
    return {"rule": rule, "exit_code": code, "grad_norm_ratio": doc["grad_norm_ratio"], "steps_accepted": doc["steps_accepted"],
            "step_backs": doc.get("step_backs"), "rejections": doc.get("rejections"), "guard_samples": doc["guard_samples"], "holdout_drift": doc["holdout"]["relative_loss_drift"],
            "calibration_drift": doc["calibration"]["relative_loss_drift"], "cpu_seconds": time.process_time() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="mlp,test_convnext2,convnext_zepto_rms,digits")
    ap.add_argument("--rules", default=",".join(RULES))
    ap.add_argument("--seeds", default="0,1,2,3,4", help="seeds of the MLP case (the timm cases use seed 0,1,2)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rules = args.rules.split(",")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for case in args.cases.split(","):
            if case == "mlp":
                runs = [(seed, *fmnist_mlp.write_case(seed, folder), TeleportConfig(seed=seed, device="cpu"), None)
                        for seed in map(int, args.seeds.split(","))]
            elif case == "digits":
                runs = [(seed, S / "mlp_digits_mid.safetensors", S / "digits_calibration.safetensors", S / "digits_holdout.safetensors",
                         TeleportConfig(seed=seed, device="cpu"), None) for seed in (0, 1, 2)]
            else:
                ckpt = timm_case(case, folder)
                runs = [(seed, ckpt, S / "fmnist_calibration", S / "fmnist_holdout", TeleportConfig(seed=seed, tau=1.0, device="cpu"), 24)
                        for seed in (0, 1, 2)]
            for rule in rules:
                mine = []
                for seed, ckpt, cal, hold, config, samples in runs:
                    r = {"case": case, "seed": seed, **one(rule, ckpt, cal, hold, folder / "out.safetensors", config, samples)}
                    rows.append(r)
                    mine.append(r)
                ratios = [r["grad_norm_ratio"] for r in mine]
                drifts = " ".join(f"{r['holdout_drift']:.3f}" for r in mine)
                print(f"{case:20s} {rule:10s} exits {[r['exit_code'] for r in mine]} median ratio {statistics.median(ratios):.3g} "
                      f"held-out drift {drifts} step-backs {[r['step_backs'] for r in mine]} "
                      f"{sum(r['cpu_seconds'] for r in mine):.0f} CPU s", flush=True)
    out = ROOT / "bench" / "results" / "guard_margin.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
