"""Bad input and refused outputs: one line, a documented exit code, nothing written."""

import json
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from _ckpt import CAL, HOLD, MID, mid_metadata, mid_state
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save, save_file

from teleport_cli.checkpoints import atomic
from teleport_cli.checkpoints.containers import read_checkpoint, write_checkpoint
from teleport_cli.cli import cli
from teleport_cli.errors import InputError, OutputError


def apply_cli(ckpt, out, *extra, data=CAL, holdout=HOLD):
    args = ["apply", str(ckpt), "--data", str(data), "-o", str(out), "--steps", "2", *map(str, extra)]
    if holdout is not None:
        args += ["--holdout", str(holdout)]
    return CliRunner().invoke(cli, args)


def one_line_error(r, code: int, *needles: str) -> None:
    assert r.exit_code == code, r.output
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.output, r.stderr
    for n in needles:
        assert n in r.stderr, (n, r.stderr)


def nothing_new(folder: Path, before: set) -> None:
    assert set(os.listdir(folder)) == before


VALID = save({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(3, dtype=torch.float16)}, {"arch": "mlp"})
HEADER_LEN = struct.unpack("<Q", VALID[:8])[0]

header_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
tensor_entry = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F64", "X9", ""]),
        "shape": st.lists(st.integers(-2, 2**40), max_size=4),
        "data_offsets": st.lists(st.integers(-2, 2**40), min_size=0, max_size=3),
    }
)


@st.composite
def damaged_files(draw) -> bytes:
    how = draw(st.sampled_from(["truncate", "flip", "header", "tensor_entry", "length"]))
    if how == "truncate":
        return VALID[: draw(st.integers(0, len(VALID) - 1))]
    if how == "flip":
        data = bytearray(VALID)
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, 8 + HEADER_LEN - 1))
            data[i] = draw(st.integers(0, 255))
        return bytes(data)
    body = VALID[8 + HEADER_LEN :]
    if how == "header":
        header = json.dumps(draw(st.dictionaries(st.text(max_size=6), header_values, max_size=4))).encode()
    elif how == "tensor_entry":
        header = json.dumps({"w": draw(tensor_entry), "__metadata__": {"arch": "mlp"}}).encode()
    else:
        header = VALID[8 : 8 + HEADER_LEN]
        return struct.pack("<Q", draw(st.integers(0, 2**64 - 1))) + header + body
    return struct.pack("<Q", len(header)) + header + body


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(damaged_files())
def test_fuzzed_safetensors_headers_are_read_or_refused_cleanly(blob):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "x.safetensors"
        p.write_bytes(blob)
        try:
            ckpt = read_checkpoint(p)
        except InputError as e:
            assert "\n" not in e.one_line() and str(p) in e.one_line()
            return
        # accepted: then it really is a readable file with finite tensors
        assert all(torch.isfinite(t).all() for t in ckpt.weights["state_dict"].tensors.values())


def test_truncated_or_corrupted_files_exit_3(tmp_path):
    src = tmp_path / "ckpt.pth.tar"
    torch.save({"state_dict": mid_state(), "epoch": 1}, src)
    blob = src.read_bytes()
    src.write_bytes(blob[: len(blob) // 2])
    before = set(os.listdir(tmp_path))
    one_line_error(apply_cli(src, tmp_path / "out.pth.tar"), 3, "not a readable torch.save file")
    st_file = tmp_path / "cut.safetensors"
    st_file.write_bytes(MID.read_bytes()[:-100])
    one_line_error(apply_cli(st_file, tmp_path / "out.safetensors"), 3, "not a readable safetensors file")
    nothing_new(tmp_path, before | {"cut.safetensors"})


def test_nan_in_weights_exit_3(tmp_path):
    state = mid_state()
    state["head.weight"][2, 3] = float("inf")
    src = tmp_path / "nan.safetensors"
    save_file(state, str(src), metadata=mid_metadata())
    one_line_error(apply_cli(src, tmp_path / "o.safetensors"), 3, "NaN or Inf in head.weight")
    assert not (tmp_path / "o.safetensors").exists()


def test_shapes_and_keys_that_do_not_fit_are_all_listed(tmp_path):
    state = mid_state()
    state["hidden.1.weight"] = torch.zeros(64, 100)
    del state["head.bias"]
    state["extra.scale"] = torch.ones(1)
    src = tmp_path / "bad.safetensors"
    save_file(state, str(src), metadata=mid_metadata())
    r = apply_cli(src, tmp_path / "o.safetensors")
    one_line_error(r, 3, "missing keys: head.bias", "unexpected keys: extra.scale", "hidden.1.weight (64, 100) vs model (64, 128)")


@pytest.mark.parametrize("n, needle", [(0, "holds no samples (found 0, need at least 1)"), (2, "needs at least 3 samples, found 2")])
def test_empty_or_too_small_calibration_set_says_requested_and_found(tmp_path, n, needle):
    d = load_file(str(CAL))
    small = tmp_path / "small.safetensors"
    save_file({"inputs": d["inputs"][:n].contiguous(), "targets": d["targets"][:n].contiguous()}, str(small))
    one_line_error(apply_cli(MID, tmp_path / "o.safetensors", data=small, holdout=None), 3, needle)
    assert not (tmp_path / "o.safetensors").exists()


def test_output_folder_missing_or_unwritable_exit_6(tmp_path):
    one_line_error(apply_cli(MID, tmp_path / "nope" / "o.safetensors"), 6, "does not exist", "mkdir -p")
    if os.geteuid() == 0:  # root may write anywhere os.access looks: /proc refuses new files
        target = Path("/proc/teleport-out.safetensors")
    else:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        target = ro / "o.safetensors"
    one_line_error(apply_cli(MID, target), 6, "is not writable")
    assert not target.exists()


def _sharded_input(tmp_path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    state = mid_state()
    save_file(state, str(folder / "model-00001-of-00001.safetensors"))
    index = {"metadata": {**mid_metadata(), "total_size": 0}, "weight_map": {k: "model-00001-of-00001.safetensors" for k in state}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def test_folder_outputs_refused_and_replaced_atomically(tmp_path):
    src = _sharded_input(tmp_path)
    snapshot = {p.name: p.read_bytes() for p in src.iterdir()}
    link = tmp_path / "link"
    link.symlink_to(src, target_is_directory=True)
    (tmp_path / "box").mkdir()
    inner = tmp_path / "box" / "in2"
    shutil.copytree(src, inner)
    one_line_error(apply_cli(src, src, "--force"), 6, "is the input")
    one_line_error(apply_cli(src, link, "--force"), 6, "is the input")
    one_line_error(apply_cli(src, src / "sub"), 6, "inside the input folder")
    one_line_error(apply_cli(inner, tmp_path / "box", "--force"), 6, "holds the input")
    one_line_error(apply_cli(src, tmp_path / "out.safetensors"), 6, "looks like a file name")
    out = tmp_path / "out"
    out.mkdir()
    (out / "old-marker").write_text("old")
    one_line_error(apply_cli(src, out), 6, "already exists", "--force")
    assert (out / "old-marker").read_text() == "old"
    r = apply_cli(src, out, "--force", "-q")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == sorted(snapshot)
    assert {p.name: p.read_bytes() for p in src.iterdir()} == snapshot
    assert sorted(p.name for p in tmp_path.iterdir()) == ["box", "in", "link", "out"]  # nothing aside, no temporary


def test_file_outputs_refused_through_hard_links_and_for_another_container(tmp_path):
    src = tmp_path / "in.safetensors"
    shutil.copy(MID, src)
    os.link(src, tmp_path / "hard.safetensors")
    one_line_error(apply_cli(src, tmp_path / "hard.safetensors", "--force"), 6, "is the input")
    one_line_error(apply_cli(src, tmp_path / "o.pt"), 6, "must end in .safetensors")


def test_failed_folder_swap_restores_the_old_folder(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("old")
    real = os.rename

    def flaky(a, b):
        if Path(b) == out and ".tmp" in str(a):
            raise OSError(28, "No space left on device")
        return real(a, b)

    monkeypatch.setattr(atomic.os, "rename", flaky)
    with pytest.raises(OutputError, match="No space left"):
        with atomic.staged_folder(out, force=True) as tmp:  # the --force sequence
            (tmp / "new").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["keep"] and (out / "keep").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failed_file_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "o.safetensors"
    target.write_bytes(b"old")

    def boom(tmp):
        tmp.write_bytes(b"partial")
        raise OSError(5, "Input/output error")

    with pytest.raises(OutputError, match="Input/output error"):
        atomic.write_file_atomic(target, boom)
    assert target.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["o.safetensors"]


def test_nan_or_inf_is_never_written(tmp_path):
    ckpt = read_checkpoint(MID)
    state = dict(ckpt.weights["state_dict"].tensors)
    state["head.bias"] = state["head.bias"].clone()
    state["head.bias"][0] = float("nan")
    with pytest.raises(OutputError, match="NaN or Inf in state_dict: head.bias"):
        write_checkpoint(ckpt, tmp_path / "o.safetensors", {"state_dict": state}, {}, {})
    assert os.listdir(tmp_path) == []


def test_help_documents_every_exit_code():
    for args in (["--help"], ["apply", "--help"]):
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == 0
        for code in range(7):
            assert re.search(rf"\n\s+{code}  \w", r.output), (args, code)
        assert "--trust-pickle" in r.output or args == ["--help"]


def test_force_over_a_link_replaces_the_link_and_leaves_its_target(tmp_path):
    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "x").write_text("keep")
    (tmp_path / "link").symlink_to(tmp_path / "target", target_is_directory=True)
    with atomic.staged_folder(tmp_path / "link", force=True) as tmp:
        (tmp / "new").write_text("new")
    assert not (tmp_path / "link").is_symlink() and os.listdir(tmp_path / "link") == ["new"]
    assert os.listdir(tmp_path / "target") == ["x"] and sorted(os.listdir(tmp_path)) == ["link", "target"]


def _invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_report_inspect_bench_read_folders_and_bare_state_dicts_with_model_flags(tmp_path):
    """Folder checkpoints are accepted by every command; a bare torch.save state dict (no
    metadata) needs --model/--model-kwargs, which inspect, report and bench now take too."""
    from _ckpt import loss64

    folder = _sharded_input(tmp_path)
    r = _invoke("inspect", folder, "--data", CAL, "--json", "-q")
    assert r.exit_code == 0 and json.loads(r.stdout)["weights"] == "state_dict", r.output
    r = _invoke("report", MID, folder, "--data", CAL, "--json", "-q")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["datasets"]["calibration"]["loss_diff"] == 0.0
    bare = tmp_path / "bare.pt"
    torch.save(mid_state(), bare)
    one_line_error(_invoke("report", bare, "--data", CAL), 3, "--model")
    kw = json.dumps({"in_features": 64, "hidden": [128, 64], "num_classes": 10})
    r = _invoke("report", bare, "--data", CAL, "--holdout", HOLD, "--model", "mlp", "--model-kwargs", kw, "--json", "-q")
    assert r.exit_code == 0, r.output
    r = _invoke("report", bare, bare, "--data", CAL, "--model", "mlp", "--model-kwargs", kw, "--json", "-q")
    assert json.loads(r.stdout)["datasets"]["calibration"]["loss_a"] == pytest.approx(loss64(mid_state()), rel=1e-5)
    r = _invoke("inspect", bare, "--data", CAL, "--model", "mlp", "--model-kwargs", kw, "-q")
    assert r.exit_code == 0 and r.stdout.strip() == "3/3", r.output


def test_bad_training_metadata_and_model_kwargs_are_one_line_errors(tmp_path):
    import argparse

    state = mid_state()
    for kwargs, needle in (("notadict", "not a dict"), (["hidden=1"], "not a dict")):
        path = tmp_path / "a.pth.tar"
        torch.save({"arch": "mlp", "state_dict": state, "args": argparse.Namespace(model_kwargs=kwargs)}, path)
        one_line_error(apply_cli(path, tmp_path / "o.pth.tar"), 3, needle)
    path = tmp_path / "t.pth.tar"
    torch.save({"arch": "mlp", "state_dict": state, "args": argparse.Namespace(num_classes=torch.tensor(10))}, path)
    one_line_error(apply_cli(path, tmp_path / "o.pth.tar"), 3, "not plain values")
    bad = json.dumps({"in_features": 64, "hidden": [128, 64], "num_classes": -1})
    one_line_error(apply_cli(MID, tmp_path / "o.safetensors", "--model-kwargs", bad), 3, "cannot be built")


def test_ema_that_does_not_fit_is_refused_before_any_work_unless_kept(tmp_path):
    state = mid_state()
    ema = {k: v.clone() for k, v in state.items()}
    ema["head.weight"] = torch.zeros(10, 32)
    path = tmp_path / "e.pth.tar"
    torch.save({"arch": "mlp", "model_kwargs": None, "state_dict": state, "state_dict_ema": ema,
                "args": argparse_namespace()}, path)
    one_line_error(apply_cli(path, tmp_path / "o.pth.tar"), 3, "head.weight (10, 32) vs (10, 64)")
    assert not (tmp_path / "o.pth.tar").exists()
    r = apply_cli(path, tmp_path / "o.pth.tar", "--keep-ema")
    assert r.exit_code == 0, r.output
    r = _invoke("report", path, "--data", CAL, "-q")  # reads state_dict only: the EMA does not matter
    assert r.exit_code == 0, r.output


def argparse_namespace():
    import argparse

    return argparse.Namespace(model="mlp", model_kwargs={"in_features": 64, "hidden": [128, 64]}, num_classes=10)


def test_link_loops_and_bad_bench_values_fail_early_in_one_line(tmp_path):
    loop_a, loop_b = tmp_path / "la.safetensors", tmp_path / "lb.safetensors"
    loop_a.symlink_to(loop_b)
    loop_b.symlink_to(loop_a)
    one_line_error(apply_cli(MID, loop_a, "--force"), 6, "symbolic link loop")
    page_a, page_b = tmp_path / "pa.html", tmp_path / "pb.html"
    page_a.symlink_to(page_b)
    page_b.symlink_to(page_a)
    one_line_error(_invoke("report", MID, "--data", CAL, "--html", page_a), 6, "symbolic link loop")
    afile = tmp_path / "afile"
    afile.write_text("x")
    base = ["bench", MID, "--data", CAL, "--holdout", HOLD, "--steps", "10", "--seeds", "1", "--variants", "original"]
    one_line_error(_invoke(*base, "--out", afile / "sub"), 6, "cannot be created")
    one_line_error(_invoke(*base, "--calibration-samples", "0"), 2, "--calibration-samples")
    one_line_error(_invoke(*base, "--lr", "inf"), 2, "--lr")
    one_line_error(_invoke(*base, "--teleport-steps", "0"), 2, "--teleport-steps")
    one_line_error(apply_cli(MID, tmp_path / "o.safetensors", "--lr", "inf"), 2, "--lr must be a finite number")
