"""CPU seconds per phase of one ``teleport apply``, from cProfile with a process-time clock.

Runs the command line in this process (``teleport_cli.cli.main``) under ``cProfile`` timed by
``time.process_time`` and prints one JSON line: the total and the cumulative CPU seconds of the
pipeline's phases (capture, bases, Lanczos, ascent and its parts, verify, ...), plus the step
counts from the command's own JSON. Profiling inflates Python-heavy code (imports most), so
compare phases between two trees, not with unprofiled totals. Not part of the test suite. From the
repository root, with one thread::

    OMP_NUM_THREADS=1 PYTHONPATH=. python bench/profile_apply.py OUT.prof -- \\
        apply sample_checkpoints/fmnist_test_resnet_mid.safetensors --data sample_checkpoints/fmnist_calibration \\
        --holdout sample_checkpoints/fmnist_holdout -o /tmp/out.safetensors --json -q --device cpu --force
"""

from __future__ import annotations

import contextlib
import cProfile
import io
import json
import pstats
import sys
import time

PHASES = {  # function name -> phase (functions of teleport_cli outside the CLI)
    "choose_batch_size": "batch probe", "noise_floor": "noise floor", "capture_grams": "capture",
    "layer_basis": "bases", "top_eigenvalue": "lanczos", "ascend": "ascent", "backtrack": "ascent: line search",
    "direction": "ascent: direction", "score": "ascent: score", "check": "ascent: guard", "whole_set": "guard report",
    "full_gradient": "full_gradient calls", "compare": "verify",
}
WHERE = {"direction": ("lookahead", "objectives"), "score": ("lookahead", "objectives"), "check": ("guard",), "compare": ("verify",)}


def phases(stats: pstats.Stats) -> dict[str, float]:
    out: dict[str, float] = {}
    for (path, _, fn), (_, _, _, cum, _) in stats.stats.items():
        if fn not in PHASES or "teleport_cli" not in path or "/cli/" in path:
            continue
        if fn in WHERE and not any(w in path for w in WHERE[fn]):
            continue
        out[PHASES[fn]] = round(out.get(PHASES[fn], 0.0) + cum, 3)
    return dict(sorted(out.items()))


def main() -> None:
    out, args = sys.argv[1], sys.argv[sys.argv.index("--") + 1:]
    from teleport_cli.cli import main as cli_main

    sys.argv = ["teleport", *args]
    prof = cProfile.Profile(time.process_time)
    start = time.process_time()
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        prof.enable()
        try:
            cli_main()
        except SystemExit:
            pass
        prof.disable()
    total = time.process_time() - start
    prof.dump_stats(out)
    doc = json.loads(stdout.getvalue()) if stdout.getvalue().strip().startswith("{") else {}
    print(json.dumps({"cpu_seconds": round(total, 2), "phases": phases(pstats.Stats(out)),
                      **{k: doc.get(k) for k in ("steps_accepted", "steps_rejected", "grad_norm_ratio")}}))


if __name__ == "__main__":
    main()
