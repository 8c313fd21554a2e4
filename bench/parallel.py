"""Data-parallel apply (docs/scale.md): one process against torchrun with 2 gloo ranks on the CPU.

1. CPU seconds of the whole process tree (launcher and ranks; ``RUSAGE_CHILDREN``) and wall
   seconds of ``teleport apply`` on the MLP sample, one process against
   ``torchrun --nproc_per_node 2``, each run ``--repeats`` times (min/median/max), with the step
   counts and gradient norms of each JSON.
2. What the ranks exchange: every collective of a 2-rank run counted (calls and bytes sent per
   rank), per ascent attempt, against the number of trainable parameters.
3. With ``--eigh``: CPU seconds of ``torch.linalg.eigh`` of a float64 Gram (one thread) at
   d_in 512, 1024, 2048 (min/median/max of 3) and 4096 (once), for docs/scale.md.

Run: PYTHONPATH=. python bench/parallel.py [--steps 5] [--repeats 3] [--eigh] [--out bench_parallel.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
S = ROOT / "sample_checkpoints"
MLP, CAL = S / "mlp_digits_mid.safetensors", S / "digits_calibration.safetensors"
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _spread(xs):
    return {"min": round(min(xs), 3), "median": round(statistics.median(xs), 3), "max": round(max(xs), 3)}


def _timed(argv):
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run(argv, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        raise SystemExit(p.stderr[-2000:])
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cpu, wall, json.loads(p.stdout)


def timing(steps, repeats):
    sys.path.insert(0, str(ROOT / "tests"))
    from _ranks import free_port

    out = {}
    with tempfile.TemporaryDirectory() as d:
        args = ["apply", str(MLP), "--data", str(CAL), "--json", "-q", "--force", "-o", f"{d}/o.safetensors"] + (["--steps", str(steps)] if steps else [])
        for name, launch in [("one process", lambda: [sys.executable, "-m", "teleport_cli"]),
                             ("torchrun 2 gloo ranks", lambda: [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                                                "--master_port", str(free_port()), "-m", "teleport_cli"])]:
            runs = [_timed([*launch(), *args]) for _ in range(repeats)]
            doc = runs[-1][2]
            out[name] = {"cpu_seconds": _spread([r[0] for r in runs]), "wall_seconds": _spread([r[1] for r in runs]),
                         **{k: doc[k] for k in ("steps_accepted", "steps_rejected", "grad_norm_before", "grad_norm_after", "objective_after",
                                                "ascent_seconds", "exit_code")},
                         "calibration_loss_after": doc["calibration"]["loss_after"], "holdout_loss_after": doc["holdout"]["loss_after"]}
    return out


def _counted(rank, steps):
    import torch.distributed as dist

    import teleport_cli.pipeline as pipeline
    from teleport_cli.config import TeleportConfig

    counts = {}

    def wrap(name):
        real = getattr(dist, name)

        def counted(tensor, *a, **k):
            size = sum(t.numel() * t.element_size() for t in (tensor if isinstance(tensor, list) else [tensor]))
            c = counts.setdefault(name, [0, 0])
            c[0] += 1
            c[1] += size
            return real(tensor, *a, **k)

        setattr(dist, name, counted)

    for name in ("all_reduce", "broadcast", "all_gather"):
        wrap(name)
    with tempfile.TemporaryDirectory() as d:
        result = pipeline.apply(str(MLP), str(CAL), f"{d}/o.safetensors", TeleportConfig(**({"steps": steps} if steps else {})), force=True)
    params = sum(p.numel() for p in result.outcome.model.parameters() if p.requires_grad)
    s = result.outcome.stats
    return {"collectives": counts, "parameters": params, "attempts": s.steps_accepted + s.steps_rejected}


def volume(steps):
    sys.path.insert(0, str(ROOT / "tests"))
    from _ranks import run

    r = run(_counted, 2, steps)[0]
    total = sum(c[1] for c in r["collectives"].values())
    return {**r, "bytes_per_attempt": round(total / max(r["attempts"], 1)),
            "parameter_bytes_float32": 4 * r["parameters"]}


def eigh_seconds():
    import torch

    torch.set_num_threads(1)
    out = {}
    for n, repeats in ((512, 3), (1024, 3), (2048, 3), (4096, 1)):
        ts = []
        for _ in range(repeats):
            x = torch.randn(n, n, dtype=torch.float64)
            a = x @ x.T
            t = time.process_time()
            torch.linalg.eigh(a)
            ts.append(time.process_time() - t)
        out[n] = _spread(ts)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=0, help="--steps of apply (0: the default)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--eigh", action="store_true", help="also time eigh at d_in 512 .. 4096")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    doc = {"machine": "2-core x86_64, shared, no GPU; OMP_NUM_THREADS=1", "steps": a.steps or "default",
           "timing": timing(a.steps, a.repeats), "volume": volume(a.steps),
           **({"eigh_cpu_seconds": eigh_seconds()} if a.eigh else {})}
    text = json.dumps(doc, indent=2)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
