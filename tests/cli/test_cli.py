"""``teleport apply`` end to end through click's CliRunner."""

import hashlib
import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from teleport_cli.cli import cli
from teleport_cli.models.builtin import MLP


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result


def _args(f, out, *extra):
    return ["apply", f / "mlp_digits_mid.safetensors", "--data", f / "digits_calibration.safetensors",
            "--holdout", f / "digits_holdout.safetensors", "-o", out, *extra]


def test_json_document_values_match_an_independent_evaluation(files):
    out = files / "out.safetensors"
    r = run(*_args(files, out, "--json", "-q", "--objective", "grad-norm"))
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)  # stdout is exactly one JSON document
    for key in ("verified", "output", "seconds", "grad_norm_before", "grad_norm_after", "calibration", "holdout", "layers"):
        assert key in doc
    assert doc["verified"] is True and doc["output"] == str(out)
    assert {l["name"] for l in doc["layers"]} == {"hidden.0", "hidden.1", "head"}
    assert all({"name", "kind", "d_in", "null_dim"} <= set(l) for l in doc["layers"])
    assert {l["name"]: l["d_in"] for l in doc["layers"]} == {"hidden.0": 64, "hidden.1": 128, "head": 64}

    kwargs = {"in_features": 64, "hidden": [128, 64], "num_classes": 10}
    m0, m1 = MLP(**kwargs), MLP(**kwargs)
    m0.load_state_dict(load_file(files / "mlp_digits_mid.safetensors"))
    m1.load_state_dict(load_file(out))
    for key, name in (("calibration", "digits_calibration"), ("holdout", "digits_holdout")):
        d = load_file(files / f"{name}.safetensors")
        x, y = d["inputs"].double(), d["targets"]
        with torch.no_grad():
            a, b = m0.double()(x), m1.double()(x)
        c = doc[key]
        assert c["loss_before"] == pytest.approx(F.cross_entropy(a, y).item(), rel=1e-5)
        assert c["loss_after"] == pytest.approx(F.cross_entropy(b, y).item(), rel=1e-5)
        assert c["accuracy_before"] == pytest.approx((a.argmax(1) == y).double().mean().item())
        assert c["accuracy_after"] == pytest.approx((b.argmax(1) == y).double().mean().item())
        assert c["max_abs_logit_diff"] == pytest.approx((a - b).abs().max().item(), rel=1e-4, abs=1e-6)
        assert c["samples"] == len(y)
    assert doc["grad_norm_after"] / doc["grad_norm_before"] >= 1.5
    assert abs(doc["calibration"]["loss_after"] / doc["calibration"]["loss_before"] - 1) < 1e-2


def test_metadata_round_trip(files):
    out = files / "out.safetensors"
    r = run(*_args(files, out, "--json", "-q", "--tau", "0.995", "--steps", "7"))
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    src = files / "mlp_digits_mid.safetensors"
    assert meta["format"] == "pt" and meta["arch"] == "mlp"
    assert json.loads(meta["model_kwargs"]) == {"in_features": 64, "hidden": [128, 64], "num_classes": 10}
    assert json.loads(meta["data_config"])["input_size"] == [64]
    assert meta["source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    settings = json.loads(meta["teleport"])
    assert settings["tau"] == 0.995 and settings["steps"] == 7
    ver = json.loads(meta["verification"])
    assert ver["passed"] is True
    assert ver["calibration"]["loss_after"] == pytest.approx(doc["calibration"]["loss_after"])
    cal = load_file(files / "digits_calibration.safetensors")
    h = hashlib.sha256()
    for t in (cal["inputs"], cal["targets"]):
        h.update(str(tuple(t.shape)).encode()); h.update(str(t.dtype).encode()); h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    assert meta["calibration_sha256"] == h.hexdigest()
    assert set(json.loads(meta["versions"])) == {"teleport_cli", "torch", "timm"}
    # the written checkpoint is a valid input again
    out2 = files / "out2.safetensors"
    r2 = run("apply", out, "--data", files / "digits_calibration.safetensors", "-o", out2, "--steps", "2", "-q")
    assert r2.exit_code == 0, r2.output


def test_holdout_failure_exits_4_and_writes_nothing(files):
    """tau = 1 on 24 samples, no guard: the calibration loss cannot move, the held-out loss does."""
    few = files / "few.safetensors"
    cal = load_file(files / "digits_calibration.safetensors")
    save_file({"inputs": cal["inputs"][:24].contiguous(), "targets": cal["targets"][:24].contiguous()}, str(few))
    out = files / "out.safetensors"
    r = run("apply", files / "mlp_digits_mid.safetensors", "--data", few, "--holdout", files / "digits_holdout.safetensors",
            "-o", out, "--tau", "1", "--step-size", "0.05", "--max-step", "1", "--holdout-tolerance", "1e-3", "--guard-fraction", "0", "--json", "-q")
    assert r.exit_code == 4, r.output
    doc = json.loads(r.stdout)
    assert doc["verified"] is False and doc["output"] is None and doc["exit_code"] == 4  # torchrun would exit 1
    assert doc["calibration"]["passed"] is True and doc["holdout"]["passed"] is False
    assert doc["holdout"]["relative_loss_drift"] > 1e-3
    assert not out.exists()
    assert list(files.glob("*.tmp")) == [] and list(files.glob(".out*")) == []


def test_no_accepted_step_exits_5(files):
    out = files / "out.safetensors"
    r = run(*_args(files, out, "--tau", "1"))  # 256 samples > every d_in: only dead directions
    assert r.exit_code == 5, r.output
    assert "no teleport step was accepted (no_freedom)" in r.stderr
    assert "lower --tau" in r.stderr and "--step-size" not in r.stderr  # only a lower tau gives freedom
    assert not out.exists()


def test_refuses_to_overwrite_existing_output_and_inputs(files):
    out = files / "out.safetensors"
    out.write_bytes(b"keep me")
    r = run(*_args(files, out))
    assert r.exit_code == 6 and "already exists" in r.stderr and "--force" in r.stderr
    assert out.read_bytes() == b"keep me"
    src = files / "mlp_digits_mid.safetensors"
    before = src.read_bytes()
    link = files / "link.safetensors"
    link.symlink_to(src)
    for target in (src, link):
        r = run(*_args(files, target, "--force"))
        assert r.exit_code == 6 and "input" in r.stderr, r.output
    assert src.read_bytes() == before
    r = run(*_args(files, out, "--force", "-q"))
    assert r.exit_code == 0 and out.read_bytes() != b"keep me"
    dangling = files / "dangling.safetensors"
    dangling.symlink_to(files / "nowhere.safetensors")
    r = run(*_args(files, dangling))
    assert r.exit_code == 6 and "link to a missing file" in r.stderr
    assert dangling.is_symlink() and not (files / "nowhere.safetensors").exists()


@pytest.mark.parametrize(
    "case, needle",
    [
        ("missing", "does not exist"),
        ("corrupt", "not a readable safetensors file"),
        ("shape", "do not fit the model"),
        ("empty", "holds no samples"),
        ("nan", "NaN or Inf"),
        ("nokeys", "no tensor named"),
        ("label", "targets must be class indices in [0, 10); found 99"),
        ("ignore", "found -100"),
        ("ints", "not floating point"),
    ],
)
def test_bad_input_is_one_line_exit_3_and_nothing_written(files, case, needle):
    data = files / "bad.safetensors"
    if case == "corrupt":
        data.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{notjson")
    elif case == "shape":
        save_file({"inputs": torch.randn(20, 32), "targets": torch.zeros(20, dtype=torch.int64)}, str(data))
    elif case == "empty":
        save_file({"inputs": torch.zeros(0, 64), "targets": torch.zeros(0, dtype=torch.int64)}, str(data))
    elif case == "nan":
        x = torch.rand(20, 64)
        x[3, 5] = float("nan")
        save_file({"inputs": x, "targets": torch.zeros(20, dtype=torch.int64)}, str(data))
    elif case == "nokeys":
        save_file({"x": torch.rand(20, 64)}, str(data))
    elif case in ("label", "ignore"):  # cross-entropy would raise on 99 and silently skip -100
        y = torch.zeros(20, dtype=torch.int64)
        y[4] = 99 if case == "label" else -100
        save_file({"inputs": torch.rand(20, 64), "targets": y}, str(data))
    elif case == "ints":
        save_file({"inputs": torch.randint(0, 16, (20, 64)), "targets": torch.zeros(20, dtype=torch.int64)}, str(data))
    out = files / "out.safetensors"
    r = run("apply", files / "mlp_digits_mid.safetensors", "--data", data, "-o", out)
    assert r.exit_code == 3, r.output
    assert needle in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.output
    assert not out.exists()


def test_with_json_an_error_is_one_json_document_on_stdout_too(files):
    """A pipeline that reads ``exit_code`` from the JSON (torchrun replaces the process's own)
    gets one for every error of the library as well: the same code and line as stderr's."""
    missing = files / "missing.safetensors"
    apply_missing = ["apply", missing, "--data", files / "digits_calibration.safetensors", "-o", files / "o.safetensors"]
    cases = [
        (apply_missing + ["--json"], 3),
        (_args(files, files / "digits_holdout.safetensors", "--json", "--force"), 6),  # the output is an input
        (["inspect", files / "mlp_digits_mid.safetensors", "--data", missing, "--json"], 3),
    ]
    for args, code in cases:
        r = run(*args)
        assert r.exit_code == code, r.output
        doc = json.loads(r.stdout)
        line = r.stderr.strip()
        assert line.startswith("error: ") and "\n" not in line
        assert doc["exit_code"] == code and line == "error: " + doc["error"] + (f" ({doc['hint']})" if doc["hint"] else "")
    r = run(*apply_missing)
    assert r.exit_code == 3 and r.stdout == ""  # without --json stdout stays empty


def test_output_folder_missing_exits_6(files):
    r = run(*_args(files, files / "no" / "such" / "out.safetensors"))
    assert r.exit_code == 6 and "does not exist" in r.stderr and "mkdir" in r.stderr


def test_bad_option_value_is_a_usage_error(files):
    r = run(*_args(files, files / "o.safetensors", "--tau", "1.5"))
    assert r.exit_code == 2 and "--tau" in r.stderr
    r = run(*_args(files, files / "o.safetensors", "--device", "tpu"))
    assert r.exit_code == 2
    r = run(*_args(files, files / "o.safetensors", "--guard-z", "-1"))
    assert r.exit_code == 2 and "--guard-z" in r.stderr
    r = run(*_args(files, files / "o.safetensors", "--guard-tangent", "always"))
    assert r.exit_code == 2


def test_default_holdout_is_a_seeded_split_recorded_in_the_output(files):
    out = files / "out.safetensors"
    r = run("apply", files / "mlp_digits_mid.safetensors", "--data", files / "digits_calibration.safetensors", "-o", out, "--json", "-q", "--seed", "3")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["holdout_source"] == "split"
    assert doc["holdout"]["samples"] == round(256 * 0.2) and doc["calibration"]["samples"] == 256 - round(256 * 0.2)
    with safe_open(str(out), "pt") as f:
        hold = json.loads(f.metadata()["holdout"])
    idx = torch.randperm(256, generator=torch.Generator().manual_seed(3))[:51].sort().values.tolist()
    assert hold["indices"] == idx and hold["seed"] == 3


def test_module_entry_point_separates_stdout_and_stderr(files, tmp_path):
    """A real process: ``python -m teleport_cli``; a user mistake is one stderr line, exit 3."""
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "teleport_cli", "apply", str(files / "missing.safetensors"),
                        "--data", str(files / "digits_calibration.safetensors"), "-o", str(tmp_path / "o.safetensors")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 3
    assert p.stdout == ""
    assert p.stderr.strip().count("\n") == 0 and "does not exist" in p.stderr


def test_usage_errors_are_one_line_with_exit_2(files):
    """click's own usage errors (missing option, bad value, unknown command) end in one stderr line."""
    import subprocess
    import sys

    cases = [["apply"], ["bench", str(files / "mlp_digits_mid.safetensors")], ["nope"],
             ["apply", str(files / "mlp_digits_mid.safetensors"), "--tau", "x", "--data", "d", "-o", "o"]]
    for args in cases:
        p = subprocess.run([sys.executable, "-m", "teleport_cli", *args], capture_output=True, text=True, timeout=120)
        assert p.returncode == 2, (args, p.stderr)
        assert p.stdout == ""
        assert p.stderr.startswith("error: ") and p.stderr.strip().count("\n") == 0, p.stderr
        assert "--help" in p.stderr
    p = subprocess.run([sys.executable, "-m", "teleport_cli", "--version"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.startswith("teleport, version")


def test_safetensors_named_pt_is_recognised_and_outputs_follow_the_umask(files, tmp_path):
    import os
    import stat

    pt = files / "mid.pt"
    shutil.copy(files / "mlp_digits_mid.safetensors", pt)
    r = run("apply", pt, "--data", files / "digits_calibration.safetensors", "-o", files / "o.pt")
    assert r.exit_code == 3 and "is a safetensors file, not a torch.save pickle" in r.stderr
    old = os.umask(0o027)
    try:
        out = files / "out.safetensors"
        r = run(*_args(files, out, "-q", "--steps", "2"))
    finally:
        os.umask(old)
    assert r.exit_code == 0, r.output
    assert stat.S_IMODE(out.stat().st_mode) == 0o640  # 0666 less the umask, not mkstemp's 0600


def test_bad_model_kwargs_json_is_a_usage_error(files):
    r = run(*_args(files, files / "o.safetensors", "--model-kwargs", "{in_features: 64"))
    assert r.exit_code == 2 and "--model-kwargs is not valid JSON" in r.stderr


def test_no_accepted_step_says_not_verified(files):
    """Exit 5 wrote nothing: the JSON must not say verified."""
    out = files / "out.safetensors"
    r = run(*_args(files, out, "--tau", "1", "--json", "-q"))
    assert r.exit_code == 5, r.output
    doc = json.loads(r.stdout)
    assert doc["verified"] is False and doc["output"] is None and doc["steps_accepted"] == 0 and doc["exit_code"] == 5


def _loss_and_grad_norm64(model, x, y) -> tuple[float, float]:
    """Mean cross-entropy and the norm of its gradient over all trainable parameters, in float64."""
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    return loss.item(), torch.sqrt(sum((g**2).sum() for g in grads)).item()


def test_default_apply_figures_match_a_float64_recomputation(files):
    """The default run (look-ahead with a guard): the gradient norms over the whole calibration
    set and the look-ahead's objective before and after, recomputed in float64 from the input and
    the written file (the pipeline takes them from the passes it already ran: the ascent's fit
    part plus one gradient over the guard, and a forward pass at the virtual step)."""
    from teleport_cli.data.tensors import TensorData, split_holdout

    out = files / "out.safetensors"
    r = run(*_args(files, out, "--json", "-q", "--steps", "3"))
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["objective"] == "lookahead" and doc["guard_samples"] > 0 and doc["steps_accepted"] >= 1
    kwargs = {"in_features": 64, "hidden": [128, 64], "num_classes": 10}
    m0, m1 = MLP(**kwargs).double(), MLP(**kwargs).double()
    m0.load_state_dict({k: v.double() for k, v in load_file(files / "mlp_digits_mid.safetensors").items()})
    m1.load_state_dict({k: v.double() for k, v in load_file(out).items()})
    d = load_file(files / "digits_calibration.safetensors")
    x, y = d["inputs"].double(), d["targets"]
    (_, g0), (_, g1) = _loss_and_grad_norm64(m0, x, y), _loss_and_grad_norm64(m1, x, y)
    assert doc["grad_norm_before"] == pytest.approx(g0, rel=1e-5)
    assert doc["grad_norm_after"] == pytest.approx(g1, rel=1e-4)  # the written weights are float32
    # the objective is the fit part's loss after one virtual SGD step at lookahead_lr
    fit, guard, _ = split_holdout(TensorData(d["inputs"], d["targets"], "cal"), 0.2, 1)
    assert len(guard) == doc["guard_samples"]
    xf, yf = fit.inputs.double(), fit.targets
    lr = doc["lookahead_lr"]
    for model, key in ((m0, "objective_before"), (m1, "objective_after")):
        params = list(model.parameters())
        grads = torch.autograd.grad(F.cross_entropy(model(xf), yf), params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(lr * g)
            assert doc[key] == pytest.approx(F.cross_entropy(model(xf), yf).item(), rel=1e-5), key


def test_layer_table_names_a_repeated_reason_once_and_a_layer_that_stayed_still():
    from rich.console import Console

    from teleport_cli.cli.apply import _layer_table

    why = "normalisation layer (BatchNorm2d): a per-channel scale and shift, not a linear map of its input"
    row = {"kind": "norm", "d_in": 8, "rank": 0, "null_dim": 0, "rel_weight_change": 0.0, "teleported": False, "reason": why}
    layers = [{**row, "name": "bn1"}, {**row, "name": "bn2"}, {**row, "name": "fc", "kind": "linear", "teleported": True, "reason": "",
                                                                "rel_weight_change": 0.01},
              {**row, "name": "bn3"}, {**row, "name": "stem", "teleported": True, "reason": "", "rel_weight_change": 0.0}]
    console = Console(record=True, width=400)
    console.print(_layer_table(layers))
    text = console.export_text()
    lines = [line.replace("│", " ").replace("┃", " ") for line in text.splitlines()]
    rows = {line.split()[0]: line for line in lines if line.split() and line.split()[0] in ("bn1", "bn2", "fc", "bn3", "stem")}
    assert why in rows["bn1"] and "same as above" in rows["bn2"] and why not in rows["bn2"]
    assert "same as above" not in rows["fc"] and why in rows["bn3"]  # after another row the reason is spelled out again
    assert "did not move" in rows["stem"] and "did not move" not in rows["fc"]  # teleported, yet exactly still
