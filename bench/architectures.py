"""Coverage sweep over timm's ``test_*`` models: teleport each at tau = 1 on a few samples.

Each model is built with random init (seeded), a small input (32x32 RGB) and 3 classes, then
teleported with the library API on ``SAMPLES`` calibration images, so few that the layers have
exact null spaces (rows are samples x positions for convs, samples x tokens for
transformers). An architecture counts as teleported when the weights moved AND
``max |logit difference| <= 1e-4 * max |logit|`` on the calibration set (float32).

    PYTHONPATH=. python bench/architectures.py            # writes docs/architectures.md
    PYTHONPATH=. python bench/architectures.py --print    # the table on stdout only

tests/test_architectures.py runs the same :func:`sweep_one` on every model.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch

from teleport_cli import TeleportConfig, teleport
from teleport_cli.layers import find_layers

SIZE = 32
CLASSES = 3
SAMPLES = 2
LOGIT_RTOL = 1e-4
CONFIG = TeleportConfig(tau=1.0, steps=2, step_size=0.01, max_step=0.5, tolerance=1e-4, holdout_tolerance=1e9, device="cpu")


@dataclass
class SweepRow:
    arch: str
    teleported_layers: int = 0
    layers: int = 0
    excluded: Counter = field(default_factory=Counter)
    max_logit_diff: float = float("nan")
    max_logit: float = float("nan")
    moved: float = 0.0
    steps: int = 0
    stop: str = ""
    error: str = ""
    seconds: float = 0.0
    verified: bool = False
    changed_keys: tuple[str, ...] = ()  # state-dict entries that differ bitwise from the original
    allowed_keys: tuple[str, ...] = ()  # weights of the layers allowed to move

    @property
    def logits_kept(self) -> bool:
        return self.max_logit_diff <= LOGIT_RTOL * self.max_logit

    @property
    def teleported(self) -> bool:
        return not self.error and self.logits_kept and self.moved > 0


def build(arch: str, seed: int = 0) -> torch.nn.Module:
    """A timm model with random init for 32x32 RGB inputs and 3 classes."""
    torch.manual_seed(seed)
    try:
        return timm.create_model(arch, pretrained=False, num_classes=CLASSES, img_size=SIZE)
    except TypeError:  # CNNs take any input size and no img_size argument
        return timm.create_model(arch, pretrained=False, num_classes=CLASSES)


def sweep_one(arch: str, seed: int = 0) -> SweepRow:
    """Teleport one architecture and measure the logit change on the calibration set."""
    start = time.perf_counter()
    row = SweepRow(arch)
    model = build(arch, seed).eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SAMPLES + 2, 3, SIZE, SIZE, generator=g)
    y = torch.randint(0, CLASSES, (SAMPLES + 2,), generator=g)
    cal, hold = (x[:SAMPLES], y[:SAMPLES]), (x[SAMPLES:], y[SAMPLES:])
    out = teleport(model, cal, CONFIG, holdout=hold)
    with torch.no_grad():
        before, after = model(cal[0]), out.model(cal[0])
    row.max_logit_diff = float((after - before).abs().max())
    row.max_logit = float(before.abs().max())
    moving = [l for l in out.layers if l.teleported]
    row.teleported_layers = len(moving)
    row.layers = len(out.layers)
    for l in out.layers:
        if not l.teleported:
            row.excluded[l.reason.split(":")[0].split(" (")[0]] += 1
    row.moved = max((l.rel_weight_change for l in moving), default=0.0)
    row.steps, row.stop = out.stats.steps_accepted, out.stats.stop_reason
    row.verified = out.verified
    keys = {spec.name: spec.weight_key for spec, _ in find_layers(model)[0]}
    row.allowed_keys = tuple(keys[l.name] for l in moving)
    new = out.model.state_dict()
    row.changed_keys = tuple(k for k, v in model.state_dict().items() if not torch.equal(v, new[k]))
    row.seconds = time.perf_counter() - start
    return row


def table(rows: list[SweepRow]) -> str:
    lines = [
        "| architecture | result | layers teleported | excluded (count: reason) | max \\|Δlogit\\| / max \\|logit\\| | max ΔW/W | steps |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        result = "teleported" if r.teleported else ("refused: " + (r.error or ("logits changed" if not r.logits_kept else "no step")))
        ex = "; ".join(f"{n}: {why}" for why, n in sorted(r.excluded.items(), key=lambda t: -t[1])) or "none"
        lines.append(
            f"| `{r.arch}` | {result} | {r.teleported_layers} / {r.layers} | {ex} | "
            f"{r.max_logit_diff / max(r.max_logit, 1e-30):.1e} | {r.moved:.3g} | {r.steps} ({r.stop}) |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--print", action="store_true", help="print the table instead of writing docs/architectures.md")
    parser.add_argument("--models", default="test_*", help="timm name pattern")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for arch in timm.list_models(args.models):
        try:
            rows.append(sweep_one(arch))
        except Exception as e:  # reported in the table, not hidden
            rows.append(SweepRow(arch, error=f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"))
        r = rows[-1]
        print(f"{arch}: {'ok' if r.teleported else 'REFUSED'} {r.max_logit_diff:.2e}/{r.max_logit:.2e} moved {r.moved:.3g} {r.seconds:.1f}s", flush=True)
    text = table(rows)
    if args.print:
        print(text)
        return
    print(text)


if __name__ == "__main__":
    main()
