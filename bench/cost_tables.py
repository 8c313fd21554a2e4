"""The arithmetic and tables of bench/cost.py: the floor, the ratios, and docs/cost.md's generated section.

Pure functions of the measured rows (no torch, no timing), so that tests/bench/test_cost.py checks
them on made-up tables. The floor (issue 11, Targets) is ``forward + accepted * passes * gradient``
with ``passes`` 2 for grad-norm and ``2k + 1`` for the look-ahead with k virtual steps; the floor
at the HVP the run took replaces each step's finite-difference product by the measured
double-backward one where ``--hvp auto`` chose ``exact``.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

PHASES = ("batch-size", "capture", "bases", "lookahead-lr", "ascent", "verify")
BEGIN, END = "<!-- bench/cost.py: begin generated section -->", "<!-- bench/cost.py: end generated section -->"
BATCH = 256

# ---- the arithmetic -------------------------------------------------------------------------

def passes_per_step(objective: str, lookahead_steps: int = 1) -> int:
    """Gradient passes per accepted step of the floor: 2 for grad-norm, 2k + 1 for the look-ahead."""
    return 2 * lookahead_steps + 1 if objective == "lookahead" else 2


def floor_seconds(pieces: dict, accepted: int, objective: str, lookahead_steps: int = 1) -> float:
    """``forward + accepted * passes_per_step * gradient`` (medians, CPU seconds)."""
    return pieces["forward"]["median"] + accepted * passes_per_step(objective, lookahead_steps) * pieces["gradient"]["median"]


def hvp_floor_seconds(pieces: dict, accepted: int, objective: str, hvp: str | None, lookahead_steps: int = 1) -> float:
    """The floor at the products the run took: as :func:`floor_seconds`, but where ``hvp`` is
    ``exact`` each step's ``k`` (1 for grad-norm) Hessian-vector products cost the measured
    double-backward pass instead of one gradient:
    ``forward + accepted * ((passes - k) * gradient + k * hvp_exact)``."""
    if hvp != "exact" or "median" not in pieces.get("hvp_exact", {}):
        return floor_seconds(pieces, accepted, objective, lookahead_steps)
    k = lookahead_steps if objective == "lookahead" else 1
    per_step = (passes_per_step(objective, lookahead_steps) - k) * pieces["gradient"]["median"] + k * pieces["hvp_exact"]["median"]
    return pieces["forward"]["median"] + accepted * per_step


def phase_split(events: list[tuple[str, float, float]], end: tuple[float, float]) -> dict:
    """Seconds per phase from ``(stage, cpu, wall)`` readings at each stage's first event, up to
    the next stage's first event (the last phase up to ``end``, also ``(cpu, wall)``)."""
    firsts: dict[str, tuple[float, float]] = {}
    for stage, c, w in events:
        firsts.setdefault(stage, (c, w))
    order = sorted(firsts.items(), key=lambda kv: kv[1][1])
    out = {}
    for (stage, (c, w)), nxt in zip(order, [o[1] for o in order[1:]] + [end]):
        out[stage] = {"cpu": nxt[0] - c, "wall": nxt[1] - w}
    return out


def slope(xs, ys) -> float:
    """Least-squares slope of log(y) on log(x) (the exponent of a power law)."""
    lx, ly = [math.log(v) for v in xs], [math.log(v) for v in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    den = sum((a - mx) ** 2 for a in lx)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / den if den > 0 else float("nan")


# ---- rendering ------------------------------------------------------------------------------

def _s(v: dict | None) -> str:
    if not v or "median" not in v:
        return "n/a" if not v or "error" not in v else "no double backward"
    return f"{v['median']:.3g} [{v['min']:.3g}-{v['max']:.3g}]"


def _med(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    m = statistics.median(values)
    return f"{m:.3g}" if len(values) == 1 else f"{m:.3g} [{min(values):.3g}-{max(values):.3g}]"


def ratios(row: dict, at_hvp: bool = False) -> list[float | None]:
    """Each run's ``apply`` CPU seconds over its floor (None when nothing was accepted); with
    ``at_hvp`` over the floor at the products it took (:func:`hvp_floor_seconds`)."""
    out = []
    for r in row["runs"]:
        if "objective" not in r:
            out.append(None)
            continue
        k = row.get("lookahead_steps", 1)
        f = hvp_floor_seconds(row["pieces"], r["accepted"], r["objective"], r.get("hvp"), k) if at_hvp else \
            floor_seconds(row["pieces"], r["accepted"], r["objective"], k)
        out.append(r["cpu"] / f if f > 0 else None)
    return out


def _median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _arrow(before, after, fmt: str = ".3g") -> str:
    return " → ".join("n/a" if v is None else format(v, fmt) for v in (before, after))


def render_before(results: dict, before: dict) -> list[str]:
    """The table of the models rerun with ``--before``: medians before -> after (CPU seconds)."""
    names = [n for n in results if n in before]
    if not names:
        return []
    lines = ["", "### Before → after (models rerun with `--before`; medians over the runs, CPU seconds)", "",
             "| model | accepted / rejected | grad-norm ratio | CPU s | ratio to the floor | ratio at its HVP | "
             + " | ".join(PHASES[:1] + ("lookahead-lr", "ascent")) + " |", "| --- |" + " --- |" * 8]
    for name in names:
        b, a = before[name], results[name]
        cells = [f"{'/'.join(str(r.get('accepted', 0)) for r in b['runs'])} / {'/'.join(str(r.get('rejected', 0)) for r in b['runs'])} → "
                 f"{'/'.join(str(r.get('accepted', 0)) for r in a['runs'])} / {'/'.join(str(r.get('rejected', 0)) for r in a['runs'])}",
                 _arrow(_median([r.get("grad_norm_ratio") for r in b["runs"]]), _median([r.get("grad_norm_ratio") for r in a["runs"]]), ".4f"),
                 _arrow(_median([r["cpu"] for r in b["runs"]]), _median([r["cpu"] for r in a["runs"]])),
                 _arrow(_median(ratios(b)), _median(ratios(a))), _arrow(_median(ratios(b, True)), _median(ratios(a, True)))]
        for ph in ("batch-size", "lookahead-lr", "ascent"):
            cells.append(_arrow(*(_median([r["phases"].get(ph, {}).get("cpu") for r in row["runs"]]) for row in (b, a))))
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return lines


def render(results: dict, command: str, machine: str, before: dict | None = None) -> str:
    """The generated section of docs/cost.md, from the merged results (model -> row); ``before``:
    the earlier rows of models rerun with ``--before`` (model -> row), shown as before -> after."""
    lines = [BEGIN, "", "## Measured by bench/cost.py (generated)", "",
             f"Commands: `{command}`. Machine: {machine}. CPU seconds are `time.process_time()` of the one",
             "process (for `apply`, plus its memory probe's forked child), median [min-max] over the runs given; the machine was shared, so wall seconds are longer",
             "than CPU seconds. The floor is `forward + accepted * passes * gradient` with the pieces below (2 passes",
             "per step for grad-norm, 2k + 1 = 3 for the look-ahead at k = 1); the floor at its HVP counts, where `--hvp auto`",
             "took double backward, each step's k products (1 for grad-norm) at the measured double-backward pass instead of one",
             "gradient.", "",
             "### The floor's pieces (one pass over the calibration set, batch 256, plain float32 autograd loops)", "",
             "| model | N | parameters | forward | gradient | HVP, forward difference | HVP, double backward |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, row in results.items():
        p = row["pieces"]
        lines.append(f"| `{name}` | {row['samples']} | {row['params'] / 1e6:.3g}M | {_s(p['forward'])} | {_s(p['gradient'])} | "
                     f"{_s(p['hvp_fd'])} | {_s(p['hvp_exact'])} |")
    batches = sorted({row.get("floor_batch", BATCH) for row in results.values()})
    if batches != [256]:
        lines += ["", "Floor batch: " + ", ".join(f"`{n}` {row.get('floor_batch', BATCH)}" for n, row in results.items()) + "."]
    lines += ["", "### `apply` at defaults against the floor (without process start-up)", "",
              "| model | flags | runs | exit / verified | objective, HVP | accepted / rejected | stop | batch | CPU s | wall s | "
              "peak RSS GB | floor CPU s | ratio | floor at its HVP | ratio at its HVP |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, row in results.items():
        runs = row["runs"]
        r0 = runs[0]
        floors = [floor_seconds(row["pieces"], r["accepted"], r["objective"], row.get("lookahead_steps", 1)) for r in runs if "objective" in r]
        hvp_floors = [hvp_floor_seconds(row["pieces"], r["accepted"], r["objective"], r.get("hvp"), row.get("lookahead_steps", 1))
                      for r in runs if "objective" in r]
        lines.append(
            f"| `{name}` | {row.get('flags') or 'defaults'} | {len(runs)} | {'/'.join(str(r['exit']) for r in runs)} / "
            f"{'/'.join('yes' if r.get('verified') else 'no' for r in runs)} | {r0.get('objective', '?')}, {r0.get('hvp') or '-'} | "
            f"{'/'.join(str(r.get('accepted', 0)) for r in runs)} / {'/'.join(str(r.get('rejected', 0)) for r in runs)} | "
            f"{r0.get('stop', '-')} | {r0.get('batch_size', '-')} | {_med([r['cpu'] for r in runs])} | {_med([r['wall'] for r in runs])} | "
            f"{_med([r['peak_rss'] / 1e9 for r in runs])} | {_med(floors)} | {_med(ratios(row))} | {_med(hvp_floors)} | "
            f"{_med(ratios(row, True))} |")
    lines += ["", "### `apply`'s phases (CPU seconds, median over the runs; `load` is reading the files)", "",
              "| model | " + " | ".join(("load",) + PHASES) + " |", "| --- |" + " --- |" * (len(PHASES) + 1)]
    for name, row in results.items():
        cells = [_med([r["phases"].get(ph, {}).get("cpu") for r in row["runs"]]) for ph in ("load",) + PHASES]
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    lines += render_before(results, before or {})
    lines += ["", END]
    return "\n".join(lines)


def render_growth(g: dict) -> list[str]:
    if not g:
        return []
    lines = ["", f"### Growth (`--growth`, on `{g['model']}` for N and random 784-d-d-10 MLPs for d_in)", "",
             "| axis | value | gradient CPU s | apply CPU s | bases CPU s | ascent CPU s | accepted |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for axis in ("n", "d_in"):
        for e in g[axis]:
            r = e["run"]
            lines.append(f"| {axis} | {e[axis]} | {e['pieces']['gradient']['median']:.3g} | {r['cpu']:.3g} | "
                         f"{r['phases'].get('bases', {}).get('cpu', 0):.3g} | {r['phases'].get('ascent', {}).get('cpu', 0):.3g} | {r.get('accepted', 0)} |")
        xs = [e[axis] for e in g[axis]]
        for what, ys in (("gradient", [e["pieces"]["gradient"]["median"] for e in g[axis]]), ("apply", [e["run"]["cpu"] for e in g[axis]]),
                         ("bases", [max(e["run"]["phases"].get("bases", {}).get("cpu", 0), 1e-9) for e in g[axis]])):
            lines.append(f"| {axis} | slope of log {what} on log {axis} | {slope(xs, ys):.2f} | | | | |")
    return lines


def clean_command(command: str) -> str:
    """The command without the file options (``--results``, ``--doc``, ``--merge`` and their values)."""
    words, out, skip = command.split(), [], False
    for w in words:
        if w in ("--results", "--doc", "--merge"):
            skip = True
        elif skip and not w.startswith("--"):
            continue
        else:
            skip = False
            out.append(w)
    return " ".join(out)


def write_section(doc: Path, section: str) -> None:
    """Replace the text between the markers in ``doc`` (or append it), keeping the rest."""
    text = doc.read_text() if doc.exists() else "# What a teleport costs\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    doc.write_text(text)
