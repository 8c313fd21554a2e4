"""``teleport inspect``: what each layer offers at tau, without moving anything."""

from __future__ import annotations

import json

import click
from rich.table import Table

from ..config import DEVICES, TeleportConfig
from ..errors import TeleportError
from .common import EXIT_CODES_HELP, fail, model_options, stderr_console, weight_options

D = TeleportConfig()


def _table(doc: dict) -> Table:
    t = Table(title=f"teleport inspect: {doc['arch']}, {doc['samples']} samples, tau {doc['tau']:g}", title_justify="left")
    for col, just in [("layer", "left"), ("kind", "left"), ("d_in", "right"), ("groups", "right"), ("rows", "right"),
                      ("rank", "right"), ("null dim", "right"), ("teleport", "left")]:
        t.add_column(col, justify=just)
    for l in doc["layers"]:
        verdict = "[green]yes[/]" if l["teleported"] else f"no: {l['reason']}"
        shape = (str(l["d_in"]), str(l["groups"]), str(l["rows"]), str(l["rank"]), str(l["null_dim"])) if l["d_in"] else ("-",) * 5
        t.add_row(l["name"], l["kind"], *shape, verdict)
    return t


@click.command(epilog=EXIT_CODES_HELP)
@click.argument("checkpoint", type=click.Path())
@click.option("--data", "data", required=True, type=click.Path(), help="Calibration set: tensor file, token file, text file or image folder (see README).")
@click.option("--tau", type=float, default=D.tau, show_default=True, help="Input energy kept invariant per layer; 1 = exact null space.")
@click.option("--batch-size", type=int, default=D.batch_size, show_default=True, help="Calibration samples per forward pass.")
@click.option("--device", type=click.Choice(DEVICES), default=D.device, show_default=True, help="auto takes a GPU when present.")
@click.option("--layers", "layer_globs", multiple=True, metavar="GLOB", help="Only the layers matching this fnmatch glob would move (as in `teleport apply`); repeatable.")
@click.option("--exclude", "exclude_globs", multiple=True, metavar="GLOB", help="The layers matching this glob would not move; repeatable; wins over --layers.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No table on stderr.")
@weight_options("inspect")
@model_options
def inspect(checkpoint, data, tau, batch_size, device, layer_globs, exclude_globs, as_json, quiet, weights, trust_pickle, model_spec, model_kwargs) -> None:
    """One row per layer of CHECKPOINT on the calibration set: kind, d_in, rank of its Gram,
    null-space dimension at --tau, and whether it will be teleported (or why not)."""
    from ..audit.survey import inspect_checkpoint

    try:
        doc = inspect_checkpoint(checkpoint, data, tau, batch_size=batch_size, device=device, weights=weights, trust_pickle=trust_pickle,
                                 model_spec=model_spec, model_kwargs=model_kwargs,
                                 layers=layer_globs, exclude=exclude_globs).to_dict()
        doc["weights"] = weights
    except TeleportError as e:
        fail(e, as_json)
    if not quiet:
        err = stderr_console()
        err.print(_table(doc))
        err.print(f"{doc['teleportable']} of {len(doc['layers'])} layers will be teleported at tau {tau:g}", highlight=False)
    if as_json:
        click.echo(json.dumps(doc, indent=2))
    else:
        click.echo(f"{doc['teleportable']}/{len(doc['layers'])}")
