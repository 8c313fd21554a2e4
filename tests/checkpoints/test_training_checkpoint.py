"""timm-style training checkpoints (.pth.tar): safe unpickling, EMA and optimizer policy."""

import argparse
import datetime
import json
import pathlib

import pytest
import torch
from _ckpt import CAL, HOLD, MID, MOVABLE, identical, loss64, mid_state, mlp, run
from click.testing import CliRunner
from safetensors.torch import load_file

from teleport_cli.checkpoints.containers import read_checkpoint
from teleport_cli.checkpoints.options import FileOptions
from teleport_cli.cli import cli
from teleport_cli.errors import ConfigError, InputError

SCALER = {"scale": 1024.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000, "_growth_tracker": 7}


def _load(path):
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, weights_only=True)


def _training_checkpoint(path, **extra):
    """What timm's CheckpointSaver writes: a real SGD-momentum optimizer state after one step."""
    torch.manual_seed(3)
    m = mlp(mid_state())
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    d = load_file(str(CAL))
    torch.nn.functional.cross_entropy(m(d["inputs"][:32]), d["targets"][:32]).backward()
    opt.step()
    sd = {k: v.detach().clone() for k, v in m.state_dict().items()}
    ema = {k: v + 0.01 * torch.randn_like(v) for k, v in sd.items()}
    obj = {
        "epoch": 5,
        "arch": "mlp",
        "state_dict": sd,
        "optimizer": opt.state_dict(),
        "version": 2,
        "args": argparse.Namespace(model="mlp", num_classes=10, model_kwargs={"in_features": 64, "hidden": [128, 64]}, lr=0.05, epochs=150),
        "amp_scaler": dict(SCALER),
        "scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=30, gamma=0.1).state_dict(),
        "state_dict_ema": ema,
        "metric": 0.61,
        "saver": {"checkpoint_files": [], "best_epoch": 4, "best_metric": 0.6, "pending": (5, 0.61)},
        **extra,
    }
    torch.save(obj, path)
    return obj


def test_default_moves_state_dict_reseeds_ema_drops_optimizer_keeps_the_rest(tmp_path):
    src, out = tmp_path / "last.pth.tar", tmp_path / "teleported.pth.tar"
    before = _training_checkpoint(src)
    r = CliRunner().invoke(cli, ["apply", str(src), "--data", str(CAL), "--holdout", str(HOLD), "-o", str(out), "--steps", "4", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    after = _load(out)
    assert list(after) == [k for k in before if k != "optimizer"] + ["teleport_metadata"]
    for k in ("epoch", "arch", "version", "amp_scaler", "scheduler", "metric", "saver"):
        assert after[k] == before[k], k
    assert vars(after["args"]) == vars(before["args"])
    moved = {k for k in MOVABLE if not torch.equal(after["state_dict"][k], before["state_dict"][k])}
    assert moved == MOVABLE
    assert all(identical(after["state_dict"][k], before["state_dict"][k]) for k in before["state_dict"] if k not in MOVABLE)
    assert all(identical(after["state_dict_ema"][k], after["state_dict"][k]) for k in before["state_dict"])
    assert loss64(after["state_dict"]) == pytest.approx(doc["calibration"]["loss_after"], rel=1e-5)
    assert loss64(before["state_dict"]) == pytest.approx(doc["calibration"]["loss_before"], rel=1e-5)
    info = doc["checkpoint"]
    assert info["weights_moved"] == "state_dict" and "re-seeded" in info["ema"] and info["optimizer"].startswith("dropped")
    assert json.loads(after["teleport_metadata"]["checkpoint"]) == info
    again = read_checkpoint(out)  # the output is an input again: it names its model
    assert again.metadata["arch"] == "mlp" and json.loads(again.metadata["model_kwargs"])["hidden"] == [128, 64]
    assert "re-seeded" in r.stderr and "optimizer: dropped" in r.stderr


def test_weights_ema_moves_only_the_ema_weights(tmp_path):
    src, out = tmp_path / "last.pth.tar", tmp_path / "out.pth.tar"
    before = _training_checkpoint(src)
    result = run(src, out, files=FileOptions(weights="ema"))
    after = _load(out)
    assert all(identical(after["state_dict"][k], v) for k, v in before["state_dict"].items())
    assert {k for k in MOVABLE if not torch.equal(after["state_dict_ema"][k], before["state_dict_ema"][k])} == MOVABLE
    assert loss64(before["state_dict_ema"]) == pytest.approx(result.outcome.verification.calibration.loss_before, rel=1e-5)
    assert loss64(after["state_dict_ema"]) == pytest.approx(result.outcome.verification.calibration.loss_after, rel=1e-5)
    assert after["optimizer"]["state"].keys() == before["optimizer"]["state"].keys()  # state_dict did not move
    assert result.files["weights_moved"] == "state_dict_ema"


def test_keep_ema_and_keep_optimizer_state(tmp_path):
    src, out = tmp_path / "last.pth.tar", tmp_path / "out.pth.tar"
    before = _training_checkpoint(src)
    run(src, out, files=FileOptions(keep_ema=True, keep_optimizer_state=True))
    after = _load(out)
    assert all(identical(after["state_dict_ema"][k], v) for k, v in before["state_dict_ema"].items())
    assert after["optimizer"]["param_groups"] == before["optimizer"]["param_groups"]
    for i, st in before["optimizer"]["state"].items():
        assert identical(after["optimizer"]["state"][i]["momentum_buffer"], st["momentum_buffer"])


def test_flag_conflicts_and_missing_ema(tmp_path):
    with pytest.raises(ConfigError):
        FileOptions(weights="ema", keep_ema=True)
    src = tmp_path / "last.pth.tar"
    _training_checkpoint(src)
    r = CliRunner().invoke(cli, ["apply", str(src), "--data", str(CAL), "-o", str(tmp_path / "o.pth.tar"), "--weights", "ema", "--keep-ema"])
    assert r.exit_code == 2 and "--keep-ema cannot be combined with --weights ema" in r.stderr
    r = CliRunner().invoke(cli, ["apply", str(CAL.parent / "mlp_digits_mid.safetensors"), "--data", str(CAL), "-o", str(tmp_path / "o.safetensors"), "--weights", "ema"])
    assert r.exit_code == 3 and "has no EMA weights" in r.stderr


def test_unsafe_globals_are_refused_all_listed_and_trust_pickle_loads(tmp_path):
    src, out = tmp_path / "last.pth.tar", tmp_path / "out.pth.tar"
    _training_checkpoint(src, when=datetime.date(2024, 1, 2), where=pathlib.PurePosixPath("/data/run1"))
    args = ["apply", str(src), "--data", str(CAL), "--holdout", str(HOLD), "-o", str(out), "--steps", "3", "-q"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 3 and len(r.stderr.strip().splitlines()) == 1
    assert "datetime.date" in r.stderr and "pathlib.PurePosixPath" in r.stderr and "--trust-pickle" in r.stderr
    assert "argparse.Namespace" not in r.stderr  # allow-listed
    assert not out.exists()
    r = CliRunner().invoke(cli, args + ["--trust-pickle"])
    assert r.exit_code == 0, r.output
    after = torch.load(out, weights_only=False)
    assert after["when"] == datetime.date(2024, 1, 2) and after["where"] == pathlib.PurePosixPath("/data/run1")


def test_legacy_pickle_format_lists_its_unsafe_globals_too(tmp_path):
    """Files written with _use_new_zipfile_serialization=False (PyTorch < 1.6 layout)."""
    src = tmp_path / "old.pth"
    obj = {"state_dict": mid_state(), "args": argparse.Namespace(model="mlp"), "when": datetime.date(2024, 1, 2), "where": pathlib.PurePosixPath("/x")}
    torch.save(obj, src, _use_new_zipfile_serialization=False)
    with pytest.raises(InputError) as e:
        read_checkpoint(src)
    msg = e.value.one_line()
    assert "datetime.date, pathlib.PurePosixPath" in msg and "--trust-pickle" in msg and "\x1b" not in msg
    assert "_codecs" not in msg and "argparse" not in msg
    ok = tmp_path / "ok.pth"
    torch.save({"state_dict": mid_state(), "args": argparse.Namespace(model="mlp")}, ok, _use_new_zipfile_serialization=False)
    assert read_checkpoint(ok).metadata["arch"] == "mlp"


def test_report_inspect_and_bench_read_the_weight_set_apply_reads(tmp_path):
    """A DDP-wrapped (module.) training checkpoint with EMA weights: report, inspect and bench
    read the chosen set through apply's loader; the losses are float64 references of that set."""
    src = tmp_path / "ddp.pth.tar"
    obj = _training_checkpoint(src)
    obj["state_dict"] = {"module." + k: v for k, v in obj["state_dict"].items()}
    obj["state_dict_ema"] = {"module." + k: v for k, v in obj["state_dict_ema"].items()}
    torch.save(obj, src)
    plain = {k.removeprefix("module."): v for k, v in obj["state_dict"].items()}
    ema = {k.removeprefix("module."): v for k, v in obj["state_dict_ema"].items()}
    r = CliRunner().invoke(cli, ["report", str(src), str(src), "--data", str(CAL), "--weights", "ema", "--json", "-q"])
    assert r.exit_code == 0, r.output
    cal = json.loads(r.stdout)["datasets"]["calibration"]
    assert cal["loss_a"] == pytest.approx(loss64(ema), rel=1e-5) and cal["loss_b"] == cal["loss_a"]
    r = CliRunner().invoke(cli, ["report", str(src), str(src), "--data", str(CAL), "--holdout", str(HOLD), "--json", "-q"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["datasets"]["holdout"]["loss_a"] == pytest.approx(loss64(plain, HOLD), rel=1e-5)
    r = CliRunner().invoke(cli, ["inspect", str(src), "--data", str(CAL), "--weights", "ema", "--json", "-q"])
    assert r.exit_code == 0 and len(json.loads(r.stdout)["layers"]) == 3, r.output
    r = CliRunner().invoke(cli, ["bench", str(src), "--data", str(CAL), "--holdout", str(HOLD), "--weights", "ema", "--steps", "10",
                                 "--seeds", "1", "--variants", "original", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["variants"]["original"]["holdout_curve_mean"][0][1] == pytest.approx(loss64(ema, HOLD), rel=1e-5)
    r = CliRunner().invoke(cli, ["report", str(MID), "--data", str(CAL), "--weights", "ema"])
    assert r.exit_code == 3 and "has no EMA weights" in r.stderr
