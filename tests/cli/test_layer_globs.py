"""``apply --layers/--exclude`` and ``inspect``'s: the selected set against an independent fnmatch,
excluded tensors byte-identical in the written file, unmatched globs as usage errors."""

import json
from fnmatch import fnmatchcase

import pytest
import timm
from click.testing import CliRunner
from safetensors import safe_open
from torch import nn

from teleport_cli.cli import cli
from teleport_cli.config import TeleportConfig
from teleport_cli.errors import ConfigError
from teleport_cli.nullspace.selection import find_layers


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def raw_tensors(path) -> dict[str, bytes]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k).numpy().tobytes() for k in f.keys()}


@pytest.mark.parametrize("include, exclude", [((), ()), (("layer4.*",), ()), (("layer*",), ("*.downsample.*", "layer1.*")),
                                              (("fc", "layer?.0.conv1"), ()), ((), ("*conv2",))])
def test_selection_equals_an_independent_fnmatch_over_module_names(include, exclude):
    model = timm.create_model("test_resnet", num_classes=10, in_chans=1)
    convs = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]  # every weight here is plain
    expected = [n for n in convs if (not include or any(fnmatchcase(n, g) for g in include)) and not any(fnmatchcase(n, g) for g in exclude)]
    layers, excluded = find_layers(model, include, exclude)
    assert [s.name for s, _ in layers] == expected
    reasons = {e.name: e.reason for e in excluded}
    for n in set(convs) - set(expected):
        assert reasons[n] == ("excluded by --exclude" if any(fnmatchcase(n, g) for g in exclude) else "not matched by --layers")


def test_unmatched_glob_is_a_config_error():
    model = timm.create_model("test_resnet", num_classes=10, in_chans=1)
    with pytest.raises(ConfigError, match="--exclude 'head'"):
        find_layers(model, ("fc",), ("head",))
    with pytest.raises(ConfigError):
        TeleportConfig(method="levelset", objective="grad-norm", layers=("fc",))
    assert TeleportConfig(layers=["fc"]).layers == ("fc",)  # lists (JSON) become tuples


def test_apply_moves_only_the_selected_layers_and_leaves_the_rest_byte_identical(files):
    src, out = files / "mlp_digits_mid.safetensors", files / "out.safetensors"
    r = run("apply", src, "--data", files / "digits_calibration.safetensors", "--holdout", files / "digits_holdout.safetensors",
            "-o", out, "--layers", "hidden.*", "--layers", "head", "--exclude", "hidden.0", "--objective", "grad-norm", "--json", "-q")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    rows = {l["name"]: l for l in doc["layers"]}
    assert rows["hidden.0"]["teleported"] is False and rows["hidden.0"]["reason"] == "excluded by --exclude"
    assert rows["hidden.1"]["teleported"] and rows["head"]["teleported"]
    a, b = raw_tensors(src), raw_tensors(out)
    assert a.keys() == b.keys()
    assert a["hidden.0.weight"] == b["hidden.0.weight"] and a["hidden.0.bias"] == b["hidden.0.bias"]
    assert a["hidden.1.weight"] != b["hidden.1.weight"]  # the selected ones did move
    assert rows["hidden.1"]["rel_weight_change"] > 0
    settings = json.loads(safe_open(str(out), "pt").metadata()["teleport"])
    assert settings["layers"] == ["hidden.*", "head"] and settings["exclude"] == ["hidden.0"]


def test_apply_layers_not_matched_are_listed_and_untouched(files):
    src, out = files / "mlp_digits_mid.safetensors", files / "out.safetensors"
    r = run("apply", src, "--data", files / "digits_calibration.safetensors", "-o", out, "--layers", "head", "--steps", "5", "--json", "-q")
    assert r.exit_code == 0, r.output
    rows = {l["name"]: l for l in json.loads(r.stdout)["layers"]}
    assert [n for n, l in rows.items() if l["teleported"]] == ["head"]
    assert rows["hidden.0"]["reason"] == rows["hidden.1"]["reason"] == "not matched by --layers"
    a, b = raw_tensors(src), raw_tensors(out)
    assert all(a[k] == b[k] for k in a if not k.startswith("head."))


@pytest.mark.parametrize("flag", ["--layers", "--exclude"])
def test_glob_matching_nothing_is_a_one_line_usage_error(files, flag):
    out = files / "out.safetensors"
    r = run("apply", files / "mlp_digits_mid.safetensors", "--data", files / "digits_calibration.safetensors", "-o", out, flag, "nope*", "-q")
    assert r.exit_code == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "nope*" in r.stderr and "Traceback" not in r.output
    assert not out.exists()
    r = run("inspect", files / "mlp_digits_mid.safetensors", "--data", files / "digits_calibration.safetensors", flag, "nope*", "-q")
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1


def test_inspect_lists_the_selection(files):
    r = run("inspect", files / "mlp_digits_mid.safetensors", "--data", files / "digits_calibration.safetensors",
            "--layers", "hidden.?", "--exclude", "*.1", "--json", "-q")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    rows = {l["name"]: l for l in doc["layers"]}
    assert doc["teleportable"] == 1 and rows["hidden.0"]["teleported"]
    assert rows["hidden.1"]["reason"] == "excluded by --exclude" and rows["head"]["reason"] == "not matched by --layers"
