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
    from teleport_cli.nullspace import memory
    from teleport_cli.nullspace.memory import choose_batch_size, peak_rss_bytes, reset_peak_rss, rss_bytes

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.Tanh(), nn.Conv2d(32, 32, 3, padding=1), nn.Tanh(),
                          nn.Conv2d(32, 32, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()
    data = TensorData(torch.randn(256, 3, 32, 32), torch.randint(0, 10, (256,)), "random")
    loss = LOSS_FUNCTIONS["ce"]
    cpu = torch.device("cpu")
    free = choose_batch_size(model, data, loss, cpu, max_memory=2**40)
    budget = free.in_use + free.reserve + free.fixed + free.per_sample * 40   # room for about 40 samples
    # the second choice reads the same probes: on a loaded machine a fresh probe can measure a
    # smaller slope, and the budget made for about 40 samples would then admit 256
    memory._cpu_probes = lambda *args: list(free.probes)
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


class BatchClock:
    """A fake clock that advances by one "second" per forward pass of a batch, and records the
    reading at which each forward started, until the ascent's last event."""

    def __init__(self) -> None:
        self.now, self.starts, self.ascent_over, self.accepted_at = 0, [], False, {}

    def __call__(self) -> float:
        return float(self.now)

    def hook(self, module, args) -> None:
        if not self.ascent_over:
            self.starts.append(self.now)
        self.now += 1

    def event(self, stage, done, total, info) -> None:
        if stage == "ascent" and "stop_reason" in info:
            self.ascent_over = True
        elif stage == "ascent" and info.get("accepted"):
            self.accepted_at.setdefault(info["accepted"], self.now)


def _clocked_run(monkeypatch, config):
    import teleport_cli.nullspace.ascent as ascent

    cal, hold = _digits()
    clock = BatchClock()
    monkeypatch.setattr(ascent, "clock", clock)
    model = mlp(mid_state())
    model.register_forward_pre_hook(lambda module, args: clock.hook(module, args))  # a function: deep copies share it
    out = teleport(model, cal, config, holdout=hold, on_event=clock.event, started=0.0)
    return out, clock


def test_max_seconds_is_checked_between_batches_and_keeps_the_last_accepted_step(monkeypatch):
    """With a fake clock that ticks once per batch, the ascent stops at the first batch boundary
    after the budget (no forward pass of the ascent starts at or after it, and the last one
    starts one tick before it), mid-pass, and the weights are those of a run with --steps equal
    to the accepted count (the same seed)."""
    base = dict(objective="grad-norm", step_size=1e-3, step_growth=1.0, tolerance=0.05, holdout_tolerance=0.2,
                guard_fraction=0.0, device="cpu", seed=3, batch_size=32)
    free, free_clock = _clocked_run(monkeypatch, TeleportConfig(**base, steps=3))
    assert free.stats.steps_accepted == 3
    two = free_clock.accepted_at[2]
    budget = two + 3  # three batches into the pass after the second accepted step
    assert budget < free_clock.accepted_at[3]
    out, clock = _clocked_run(monkeypatch, TeleportConfig(**base, steps=100000, max_seconds=budget))
    assert out.stats.stop_reason == "max_seconds" and out.verified
    assert out.stats.steps_accepted == 2
    assert max(clock.starts) == budget - 1  # stopped at the first batch boundary at or past the budget
    again, _ = _clocked_run(monkeypatch, TeleportConfig(**base, steps=2))
    assert again.stats.stop_reason == "steps"
    a, b = out.model.state_dict(), again.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _conv_model():
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.Tanh(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 40), nn.Tanh(), nn.Linear(40, 10)).eval()


def test_memory_parts_match_the_tensors_they_count():
    """The estimate's Gram part is the exact byte count of the captured Grams (each counted
    once), and its basis part bounds the bytes of the bases built from them at every tau."""
    from teleport_cli.nullspace.bases import layer_basis
    from teleport_cli.nullspace.capture import capture_grams
    from teleport_cli.nullspace.memory import PARAMETER_COPIES, basis_bytes, gram_bytes, reserve_bytes
    from teleport_cli.nullspace.selection import find_layers

    model = _conv_model()
    layers, _ = find_layers(model)
    blocks = [(s.groups, s.d_in) for s, _ in layers]
    assert len(blocks) == 4 and (2, 36) in blocks
    accs = capture_grams(model, layers, [(torch.randn(6, 3, 6, 6), torch.zeros(6, dtype=torch.long))])
    assert gram_bytes(blocks) == sum(a.gram.nbytes for a in accs.values())
    params = sum(p.nbytes for p in model.parameters())
    for tau in (0.5, 0.9, 0.999, 1.0):
        bases = [layer_basis(s.name, accs[s.name].gram, tau) for s, _ in layers]
        held = sum(g.vectors.nbytes for b in bases for g in b.groups)
        assert 0 < held <= basis_bytes(blocks)
    assert reserve_bytes(model, blocks) == PARAMETER_COPIES * params + basis_bytes(blocks)


def test_grams_are_freed_before_the_ascent(monkeypatch):
    """The reserve leaves the Grams out of the ascent's phase: the pipeline must drop them once
    their bases exist (no reference left when the ascent starts)."""
    import gc
    import weakref

    import teleport_cli.pipeline as pipeline

    refs = []
    real = pipeline.capture_grams

    def capture(*args, **kwargs):
        accs = real(*args, **kwargs)
        refs.extend(weakref.ref(a.gram) for a in accs.values() if a.gram is not None)
        return accs

    alive = []

    def event(stage, done, total, info):
        if stage == "ascent" and done == 0 and not alive:
            gc.collect()
            alive.append(sum(r() is not None for r in refs))

    monkeypatch.setattr(pipeline, "capture_grams", capture)
    cal, hold = _digits()
    out = teleport(mlp(mid_state()), cal, TeleportConfig(objective="grad-norm", steps=1, device="cpu"), holdout=hold, on_event=event)
    assert len(refs) == 3 and alive == [0] and out.stats.steps_accepted == 1


def test_auto_batch_on_a_model_without_double_backward():
    """hardsigmoid has no double backward (MobileNetV3, LCNet): the probe measures a gradient pass
    instead of crashing, and the choice is the same rule on its figures."""
    from torch import nn

    from teleport_cli.data.tensors import TensorData
    from teleport_cli.nullspace.derivatives import hessian_vector_product
    from teleport_cli.nullspace.losses import LOSS_FUNCTIONS
    from teleport_cli.nullspace.memory import choose_batch_size

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Hardsigmoid(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10)).eval()
    data = TensorData(torch.randn(64, 3, 8, 8), torch.randint(0, 10, (64,)), "random")
    params = list(model.parameters())
    with pytest.raises(RuntimeError, match="derivative for"):
        hessian_vector_product(model, [(data.inputs[:2], data.targets[:2])], LOSS_FUNCTIONS["ce"], params, params, params, 2)
    choice = choose_batch_size(model, data, LOSS_FUNCTIONS["ce"], torch.device("cpu"), max_memory=2**40)
    assert choice.fits and choice.batch_size == 64 and len(choice.probes) == 2


COPIES_SCRIPT = textwrap.dedent(
    """
    import copy, gc, json, sys
    import torch
    torch.set_num_threads(1)
    from teleport_cli.config import TeleportConfig
    from teleport_cli.data.tensors import TensorData
    from teleport_cli.models.builtin import MLP
    from teleport_cli.nullspace.ascent import ascend
    from teleport_cli.nullspace.bases import layer_basis
    from teleport_cli.nullspace.capture import capture_grams
    from teleport_cli.nullspace.losses import LOSS_FUNCTIONS
    from teleport_cli.nullspace.memory import _mallopt, peak_rss_bytes, reset_peak_rss, rss_bytes
    from teleport_cli.nullspace.objectives import make_objective
    from teleport_cli.nullspace.selection import find_layers

    objective, hvp = sys.argv[1], sys.argv[2]
    _mallopt(128 * 1024, 128 * 1024)  # freed blocks go back at once: RSS growth is live memory
    torch.manual_seed(0)
    model = MLP(784, [1024, 1024, 1024], 10).eval()  # parameters dominate: 64 samples, activations 0.25 MB a layer
    batches = TensorData(torch.randn(64, 784), torch.randint(0, 10, (64,)), "random").batches(64)
    layers, _ = find_layers(model)
    accs = capture_grams(model, layers, batches)
    bases = {s.name: layer_basis(s.name, accs[s.name].gram, 0.99) for s, _ in layers}
    del accs
    gc.collect()
    before = rss_bytes()
    reset_peak_rss()
    moved = copy.deepcopy(model)
    stats = ascend(moved, batches, find_layers(moved)[0], bases, TeleportConfig(objective=objective, hvp=hvp, steps=3, tolerance=1.0),
                   LOSS_FUNCTIONS["ce"], objective=make_objective(objective, lr=0.01, hvp=hvp))
    params = sum(p.nbytes for p in model.parameters())
    print(json.dumps({"copies": (peak_rss_bytes() - before) / params, "accepted": stats.steps_accepted}))
    """
)


@pytest.mark.parametrize("objective,hvp", [("lookahead", "forward"), ("lookahead", "exact"), ("grad-norm", "forward")])
def test_parameter_copies_bound_the_ascent_measured_peak(objective, hvp):
    """In a fresh process whose heap returns freed blocks at once, three ascent steps of a model
    whose memory is its parameters grow the resident set by at most PARAMETER_COPIES times the
    parameters' bytes (the reserve's parameter part), and by more than half of it (a bound, not
    a wild overcount)."""
    from teleport_cli.nullspace.memory import PARAMETER_COPIES

    p = subprocess.run([sys.executable, "-c", COPIES_SCRIPT, objective, hvp], capture_output=True, text=True, timeout=300,
                       env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["accepted"] == 3
    assert PARAMETER_COPIES / 2 < r["copies"] <= PARAMETER_COPIES, r


def test_the_choice_runs_no_garbage_collection_and_restores_the_collector():
    """The probes run with the cyclic collector off and collect nothing themselves (a gc.collect()
    per probe cost 0.06-0.2 s with torch loaded, more than the probes' passes); the collector's
    state is restored, and the probes still measure a growth (per-sample bytes > 0)."""
    import gc

    from teleport_cli.data.tensors import TensorData
    from teleport_cli.nullspace.losses import LOSS_FUNCTIONS
    from teleport_cli.nullspace.memory import choose_batch_size

    model = _conv_model()
    data = TensorData(torch.randn(64, 3, 16, 16), torch.randint(0, 10, (64,)), "random")
    collections = []
    callback = lambda phase, info: collections.append(info["generation"]) if phase == "start" else None  # noqa: E731
    for enabled in (True, False):
        gc.enable() if enabled else gc.disable()
        gc.callbacks.append(callback)
        try:
            choice = choose_batch_size(model, data, LOSS_FUNCTIONS["ce"], torch.device("cpu"), max_memory=2**40)
            assert gc.isenabled() == enabled
        finally:
            gc.callbacks.remove(callback)
            gc.enable()
        assert collections == [] and choice.batch_size == 64 and len(choice.probes) == 2 and choice.per_sample > 0
