"""Progress on stderr: plain phase lines when stderr is a pipe, rich bars on a terminal, none with -q."""

import json
import os
import pty
import select
import subprocess
import sys

from _ckpt import CAL, HOLD, MID, ROOT

PHASES = ("capture", "bases", "ascent", "verify")


def _cmd(out, *extra):
    return [sys.executable, "-m", "teleport_cli", "apply", str(MID), "--data", str(CAL), "--holdout", str(HOLD), "-o", str(out),
            "--steps", "3", "--device", "cpu", *extra]


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def test_plain_phase_lines_on_a_pipe_and_one_json_document_on_stdout(tmp_path):
    p = subprocess.run(_cmd(tmp_path / "o.safetensors", "--json"), capture_output=True, text=True, timeout=300, env=_env())
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)  # stdout is exactly one JSON document
    lines = [l for l in p.stderr.splitlines() if l.startswith("[teleport] ")]
    for phase in PHASES + ("batch-size",):
        assert any(l.startswith(f"[teleport] {phase}:") for l in lines), (phase, p.stderr)
    done = [l for l in lines if l.startswith("[teleport] ascent: done")]
    assert done == [f"[teleport] ascent: done ({doc['stop_reason']}), {doc['steps_accepted']} accepted, "
                    f"{doc['steps_rejected']} rejected, grad-norm {doc['grad_norm_ratio']:.3g}x, {doc['ascent_seconds']:.0f} s"]
    assert f"[teleport] batch-size: auto chose {doc['batch_size']}" in lines
    for phase in ("capture", "bases", "verify"):  # each phase also says when its last part is done
        start = next(l for l in lines if l.startswith(f"[teleport] {phase}: 0/"))
        total = start.rsplit("/", 1)[1]
        assert any(l.startswith(f"[teleport] {phase}: {total}/{total} done, ") and l.endswith(" s") for l in lines), (phase, lines)
    assert "[teleport]" not in p.stdout


def test_quiet_prints_no_progress(tmp_path):
    p = subprocess.run(_cmd(tmp_path / "o.safetensors", "--json", "-q"), capture_output=True, text=True, timeout=300, env=_env())
    assert p.returncode == 0, p.stderr
    json.loads(p.stdout)
    assert p.stderr == ""


def test_rich_bars_on_a_terminal(tmp_path):
    """stderr (and stdout) a pty: the rich path runs to exit 0 and draws the phases' bars."""
    pid, fd = pty.fork()
    if pid == 0:
        os.execve(sys.executable, _cmd(tmp_path / "o.safetensors"), {**_env(), "COLUMNS": "160", "TERM": "xterm"})
    chunks = []
    while True:
        ready, _, _ = select.select([fd], [], [], 300)
        if not ready:
            break
        try:
            data = os.read(fd, 65536)
        except OSError:  # the child closed the pty
            break
        if not data:
            break
        chunks.append(data)
    _, status = os.waitpid(pid, 0)
    text = b"".join(chunks).decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, text
    for phase in PHASES:
        assert phase in text, (phase, text[-2000:])
    assert "[teleport] " not in text  # not the plain lines
    assert "accepted" in text and "ETA" in text
    assert (tmp_path / "o.safetensors").exists()


def test_plain_ascent_lines_every_ten_seconds_also_within_a_long_step():
    import io

    from teleport_cli.cli.common import PlainProgress

    now = [0.0]
    out = io.StringIO()
    p = PlainProgress(out, clock=lambda: now[0])
    p("ascent", 0, 30, {"accepted": 0, "rejected": 0, "grad_norm_ratio": 1.0, "seconds": 0.0})
    now[0] = 4.0
    p("ascent", 1, 30, {"accepted": 1, "rejected": 0, "grad_norm_ratio": 1.1, "seconds": 4.0})  # < 10 s: no line
    now[0] = 10.5
    p("ascent", 2, 30, {"accepted": 2, "rejected": 1, "grad_norm_ratio": 1.2, "seconds": 10.5})
    now[0] = 15.0
    p.beat()  # < 10 s since the last line: nothing
    now[0] = 21.0
    p.beat()  # a step that has run 10 s without an event: the line from the last counts, time now
    p("ascent", 2, 2, {"accepted": 2, "rejected": 1, "grad_norm_ratio": 1.2, "seconds": 22.0, "stop_reason": "max_seconds"})
    now[0] = 40.0
    p.beat()  # after the end: nothing
    assert out.getvalue().splitlines() == [
        "[teleport] ascent: up to 30 accepted steps",
        "[teleport] ascent: step 3/30, 2 accepted, 1 rejected, grad-norm 1.2x, 10 s",
        "[teleport] ascent: step 3/30, 2 accepted, 1 rejected, grad-norm 1.2x, 21 s",
        "[teleport] ascent: done (max_seconds), 2 accepted, 1 rejected, grad-norm 1.2x, 22 s",
    ]
