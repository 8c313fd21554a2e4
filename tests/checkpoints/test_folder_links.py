"""Links in folder checkpoints: followed only to regular files inside the folder or inside the
blobs/ of a Hugging Face cache; anything else is one line, exit 3, nothing written."""

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
from _ckpt import CAL, HOLD, KWARGS, MID, loss64, mid_metadata, mid_state
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from teleport_cli.cli import cli

HOST_FILE = Path("/etc/hostname") if Path("/etc/hostname").is_file() else Path("/etc/passwd")


def _invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _one_line(r, code, *needles):
    assert r.exit_code == code, r.output
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.output, r.stderr
    for n in needles:
        assert n in r.stderr, (n, r.stderr)


def _sharded(folder: Path) -> Path:
    folder.mkdir()
    state = mid_state()
    save_file(state, str(folder / "model-00001-of-00001.safetensors"))
    index = {"metadata": {**mid_metadata(), "total_size": 0}, "weight_map": {k: "model-00001-of-00001.safetensors" for k in state}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


@pytest.mark.parametrize("make_link, needle", [
    (lambda d: (d / "x.txt").symlink_to(HOST_FILE), f"x.txt is a link to {HOST_FILE.resolve()}, outside the folder"),
    (lambda d: (d / "x.txt").symlink_to("../elsewhere.txt"), "outside the folder"),
    (lambda d: (d / "sub").symlink_to("/etc", target_is_directory=True), "sub is a link to /etc, outside the folder"),
    (lambda d: ((d / "inner").mkdir(), (d / "l").symlink_to("inner", target_is_directory=True)), "which is not a regular file"),
    (lambda d: (d / "gone").symlink_to("missing.txt"), "gone is a link to a missing file or a link loop"),
    (lambda d: os.mkfifo(d / "pipe"), "pipe is not a regular file"),
], ids=["host-file", "parent", "dir-outside", "dir-inside", "dangling", "fifo"])
def test_a_link_out_of_the_folder_is_refused_in_one_line_and_nothing_is_written(tmp_path, make_link, needle):
    (tmp_path / "elsewhere.txt").write_text("not part of the checkpoint")
    src = _sharded(tmp_path / "in")
    make_link(src)
    before = sorted(os.listdir(tmp_path))
    _one_line(_invoke("apply", src, "--data", CAL, "--holdout", HOLD, "-o", tmp_path / "out", "--steps", "2"), 3, needle)
    assert sorted(os.listdir(tmp_path)) == before  # no output, no temporary
    _one_line(_invoke("inspect", src, "--data", CAL), 3, needle)  # every reader checks


def test_a_link_to_a_file_inside_the_folder_is_copied_as_a_regular_file(tmp_path):
    src = _sharded(tmp_path / "in")
    (src / "notes").mkdir()
    (src / "notes" / "card.md").write_text("model card\n")
    (src / "README.md").symlink_to("notes/card.md")
    r = _invoke("apply", src, "--data", CAL, "--holdout", HOLD, "-o", tmp_path / "out", "--steps", "2", "-q")
    assert r.exit_code == 0, r.output
    readme = tmp_path / "out" / "README.md"
    assert stat.S_ISREG(os.lstat(readme).st_mode) and readme.read_text() == "model card\n"


def _hf_cache(root: Path) -> Path:
    """models--x/{blobs/SHA, snapshots/abc/NAME -> ../../blobs/SHA}, as huggingface_hub lays it out."""
    files = {"config.json": json.dumps({"architecture": "mlp", "model_args": KWARGS}).encode(), "model.safetensors": MID.read_bytes()}
    blobs, snap = root / "models--x" / "blobs", root / "models--x" / "snapshots" / "abc"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for name, data in files.items():
        sha = hashlib.sha256(data).hexdigest()
        (blobs / sha).write_bytes(data)
        (snap / name).symlink_to(Path("..") / ".." / "blobs" / sha)
    return snap


def test_a_hugging_face_cache_snapshot_of_links_into_blobs_is_accepted(tmp_path):
    snap = _hf_cache(tmp_path / "hub")
    out = tmp_path / "out"
    r = _invoke("apply", snap, "--data", CAL, "--holdout", HOLD, "-o", out, "--steps", "3", "--json", "-q")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    assert all(stat.S_ISREG(os.lstat(out / n).st_mode) for n in os.listdir(out))  # files, not links into the cache
    assert (out / "config.json").read_bytes() == (snap / "config.json").read_bytes()
    assert loss64(load_file(str(out / "model.safetensors"))) == pytest.approx(doc["calibration"]["loss_after"], rel=1e-5)
    # the cache itself is untouched, and a snapshot link that leaves models--x/blobs is still refused
    assert loss64(load_file(str(snap / "model.safetensors"))) == pytest.approx(doc["calibration"]["loss_before"], rel=1e-5)
    other = tmp_path / "hub" / "models--y" / "blobs"
    other.mkdir(parents=True)
    shutil.copy(snap / "config.json", other / "c")
    (snap / "extra.json").symlink_to(Path("..") / ".." / ".." / "models--y" / "blobs" / "c")
    _one_line(_invoke("apply", snap, "--data", CAL, "-o", tmp_path / "out2"), 3, "extra.json is a link to", "outside the folder")
