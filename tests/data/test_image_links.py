"""Links in image folders: followed only to a regular file inside the folder (the rule of
checkpoint folders); any other link or special file is one line naming it, exit 3. Real links."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from teleport_cli.cli import cli
from teleport_cli.data.images import load_image_folder

SAMPLES = Path(__file__).resolve().parents[2] / "sample_checkpoints"
CKPT = SAMPLES / "fmnist_test_resnet_mid.safetensors"
IMAGES = SAMPLES / "fmnist_calibration"
HOST_FILE = Path("/etc/hostname") if Path("/etc/hostname").is_file() else Path("/etc/passwd")


def _config() -> dict:
    with safe_open(str(CKPT), "pt") as f:
        return json.loads(f.metadata()["data_config"])


def _folder(root: Path, per_class: int = 3) -> Path:
    """A copy of the first images of two classes of the shipped calibration folder."""
    for cls in ("bag", "coat"):
        (root / cls).mkdir(parents=True)
        for f in sorted((IMAGES / cls).iterdir())[:per_class]:
            shutil.copyfile(f, root / cls / f.name)
    return root


def _invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _outside_png(tmp: Path) -> Path:
    (tmp / "elsewhere").mkdir()
    target = tmp / "elsewhere" / "x.png"
    shutil.copyfile(sorted((IMAGES / "dress").iterdir())[0], target)
    return target


CASES = {
    "file-outside": (lambda d, t: (d / "bag" / "zz.png").symlink_to(_outside_png(t)), "bag/zz.png is a link to {t}/elsewhere/x.png, outside the folder"),
    "host-file": (lambda d, t: (d / "bag" / "zz.png").symlink_to(HOST_FILE), f"bag/zz.png is a link to {HOST_FILE.resolve()}, outside the folder"),
    "class-folder-outside": (lambda d, t: (_outside_png(t), (d / "dress").symlink_to(t / "elsewhere", target_is_directory=True)), "dress is a link to {t}/elsewhere, outside the folder"),
    "class-folder-inside": (lambda d, t: (d / "dress").symlink_to("bag", target_is_directory=True), "dress is a link to {d}/bag, which is not a regular file"),
    "nested-folder-inside": (lambda d, t: (d / "coat" / "more").symlink_to("../bag", target_is_directory=True), "coat/more is a link to {d}/bag, which is not a regular file"),
    "dangling": (lambda d, t: (d / "bag" / "gone.png").symlink_to("missing.png"), "bag/gone.png is a link to a missing file or a link loop"),
    "loop": (lambda d, t: ((d / "bag" / "a.png").symlink_to("b.png"), (d / "bag" / "b.png").symlink_to("a.png")), "is a link to a missing file or a link loop"),
    "fifo": (lambda d, t: os.mkfifo(d / "bag" / "pipe.png"), "bag/pipe.png is not a regular file"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_link_in_an_image_folder_is_one_line_naming_it_exit_3(tmp_path, case):
    make, needle = CASES[case]
    data = _folder(tmp_path / "imgs")
    make(data, tmp_path)
    needle = needle.format(t=tmp_path.resolve(), d=data.resolve())
    for flag in ("--data", "--holdout"):
        args = ["--data", data] if flag == "--data" else ["--data", IMAGES, "--holdout", data]
        out = tmp_path / f"out{flag}.safetensors"
        r = _invoke("apply", CKPT, *args, "-o", out, "--steps", "1")
        assert r.exit_code == 3, r.output
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in r.output and needle in lines[0], r.stderr
        assert "image folder" in lines[0] and not out.exists()
    r = _invoke("inspect", CKPT, "--data", data)
    assert r.exit_code == 3 and needle in r.stderr, r.output


def test_a_link_to_a_regular_file_inside_the_folder_is_read_as_that_file(tmp_path):
    linked = _folder(tmp_path / "linked")
    copied = _folder(tmp_path / "copied")
    first = sorted((linked / "coat").iterdir())[0].name
    (linked / "bag" / "zz.png").symlink_to(Path("..") / "coat" / first)  # relative, inside
    (linked / "coat" / "zz.png").symlink_to((linked / "coat" / first).resolve())  # absolute, inside
    shutil.copyfile(copied / "coat" / first, copied / "bag" / "zz.png")
    shutil.copyfile(copied / "coat" / first, copied / "coat" / "zz.png")
    a, _ = load_image_folder(linked, _config())
    b, _ = load_image_folder(copied, _config())
    assert len(a) == len(b) == 8
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    r = _invoke("inspect", CKPT, "--data", linked, "--json")
    assert r.exit_code == 0, r.output
