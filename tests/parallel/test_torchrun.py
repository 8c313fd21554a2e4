"""``torchrun --nproc_per_node 2 -m teleport_cli apply``: a real launch, 2 gloo ranks on the CPU.

* the result equals ``python -m teleport_cli apply`` in one process (step counts, weight
  changes to 1e-4 relative, the losses), stdout holds rank 0's JSON alone, with ``exit_code``;
* a rank killed mid-ascent (SIGKILL, as the OOM killer does) ends the job: every other rank
  stops with one line naming it, no output and no temporary file is left, nothing hangs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from _ckpt import CAL, MID
from _procs import ENV, ROOT
from _ranks import free_port

from teleport_cli.checkpoints.tensor_files import read_tensor_file


def torchrun() -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "teleport_cli"]


SINGLE = [sys.executable, "-m", "teleport_cli"]


def _run(argv: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """``argv`` in its own session; on a timeout the whole session (launcher and ranks) is killed."""
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    return subprocess.CompletedProcess(argv, p.returncode, out, err)


def _delta(path) -> torch.Tensor:
    a, _ = read_tensor_file(path, what="output")
    b, _ = read_tensor_file(MID, what="input")
    return torch.cat([(a[k].double() - b[k].double()).reshape(-1) for k in sorted(b)])


def test_torchrun_apply_gives_the_single_process_figures(tmp_path):
    args = ["apply", str(MID), "--data", str(CAL), "--steps", "5", "--json"]
    one = subprocess.run([*SINGLE, *args, "-o", str(tmp_path / "one.safetensors")], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    two = _run([*torchrun(), *args, "-o", str(tmp_path / "two.safetensors")])
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    a, b = json.loads(one.stdout), json.loads(two.stdout)  # one JSON document: rank 1 printed nothing
    assert a["exit_code"] == b["exit_code"] == 0
    assert (a["steps_accepted"], a["steps_rejected"]) == (b["steps_accepted"], b["steps_rejected"])
    assert a["calibration"]["samples"] == b["calibration"]["samples"] and a["holdout"]["samples"] == b["holdout"]["samples"]
    for key in ("grad_norm_before", "grad_norm_after", "objective_after"):
        assert abs(a[key] - b[key]) <= 1e-5 * abs(a[key]), key
    for name in ("calibration", "holdout"):
        assert abs(a[name]["loss_after"] - b[name]["loss_after"]) <= 1e-5 * a[name]["loss_after"]
    d1, d2 = _delta(tmp_path / "one.safetensors"), _delta(tmp_path / "two.safetensors")
    assert float((d2 - d1).norm()) <= 1e-4 * float(d1.norm()) and float(d1.norm()) > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.safetensors", "two.safetensors"]


def _rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of the torchrun worker with ``RANK=rank`` among ``launcher``'s children."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == launcher and f"RANK={rank}".encode() in env:
            return int(entry.name)
    return None


def test_a_killed_rank_ends_every_rank_with_one_line_and_no_output(tmp_path):
    out = tmp_path / "out.safetensors"
    # tiny steps that are all accepted: an ascent that would run for minutes
    args = ["apply", str(MID), "--data", str(CAL), "--steps", "100000", "--step-size", "1e-7", "--step-growth", "1",
            "--tolerance", "1", "--holdout-tolerance", "1", "--hvp", "forward", "-o", str(out)]
    p = subprocess.Popen([*torchrun(), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT, start_new_session=True)
    lines = []
    try:
        for line in p.stderr:
            lines.append(line)
            if line.startswith("[teleport] ascent:"):
                break
        pid = _rank_pid(p.pid, 1)
        assert pid is not None, "".join(lines)
        os.kill(pid, signal.SIGKILL)
        t0 = time.monotonic()
        stdout, rest = p.communicate(timeout=60)
        took = time.monotonic() - t0
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    err = "".join(lines) + rest
    assert p.returncode != 0 and stdout == ""
    ours = [line for line in err.splitlines() if line.startswith("rank ")]
    assert len(ours) == 1 and ours[0].startswith("rank 0: error: "), err  # rank 1 died without a word
    assert not any("teleport_cli" in line and "File" in line for line in err.splitlines()), err  # no traceback from our code
    assert took < 30, took
    assert list(tmp_path.iterdir()) == []  # no output, no temporary file


def test_torchrun_inspect_runs_on_rank_0_alone_and_prints_one_document():
    args = ["inspect", str(MID), "--data", str(CAL), "--json"]
    one = _run([*SINGLE, *args])
    two = _run([*torchrun(), *args])
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    assert json.loads(two.stdout) == json.loads(one.stdout)  # rank 1 printed nothing
