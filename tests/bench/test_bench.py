"""The benchmark's figures against brute force, and its determinism."""

import json
import statistics

import pytest
import torch
from click.testing import CliRunner

from teleport_cli.bench.resume import resume, smoothed, steps_to_target
from teleport_cli.bench.settings import BenchSettings
from teleport_cli.cli import cli
from teleport_cli.data.tensors import load_tensor_data
from teleport_cli.models.loading import load_model


def test_smoothed_and_steps_to_target_match_brute_force():
    g = torch.Generator().manual_seed(0)
    curve = (torch.linspace(2, 0.5, 60) + 0.2 * torch.rand(60, generator=g)).tolist()
    for w in (1, 3, 6):
        s = smoothed(curve, w)
        assert s == pytest.approx([statistics.fmean(curve[t - w + 1 : t + 1]) for t in range(w - 1, 60)])
        for target in (1.5, 1.0, 0.7, 0.1):
            brute = next((t + 1 for t in range(w - 1, 60) if statistics.fmean(curve[t - w + 1 : t + 1]) <= target), None)
            assert steps_to_target(curve, target, w) == brute


def test_resume_is_deterministic_per_seed_and_seeds_differ(samples):
    model = load_model(samples / "mlp_digits_mid.safetensors")[0]
    train = load_tensor_data(samples / "digits_train.safetensors")
    hold = load_tensor_data(samples / "digits_holdout.safetensors")
    s = BenchSettings(steps=12, holdout_every=6)
    a, b, c = (resume(model, train, hold, s, seed) for seed in (0, 0, 1))
    assert a.train == b.train and a.holdout == b.holdout
    assert a.train != c.train
    # the first recorded loss is the minibatch loss of the original weights on seed 0's first batch
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:32]
    with torch.no_grad():
        first = torch.nn.functional.cross_entropy(model(train.inputs[idx]), train.targets[idx]).item()
    assert a.train[0] == pytest.approx(first, rel=1e-6)
    assert a.holdout[0] == (0, pytest.approx(torch.nn.functional.cross_entropy(model(hold.inputs), hold.targets).item(), rel=1e-6))
    assert [h[0] for h in a.holdout] == [0, 6, 12]


def test_bench_cli_json_and_plots(samples, tmp_path):
    out = tmp_path / "b"
    r = CliRunner().invoke(cli, ["bench", str(samples / "mlp_digits_mid.safetensors"), "--data", str(samples / "digits_train.safetensors"),
                                 "--holdout", str(samples / "digits_holdout.safetensors"), "--steps", "20", "--seeds", "2",
                                 "--variants", "original,random", "--teleport-steps", "5", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert set(doc["variants"]) == {"original", "random"}
    v = doc["variants"]["random"]
    orig = doc["variants"]["original"]
    assert len(v["steps_to_target_ratio_per_seed"]) == 2
    assert v["teleport_equivalent_steps"] == pytest.approx(v["teleport_seconds"] / orig["seconds_per_step"])
    assert len(orig["train_curve_mean"]) == 20 and orig["final_loss_mean"] == pytest.approx(
        statistics.fmean(orig["train_curve_mean"][-2:]), rel=1e-9)
    assert (out / "train_loss.png").read_bytes()[:4] == b"\x89PNG" and (out / "holdout_loss.png").exists()
    assert json.loads((out / "bench.json").read_text())["variants"].keys() == doc["variants"].keys()


def test_bench_table_and_random_cost(samples, monkeypatch):
    """The table prints the original's own steps_to_target_ratio (mean of the JSON's per-seed values),
    not 1; the random variant costs its Grams and bases (each basis made 30 ms slower here), not 0."""
    import time

    import teleport_cli.pipeline as pipeline

    real = pipeline.layer_basis
    slowed = []

    def slow(*a, **k):
        time.sleep(0.03)
        slowed.append(a[0])
        return real(*a, **k)

    monkeypatch.setattr(pipeline, "layer_basis", slow)
    r = CliRunner().invoke(cli, ["bench", str(samples / "mlp_digits_mid.safetensors"), "--data", str(samples / "digits_train.safetensors"),
                                 "--holdout", str(samples / "digits_holdout.safetensors"), "--steps", "20", "--seeds", "2",
                                 "--variants", "original,nullspace,random", "--teleport-steps", "3", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    v = doc["variants"]
    assert slowed  # the bases were computed through the slowed function
    assert v["random"]["teleport_seconds"] >= 0.03 * len(slowed)
    assert v["random"]["grams_and_bases_seconds"] >= 0.03 * len(slowed)
    assert v["random"]["teleport_seconds"] < v["nullspace"]["teleport_seconds"]  # the ascent is not part of it
    per = v["original"]["self_steps_to_target_ratio_per_seed"]
    own = statistics.fmean(per)
    assert v["original"]["self_steps_to_target_ratio"] == pytest.approx(own, rel=1e-12)
    assert own < 1  # on 20 noisy steps the original touches its own final loss early
    row = next(line for line in r.stderr.splitlines() if line.strip("│ ").startswith("original"))
    cells = [c.strip() for c in row.split("│") if c.strip()]
    assert cells[3] == f"{own:.3f}"
    rand = next(line for line in r.stderr.splitlines() if line.strip("│ ").startswith("random"))
    assert [c.strip() for c in rand.split("│") if c.strip()][4] == f"{v['random']['teleport_seconds']:.2f}" != "0.00"
