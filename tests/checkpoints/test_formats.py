"""Each container is read and written back as the same container, on files the tests build."""

import json
import shutil

import pytest
import torch
from _ckpt import (
    CAL,
    MOVABLE,
    identical,
    loss64,
    mid_metadata,
    mid_state,
    mlp,
    provenance,
    run,
)
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from teleport_cli.checkpoints.base import canonical_keys
from teleport_cli.checkpoints.containers import read_checkpoint
from teleport_cli.cli import cli
from teleport_cli.errors import InputError


def _check_moved(before: dict, after: dict, result) -> None:
    """Same keys; only teleported weights changed; the rest bit-identical; the loss as reported."""
    assert set(after) == set(before)
    for k in before:
        if k in MOVABLE:
            assert after[k].dtype == before[k].dtype and not torch.equal(after[k], before[k]), k
        else:
            assert identical(after[k], before[k]), k
    assert loss64(after) == pytest.approx(result.outcome.verification.calibration.loss_after, rel=1e-5)


def test_single_safetensors_with_metadata_is_written_as_one_file(tmp_path):
    out = tmp_path / "out.safetensors"
    result = run(str(shutil.copy(CAL.parent / "mlp_digits_mid.safetensors", tmp_path / "in.safetensors")), out)
    _check_moved(mid_state(), load_file(str(out)), result)
    info = provenance(out)
    assert info["container"] == "safetensors" and info["weights_moved"] == "state_dict"
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["arch"] == "mlp"


def test_single_safetensors_without_metadata_needs_model_flags(tmp_path):
    bare = tmp_path / "bare.safetensors"
    save_file(mid_state(), str(bare))
    r = CliRunner().invoke(cli, ["apply", str(bare), "--data", str(CAL), "-o", str(tmp_path / "o.safetensors")])
    assert r.exit_code == 3
    assert "pass --model NAME (and --model-kwargs JSON)" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o.safetensors").exists()
    # with the model built by the caller (what --model will do) the same file goes through
    out = tmp_path / "out.safetensors"
    result = run(bare, out, module=mlp())
    _check_moved(mid_state(), load_file(str(out)), result)


def _shard(folder, extra_readme=True):
    state = mid_state()
    folder.mkdir()
    parts = {"model-00001-of-00002.safetensors": ["hidden.0.weight", "hidden.0.bias"],
             "model-00002-of-00002.safetensors": ["hidden.1.weight", "hidden.1.bias", "head.weight", "head.bias"]}
    weight_map = {}
    for f, keys in parts.items():
        save_file({k: state[k] for k in keys}, str(folder / f), metadata={"format": "pt"})
        weight_map.update({k: f for k in keys})
    meta = {"total_size": sum(t.numel() * t.element_size() for t in state.values()), **mid_metadata()}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": meta, "weight_map": weight_map}))
    if extra_readme:
        (folder / "README.md").write_text("my model\n")
    return state, weight_map


def test_sharded_folder_stays_sharded_with_a_correct_index(tmp_path):
    state, weight_map = _shard(tmp_path / "in")
    out = tmp_path / "out"
    result = run(tmp_path / "in", out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == weight_map
    after = {}
    for f in set(weight_map.values()):
        part = load_file(str(out / f))
        assert set(part) == {k for k, v in weight_map.items() if v == f}
        after.update(part)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in after.values())
    assert index["metadata"]["arch"] == "mlp" and json.loads(index["metadata"]["checkpoint"])["container"] == "sharded"
    assert (out / "README.md").read_text() == "my model\n"
    assert sorted(p.name for p in out.iterdir()) == sorted([*set(weight_map.values()), "model.safetensors.index.json", "README.md"])
    _check_moved(state, after, result)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]  # no temporary folder left


@pytest.mark.parametrize(
    "damage, needle",
    [
        ("missing_shard", "names shards that are not in"),
        ("absent_tensor", "listed for model-00002-of-00002.safetensors but not in it: head.bias"),
        ("unlisted_tensor", "in model-00001-of-00002.safetensors but in no index entry for it: hidden.0.bias"),
    ],
)
def test_sharded_index_and_shards_are_cross_checked_both_ways(tmp_path, damage, needle):
    folder = tmp_path / "in"
    state, weight_map = _shard(folder)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    if damage == "missing_shard":
        (folder / "model-00002-of-00002.safetensors").unlink()
    elif damage == "absent_tensor":
        keys = ["hidden.1.weight", "hidden.1.bias", "head.weight"]
        save_file({k: state[k] for k in keys}, str(folder / "model-00002-of-00002.safetensors"))
    else:
        del index["weight_map"]["hidden.0.bias"]
        index_path.write_text(json.dumps(index))
    with pytest.raises(InputError, match="disagree|not in") as e:
        read_checkpoint(folder)
    assert needle in str(e.value)
    r = CliRunner().invoke(cli, ["apply", str(folder), "--data", str(CAL), "-o", str(tmp_path / "out")])
    assert r.exit_code == 3 and needle in r.stderr and not (tmp_path / "out").exists()


def _wrapped_state(wrap: str) -> tuple[dict, dict]:
    """A real wrapper's state dict of the mid MLP, and stored key -> bare key."""
    m = mlp(mid_state())
    if wrap == "dataparallel":
        w = torch.nn.DataParallel(m)
    elif wrap == "compile":
        w = torch.compile(m)
    elif wrap == "compile(dataparallel)":
        w = torch.compile(torch.nn.DataParallel(m))
    elif wrap == "dataparallel(compile)":
        w = torch.nn.DataParallel(torch.compile(m))
    else:  # a submodule wrapped: DataParallel around the head, torch.compile around hidden
        m.head = torch.nn.DataParallel(m.head)
        m.hidden = torch.compile(m.hidden)
        w = m
    sd = w.state_dict()
    bare = {k: k.replace("_orig_mod.", "").replace("module.", "") for k in sd}
    return sd, bare


@pytest.mark.parametrize(
    "wrap, suffix",
    [("dataparallel", ".pt"), ("compile", ".pth"), ("compile(dataparallel)", ".bin"), ("dataparallel(compile)", ".pt"), ("nested", ".pt")],
)
def test_plain_state_dict_with_wrapper_prefixes_keeps_its_keys(tmp_path, wrap, suffix):
    sd, bare = _wrapped_state(wrap)
    assert any(k != bare[k] for k in sd)
    src = tmp_path / f"in{suffix}"
    torch.save(sd, src)
    canon = set(canonical_keys(list(sd)).values())  # a wrapped submodule is matched against the model later
    assert canon == set(bare.values()) if wrap != "nested" else "head.module.weight" in canon
    out = tmp_path / f"out{suffix}"
    result = run(src, out, module=mlp())
    written = torch.load(out, weights_only=True)
    assert list(written) == list(sd)  # stored names and order kept
    _check_moved({bare[k]: v for k, v in sd.items()}, {bare[k]: v for k, v in written.items()}, result)


class Holder(torch.nn.Module):
    """A model whose own top-level submodule is called ``module``: its keys must not be stripped."""

    def __init__(self):
        super().__init__()
        self.module = mlp()

    def forward(self, x):
        return self.module(x)


def test_a_model_with_a_submodule_named_module_keeps_its_keys(tmp_path):
    h = Holder()
    h.module.load_state_dict(mid_state())
    torch.save(h.state_dict(), tmp_path / "in.pt")
    result = run(tmp_path / "in.pt", tmp_path / "out.pt", module=Holder())
    after = torch.load(tmp_path / "out.pt", weights_only=True)
    assert set(after) == {f"module.{k}" for k in mid_state()}
    _check_moved(mid_state(), {k[len("module."):]: v for k, v in after.items()}, result)
