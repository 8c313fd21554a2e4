"""Figures, the gain rule and docs/finetune.md for bench/finetune.py (pure functions over the cached runs).

Per seed s and variant v of a cell (K steps, window ``w = max(1, K // 10)``):

* ``final(v, s)``: mean training (minibatch) loss over the last w steps;
* ``steps(v, s)``: first step t whose trailing w-step mean is <= ``final(none, s)``
  (:func:`teleport_cli.bench.resume.steps_to_target`), None if never;
* ``equivalent(v, s)``: the teleport's CPU seconds / the ``none`` run's CPU seconds per step;
* ``net(v, s) = (steps + equivalent) / K``; ``own(s) = steps(none, s) / K`` (the original
  touching its own final loss, the baseline of the speed gain);
* held-out loss and accuracy after K.

Gain rule (fixed before any run): for held-out loss the gain is ``held(none) - held(v)``, for
speed ``own - net``; a variant passes a metric when the mean gain over seeds exceeds 2 pooled
standard deviations (``sqrt((sd_none^2 + sd_v^2) / 2)``, sample sd over seeds), and it beats
``random`` on at least 4 of 5 seeds (held-out loss lower; steps, gross of cost, fewer). A pass on
seeds 0..4 is a real gain only when it passes again on seeds 5..9.
"""

from __future__ import annotations

import json
import math
import platform
import statistics
from pathlib import Path

import torch

from teleport_cli.bench.resume import steps_to_target

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "finetune"
DOCS = ROOT / "docs"
COMPARED = ("lookahead", "grad-norm", "trace", "levelset")  # the rule's candidates (random and none_2lr are controls)


def per_seed(doc: dict) -> dict[str, list[dict]]:
    """variant -> one dict of figures per seed (see the module docstring)."""
    k = doc["K"]
    w = max(1, k // 10)
    none = doc["runs"]["none"]
    out = {}
    for v, runs in doc["runs"].items():
        rows = []
        for r, ref, start in zip(runs, none, doc["starts"][v]):
            target = statistics.fmean(ref["train"][-w:])
            t = steps_to_target(r["train"], target, w)
            eq = start.get("cpu_seconds", 0.0) / (ref["cpu_seconds"] / k)
            rows.append({"seed": r["seed"], "final": statistics.fmean(r["train"][-w:]), "steps": t, "equivalent": eq,
                         "net": None if t is None else (t + eq) / k, "held": r["holdout"][-1][1], "acc": r["holdout"][-1][2],
                         "own": None if v != "none" else (None if t is None else t / k), "geometry": start.get("geometry"),
                         "verified": start.get("verified", True)})
        out[v] = rows
    return out


def _sd(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def gain_test(base: list[float | None], other: list[float | None], rnd: list[float | None] | None, lower_is_better=True) -> dict:
    """The rule on one metric: per-seed values of ``none`` (``base``), the variant and ``random``.
    None (never reached) fails the test."""
    if any(x is None for x in base + other):
        return {"gain": None, "pooled_sd": None, "beats_random": None, "seeds": len(other), "passed": False}
    sign = 1 if lower_is_better else -1
    gains = [sign * (b - o) for b, o in zip(base, other)]
    pooled = math.sqrt((_sd(base) ** 2 + _sd(other) ** 2) / 2)
    beats = None if rnd is None else sum(r is None or sign * (r - o) > 0 for o, r in zip(other, rnd))
    mean = statistics.fmean(gains)
    return {"gain": mean, "pooled_sd": pooled, "beats_random": beats, "seeds": len(other), "passed": mean > 2 * pooled and (beats or 0) >= 4}


def verdicts(doc: dict) -> dict[str, dict]:
    """variant -> {"holdout": gain_test, "speed": gain_test} for the rule's candidates."""
    rows = per_seed(doc)
    own = [r["own"] for r in rows["none"]]
    out = {}
    for v in COMPARED:
        if v not in rows:
            continue
        rnd = rows.get("random")
        out[v] = {
            "holdout": gain_test([r["held"] for r in rows["none"]], [r["held"] for r in rows[v]], rnd and [r["held"] for r in rnd]),
            "speed": gain_test(own, [r["net"] for r in rows[v]], None),
        }
        if rnd:  # speed against random: gross steps (the random move's Grams are not free either)
            steps = [r["steps"] for r in rows[v]]
            out[v]["speed"]["beats_random"] = sum(a is not None and (b is None or a < b) for a, b in zip(steps, [r["steps"] for r in rnd]))
            out[v]["speed"]["passed"] = out[v]["speed"]["passed"] and out[v]["speed"]["beats_random"] >= 4
    return out


def cell_name(doc: dict) -> str:
    return f"{doc['scenario']}__{doc['regime']}__{doc['optimizer']}"


def save_cell(doc: dict, fresh: bool = False) -> None:
    (OUT / "cells").mkdir(parents=True, exist_ok=True)
    (OUT / "cells" / f"{cell_name(doc)}{'__fresh' if fresh else ''}.json").write_text(json.dumps(doc))


def replicate(doc: dict, rerun) -> None:
    """Save the cell; rerun the variants that passed on seeds 0..4 (with none and random) on fresh seeds."""
    save_cell(doc)
    passed = [v for v, t in verdicts(doc).items() if t["holdout"]["passed"] or t["speed"]["passed"]]
    if passed:
        save_cell(rerun(("none", "random", *passed)), fresh=True)


def _fmt(xs, digits=3) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "never"
    return f"{statistics.fmean(xs):.{digits}f} ± {_sd(xs):.{digits}f}"


def plot_cell(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from teleport_cli.bench.resume import smoothed

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    w = max(1, doc["K"] // 10)
    for v, runs in doc["runs"].items():
        mean = [statistics.fmean(x) for x in zip(*(r["train"] for r in runs))]
        a.plot(range(w, len(mean) + 1), smoothed(mean, w), label=v, lw=1)
        steps = [s for s, *_ in runs[0]["holdout"]]
        b.plot(steps, [statistics.fmean(r["holdout"][i][1] for r in runs) for i in range(len(steps))], label=v, lw=1)
    a.set(xlabel="step", ylabel=f"training loss ({w}-step mean)", title=cell_name(doc).replace("__", ", "))
    b.set(xlabel="step", ylabel="held-out loss", yscale="log")
    a.set_yscale("log")
    b.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _rule(m: dict) -> str:
    gain = "n/a" if m["gain"] is None else f"{m['gain']:+.3g} vs 2σ {2 * m['pooled_sd']:.3g}"
    return f"{'PASS' if m['passed'] else 'no'} ({gain}, beats random {m['beats_random']}/{m['seeds']})"


def cell_table(doc: dict) -> list[str]:
    rows = per_seed(doc)
    ver = verdicts(doc)
    k = doc["K"]
    lines = ["| variant | held-out loss | held-out acc | steps→target / K | teleport CPU s | ≈ steps | net / K | λ_max | tr(H) | rule: held-out / speed |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for v, rs in rows.items():
        geo = [r["geometry"] for r in rs if r["geometry"]]
        steps = [None if r["steps"] is None else r["steps"] / k for r in rs]
        never = sum(s is None for s in steps)
        t = ver.get(v)
        rule = "-" if t is None else " / ".join(_rule(m) for m in (t["holdout"], t["speed"]))
        lines.append(
            f"| {v}{'' if all(r['verified'] for r in rs) else ' (' + str(sum(not r['verified'] for r in rs)) + ' unverified: start unchanged)'} | "
            f"{_fmt([r['held'] for r in rs], 4)} | {_fmt([r['acc'] for r in rs], 3)} | "
            f"{_fmt(steps, 2)}{f' ({never} never)' if never else ''} | {_fmt([s.get('cpu_seconds', 0.0) for s in doc['starts'][v]], 1)} | "
            f"{_fmt([r['equivalent'] for r in rs], 0)} | {'1 (itself: ' + _fmt([r['own'] for r in rs], 2) + ')' if v == 'none' else _fmt([r['net'] for r in rs], 2)} | "
            f"{_fmt([g['top_eigenvalue'] for g in geo], 3) if geo else '-'} | {_fmt([g['trace'] for g in geo], 1) if geo else '-'} | {rule} |")
    return lines


def summary_table(cells: dict[str, dict]) -> list[str]:
    """One row per cell: held-out loss of none, the best teleport, random and 2x lr; the rule's passes."""
    lines = ["| cell | lr | none | best teleport (held-out loss) | random | levelset | none at 2x lr | rule passes (seeds 0..4) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, doc in cells.items():
        if name.endswith("__fresh"):
            continue
        rows = per_seed(doc)
        held = {v: [r["held"] for r in rs] for v, rs in rows.items()}
        best = min((v for v in ("lookahead", "grad-norm", "trace") if v in held), key=lambda v: statistics.fmean(held[v]), default=None)
        passes = [f"{v} ({m})" for v, t in verdicts(doc).items() for m in ("holdout", "speed") if t[m]["passed"]]
        get = lambda v: _fmt(held[v], 4) if v in held else "-"  # noqa: E731
        lines.append(f"| {name.replace('__', ', ')} | {doc['lr']:g} | {get('none')} | {best}: {get(best) if best else '-'} | {get('random')} | "
                     f"{get('levelset')} | {get('none_2lr')} | {', '.join(passes) or 'none'} |")
    return lines


PLANNED = [f"{s}__{r}__{o}" for s in ("resnet", "char_lm") for r in ("head", "full") for o in ("sgd", "adamw")]


def coverage(cells: dict[str, dict]) -> list[str]:
    """Which planned cells ran (with their seeds, variants and teleport steps) and which did not."""
    lines = []
    for name in PLANNED:
        doc = cells.get(name)
        if doc is None:
            lines.append(f"* `{name}`: not run (out of time on the shared 2-core machine).")
            continue
        seeds = [r["seed"] for r in doc["runs"]["none"]]
        lines.append(f"* `{name}`: seeds {seeds}, variants {', '.join(doc['runs'])}; teleport steps at most {doc.get('teleport', {}).get('steps', 20)}"  # cells written before the key existed ran the default 20
                     + ("; replicated on fresh seeds" if name + "__fresh" in cells else "") + ".")
    return lines


def write_report() -> None:
    cells = {p.stem: json.loads(p.read_text()) for p in sorted((OUT / "cells").glob("*.json"))} if (OUT / "cells").exists() else {}
    intro = (ROOT / "bench" / "finetune_findings.md")
    lines = ["# Fine-tuning from a teleported pretrained checkpoint", "",
             "Generated by `bench/finetune.py --report` from the cached runs of `OMP_NUM_THREADS=1 bench/finetune.py` "
             f"(machine: {platform.machine()}, 2 shared cores, no GPU, one torch thread, torch {torch.__version__}; "
             "CPU seconds by `time.process_time`).", ""]
    if intro.exists():
        text = intro.read_text().strip().replace("{summary_table}", "\n".join(summary_table(cells)))
        lines += [text.replace("{coverage}", "\n".join(coverage(cells))), ""]
    else:
        lines += summary_table(cells) + [""]
    lines += ["## Cells", "", "Cells that ran: " + (", ".join(f"`{n}`" for n in cells) or "none") + ".", ""]
    for name, doc in cells.items():
        fresh = name.endswith("__fresh")
        lines += [f"### {name.replace('__', ', ')}", "",
                  f"lr {doc['lr']:g} (grid on `none`, mean held-out loss after K: {', '.join(f'{k}: {v:.4f}' for k, v in doc['lr_grid'].items())}), K = {doc['K']}, batch {doc['batch']}, "
                  f"seeds {[r['seed'] for r in doc['runs']['none']]}. Values: mean ± sd over seeds; λ_max and tr(H) (Lanczos, Hutchinson, "
                  "trained parameters, calibration set) at the start of the fine-tune (for `none`: before any teleport).", ""]
        lines += cell_table(doc)
        if not fresh:
            plot_cell(doc, DOCS / "finetune" / f"{name}.png")
            lines += ["", f"![{name}](finetune/{name}.png)"]
        lines += [""]
    (DOCS / "finetune.md").write_text("\n".join(lines) + "\n")
