"""The self-contained HTML page of an audit: tables and matplotlib plots embedded as base64 PNG.

Plots (Agg backend, no display needed):

* per-layer relative output drift and relative weight change (two checkpoints only);
* per-layer null-space dimension against tau (the rule of :func:`teleport_cli.nullspace.bases.null_mask`);
* the Gram eigenvalue spectrum of chosen layers, relative to the largest eigenvalue.

The page loads nothing from outside (no scripts, styles or fonts from the network); a
ten-line inline script counts the decoded plots into ``<body data-plots-rendered=N>`` so that a
headless browser can check the page rendered.
"""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from ..checkpoints.atomic import resolve_output, writable, write_file_atomic  # noqa: E402
from ..checkpoints.temps import check_name_length  # noqa: E402
from ..errors import OutputError  # noqa: E402
from ..nullspace.bases import EPS64, null_mask  # noqa: E402
from .compare import Audit  # noqa: E402

TAU_GRID = (0.5, 0.8, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9999, 0.99999, 1.0)


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def drift_figure(layers: list[dict]):
    """The matplotlib Figure of :func:`drift_plot` (log-scale bars; the caller closes it).

    A value of exactly 0 (a BatchNorm or other module the teleport leaves unchanged) has no bar
    on a log axis: it is drawn as a "0" at the foot of its slot, and the axis spans the positive
    values only. The legend sits above the axes, outside them, so that it covers no bar.
    """
    rows = [l for l in layers if l["output_drift"] is not None]
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(rows) + 2), 3.8))
    xs = list(range(len(rows)))
    series = (("output drift ‖ΔZ‖/‖Z‖", "output_drift", -0.2, "C0"), ("weight change ‖ΔW‖/‖W‖", "rel_weight_change", 0.2, "C1"))
    positive = [l[k] for _, k, _, _ in series for l in rows if (l[k] or 0.0) > 0]
    low, high = (min(positive), max(positive)) if positive else (1e-3, 1.0)
    ax.set_yscale("log")
    ax.set_ylim(low / 10, high * 3)
    for label, key, dx, color in series:
        bars = [(x + dx, l[key]) for x, l in zip(xs, rows) if (l[key] or 0.0) > 0]
        ax.bar([x for x, _ in bars], [v for _, v in bars], 0.4, label=label, color=color)
        for x, l in zip(xs, rows):
            if l[key] == 0.0:  # unchanged: no bar of invented height
                ax.text(x + dx, low / 10, "0", ha="center", va="bottom", fontsize=7, color=color, gid="zero")
    ax.set_xticks(xs, [l["name"] for l in rows], rotation=45, ha="right", fontsize=8)
    ax.set_xlim(-0.6, len(rows) - 0.4)
    ax.set_ylabel("relative change (calibration set)")
    ax.set_title("per-layer output drift and weight change", pad=24)
    ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False, borderaxespad=0.2)
    return fig


def drift_plot(layers: list[dict]) -> str:
    """Bar chart (log scale) of output drift and weight change per layer; base64 PNG (see :func:`drift_figure`)."""
    return _png(drift_figure(layers))


def null_dim_curve(eigenvalues: torch.Tensor, taus=TAU_GRID) -> list[int]:
    """Null-space dimension (summed over groups) of one layer's Gram at each tau."""
    return [sum(int(null_mask(e, t)[0].sum()) for e in eigenvalues) for t in taus]


def null_dim_plot(eigenvalues: dict[str, torch.Tensor], tau: float) -> str:
    """Null-space dimension against tau, one line per layer; base64 PNG."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    xs = list(range(len(TAU_GRID)))
    for name, ev in eigenvalues.items():
        ax.plot(xs, null_dim_curve(ev), marker="o", ms=3, label=f"{name} (d_in {ev.shape[0] * ev.shape[1]})")
    if tau in TAU_GRID:
        ax.axvline(TAU_GRID.index(tau), color="grey", ls="--", lw=1, label=f"tau = {tau:g}")
    ax.set_xticks(xs, [f"{t:g}" for t in TAU_GRID], rotation=45, fontsize=8)
    ax.set_xlabel("tau (input energy kept invariant; 1 = exact null space)")
    ax.set_ylabel("null-space dimension")
    ax.set_title("per-layer null-space dimension against tau")
    ax.legend(fontsize=7, ncol=2 if len(eigenvalues) > 6 else 1)
    return _png(fig)


def spectrum_plot(eigenvalues: dict[str, torch.Tensor], names: list[str]) -> str:
    """Gram eigenvalues / largest, descending, log scale, for the chosen layers; base64 PNG."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name in names:
        s = eigenvalues[name].reshape(-1).clamp_min(0).sort(descending=True).values
        rel = (s / s[0]).clamp_min(EPS64) if s[0] > 0 else torch.full_like(s, EPS64)
        ax.semilogy(range(1, len(s) + 1), rel.numpy(), label=name)
    ax.axhline(EPS64, color="grey", ls=":", lw=1, label="float64 eps")
    ax.set_xlabel("eigenvalue index (descending)")
    ax.set_ylabel("eigenvalue / largest")
    ax.set_title("Gram eigenvalue spectrum (checkpoint A)")
    ax.legend(fontsize=8)
    return _png(fig)


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "pass" if v else "FAIL"
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def _g6(v):
    return v if v is None else f"{v:.6g}"


def _table(headers: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure(pid: str, png: str, caption: str) -> str:
    return f'<figure><img id="{pid}" class="plot" alt="{html.escape(caption)}" src="data:image/png;base64,{png}"><figcaption>{html.escape(caption)}</figcaption></figure>'


STYLE = """body{font-family:sans-serif;margin:2em;max-width:70em}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}th{background:#eee}td:first-child,th:first-child{text-align:left}
.pass{color:#070;font-weight:bold}.fail{color:#b00;font-weight:bold}figure{display:inline-block;margin:1em}img.plot{max-width:100%}"""

SCRIPT = """window.addEventListener('load',function(){var n=0;document.querySelectorAll('img.plot').forEach(
function(i){if(i.complete&&i.naturalWidth>0){n++;}});document.body.setAttribute('data-plots-rendered',String(n));});"""


def render(audit: Audit) -> str:
    """The whole page as one HTML string (UTF-8, no external resources)."""
    d = audit.doc
    two = d["b"] is not None
    title = f"teleport report: {Path(d['a']).name}" + (f" vs {Path(d['b']).name}" if two else "")
    parts = [f"<h1>{html.escape(title)}</h1>", f"<p>A = {html.escape(d['a'])}" + (f"<br>B = {html.escape(d['b'])}" if two else "") + "</p>"]
    inv = d["invariance"]
    if inv["passed"] is not None:
        cls, word = ("pass", "pass") if inv["passed"] else ("fail", "FAIL")
        parts.append(f'<p>invariance: <span class="{cls}" id="verdict">{word}</span> ({html.escape(inv["rule"])}, noise floor {inv["noise_floor"]:.3g})</p>')
        rows = [[k, v["samples"], _g6(v["loss_a"]), _g6(v["loss_b"]), v["loss_diff"], v["relative_loss_drift"], v["tolerance"],
                 v["accuracy_a"], v["accuracy_b"], v["max_abs_logit_diff"], v["mean_abs_logit_diff"], v["passed"]] for k, v in d["datasets"].items()]
        parts.append(_table(["data set", "samples", "loss A", "loss B", "B − A", "drift", "tolerance", "acc A", "acc B", "max |Δlogit|", "mean |Δlogit|", "gate"], rows))
    keys = [("loss", "loss"), ("gradient norm", "grad_norm"), ("top Hessian eigenvalue", "top_eigenvalue"),
            ("Lanczos residual", "eigenvalue_residual"), ("Hessian trace (Hutchinson)", "trace"), ("standard error", "trace_stderr"),
            ("SAM sharpness", "sharpness")]
    geo = d["geometry"]
    parts.append("<h2>Geometry on the calibration set</h2>")
    parts.append(_table(["", *[k.upper() for k in geo]], [[label] + [_g6(geo[m][k]) for m in geo] for label, k in keys]))
    parts.append(f"<p>sharpness at radius {geo['a']['sharpness_radius']:g}; trace from {geo['a']['trace_probes']} Hutchinson probes.</p>")
    st = d["stability"]
    if st is not None:
        lines = [f"{k.upper()}: λmax {st[k]['top_eigenvalue']:.4g} {'&gt;' if st[k]['unstable'] else '≤'} 2(1+β)/lr = {st['edge']:.4g} — "
                 f"{'<span class=fail>unstable</span>' if st[k]['unstable'] else '<span class=pass>stable</span>'}" for k in geo if st[k]["unstable"] is not None]
        parts.append(f"<h2>Stability (SGD lr {st['lr']:g}, momentum {st['momentum']:g})</h2><p>" + "<br>".join(lines) + f"</p><p>{html.escape(st['note'])}</p>")
    parts.append("<h2>Layers</h2>")
    moved = ["output drift", "ΔW/W"] if two else []
    parts.append(_table(["layer", "kind", "d_in", "rank", f"null dim (tau {d['settings']['tau']:g})", *moved, "note"],
                        [[l["name"], l["kind"], l["d_in"], l["rank"], l["null_dim"], *([l["output_drift"], l["rel_weight_change"]] if two else []), l["note"]]
                         for l in d["layers"]]))
    parts.append("<h2>Plots</h2>")
    if two:
        parts.append(_figure("plot-drift", drift_plot(d["layers"]), "per-layer relative output drift and weight change"))
    if audit.eigenvalues:
        parts.append(_figure("plot-null-dim", null_dim_plot(audit.eigenvalues, d["settings"]["tau"]), "per-layer null-space dimension against tau"))
        parts.append(_figure("plot-spectrum", spectrum_plot(audit.eigenvalues, audit.spectrum_layers), "Gram eigenvalue spectrum: " + ", ".join(audit.spectrum_layers)))
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head>\n<body>\n{body}\n<script>{SCRIPT}</script>\n</body></html>\n")


def check_html_path(path: str | Path, inputs: list, flag: str = "--html", *, force: bool = False) -> Path:
    """Validate a page path before any work is done: like ``-o``, an existing page is
    replaced only with ``force``.

    Raises:
        OutputError: the path is one of ``inputs`` (also through a link), exists without
            ``force``, is a folder, does not end in ``.html``/``.htm``, its folder does not exist
            or is not writable, or its temporary name would be too long for the file system.
    """
    out = Path(path)
    resolved = resolve_output(out, flag)
    for i in inputs:
        if i is not None and (resolved == Path(i).resolve() or (out.exists() and Path(i).exists() and os.path.samefile(out, i))):
            raise OutputError(f"{flag} {path} would overwrite {i}", hint="teleport-cli never writes over an input or the checkpoint it writes; choose another page name")
    if out.suffix.lower() not in (".html", ".htm"):
        raise OutputError(f"{flag} {path} must end in .html", hint=f"e.g. {flag} report.html")
    if out.is_dir():
        raise OutputError(f"{flag} {path} is a folder", hint="pass a file path ending in .html")
    if (out.exists() or out.is_symlink()) and not force:
        raise OutputError(f"{flag} {path} already exists", hint="pass --force to replace it, or choose another page name")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"folder {parent} of {flag} does not exist", hint=f"create it first: mkdir -p {parent}")
    if not writable(parent):
        raise OutputError(f"folder {parent} of {flag} is not writable", hint="choose another page path or fix the permissions")
    check_name_length(out, flag)
    return out


def write_html(path: str | Path, page: str, inputs: list, *, force: bool = False, flag: str = "--html") -> Path:
    """Check the path (:func:`check_html_path`) and write the page atomically
    (:func:`teleport_cli.checkpoints.atomic.write_file_atomic`: locked temporary beside it,
    fsync, published without replacing anything unless ``force``).

    Raises:
        OutputError: a refused path (see :func:`check_html_path`), a page that appeared
            meanwhile (without ``force``), or a failed write (a full disk: "no space left").
    """
    out = check_html_path(path, inputs, flag, force=force)
    write_file_atomic(out, lambda tmp: tmp.write_text(page, encoding="utf-8"), force=force)
    return out
