"""What a teleport costs against its floor, per phase, in one process (docs/cost.md, issue 11 item 7).

For each model, in this one process with one torch thread:

1. **The floor's pieces**, each one pass over the calibration set at batch 256 by a plain float32
   ``torch.autograd.grad`` loop written here (not the tool's code): a forward pass, a gradient,
   a Hessian-vector product by a forward difference of gradients (one gradient at ``w + eps v``,
   ``v = g``) and by double backward. CPU seconds (``time.process_time``), median of
   ``--repeats`` with min and max.
2. **``apply`` at defaults** (``teleport_cli.pipeline.apply``, files in and a verified file out,
   without process start-up), split into its phases by the pipeline's ``on_event`` callback
   (``batch-size``, ``capture``, ``bases``, ``lookahead-lr``, ``ascent``, and ``verify`` with the
   write), in CPU and wall seconds, with the peak RSS (``VmHWM`` reset before the call).
3. **The ratio** of ``apply``'s CPU seconds to the floor: ``forward + accepted * passes * gradient``
   with ``passes`` 2 for grad-norm (the gradient and one finite-difference HVP) and ``2k + 1`` for the
   look-ahead with k virtual steps (issue 11, Targets).
4. With ``--growth``: ``apply`` and the floor at N = 64, 128, 256 on ``--growth-model``, and at
   d_in = 256, 512, 1024 on random-init 784-d-d-10 MLPs (Fashion-MNIST), with the log-log slopes.

Models: the shipped samples (``mlp_digits_mid``, ``fmnist_test_resnet_mid``, ``fmnist_test_vit_mid``,
``char_lm_mid``, docs/samples.md) and timm ``resnet18``, ``resnet50``, ``vit_small_patch16_224``,
``vit_base_patch16_224``, ``convnext_tiny`` at 64x64 (random init, 256 Fashion-MNIST images replicated
to 3 channels, bench/scale_cases.py); those run with ``--scale-flags`` (default
``--max-memory 4GB --max-seconds 540``).

    PYTHONPATH=. OMP_NUM_THREADS=1 python bench/cost.py                      # samples, write docs/cost.md
    PYTHONPATH=. OMP_NUM_THREADS=1 python bench/cost.py --models resnet18 --apply-repeats 1
    PYTHONPATH=. OMP_NUM_THREADS=1 python bench/cost.py --quick --no-write   # smoke run (seconds)

Results are merged by model into ``--results`` (bench/cost_results.json): a model not given in
``--models`` keeps its recorded row (e.g. ``resnet50``'s, too slow to rerun with the samples), and
with ``--before`` a rerun model's recorded row is kept as its "before", shown before -> after. The
section of docs/cost.md between the markers is rendered from all of them; the rest of the page is kept.
The arithmetic and the tables are in bench/cost_tables.py.
It never runs in CI (tests/bench/test_cost.py checks the arithmetic and the rendering).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cost_tables import (  # noqa: E402  (the arithmetic and tables, re-exported for tests/bench/test_cost.py)
    BEGIN, END, PHASES, clean_command, floor_seconds, hvp_floor_seconds, passes_per_step, phase_split, ratios, render, render_growth, slope,
    write_section,
)

ROOT = Path(__file__).resolve().parents[1]
S = ROOT / "sample_checkpoints"
SAMPLES = {
    "mlp_digits_mid": (S / "mlp_digits_mid.safetensors", S / "digits_calibration.safetensors", S / "digits_holdout.safetensors"),
    "fmnist_test_resnet_mid": (S / "fmnist_test_resnet_mid.safetensors", S / "fmnist_calibration", S / "fmnist_holdout"),
    "fmnist_test_vit_mid": (S / "fmnist_test_vit_mid.safetensors", S / "fmnist_calibration", S / "fmnist_holdout"),
    "char_lm_mid": (S / "char_lm_mid.safetensors", S / "shakespeare_calibration.safetensors", S / "shakespeare_holdout.safetensors"),
}
SCALE = ("resnet18", "resnet50", "vit_small_patch16_224", "vit_base_patch16_224", "convnext_tiny")
BATCH = 256


# ---- the floor: plain autograd loops, not the tool's code -------------------------------------

def _loss(logits, y, n):
    import torch.nn.functional as F

    per = y.shape[1] if y.ndim == 2 else 1  # a language model: the mean over tokens per sequence
    return F.cross_entropy(logits.flatten(0, -2).float(), y.flatten(), reduction="sum") / (per * n)


def _batches(x, y):
    return [(x[i:i + BATCH], y[i:i + BATCH]) for i in range(0, len(x), BATCH)]


def forward_pass(model, x, y):
    import torch

    with torch.no_grad():
        return sum(float(_loss(model(a), b, len(x))) for a, b in _batches(x, y))


def gradient_pass(model, x, y, params):
    import torch

    out = [torch.zeros_like(p) for p in params]
    for a, b in _batches(x, y):
        for acc, g in zip(out, torch.autograd.grad(_loss(model(a), b, len(x)), params, allow_unused=True)):
            if g is not None:
                acc += g
    return out


def fd_hvp_pass(model, x, y, params, v, g):
    """``(g(w + eps v) - g(w)) / eps``: one gradient pass at the perturbed point (``g`` given)."""
    import torch

    eps = 3.4e-4 * (1 + math.sqrt(sum(float((p.detach().double() ** 2).sum()) for p in params))) / max(
        math.sqrt(sum(float((t.double() ** 2).sum()) for t in v)), 1e-30)
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, t in zip(params, v):
            p.add_(t, alpha=eps)
    plus = gradient_pass(model, x, y, params)
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
    return [(a - b) / eps for a, b in zip(plus, g)]


def exact_hvp_pass(model, x, y, params, v):
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = [torch.zeros_like(p) for p in params]
    with sdpa_kernel([SDPBackend.MATH]):
        for a, b in _batches(x, y):
            gs = torch.autograd.grad(_loss(model(a), b, len(x)), params, create_graph=True, allow_unused=True)
            dot = sum((g * t).sum() for g, t in zip(gs, v) if g is not None)
            for acc, h in zip(out, torch.autograd.grad(dot, params, allow_unused=True)):
                if h is not None:
                    acc += h.detach()
    return out


def spread(values) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": len(values)}


def timed(fn, repeats: int) -> dict:
    out = []
    for _ in range(repeats):
        t = time.process_time()
        fn()
        out.append(time.process_time() - t)
    return spread(out)


def floor_pieces(model, x, y, repeats: int) -> dict:
    """CPU seconds of one forward, gradient, finite-difference HVP and double-backward HVP pass."""
    params = [p for p in model.parameters() if p.requires_grad]
    g = gradient_pass(model, x, y, params)
    pieces = {"forward": timed(lambda: forward_pass(model, x, y), repeats),
              "gradient": timed(lambda: gradient_pass(model, x, y, params), repeats),
              "hvp_fd": timed(lambda: fd_hvp_pass(model, x, y, params, g, g), repeats)}
    try:
        pieces["hvp_exact"] = timed(lambda: exact_hvp_pass(model, x, y, params, g), repeats)
    except RuntimeError as e:  # no double backward (hardswish): the finite difference is the only way
        pieces["hvp_exact"] = {"error": str(e).splitlines()[0][:80]}
    return pieces



# ---- apply ----------------------------------------------------------------------------------

def _peak_reset():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))


def cpu_now() -> float:
    """CPU seconds of this process plus its waited-for children (the memory probe of
    ``--batch-size auto`` runs in a forked child)."""
    import resource

    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + c.ru_utime + c.ru_stime


def _event(events: list, stage: str, info: dict) -> None:
    if not events or events[-1][0] != stage or "stop_reason" in info or "batch_size" in info or "accepted" in info:  # progress on stderr
        print(f"[cost] {stage} {json.dumps(info)} cpu {cpu_now():.1f} s", file=sys.stderr, flush=True)
    events.append((stage, cpu_now(), time.perf_counter()))


def run_apply(ckpt, data, hold, config, cpu_clock: bool = False) -> dict:
    """One ``apply`` in this process. With ``cpu_clock`` the ``--max-seconds`` clock counts this
    process's CPU seconds (on a shared machine: the budget a dedicated core would give)."""
    import teleport_cli.nullspace.ascent as ascent
    from teleport_cli.errors import TeleportError
    from teleport_cli.pipeline import apply

    events: list[tuple[str, float, float]] = []
    wall_clock = ascent.clock
    with tempfile.TemporaryDirectory() as tmp:
        _peak_reset()
        c0, w0 = cpu_now(), time.perf_counter()
        if cpu_clock:  # apply starts its budget at perf_counter() ~ w0: from there on, count CPU seconds
            ascent.clock = lambda: w0 + (cpu_now() - c0)
        code = 0
        try:
            r = apply(ckpt, data, Path(tmp) / "out.safetensors", config, holdout=hold, loss_from_checkpoint=True,
                      on_event=lambda stage, done, total, info: _event(events, stage, info))
        except TeleportError as e:
            r, code = getattr(e, "result", None), getattr(e, "exit_code", 1)
        finally:
            ascent.clock = wall_clock
        c1, w1 = cpu_now(), time.perf_counter()
    row = {"exit": code, "cpu_clock": cpu_clock, "cpu": c1 - c0, "wall": w1 - w0, "peak_rss": _peak_rss(),
           "phases": phase_split([("load", c0, w0)] + events, (c1, w1))}
    if r is not None:
        st = r.outcome.stats
        row.update(verified=bool(r.outcome.verified and code == 0), accepted=st.steps_accepted, rejected=st.steps_rejected,
                   objective=st.objective, stop=st.stop_reason, grad_norm_ratio=st.grad_norm_ratio, batch_size=r.batch_size,
                   hvp=(st.hvp or {}).get("mode"))
    return row


def case_files(name: str, folder: Path, n: int = 256) -> tuple[Path, Path, Path]:
    """(checkpoint, data, holdout) of a sample, or of a scale model written into ``folder``."""
    if name in SAMPLES:
        return SAMPLES[name]
    from bench.scale_cases import write_case

    return write_case(name, folder, n)


def load_case(ckpt, data, hold):
    """(model, calibration inputs, targets) as ``apply`` reads them (loading is not timed)."""
    from teleport_cli.checkpoints.containers import read_checkpoint
    from teleport_cli.data.inputs import load_data_inputs
    from teleport_cli.models.loading import load_model

    model = load_model(str(ckpt))[0].eval()
    cal = load_data_inputs(read_checkpoint(str(ckpt)).metadata, str(ckpt), str(data), str(hold), model).calibration.data
    return model, cal.inputs, cal.targets


def measure(name: str, args, folder: Path) -> dict:
    from teleport_cli.config import TeleportConfig

    ckpt, data, hold = case_files(name, folder)
    flags = {} if name in SAMPLES else parse_flags(args.scale_flags)
    config = TeleportConfig(**{"device": "cpu", "batch_size": "auto", **flags})  # the CLI's defaults
    # apply first: the floor's batch-256 passes would leave their heap in the peak RSS
    runs = [run_apply(ckpt, data, hold, config, args.cpu_clock and bool(flags)) for _ in range(1 if args.quick else args.apply_repeats)]
    model, x, y = load_case(ckpt, data, hold)  # after apply: its memory probe counts what this process holds
    params = sum(p.numel() for p in model.parameters())
    pieces = floor_pieces(model, x, y, args.repeats)
    flag_text = args.scale_flags + (" (budget in CPU seconds)" if args.cpu_clock else "") if flags else ""
    return {"model": name, "samples": len(x), "params": params, "pieces": pieces, "runs": runs, "flags": flag_text,
            "lookahead_steps": config.lookahead_steps, "floor_batch": BATCH}


def parse_flags(text: str) -> dict:
    """``--max-memory 4GB --max-seconds 540`` -> TeleportConfig keyword arguments."""
    from teleport_cli.config import parse_bytes

    words, out = text.split(), {}
    for key, value in zip(words[::2], words[1::2]):
        name = key.lstrip("-").replace("-", "_")
        out[name] = parse_bytes(value) if name == "max_memory" else float(value) if name == "max_seconds" else \
            int(value) if name == "batch_size" and value.isdigit() else value
    return out


def growth(args, folder: Path) -> dict:
    """``apply`` and the floor against N (subsets of ``--growth-model``'s set) and d_in (random MLPs)."""
    import torch
    from safetensors.torch import save_file

    from bench.scale_cases import fmnist_images
    from teleport_cli.config import TeleportConfig
    from teleport_cli.models.builtin import MLP

    out = {"n": [], "d_in": []}
    ckpt, data, hold = case_files(args.growth_model, folder)
    model, x, y = load_case(ckpt, data, hold)
    for n in (64, 128, 256):
        sub = folder / f"growth_n{n}.safetensors"
        save_file({"inputs": x[:n].contiguous(), "targets": y[:n].contiguous()}, str(sub))
        pieces = floor_pieces(model, x[:n], y[:n], args.repeats)
        run = run_apply(ckpt, sub, hold, TeleportConfig(device="cpu", batch_size="auto"))
        out["n"].append({"n": n, "pieces": pieces, "run": run})
    xs, ys = fmnist_images(256, 28, "train")
    xh, yh = fmnist_images(256, 28, "t10k")
    cal, hol = folder / "mlp_cal.safetensors", folder / "mlp_hold.safetensors"
    save_file({"inputs": xs[:, 0].flatten(1).contiguous(), "targets": ys}, str(cal))
    save_file({"inputs": xh[:, 0].flatten(1).contiguous(), "targets": yh}, str(hol))
    for d in (256, 512, 1024):
        kwargs = {"in_features": 784, "hidden": [d, d], "num_classes": 10}
        torch.manual_seed(0)
        mlp = MLP(**kwargs).eval()
        path = folder / f"mlp_{d}.safetensors"
        save_file({k: v.contiguous() for k, v in mlp.state_dict().items()}, str(path),
                  metadata={"format": "pt", "arch": "mlp", "model_kwargs": json.dumps(kwargs)})
        pieces = floor_pieces(mlp, xs[:, 0].flatten(1), ys, args.repeats)
        out["d_in"].append({"d_in": d, "pieces": pieces, "run": run_apply(path, cal, hol, TeleportConfig(device="cpu", batch_size="auto"))})
    return out



def machine() -> str:
    import torch

    model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    return (f"{platform.machine()}, {os.cpu_count()} cores ({model}), shared, no GPU; torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch thread(s), OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(SAMPLES), help=f"comma-separated, of {', '.join((*SAMPLES, *SCALE))}")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each floor piece")
    ap.add_argument("--apply-repeats", type=int, default=3, help="apply runs per model")
    ap.add_argument("--scale-flags", default="--max-memory 4GB --max-seconds 540", help="apply flags for the timm models at 64x64")
    ap.add_argument("--cpu-clock", action="store_true", help="count --max-seconds of the timm models in this process's CPU seconds")
    ap.add_argument("--floor-batch", type=int, default=BATCH, help="batch of the floor's passes (256 in the issue's definition)")
    ap.add_argument("--growth", action="store_true", help="also the growth in N and d_in")
    ap.add_argument("--growth-model", default="fmnist_test_resnet_mid")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 repeat, 1 apply run")
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "cost_results.json")
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "cost.md")
    ap.add_argument("--no-write", action="store_true", help="print the section, write neither results nor docs")
    ap.add_argument("--before", action="store_true", help="keep each rerun model's recorded row as its 'before' (shown before -> after)")
    ap.add_argument("--merge", type=Path, nargs="*", default=[], help="results files of other runs to merge in first")
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats = 1
    globals()["BATCH"] = args.floor_batch  # the floor's passes read it
    import torch

    torch.set_num_threads(1)
    results = json.loads(args.results.read_text()) if args.results.exists() and not args.no_write else {}
    for other in args.merge:
        extra = json.loads(other.read_text())
        commands = results.get("_commands", []) + [c for c in extra.pop("_commands", []) if c not in results.get("_commands", [])]
        results.update(extra)
        results["_commands"] = commands
    with tempfile.TemporaryDirectory() as tmp:
        for name in [m for m in args.models.split(",") if m]:
            if name not in SAMPLES and name not in SCALE:
                sys.exit(f"unknown model {name!r}")
            if args.before and name in results:
                results.setdefault("_before", {})[name] = results[name]
            results[name] = measure(name, args, Path(tmp))
            print(json.dumps({k: results[name][k] for k in ("model", "pieces", "runs")}), flush=True)
        if args.growth:
            results["_growth"] = {"model": args.growth_model, **growth(args, Path(tmp))}
    command = "PYTHONPATH=. OMP_NUM_THREADS=1 python bench/cost.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.models or args.growth:  # a run, not only a merge and render
        results["_commands"] = [c for c in results.get("_commands", []) if c != command] + [command]
    models = {k: v for k, v in results.items() if not k.startswith("_")}
    section = render(models, "`; `".join(clean_command(c) for c in results.get("_commands", [])), machine(), results.get("_before"))
    section = section.replace("\n" + END, "\n".join(render_growth(results.get("_growth"))) + "\n\n" + END)
    if args.no_write:
        print(section)
        return
    args.results.write_text(json.dumps(results, indent=1))
    write_section(args.doc, section)


if __name__ == "__main__":
    main()
