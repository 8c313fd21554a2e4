"""The final rename never replaces an output that appeared meanwhile; temporaries are locked,
stale ones removed; a full disk and an over-long name are exit 6 in one line. Real processes,
real files, a real full tmpfs."""

import fcntl
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from _ckpt import CAL, HOLD, MID, loss64, mid_state
from _procs import ENV, ROOT, on_tmpfs, one_line, teleport
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from teleport_cli.checkpoints import atomic, publish
from teleport_cli.checkpoints.temps import STALE
from teleport_cli.errors import OutputError

SLOW_APPLY = ["--steps", "400", "--step-size", "1e-5", "--step-growth", "1"]  # about 3 s of ascent on the MLP


def _temps(folder: Path) -> list[str]:
    return sorted(n for n in os.listdir(folder) if ".tmp" in n or "teleport-lock" in n)


def test_two_concurrent_applies_to_one_new_output_one_wins_the_other_exits_6(tmp_path):
    out = tmp_path / "o.safetensors"
    base = ["apply", MID, "--data", CAL, "--holdout", HOLD, "-o", out, "--json", "-q", *SLOW_APPLY[2:]]
    procs = {steps: teleport(*base, "--steps", steps) for steps in (400, 399)}  # the step budget tells the files apart
    done = {steps: (p.wait(timeout=300), *p.communicate()) for steps, p in procs.items()}
    rcs = sorted(rc for rc, _, _ in done.values())
    assert rcs == [0, 6], done
    (winner, (_, stdout, _)), = [(s, d) for s, d in done.items() if d[0] == 0]
    (_, _, loser_err), = [d for d in done.values() if d[0] == 6]
    # the loser passed the start-up check and was refused at the final rename, not at the start
    assert "was created by another process while this run was working" in one_line(loser_err)
    doc = json.loads(stdout)
    assert doc["output"] == str(out) and sorted(os.listdir(tmp_path)) == ["o.safetensors"]
    with safe_open(str(out), "pt") as f:
        assert json.loads(f.metadata()["teleport"])["steps"] == winner
    # intact: the file's loss is the winner's verified loss, computed independently in float64
    assert loss64(load_file(str(out))) == pytest.approx(doc["calibration"]["loss_after"], rel=1e-5)


def _make_out_appear(out: Path, *, folder: bool):
    def writer(tmp: Path) -> None:
        (tmp / "w" if folder else tmp).write_bytes(b"new")
        if folder:
            out.mkdir()
            (out / "theirs").write_text("theirs")
        else:
            out.write_text("theirs")

    return writer


@pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2", "lock-file"])
def test_an_output_that_appears_during_the_write_is_left_alone(tmp_path, monkeypatch, renameat2):
    if not renameat2:
        monkeypatch.setattr(publish, "_RENAMEAT2", [None])  # a C library without renameat2
    elif publish._renameat2() is None:
        pytest.skip("this C library has no renameat2")
    f = tmp_path / "o.safetensors"
    with pytest.raises(OutputError, match="created by another process"):
        atomic.write_file_atomic(f, _make_out_appear(f, folder=False))
    assert f.read_text() == "theirs"
    d = tmp_path / "folder"
    with pytest.raises(OutputError, match="created by another process"):
        with atomic.staged_folder(d) as tmp:
            _make_out_appear(d, folder=True)(tmp)
    assert os.listdir(d) == ["theirs"]
    assert _temps(tmp_path) == []
    with atomic.staged_folder(tmp_path / "fresh") as tmp:  # and a free name is published
        (tmp / "w").write_text("mine")
    assert (tmp_path / "fresh" / "w").read_text() == "mine" and _temps(tmp_path) == []


HOLD_LOCK = textwrap.dedent("""
    import fcntl, os, sys, time
    fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    print("held", flush=True)
    time.sleep(120)
""")


def test_lock_file_fallback_refuses_while_another_run_holds_it_and_takes_over_a_stale_one(tmp_path, monkeypatch):
    monkeypatch.setattr(publish, "_RENAMEAT2", [None])
    lock = tmp_path / ".out.teleport-lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputError, match="being written by another teleport-cli run"):
            with atomic.staged_folder(tmp_path / "out") as tmp:
                (tmp / "w").write_text("mine")
        assert not (tmp_path / "out").exists()
    finally:
        holder.kill()
        holder.wait()
    assert lock.exists()  # left behind by a run killed while it held it
    with atomic.staged_folder(tmp_path / "out") as tmp:
        (tmp / "w").write_text("mine")
    assert (tmp_path / "out" / "w").read_text() == "mine" and _temps(tmp_path) == []


SLOW_WRITER = textwrap.dedent("""
    import signal, sys, time
    from pathlib import Path
    from teleport_cli.checkpoints.atomic import write_file_atomic

    def slow(tmp):
        tmp.write_bytes(b"partial")
        print("writing", flush=True)
        time.sleep(120)

    write_file_atomic(Path(sys.argv[1]), slow)
""")


def _slow_writer(target: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(target)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    assert p.stdout.readline().strip() == "writing", p.stderr.read()
    return p


def _apply_into(folder: Path, name: str = "o.safetensors"):
    return subprocess.run([sys.executable, "-m", "teleport_cli", "apply", str(MID), "--data", str(CAL), "--holdout", str(HOLD),
                           "-o", str(folder / name), "--steps", "2", "-q"], capture_output=True, text=True, env=ENV, cwd=ROOT)


def test_kill_9_mid_write_leaves_a_temporary_that_the_next_run_removes_but_a_live_ones_stays(tmp_path):
    dead = _slow_writer(tmp_path / "dead.safetensors")
    live = _slow_writer(tmp_path / "live.safetensors")
    try:
        temps = _temps(tmp_path)
        assert len(temps) == 2 and all(STALE.match(n) for n in temps), temps
        assert [n for n in temps if n.startswith(".dead.safetensors.teleport-")] and [n for n in temps if n.startswith(".live.safetensors.teleport-")]
        dead.send_signal(signal.SIGKILL)
        dead.wait()
        stale = [n for n in temps if n.startswith(".dead")][0]
        assert (tmp_path / stale / "dead.safetensors").read_bytes() == b"partial"  # kill -9 ran no clean-up
        # the live writer's lock is real: another process cannot take it
        fd = os.open(tmp_path / [n for n in temps if n.startswith(".live")][0], os.O_RDONLY)
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(fd)
        r = _apply_into(tmp_path)
        assert r.returncode == 0, r.stderr
        left = _temps(tmp_path)
        assert len(left) == 1 and left[0].startswith(".live.safetensors.teleport-"), left
    finally:
        live.kill()
        live.wait()


def test_an_output_name_too_long_for_its_temporary_name_is_refused_before_any_work(tmp_path):
    name = "m" * (255 - len(".safetensors") - 5) + ".safetensors"  # a valid name: 250 bytes
    (tmp_path / name).write_bytes(b"")  # proves the name itself fits the file system
    os.unlink(tmp_path / name)
    r = _apply_into(tmp_path, name)
    line = one_line(r.stderr)
    assert r.returncode == 6 and "is too long: its temporary name needs 273 bytes, the file system allows 255" in line, line
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("suffix", ["o.safetensors", "o.pth.tar", "sharded"])
def test_a_full_disk_is_exit_6_no_space_left_with_nothing_left_behind(tmp_path, suffix):
    src = MID
    if suffix == "o.pth.tar":
        src = tmp_path / "in.pth.tar"
        torch.save({"state_dict": mid_state(), "arch": "mlp", "model_kwargs": {"in_features": 64, "hidden": [128, 64], "num_classes": 10}}, src)
    elif suffix == "sharded":
        src = tmp_path / "in"
        src.mkdir()
        state = mid_state()
        save_file(state, str(src / "model-00001-of-00001.safetensors"))
        with safe_open(str(MID), "pt") as f:
            meta = f.metadata()
        (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {**meta, "total_size": 0}, "weight_map": {k: "model-00001-of-00001.safetensors" for k in state}}))
    disk = tmp_path / "disk"
    argv = [sys.executable, "-m", "teleport_cli", "apply", src, "--data", CAL, "--holdout", HOLD, "-o", disk / suffix, "--steps", "2", "-q"]
    r = on_tmpfs(disk, argv, size="1M", fill=1_000_000)  # about 45 KB left for a 70 KB checkpoint
    line = one_line(r.stderr)
    assert r.rc == 6 and "No space left on device" in line and "no space left" in line, line
    assert r.listing == ["filler"]  # no partial output, no temporary
