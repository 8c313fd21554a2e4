"""``teleport report``: audit one checkpoint, or a second one against it; gate on invariance."""

from __future__ import annotations

import json
import sys

import click
from rich.table import Table
from rich.text import Text

from ..audit.settings import AuditSettings
from ..config import DEVICES, SEED_RANGE
from ..errors import EXIT_VERIFICATION_FAILED, TeleportError
from .common import EXIT_CODES_HELP, fail, model_options, stderr_console, weight_options

D = AuditSettings()


def _f(v, spec=".4g") -> str:
    return "–" if v is None else format(v, spec)


def datasets_table(doc: dict) -> Table:
    sets = doc["datasets"]
    t = Table(title="teleport report: B against A", title_justify="left")
    t.add_column("")
    for name in sets:
        t.add_column(name, justify="right")
    rows = [("samples", "samples", "d"), ("loss A", "loss_a", ".6f"), ("loss B", "loss_b", ".6f"), ("loss B − A", "loss_diff", "+.3e"),
            ("relative drift", "relative_loss_drift", ".3e"), ("tolerance", "tolerance", "g"), ("accuracy A", "accuracy_a", ".4f"),
            ("accuracy B", "accuracy_b", ".4f"), ("accuracy B − A", "accuracy_diff", "+.4f"), ("max |Δlogit|", "max_abs_logit_diff", ".3g"),
            ("mean |Δlogit|", "mean_abs_logit_diff", ".3g")]
    for label, key, spec in rows:
        t.add_row(label, *[_f(c[key], spec) for c in sets.values()])
    t.add_row("gate", *["[green]pass[/]" if c["passed"] else "[red]FAIL[/]" for c in sets.values()])
    return t


def layers_table(doc: dict) -> Table:
    two = doc["b"] is not None
    t = Table(title="layers (null space of A on the calibration set)", title_justify="left")
    cols = ["layer", "kind", "d_in", "rank", f"null dim @ tau {doc['settings']['tau']:g}"] + (["output drift", "ΔW/W"] if two else []) + ["note"]
    for col in cols:
        t.add_column(col, justify="left" if col in ("layer", "kind", "note") else "right")
    for l in doc["layers"]:
        row = [l["name"], l["kind"], _f(l["d_in"], "d"), _f(l["rank"], "d"), _f(l["null_dim"], "d")]
        if two:
            row += [_f(l["output_drift"], ".3g"), _f(l["rel_weight_change"], ".3g")]
        t.add_row(*row, l["note"])
    return t


def geometry_table(doc: dict) -> Table:
    geo = doc["geometry"]
    t = Table(title="geometry on the calibration set", title_justify="left")
    t.add_column("")
    for k in geo:
        t.add_column(k.upper(), justify="right")
    rows = [("loss", "loss", ".6f"), ("gradient norm", "grad_norm", ".4g"), ("top Hessian eigenvalue", "top_eigenvalue", ".4g"),
            ("  (Lanczos residual)", "eigenvalue_residual", ".1e"), ("Hessian trace (Hutchinson)", "trace", ".4g"),
            ("  (standard error)", "trace_stderr", ".2g"), (f"SAM sharpness (radius {geo['a']['sharpness_radius']:g})", "sharpness", ".3e")]
    for label, key, spec in rows:
        t.add_row(label, *[_f(geo[m][key], spec) for m in geo])
    return t


def render(doc: dict) -> None:
    err = stderr_console()
    if doc["datasets"]:
        err.print(datasets_table(doc))
    err.print(layers_table(doc))
    err.print(geometry_table(doc))
    st = doc["stability"]
    if st is not None:
        for k in doc["geometry"]:
            s = st[k]
            if s["unstable"] is None:
                continue
            word = "[red]UNSTABLE[/]" if s["unstable"] else "[green]stable[/]"
            err.print(f"stability {k.upper()}: λmax {s['top_eigenvalue']:.4g} {'>' if s['unstable'] else '≤'} 2(1+β)/lr = {st['edge']:.4g} "
                      f"(lr {st['lr']:g}, β {st['momentum']:g}): {word}", highlight=False)
        err.print(f"note: {st['note']}", highlight=False)
    inv = doc["invariance"]
    if inv["passed"] is not None:
        word = "[green]pass[/]" if inv["passed"] else "[red]FAIL[/]"
        err.print(f"invariance: {word} ({inv['rule']}; noise floor {inv['noise_floor']:.2g}; checked: {', '.join(inv['checked'])})", highlight=False)


@click.command(epilog=EXIT_CODES_HELP.replace("(loss changed beyond tolerance; nothing written)", "(loss changed beyond tolerance)"))
@click.argument("a", type=click.Path())
@click.argument("b", type=click.Path(), required=False)
@click.option("--data", "data", required=True, type=click.Path(), help="Calibration set: any data apply reads (tensor or token file, text, image folder).")
@click.option("--holdout", type=click.Path(), default=None, help="Held-out set, compared and gated too.")
@click.option("--lr", type=float, default=None, help="SGD learning rate: flag a top eigenvalue above 2(1+momentum)/lr.")
@click.option("--momentum", type=float, default=D.momentum, show_default=True, help="Heavy-ball momentum beta of that SGD.")
@click.option("--tolerance", type=float, default=D.tolerance, show_default=True, help="Allowed relative calibration-loss drift of B against A.")
@click.option("--holdout-tolerance", type=float, default=D.holdout_tolerance, show_default=True, help="Allowed relative held-out-loss drift.")
@click.option("--tau", type=float, default=D.tau, show_default=True, help="Input energy kept invariant, for the null-space dimension.")
@click.option("--radius", type=float, default=D.radius, show_default=True, help="SAM sharpness radius (L2, parameter units).")
@click.option("--iterations", type=int, default=D.iterations, show_default=True, help="Lanczos steps at most (top eigenvalue).")
@click.option("--probes", type=int, default=D.probes, show_default=True, help="Hutchinson probes (trace).")
@click.option("--spectrum-layer", "spectrum_layers", multiple=True, help="Layer whose Gram spectrum is plotted (repeatable; default first, middle, last).")
@click.option("--seed", type=click.IntRange(*SEED_RANGE), default=D.seed, show_default=True, help="Seed of the Lanczos start and the probes.")
@click.option("--batch-size", type=int, default=D.batch_size, show_default=True, help="Samples per forward pass.")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True, help="auto takes a GPU when present.")
@click.option("--html", "html_out", type=click.Path(dir_okay=False), default=None, help="Write a self-contained HTML page with plots.")
@click.option("--force", is_flag=True, help="Replace an existing --html page (atomically).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No tables on stderr.")
@weight_options("audit (the same set of A and B)")
@model_options
def report(a, b, data, holdout, lr, momentum, tolerance, holdout_tolerance, tau, radius, iterations, probes, spectrum_layers,
           seed, batch_size, device, html_out, force, as_json, quiet, weights, trust_pickle, model_spec, model_kwargs) -> None:
    """Audit checkpoint A, or checkpoint B against A: losses, logits, layer drift, curvature.

    With B, exits 4 when B's loss drifts from A's beyond --tolerance (calibration) or
    --holdout-tolerance (held-out), by the rule of `teleport apply`.
    """
    from ..audit.html import check_html_path, write_html
    from ..audit.html import render as render_html
    from ..audit.report import report as run_report

    try:
        settings = AuditSettings(tau=tau, tolerance=tolerance, holdout_tolerance=holdout_tolerance, lr=lr, momentum=momentum,
                                 iterations=iterations, probes=probes, radius=radius, seed=seed, batch_size=batch_size,
                                 spectrum_layers=tuple(spectrum_layers))
        inputs = [a, b, data, holdout]
        if html_out is not None:
            check_html_path(html_out, inputs, force=force)
        audit = run_report(a, b, data, holdout, settings, device=device, weights=weights, trust_pickle=trust_pickle,
                           model_spec=model_spec, model_kwargs=model_kwargs)
        if html_out is not None:
            audit.doc["html"] = str(write_html(html_out, render_html(audit), inputs, force=force))
    except TeleportError as e:
        fail(e, as_json)
    doc = audit.doc
    if not quiet:
        render(doc)
        if html_out is not None:
            stderr_console().print(f"wrote {doc['html']}", highlight=False)
    if as_json:
        click.echo(json.dumps(doc, indent=2))
    if audit.passed is False:
        failed = [k for k, c in doc["datasets"].items() if not c["passed"]]
        stderr_console().print(Text.assemble(("error: ", "bold red"), f"invariance failed on {', '.join(failed)}: loss drift beyond tolerance"), soft_wrap=True)
        sys.exit(EXIT_VERIFICATION_FAILED)
