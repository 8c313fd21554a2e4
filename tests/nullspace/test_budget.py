"""``--batch-size auto`` / ``--max-memory`` and ``--max-seconds`` (pipeline and ascent loop)."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from _ckpt import CAL, HOLD, MID, ROOT, mid_state, mlp, run

from teleport_cli.config import TeleportConfig, parse_bytes
from teleport_cli.errors import ConfigError
from teleport_cli.pipeline import teleport


def test_parse_bytes_binary_units():
    assert parse_bytes("4GB") == 4 * 2**30
    assert parse_bytes("512MB") == 512 * 2**20
    assert parse_bytes("1.5g") == int(1.5 * 2**30)
    assert parse_bytes("1000") == 1000
    for bad in ("", "GB", "-1GB", "4XB", "0"):
        with pytest.raises(ConfigError):
            parse_bytes(bad)


def test_auto_batch_gives_the_same_teleport_as_batch_8(tmp_path):
    """The batch size changes only the order of float sums: same losses and weights."""
    a = run(mid_state_file(tmp_path), tmp_path / "a.safetensors", config=TeleportConfig(steps=4, device="cpu", batch_size=8))
    b = run(mid_state_file(tmp_path), tmp_path / "b.safetensors", config=TeleportConfig(steps=4, device="cpu", batch_size="auto"))
    assert a.batch_size == 8 and b.batch_size == b.outcome.batch["batch_size"] and b.batch_size > 8
    sa, sb = a.outcome.stats, b.outcome.stats
    assert (sa.steps_accepted, sa.steps_rejected) == (sb.steps_accepted, sb.steps_rejected)
    for x, y in [(sa.loss_before, sb.loss_before), (sa.loss_after, sb.loss_after), (sa.grad_norm_after, sb.grad_norm_after)]:
        assert x == pytest.approx(y, rel=1e-5)
    wa, wb = a.outcome.model.state_dict(), b.outcome.model.state_dict()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=1e-4, atol=1e-6), k
    ca = {l.name: l.rel_weight_change for l in a.outcome.layers}
    cb = {l.name: l.rel_weight_change for l in b.outcome.layers}
    assert ca == pytest.approx(cb, rel=1e-4, abs=1e-7)
    doc = b.to_dict()
    assert doc["batch_size"] == b.batch_size and doc["memory"]["estimate"] <= doc["memory"]["budget"]


def mid_state_file(tmp_path):
    return MID


PEAK_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from torch import nn
    torch.set_num_threads(1)
    from teleport_cli.data.tensors import TensorData
    from teleport_cli.nullspace.derivatives import hessian_vector_product
    from teleport_cli.nullspace.losses import LOSS_FUNCTIONS
    from teleport_cli.nullspace.memory import choose_batch_size, peak_rss_bytes, reset_peak_rss, rss_bytes

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.Tanh(), nn.Conv2d(32, 32, 3, padding=1), nn.Tanh(),
                          nn.Conv2d(32, 32, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()
    data = TensorData(torch.randn(256, 3, 32, 32), torch.randint(0, 10, (256,)), "random")
    loss = LOSS_FUNCTIONS["ce"]
    cpu = torch.device("cpu")
    free = choose_batch_size(model, data, loss, cpu, max_memory=2**40)
    budget = free.in_use + free.reserve + free.fixed + free.per_sample * 40   # room for about 40 samples
    chosen = choose_batch_size(model, data, loss, cpu, max_memory=budget)
    params = [p for p in model.parameters()]
    reset_peak_rss()
    start = rss_bytes()
    hessian_vector_product(model, data.batches(chosen.batch_size), loss, params, [torch.ones_like(p) for p in params], params, 256)
    print(json.dumps({"budget": budget, "batch": chosen.batch_size, "peak": peak_rss_bytes(), "start": start,
                      "per_sample": chosen.per_sample, "estimate": chosen.estimate}))
    """
)


def test_chosen_batch_peak_fits_the_budget():
    """A real measurement in a fresh process: the HVP over the whole set at the chosen batch
    peaks (VmHWM) within the budget that made ``auto`` choose it."""
    p = subprocess.run([sys.executable, "-c", PEAK_SCRIPT], capture_output=True, text=True, timeout=300,
                       env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["per_sample"] > 0
    assert 1 <= r["batch"] < 256  # about 40 samples of live room, halved by the heap slack
    assert r["peak"] <= r["budget"], r


def _digits():
    from safetensors.torch import load_file

    return [(d["inputs"], d["targets"]) for d in (load_file(str(CAL)), load_file(str(HOLD)))]


def test_max_seconds_stops_at_the_last_accepted_step():
    """A tiny time budget stops with ``max_seconds``, verifies, and leaves the weights of the
    last accepted step: the same as a run with --steps equal to the accepted count."""
    cal, hold = _digits()
    base = dict(objective="grad-norm", steps=100000, step_size=1e-3, step_growth=1.0, tolerance=0.05, holdout_tolerance=0.2,
                guard_fraction=0.0, device="cpu", seed=3)
    outcome = None
    for seconds in (0.05, 0.2, 0.8, 3.0, 10.0):
        out = teleport(mlp(mid_state()), cal, TeleportConfig(**base, max_seconds=seconds), holdout=hold)
        if out.stats.stop_reason == "max_seconds" and out.stats.steps_accepted >= 1:
            outcome = out
            break
    assert outcome is not None, "no budget both accepted a step and ran out"
    assert outcome.verified
    assert outcome.stats.seconds >= seconds
    again = teleport(mlp(mid_state()), cal, TeleportConfig(**base | {"steps": outcome.stats.steps_accepted}), holdout=hold)
    assert again.stats.stop_reason == "steps"
    a, b = outcome.model.state_dict(), again.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
