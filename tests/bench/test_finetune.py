"""Smoke version of bench/finetune.py: its smallest cell (test_resnet, head only, SGD) with a tiny K,
and every figure of the report recomputed independently from the recorded runs and starts."""

import importlib
import json
import math
import statistics
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        ft, fr = importlib.import_module("finetune"), importlib.import_module("finetune_report")
    finally:
        sys.path.remove(str(ROOT / "bench"))
    out = tmp_path_factory.mktemp("finetune")
    saved = (ft.OUT, fr.OUT, ft.SCENARIOS, ft.SEEDS, ft.LR_GRID, ft.TELEPORT, ft.GEOMETRY)
    ft.OUT = fr.OUT = out
    ft.SCENARIOS = {"resnet": ("fmnist_test_resnet_converged.safetensors", "fc", "ce", 8, 16)}
    ft.SEEDS, ft.LR_GRID = (0, 1), {"sgd": (0.03, 0.1)}
    ft.TELEPORT = ft.TELEPORT.replace(steps=3)
    ft.GEOMETRY = {"iterations": 3, "probes": 2}
    base, data = ft.load_scenario("resnet")
    doc = ft.run_cell("resnet", "head", "sgd", seeds=(0, 1), variants=("none", "lookahead", "random", "none_2lr"), base=base, data=data)
    yield ft, fr, doc, base, data, out
    ft.OUT, fr.OUT, ft.SCENARIOS, ft.SEEDS, ft.LR_GRID, ft.TELEPORT, ft.GEOMETRY = saved


def test_digits_are_preprocessed_as_the_backbone_expects(bench):
    from sklearn.datasets import load_digits

    ft, _, _, _, data, _ = bench
    d = load_digits()
    x = data["train"].inputs
    assert x.shape[1:] == (1, 28, 28) and len(data["train"]) + len(data["holdout"]) == len(d.target)
    blank = (0.0 - 0.2860) / 0.3530  # the digits' zero background, normalised like Fashion-MNIST
    assert float(x.min()) == pytest.approx(blank, abs=1e-5) and float(x.max()) == pytest.approx((1 - 0.2860) / 0.3530, abs=1e-4)
    assert torch.equal(data["calibration"].inputs, x[:256])


def test_lr_is_the_grid_point_with_the_lowest_mean_holdout_loss(bench):
    _, _, doc, _, _, _ = bench
    grid = {lr: statistics.fmean(v for v in [doc["lr_grid"][f"{lr:g}"]]) for lr in (0.03, 0.1)}
    assert doc["lr"] == min(grid, key=grid.get)
    assert [r["lr"] for r in doc["runs"]["none_2lr"]] == [2 * doc["lr"]] * 2


def test_steps_to_target_and_net_ratio_recomputed_from_the_curves(bench):
    _, fr, doc, _, _, _ = bench
    k, w = doc["K"], max(1, doc["K"] // 10)
    rows = fr.per_seed(doc)
    for v, runs in doc["runs"].items():
        for i, r in enumerate(runs):
            ref = doc["runs"]["none"][i]
            target = sum(ref["train"][-w:]) / w
            brute = next((t + 1 for t in range(w - 1, k) if sum(r["train"][t - w + 1 : t + 1]) / w <= target), None)
            assert rows[v][i]["steps"] == brute
            eq = doc["starts"][v][i]["cpu_seconds"] * k / ref["cpu_seconds"]
            assert rows[v][i]["equivalent"] == pytest.approx(eq)
            assert rows[v][i]["net"] == (None if brute is None else pytest.approx((brute + eq) / k))
            assert rows[v][i]["held"] == r["holdout"][-1][1]
    assert rows["none"][0]["steps"] is not None  # the original reaches its own final loss


def test_start_holdout_loss_and_head_init_independently(bench):
    ft, _, doc, base, data, _ = bench
    for seed in (0, 1):
        m = ft.start_model("resnet", "head", seed, base).double()
        with torch.no_grad():
            logits = m(data["holdout"].inputs.double())
        ce = F.cross_entropy(logits, data["holdout"].targets).item()
        assert doc["runs"]["none"][seed]["holdout"][0][1] == pytest.approx(ce, rel=1e-5)
        assert doc["runs"]["none_2lr"][seed]["holdout"][0][1] == pytest.approx(ce, rel=1e-5)  # same head init per seed
    a, b = (ft.start_model("resnet", "head", s, base).fc.weight for s in (0, 1))
    assert not torch.equal(a, b)


def test_head_teleport_moves_only_the_head_and_random_has_its_norm(bench):
    ft, _, doc, base, data, out = bench
    start = ft.start_model("resnet", "head", 0, base)
    la = torch.load(out / "starts" / f"resnet__head__lookahead__seed0__lr{doc['lr']:g}.pt", weights_only=True)
    rnd = torch.load(out / "starts" / f"resnet__head__random__seed0__lr{doc['lr']:g}.pt", weights_only=True)
    s0 = start.state_dict()
    assert all(torch.equal(s0[k], la[k]) and torch.equal(s0[k], rnd[k]) for k in s0 if not k.startswith("fc."))
    d_la, d_rnd = la["fc.weight"] - s0["fc.weight"], rnd["fc.weight"] - s0["fc.weight"]
    assert float(d_la.norm()) > 0 and float(d_rnd.norm()) == pytest.approx(float(d_la.norm()), rel=1e-5)
    assert abs(float((d_la.flatten() @ d_rnd.flatten()) / (d_la.norm() * d_rnd.norm()))) < 0.9
    x, y = data["calibration"].inputs.double(), data["calibration"].targets
    with torch.no_grad():
        losses = []
        for sd in (s0, la, rnd):
            start.load_state_dict(sd)
            losses.append(F.cross_entropy(start.double()(x), y).item())
            start.float()
    assert losses[1] == pytest.approx(losses[0], rel=1e-2) and losses[2] == pytest.approx(losses[0], rel=2e-2)


def test_gain_rule_against_hand_computation(bench):
    _, fr, _, _, _, _ = bench
    base, other, rnd = [1.0, 1.1, 0.9, 1.05, 0.95], [0.5, 0.6, 0.4, 0.55, 0.45], [0.7, 0.3, 0.8, 0.9, 0.9]
    t = fr.gain_test(base, other, rnd)
    sd = statistics.stdev(base)  # both sets have the same spread
    assert t["gain"] == pytest.approx(0.5) and t["pooled_sd"] == pytest.approx(math.sqrt((sd**2 + sd**2) / 2))
    assert t["beats_random"] == 4 and t["passed"]
    assert not fr.gain_test(base, other, [0.1] * 5)["passed"]  # worse than random everywhere
    assert not fr.gain_test(base, [b - 0.01 for b in base], rnd)["passed"]  # gain below 2 pooled sd
    assert not fr.gain_test(base, [None] + other[1:], rnd)["passed"]


def test_cached_cell_resumes_without_recomputing(bench):
    ft, _, doc, base, data, _ = bench
    again = ft.run_cell("resnet", "head", "sgd", seeds=(0, 1), variants=("none", "lookahead", "random", "none_2lr"), base=base, data=data)
    assert json.loads(json.dumps(again)) == json.loads(json.dumps(doc))  # every run and start read back from the cache
    fresh = ft.finetune(ft.start_model("resnet", "head", 1, base), data, "head", "sgd", doc["lr"], doc["K"], doc["batch"], 1, "ce")
    assert fresh["train"] == doc["runs"]["none"][1]["train"] and fresh["holdout"] == doc["runs"]["none"][1]["holdout"]  # deterministic per seed
