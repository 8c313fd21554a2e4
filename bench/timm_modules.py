"""Coverage sweep over every module of ``timm.models``: its smallest model, through the CLI.

For each module of ``timm.list_modules()`` the model with the fewest parameters (counted on the
meta device, 10 classes, nothing downloaded) is built with random init (seed 0) at its minimum
input size: the smallest of 32, 64, 96, ... pixels, not below the default config's
``min_input_size``, at which it builds (``img_size=`` where the model takes one) and runs a
forward pass. Its state dict is saved as ``.safetensors`` and ``teleport apply`` runs on it in
a child process with the defaults (``--hvp auto``, tau 0.99, look-ahead objective) except
``--steps``, on sklearn's digits resized to that size (3 channels, 10 classes, ``CAL``
calibration and ``HOLD`` held-out images). A model passes when the command exits 0 with at
least one accepted step (both gates, calibration and held-out, passed: exit 4 otherwise).

    PYTHONPATH=. OMP_NUM_THREADS=1 python bench/timm_modules.py      # resumable; fills the cache
    PYTHONPATH=. python bench/architectures.py                       # writes docs/architectures.md

Results are cached per model in ``bench/results/timm_modules.json`` (delete an entry to rerun it)
and their rows copied to ``docs/bench/timm_modules.json``, which architectures.py reads without a cache.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "bench" / "results" / "timm_modules.json"  # the working cache (not committed)
RECORD = ROOT / "docs" / "bench" / "timm_modules.json"  # the rows of the last sweep, committed
CLASSES = 10
CAL, HOLD = 48, 32
STEPS = 1
SIZES = (32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 384)
MAX_PARAMS = 30_000_000  # above this a model is not run on the 2-core machine
CPU_LIMIT = 300  # CPU seconds per child process (RLIMIT_CPU): the per-model cap of the 2-core sweep
TIMEOUT = 1800  # wall seconds per model, a backstop: the machine is shared, wall time is not the cap
FLAGS = ("--objective", "grad-norm", "--batch-size", str(CAL), "--steps", str(STEPS))


def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _save(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True))
    tmp.replace(path)


def parameter_counts(cache: dict) -> dict:
    """``{model: [module, params or None, error]}`` for every registered timm model (meta device)."""
    import timm
    import torch

    counts = cache.setdefault("params", {})
    for module in timm.list_modules():
        for name in timm.list_models(module=module):
            if name in counts:
                continue
            try:
                with torch.device("meta"), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    model = timm.create_model(name, pretrained=False, num_classes=CLASSES)
                counts[name] = [module, sum(p.numel() for p in model.parameters()), ""]
            except Exception as e:  # noqa: BLE001 - a model that cannot be built on meta is skipped
                counts[name] = [module, None, f"{type(e).__name__}: {str(e)[:120]}"]
    return counts


def smallest_per_module(counts: dict) -> dict:
    """``{module: (model, params)}``: the model with the fewest parameters of each module."""
    best: dict = {}
    for name, (module, params, _) in sorted(counts.items()):
        if params is not None and (module not in best or params < best[module][1]):
            best[module] = (name, params)
    return best


def choose_size(name: str):
    """``(size, kwargs)``: the smallest square input the model builds for and runs on."""
    import timm
    import torch

    cfg = timm.models.get_pretrained_cfg(name)
    cfg = cfg.to_dict() if cfg is not None else {}
    floor = (cfg.get("min_input_size") or (3, 1, 1))[-1]
    default = (cfg.get("input_size") or (3, 224, 224))[-1]
    last = None
    for size in [s for s in SIZES if floor <= s <= max(default, SIZES[0])] or [default]:
        for kwargs in ({"num_classes": CLASSES, "img_size": size}, {"num_classes": CLASSES}):
            try:
                torch.manual_seed(0)
                model = timm.create_model(name, pretrained=False, **kwargs).eval()
                with torch.no_grad():
                    out = model(torch.randn(2, 3, size, size))
                if out.shape == (2, CLASSES):
                    return size, kwargs
            except Exception as e:  # noqa: BLE001 - this size or argument does not fit; try the next
                last = e
    raise RuntimeError(f"no input size up to {default} fits ({type(last).__name__}: {str(last)[:100]})")


def prepare(name: str, folder: Path) -> dict:
    """Write ``model.safetensors``, ``cal.safetensors``, ``hold.safetensors``; return size and kwargs."""
    import timm
    import torch
    import torch.nn.functional as F
    from safetensors.torch import save_file
    from sklearn.datasets import load_digits

    torch.set_num_threads(1)
    size, kwargs = choose_size(name)
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs)
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    digits = load_digits()
    x = torch.tensor(digits.images[: CAL + HOLD], dtype=torch.float32)[:, None] / 16
    x = (F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1) - 0.5) / 0.25
    y = torch.tensor(digits.target[: CAL + HOLD])
    save_file({"inputs": x[:CAL].contiguous(), "targets": y[:CAL].contiguous()}, str(folder / "cal.safetensors"))
    save_file({"inputs": x[CAL:].contiguous(), "targets": y[CAL:].contiguous()}, str(folder / "hold.safetensors"))
    return {"size": size, "kwargs": kwargs}


def _fill(row: dict, doc: dict) -> None:
    """The figures of ``teleport apply --json``'s document that the table shows."""
    layers = doc.get("layers", [])
    reasons: dict = {}
    for l in layers:
        if not l["teleported"]:
            key = l["reason"].split(":")[0].split(" (")[0]
            reasons[key] = reasons.get(key, 0) + 1
    row.update(
        steps=doc.get("steps_accepted"), stop=doc.get("stop_reason"), grad_norm_ratio=doc.get("grad_norm_ratio"),
        drift_cal=doc["calibration"]["relative_loss_drift"], drift_hold=doc["holdout"]["relative_loss_drift"],
        gate_cal=doc["calibration"]["passed"], gate_hold=doc["holdout"]["passed"],
        layers=len(layers), teleported_layers=sum(bool(l["teleported"]) for l in layers), excluded=reasons,
    )


def _cpu_limit() -> None:
    """In the child: SIGXCPU after ``CPU_LIMIT`` CPU seconds (SIGKILL 10 s later)."""
    resource.setrlimit(resource.RLIMIT_CPU, (CPU_LIMIT, CPU_LIMIT + 10))


def run_model(name: str, timeout: float = TIMEOUT) -> dict:
    """Prepare and teleport one model in one child process (one import of torch and timm); the row."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    row: dict = {"model": name}
    with tempfile.TemporaryDirectory(prefix="timm-sweep-") as tmp:
        folder = Path(tmp)
        t0 = time.monotonic()
        try:
            p = subprocess.run([sys.executable, __file__, "--child", name, str(folder)], capture_output=True, text=True,
                               timeout=timeout, env=env, preexec_fn=_cpu_limit)
        except subprocess.TimeoutExpired:
            return {**row, "result": "skipped", "exit": None, "reason": f"over {timeout:.0f} s of wall time (backstop) on the shared machine"}
        prep = folder / "prepared.json"
        if prep.exists():
            row.update(json.loads(prep.read_text()))
        row["seconds"] = round(time.monotonic() - t0, 1)
        row["exit"] = p.returncode
        if p.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
            what = "apply" if prep.exists() else "building it"
            return {**row, "result": "skipped", "reason": f"{what} over the {CPU_LIMIT} CPU s per-model limit of the 2-core sweep"}
        if not prep.exists():
            return {**row, "result": "skipped", "reason": "cannot build: " + (p.stderr.strip().splitlines() or ["?"])[-1][:160]}
        row["stderr_tail"] = p.stderr.strip().splitlines()[-3:] if p.stderr.strip() else []
        try:
            doc = json.loads(p.stdout) if p.stdout.strip() else None
        except ValueError:
            doc = None
        if doc is not None:
            _fill(row, doc)
        if p.returncode == 1:  # a traceback: where in the tool it came from
            row["traceback"] = [l.strip() for l in p.stderr.splitlines() if l.strip().startswith('File "') and "teleport_cli" in l][-3:]
        ok = p.returncode == 0 and doc is not None and (row.get("steps") or 0) >= 1 and row.get("gate_cal") and row.get("gate_hold")
        row["result"] = "pass" if ok else "fail"
        if not ok:
            row["reason"] = (row["stderr_tail"] or ["?"])[-1][:240]
    return row


def child(name: str, folder: Path) -> None:
    """In the child: prepare the files, then run ``teleport apply`` on them in this process."""
    prep = prepare(name, folder)
    (folder / "prepared.json").write_text(json.dumps(prep))
    sys.argv = ["teleport", "apply", str(folder / "model.safetensors"), "--data", str(folder / "cal.safetensors"),
                "--holdout", str(folder / "hold.safetensors"), "--model", name, "--model-kwargs", json.dumps(prep["kwargs"]),
                "-o", str(folder / "out.safetensors"), *FLAGS, "--device", "cpu", "--json", "-q"]
    from teleport_cli.cli import main as cli_main

    cli_main()

def named_reason(row: dict) -> str:
    """Why a model did not pass, in the terms of the design notes, with the tool's own message."""
    if row["result"] == "pass":
        return ""
    msg = (row.get("reason") or "").removeprefix("error: ")
    code = row.get("exit")
    if row["result"] == "skipped":
        return "skipped: " + msg
    if code == 1:
        return "exit 1 (a traceback, a bug): " + msg
    if code == 4:
        return "a drift gate failed (invariance is exact on the Grams' samples only; held-out data may move): " + msg
    if code == 5 and "no layer can be teleported" in msg:
        return "nothing teleportable by design (only plain F.linear/F.convNd layers move): " + msg
    if code == 5 and "no_freedom" in msg:
        return "no usable null-space direction (exactly null directions are dead ones): " + msg
    if code == 5:
        return "no step survived the line search (drift or guard limit): " + msg
    return f"exit {code}: " + msg


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def section(cache: dict | None = None) -> str:
    """The markdown section of docs/architectures.md for the module sweep (from the cache)."""
    cache = (_load(CACHE) or _load(RECORD)) if cache is None else cache
    rows = sorted(cache.get("rows", {}).values(), key=lambda r: r["module"])
    if not rows:
        return "Not run yet: `PYTHONPATH=. OMP_NUM_THREADS=1 python bench/timm_modules.py`."
    passed = sum(r["result"] == "pass" for r in rows)
    picks = cache.get("picks") or {m: list(v) for m, v in smallest_per_module(cache.get("params", {})).items()}
    modules = len(picks) or len(rows)
    done = {r["module"] for r in rows}
    not_run = [f"{m} (`{n}`, {c / 1e6:.2f} M)" for m, (n, c) in sorted(picks.items()) if m not in done]
    lines = [
        f"**{passed} of {modules} modules pass ({passed / modules:.0%})**; "
        f"{sum(r['result'] == 'fail' for r in rows)} fail, {sum(r['result'] == 'skipped' for r in rows)} skipped, "
        f"{modules - len(rows)} not run. Every failure and skip has its reason below.",
        "",
        "| module | model | params | input | result | accepted steps | grad-norm gain | drift: calibration / held-out | s | reason |",
        "| --- | --- | ---: | ---: | --- | ---: | ---: | --- | ---: | --- |",
    ]
    for r in rows:
        drift = "-" if r.get("drift_cal") is None else f"{r['drift_cal']:.1e} / {r['drift_hold']:.1e}"
        reason = named_reason(r).replace("|", "\\|")
        lines.append(
            f"| {r['module']} | `{r['model']}` | {r['params'] / 1e6:.2f} M | {_fmt(r.get('size'), 'd')} | {r['result']} | "
            f"{_fmt(r.get('steps'), 'd')} | {_fmt(r.get('grad_norm_ratio'), '.3g')} | {drift} | {_fmt(r.get('seconds'), '.0f')} | {reason} |"
        )
    if not_run:
        lines += ["", "Not run (not reached in the session's time; not passed): " + ", ".join(not_run) + "."]
    return "\n".join(lines)


def main() -> None:
    global MAX_PARAMS, CPU_LIMIT, TIMEOUT
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "FOLDER"), help=argparse.SUPPRESS)
    parser.add_argument("--only", nargs="*", help="these modules only")
    parser.add_argument("--workers", type=int, default=3, help="models run at once")
    parser.add_argument("--reverse", action="store_true", help="largest first (for a second sweep beside the first)")
    parser.add_argument("--rerun", action="store_true", help="rerun models already in the cache")
    parser.add_argument("--record", action="store_true", help="only copy the cached rows to docs/bench/timm_modules.json")
    parser.add_argument("--max-params", type=int, default=MAX_PARAMS, help="run models up to this many parameters (default %(default)s)")
    parser.add_argument("--cpu-limit", type=int, default=CPU_LIMIT, help="CPU seconds per model (default %(default)s)")
    args = parser.parse_args()
    MAX_PARAMS, CPU_LIMIT = args.max_params, args.cpu_limit
    TIMEOUT = max(TIMEOUT, 3 * CPU_LIMIT)
    if args.child:
        child(args.child[0], Path(args.child[1]))
        return
    if args.record:
        write_record()
        return
    cache = _load(CACHE)
    known = len(cache.get("params", {}))
    counts = parameter_counts(cache)
    if len(counts) != known:  # only then: another sweep may be writing rows into the file
        _save(CACHE, cache)
    rows = cache.setdefault("rows", {})
    picks = smallest_per_module(counts)
    order = sorted(picks.items(), key=lambda kv: kv[1][1], reverse=args.reverse)  # smallest first: most results early
    todo = [(m, n, c) for m, (n, c) in order if (not args.only or m in args.only)
            and (args.rerun or rows.get(m, {}).get("model") != n
                 or (rows[m].get("reason", "").startswith("too large") and c <= MAX_PARAMS)
                 or (rows[m].get("reason", "").startswith("apply over the") and CPU_LIMIT > rows[m].get("cpu_limit", 300)))]
    lock = threading.Lock()

    def one(item):
        module, name, params = item
        done = _load(CACHE).get("rows", {}).get(module, {})
        if not args.rerun and done.get("model") == name and not done.get("reason", "").startswith("too large"):
            return
        if params > MAX_PARAMS:
            row = {"model": name, "result": "skipped", "reason": f"too large for the 2-core sweep ({params:,} params)"}
        else:
            row = run_model(name)
        row.update(module=module, params=params, cpu_limit=CPU_LIMIT)
        with lock:  # merged into the file as it is now: other sweeps may be filling it too
            disk = _load(CACHE)
            disk.setdefault("rows", {})[module] = row
            disk.setdefault("params", counts)
            _save(CACHE, disk)
        print(f"{module}: {name} {params:,} {row['result']} {row.get('seconds', '')} {row.get('reason', '')[:150]}", flush=True)

    with ThreadPoolExecutor(args.workers) as pool:
        list(pool.map(one, todo))
    write_record()


def write_record() -> None:
    """Copy the cache's rows (not the 1000-odd parameter counts) to the committed record."""
    cache = _load(CACHE)
    picks = {m: list(v) for m, v in smallest_per_module(cache.get("params", {})).items()}
    _save(RECORD, {"picks": picks, "rows": cache.get("rows", {})})

if __name__ == "__main__":
    main()
