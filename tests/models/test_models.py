"""Model building: --model NAME / --model-kwargs, package.module:factory from the command line
only, refusal of code named in a checkpoint's metadata, strict loading."""

import json
import sys

import pytest
import timm
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

from teleport_cli.cli import cli
from teleport_cli.errors import ConfigError, InputError
from teleport_cli.models.builtin import model_from_metadata
from teleport_cli.models.factories import choose_model
from teleport_cli.models.loading import load_strict

FACTORY_MODULE = '''
import pathlib
import torch
from torch import nn

pathlib.Path({marker!r}).write_text("imported")


class Net(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.fc1 = nn.Linear(6, width)
        self.fc2 = nn.Linear(width, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def make(width=4):
    return Net(width)
'''


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    """A user's module in tmp_path that leaves a marker file when it is imported."""
    name = f"user_models_{tmp_path.name.replace('-', '_')}"
    marker = tmp_path / "imported.marker"
    (tmp_path / f"{name}.py").write_text(FACTORY_MODULE.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name, marker
    sys.modules.pop(name, None)


def test_timm_name_and_kwargs_from_the_command_line():
    choice = choose_model({}, "ckpt", "test_resnet", '{"in_chans": 1, "num_classes": 7}')
    ref = timm.create_model("test_resnet", in_chans=1, num_classes=7)
    assert choice.origin == "flag" and choice.arch == "test_resnet" and choice.kwargs == {"in_chans": 1, "num_classes": 7}
    own = choice.model.state_dict()
    assert {k: tuple(v.shape) for k, v in own.items()} == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert choice.model.conv1[0].in_channels == 1 and choice.model.get_classifier().out_features == 7


def test_model_kwargs_alone_replace_the_metadata_kwargs():
    meta = {"arch": "mlp", "model_kwargs": json.dumps({"in_features": 64, "hidden": [128, 64], "num_classes": 10})}
    choice = choose_model(meta, "ckpt", None, '{"in_features": 5, "hidden": [3], "num_classes": 2}')
    assert choice.origin == "metadata" and [m.in_features for m in choice.model.modules() if isinstance(m, torch.nn.Linear)] == [5, 3]


@pytest.mark.parametrize("bad, needle, error", [("[1, 2]", "JSON object", ConfigError), ("{oops", "not valid JSON", ConfigError),
                                               ('{"nope": 1}', "does not accept", InputError)])
def test_bad_model_kwargs_are_refused(bad, needle, error):
    """Malformed JSON is a bad option value (exit 2); kwargs the model does not take are bad input (exit 3)."""
    with pytest.raises(error, match=needle):
        choose_model({}, "ckpt", "test_resnet", bad)


@pytest.mark.parametrize("arch", ["os:system", "pkg.mod:factory", "FACTORY", "no_such_model_xyz"])
def test_metadata_may_name_only_builtin_or_timm_architectures(tmp_path, factory_module, arch):
    name, marker = factory_module
    arch = f"{name}:make" if arch == "FACTORY" else arch
    ckpt = tmp_path / "evil.safetensors"
    save_file({"fc1.weight": torch.zeros(4, 6)}, str(ckpt), metadata={"arch": arch, "model_kwargs": "{}"})
    r = run("apply", ckpt, "--data", tmp_path / "unused.safetensors", "-o", tmp_path / "out.safetensors")
    assert r.exit_code == 3, r.output
    assert "neither built-in nor a timm model" in r.stderr and "--model package.module:factory" in r.stderr
    assert not marker.exists() and name not in sys.modules  # nothing was imported
    with pytest.raises(InputError):
        model_from_metadata({"arch": arch}, "ckpt")
    assert not marker.exists()


def test_factory_from_the_command_line_end_to_end(tmp_path, factory_module):
    name, marker = factory_module
    net = __import__(name).make(width=16)
    assert marker.exists()
    marker.unlink()
    ckpt, data, out = tmp_path / "net.safetensors", tmp_path / "cal.safetensors", tmp_path / "out.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(ckpt))  # no metadata at all
    g = torch.Generator().manual_seed(1)
    x = torch.randn(60, 6, generator=g) * torch.tensor([3.0, 2.0, 1.0, 0.5, 0.05, 0.01])  # small directions: tau < 1 frees them
    save_file({"inputs": x, "targets": torch.randint(0, 3, (60,), generator=g)}, str(data))
    r = run("apply", ckpt, "--data", data, "-o", out, "--model", f"{name}:make", "--model-kwargs", '{"width": 16}',
            "--steps", "3", "--json", "-q")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["arch"] == f"{name}:make" and doc["grad_norm_after"] > doc["grad_norm_before"]
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["arch"] == f"{name}:make" and meta["model_origin"] == "factory" and json.loads(meta["model_kwargs"]) == {"width": 16}
    # the written file names a factory: reading it back without --model is refused, not imported
    sys.modules.pop(name, None)
    marker.unlink(missing_ok=True)
    r2 = run("apply", out, "--data", data, "-o", tmp_path / "out2.safetensors", "-q")
    assert r2.exit_code == 3 and "may not name code" in r2.stderr and not marker.exists()


@pytest.mark.parametrize("spec, needle", [("no_such_pkg_abc:make", "cannot import"), ("json:no_such_fn", "has no attribute"), ("json:__doc__", "not callable")])
def test_bad_factory_specs_are_input_errors(spec, needle):
    with pytest.raises(InputError, match=needle):
        choose_model({}, "ckpt", spec, None)


def test_strict_loading_lists_every_missing_unexpected_and_misshaped_key():
    model = timm.create_model("test_resnet", in_chans=1, num_classes=10)
    state = dict(model.state_dict())
    state.pop("fc.bias")
    state.pop("conv1.0.weight")
    state["extra.weight"] = torch.zeros(1)
    state["fc.weight"] = torch.zeros(5, state["fc.weight"].shape[1])
    with pytest.raises(InputError) as e:
        load_strict(model, state, "ckpt")
    msg = str(e.value)
    assert "missing keys: conv1.0.weight, fc.bias" in msg and "unexpected keys: extra.weight" in msg
    assert "fc.weight (5, " in msg and len(msg.splitlines()) == 1
