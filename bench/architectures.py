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
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch

from teleport_cli import TeleportConfig, teleport
from teleport_cli.nullspace.selection import find_layers

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
    layer_rows: tuple = ()  # the LayerSummary of every layer

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
    row.layer_rows = out.layers
    keys = {spec.name: spec.weight_key for spec, _ in find_layers(model)[0]}
    row.allowed_keys = tuple(keys[l.name] for l in moving)
    new = out.model.state_dict()
    row.changed_keys = tuple(k for k, v in model.state_dict().items() if not torch.equal(v, new[k]))
    row.seconds = time.perf_counter() - start
    return row


def table(rows: list[SweepRow]) -> str:
    lines = [
        "| architecture | result | layers teleported (moved) / all | excluded (count: reason) | max \\|Δlogit\\| / max \\|logit\\| | max ΔW/W | steps |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        result = "teleported" if r.teleported else ("refused: " + (r.error or ("logits changed" if not r.logits_kept else "no step")))
        ex = "; ".join(f"{n}: {why}" for why, n in sorted(r.excluded.items(), key=lambda t: -t[1])) or "none"
        lines.append(
            f"| `{r.arch}` | {result} | {r.teleported_layers} ({sum(l.rel_weight_change > 0 for l in r.layer_rows)}) / {r.layers} | {ex} | "
            f"{r.max_logit_diff / max(r.max_logit, 1e-30):.1e} | {r.moved:.3g} | {r.steps} ({r.stop}) |"
        )
    return "\n".join(lines)


def fast_path_noise(seed: int = 0) -> list[tuple[str, float, float, float]]:
    """How far nn.TransformerEncoderLayer's paths differ in eval mode (float32, CPU).

    Without hooks, under ``no_grad``, the layer runs the fused
    ``torch._transformer_encoder_layer_fwd`` (verification, noise-floor runs); with a forward
    hook attached (capture) it runs module by module but keeps MultiheadAttention's own fast
    path; with grad enabled (the teleport loop's gradient passes) it runs the plain path.

    Returns:
        ``(setting, fast vs hooked, fast vs grad path, loss difference fast vs grad path)``,
        the first two as max |difference| / max |output|, the last relative to the loss.
    """
    torch.manual_seed(seed)
    out = []
    for d, heads, tokens, norm_first in ((16, 2, 5, False), (64, 4, 17, False), (64, 4, 17, True), (256, 8, 65, True)):
        layer = torch.nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=norm_first).eval()
        head = torch.nn.Linear(d, 10)
        x = torch.randn(32, tokens, d)
        y = torch.randint(0, 10, (32,))
        with torch.no_grad():
            fast = layer(x)
            handle = layer.linear1.register_forward_hook(lambda *a: None)
            hooked = layer(x)
            handle.remove()
        grad_path = layer(x).detach()
        with torch.no_grad():
            lf = torch.nn.functional.cross_entropy(head(fast.mean(1)), y).item()
            lg = torch.nn.functional.cross_entropy(head(grad_path.mean(1)), y).item()
        scale = float(grad_path.abs().max())
        out.append((
            f"d_model {d}, {heads} heads, {tokens} tokens, norm_first={norm_first}",
            float((fast - hooked).abs().max()) / scale, float((fast - grad_path).abs().max()) / scale, abs(lf - lg) / abs(lg),
        ))
    return out


def modules_section() -> str:
    """The section of the module sweep (bench/timm_modules.py), from its cached or recorded rows."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import timm_modules

    return MODULES_DOC.format(
        modules=timm_modules.section(), cal=timm_modules.CAL, hold=timm_modules.HOLD, mod_steps=timm_modules.STEPS,
        max_params=timm_modules.MAX_PARAMS, cpu_limit=timm_modules.CPU_LIMIT, flags=" ".join(timm_modules.FLAGS),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--print", action="store_true", help="print the table instead of writing docs/architectures.md")
    parser.add_argument("--models", default="test_*", help="timm name pattern")
    parser.add_argument("--modules-only", action="store_true", help="only refresh the module sweep's section of docs/architectures.md")
    args = parser.parse_args()
    path = Path(__file__).resolve().parents[1] / "docs" / "architectures.md"
    if args.modules_only:
        text = path.read_text()
        head = "## Coverage sweep: the smallest model of every `timm.models` module"
        b = text.index("## Noise floor of `nn.TransformerEncoderLayer`")
        a = text.index(head) if head in text else b  # a page written before the module sweep: insert it
        path.write_text(text[:a] + modules_section() + text[b:])
        print(f"wrote {path}", file=sys.stderr)
        return
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
    noise = fast_path_noise()
    noise_text = "\n".join(
        ["| setting (batch 32, float32, CPU) | fast vs hooked: max \\|Δ\\| / max \\|output\\| | fast vs grad path: max \\|Δ\\| / max \\|output\\| | fast vs grad path: relative loss difference |", "| --- | --- | --- | --- |"]
        + [f"| {s} | {h:.1e} | {g:.1e} | {l:.1e} |" for s, h, g, l in noise]
    )
    if args.print:
        print(text + "\n\n" + noise_text)
        return
    done = sum(r.teleported for r in rows)
    doc = DOC.format(
        modules_section=modules_section(), done=done, total=len(rows), share=done / len(rows), table=text, noise=noise_text,
        size=SIZE, classes=CLASSES, samples=SAMPLES, steps=CONFIG.steps, step_size=CONFIG.step_size,
        seconds=sum(r.seconds for r in rows), timm=timm.__version__, torch=torch.__version__,
    )
    path.parent.mkdir(exist_ok=True)
    path.write_text(doc)
    print(f"wrote {path}", file=sys.stderr)


DOC = """# Architectures

`teleport` finds the layers to move from module types, with no per-architecture code
(`teleport_cli/nullspace/layers.py`, `teleport_cli/nullspace/attention.py`):

| module | rows of X (one Gram per block) | moved weight |
| --- | --- | --- |
| `nn.Linear` (MLP blocks, classifier heads, timm's fused `qkv` and attention `proj`) | one per sample and token | `weight` |
| `nn.Conv1d`, `nn.Conv2d`, `nn.Conv3d` | one per sample and output position: the unfolded patch, with the conv's padding (zeros, `'same'`, reflect, circular), stride and dilation | `weight`, one block per group (grouped and depthwise convs) |
| `nn.MultiheadAttention` | q, k and v blocks of `in_proj_weight`: the query, key and value tokens (equal Grams in self-attention, separate ones in cross-attention); `out_proj`: the attention output before `out_proj`, recomputed in the hook by rerunning the module with `W_o = I` | `in_proj_weight` (or `q/k/v_proj_weight`), `out_proj.weight` |

Left alone, with the reason shown by `teleport apply` and `teleport inspect`: normalisation
layers, embeddings, tied, frozen or parametrized weights (`weight_norm`,
`torch.nn.utils.parametrize`), any other parameter (position embeddings, class tokens,
layer scales, relative position tables), subclasses whose output is not `F.linear`/`F.convNd`
of their input and stored weight (checked on the first calibration batch: timm's `StdConv2d`,
`ScaledStdConv2d`, `Conv2dSame`), a `MultiheadAttention` subclass that overrides `forward`,
a layer whose hook never fired on the calibration set (a dead branch), and a layer whose
null space is empty at the chosen tau. Biases and buffers never change (BatchNorm running
statistics stay bit-identical; the sweep test checks every buffer).

Hessian-vector products run with the math attention backend
(`sdpa_kernel([SDPBackend.MATH])`): the fused CPU kernel
(`_scaled_dot_product_flash_attention_for_cpu`) has no double backward, which a test shows,
and the HVPs through timm's ViT and `nn.MultiheadAttention` match central finite differences
of the gradient to 1e-6 (float64). The gradient pass keeps the default kernels (single
backward works everywhere) and matches finite differences of the loss.

## Coverage sweep: timm `test_*` models

Every model whose name starts with `test_` (timm {timm}, torch {torch}), random init,
{size}x{size} RGB input, {classes} classes, teleported with tau = 1 on {samples} calibration
samples (so that layers have exact null spaces: rows are samples x positions or tokens),
{steps} steps of relative size {step_size}. Teleported means: weights moved AND max |logit
difference| <= 1e-4 x max |logit| on the calibration set (float32).
**{done} of {total} teleported ({share:.0%})**, {seconds:.0f} s of wall time in all on one CPU thread (shared machine).
"teleported" layers are those allowed to move (null space not empty); "moved" counts those
whose weight changed (with exact null spaces a layer whose inputs, outputs and gradient stay
fixed, such as a stem whose upstream has no parameters, gets no ascent direction; and timm
initialises the last layer of each residual branch to zero (`zero_init_last`), so at random
init the squeeze-excitation layers after it in `test_byobnet` and `test_nfnet` see all-zero
inputs: rank 0, every direction null, and a zero gradient).
"excluded" counts every module with parameters that does not move, by reason.
Regenerate with `PYTHONPATH=. python bench/architectures.py`; `tests/test_architectures.py`
runs the same sweep.

{table}

{modules_section}## Noise floor of `nn.TransformerEncoderLayer`'s fast path

`nn.TransformerEncoderLayer` has three paths in eval mode: without hooks under `no_grad` the
fused `torch._transformer_encoder_layer_fwd` (the determinism check and verification run this
for both models); with a forward hook attached anywhere inside it, module by module but with
`nn.MultiheadAttention`'s own fused kernel (the capture); with grad enabled, the plain path
(the teleport loop's gradient passes and drift checks). Measured by `bench/architectures.py`
(random init, float32, CPU): the hooked path is bit-identical to the fused one on CPU, and
the grad path differs from both by float32 roundoff, about 1e-7 of the output and below 1e-6
of the loss: far under every drift gate (`--tolerance` 5e-3, and the 1e-6 absolute slack of
the gate). The loop compares its own grad-path losses with each other and verification
compares fast-path runs with each other, so the paths never meet inside one gate. Not
measured on CUDA (no GPU in this session), where the fused kernels may differ more.

{noise}
"""


MODULES_DOC = """## Coverage sweep: the smallest model of every `timm.models` module

`bench/timm_modules.py` takes, for each module of `timm.list_modules()`, the registered model
with the fewest parameters (counted on the meta device with 10 classes; nothing downloaded),
builds it with random init (seed 0) at its minimum input size (the smallest of 32, 64, 96, ...
pixels, not below the default config's `min_input_size`, at which it builds, with `img_size=`
where the model takes one, and runs a forward pass), and runs `teleport apply` on its state dict
in a child process as `teleport apply MODEL --data CAL --holdout HOLD --model NAME --model-kwargs
JSON {flags}`, that is with the defaults (`--hvp auto`, tau 0.99, `--tolerance`,
`--holdout-tolerance`, the guard) but for the paper's gradient-norm objective (the look-ahead's
default learning rate costs a Lanczos run of up to 20 Hessian-vector products), one batch (no
`--batch-size auto` probes) and {mod_steps} accepted step, on the first {cal} of sklearn's digits as
calibration and the next {hold} as held-out set (bilinearly resized to the input size, 3 channels,
10 classes). **A model passes when the command exits 0 after at least one accepted step**: both
gates, calibration and held-out, passed (a failed gate is exit 4). Models above
{max_params:,} parameters, or whose build or `apply` needs more than {cpu_limit} CPU seconds (the
child's `RLIMIT_CPU`), are listed as skipped with that reason: not run is not passed (a second
pass, `--only ... --max-params 130000000 --cpu-limit 900`, ran some of those skipped by the first;
each row's `cpu_limit` in the record says which cap it ran under; 64 rows come from the tree
before this session's cost and data-parallel merges, the rest from after, NASNet and PNASNet after
the fix for convs that pad inside forward, which crashed them). "grad-norm
gain" is the calibration gradient norm after / before, "drift" the relative loss change, "s" the
wall seconds of the child (build and `apply`) on the shared 2-core machine (several runs at once: not a cost figure;
[docs/cost.md](cost.md) has those). Run with `PYTHONPATH=. OMP_NUM_THREADS=1 python
bench/timm_modules.py` (resumable: results are cached per model in
`bench/results/timm_modules.json`, their rows copied to `docs/bench/timm_modules.json`), then
`python bench/architectures.py` writes this page. A module listed as not run was not reached
in the time the session had: rerunning the first command fills it in.

{modules}

"""


if __name__ == "__main__":
    main()
