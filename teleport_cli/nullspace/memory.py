"""``--batch-size auto``: the largest batch whose gradient and Hessian-vector product fit a budget.

The memory of one batch's gradient and double-backward Hessian-vector product is measured, not
modelled: one HVP (:func:`~teleport_cli.nullspace.derivatives.hessian_vector_product`, the
costliest pass of an ascent step; a gradient where the model has no double backward) runs on a batch of ``b1`` and of ``b2`` samples (after a
warm-up on one sample, for the one-off allocations), and its peak
is read from ``torch.cuda.max_memory_allocated`` on a GPU, or on the CPU from the growth of the
process's peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``; while it
measures, glibc is told to return large freed blocks at once so that the growth is not hidden
by reused pages; this runs in a forked child, so that this process's allocator keeps its own
faster settings). The peak at batch ``b`` is then estimated linearly, as the larger of two phases,

    ``peak(b) = in_use + max(bases_phase, reserve + slack * (fixed + per_sample * b))``

with ``in_use`` the memory held when measuring (model and calibration set); ``bases_phase``
what building the bases holds (every float64 Gram, the bases, one eigendecomposition's
workspace; no batch runs then); ``reserve`` what the ascent holds besides its batch (the
teleported copy and about ``PARAMETER_COPIES`` parameter-sized buffers, and the bases: the
Grams are freed once their bases are built, so they are not counted there); ``fixed`` and
``per_sample`` the intercept and slope of the two probes; and ``slack`` the heap's overhead over
the live tensors on the CPU (``CPU_HEAP_SLACK``; 1 on a GPU). The batch size changes only the
order of the float sums, never the objective.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .derivatives import full_gradient, hessian_vector_product
from .hvp import missing_double_backward

MAX_BATCH = 256
PROBES = (2, 8)
# parameter-sized tensors alive at the peak of an ascent step besides the model's own parameters
# (the teleported copy, gradient states of the point and the candidate, the look-ahead's
# trajectory, start, current and kept weights, the direction and its Hessian-vector product, the
# projection, and the look-ahead's virtual-step leaves with their kept graph): measured as the
# live-memory growth of three steps over the parameters' bytes, 17.1 for the look-ahead (k = 1,
# forward differences; 15.4 before the virtual step's graph was kept for the next direction) and
# 12.4 for grad-norm (tests/nullspace/test_budget.py checks the bound)
PARAMETER_COPIES = 20
# glibc's heap (dynamic mmap threshold) holds more than the live tensors: streaming an HVP over 256
# samples of test_budget's three-layer conv net, the peak RSS growth in a fresh process was 2.0x
# (batch 8), 2.7x (16), 3.0x (32) and 3.5x (64) of fixed + per_sample * b from the probes (2 runs
# each); at 2 (the earlier figure, 1.3-2.0x from single-batch passes) a chosen batch 16 overran
# the budget in 2 of 8 runs
CPU_HEAP_SLACK = 4.0
# float64 d_in x d_in matrices alive while one group is eigendecomposed: the symmetrised Gram
# (and its temporary), the eigenvectors, and syevd's workspace of about 2 d_in^2
EIGH_COPIES = 5


@dataclass(frozen=True)
class BatchChoice:
    """The batch size ``auto`` chose and the measurement behind it (all sizes in bytes).

    Attributes:
        batch_size: the chosen calibration batch size.
        budget: the memory budget; ``budget_source``: ``max_memory``, ``MemAvailable/2`` or
            ``cuda_free/2``.
        device: ``cpu`` or ``cuda``.
        in_use: memory held when measuring (RSS on the CPU, allocated on the GPU).
        reserve: what the ascent holds besides: parameter copies and the null-space bases.
        bases_phase: what building the bases holds: the Grams, the bases and one eigh's workspace.
        fixed, per_sample: intercept and slope of the probes' peaks over their batch sizes.
        estimate: the predicted peak at ``batch_size``.
        fits: whether ``estimate <= budget`` (False only when batch 1 does not fit).
        probes: ``[[batch, measured peak growth], ...]``.
    """

    batch_size: int
    budget: int
    budget_source: str
    device: str
    in_use: int
    reserve: int
    bases_phase: int
    fixed: int
    per_sample: int
    estimate: int
    fits: bool
    probes: tuple

    def to_dict(self) -> dict:
        return {**asdict(self), "probes": [list(p) for p in self.probes]}


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{field} not in /proc/self/status")


def rss_bytes() -> int:
    """The process's resident set size now (``VmRSS``), in bytes."""
    return _status_bytes("VmRSS")


def peak_rss_bytes() -> int:
    """The process's peak resident set size since start or the last reset (``VmHWM``), in bytes."""
    return _status_bytes("VmHWM")


def reset_peak_rss() -> None:
    """Reset ``VmHWM`` to the current RSS (Linux: writing 5 to ``/proc/self/clear_refs``)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def free_memory(device: torch.device) -> tuple[int, str]:
    """Half of the free memory of ``device``: ``(bytes, source)``."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2, "cuda_free/2"
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 // 2, "MemAvailable/2"
    raise OSError("MemAvailable not in /proc/meminfo")


def _mallopt(mmap_threshold: int, trim_threshold: int) -> None:
    """glibc: serve blocks >= ``mmap_threshold`` by mmap and trim the heap above ``trim_threshold``."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, mmap_threshold)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, trim_threshold)  # M_TRIM_THRESHOLD
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS growth may then be hidden by reuse
        pass


def _costliest_pass(model: nn.Module, x, y, loss_fn, params) -> None:
    """A double-backward HVP on ``(x, y)``; where the model has no double backward (hardswish:
    MobileNetV3, LCNet) the ascent's products are finite differences of gradients, so a gradient."""
    vector = [torch.ones_like(p) for p in params]
    try:
        hessian_vector_product(model, [(x, y)], loss_fn, params, vector, params, int(x.shape[0]))
    except RuntimeError as e:
        if not missing_double_backward(e):
            raise
        full_gradient(model, [(x, y)], loss_fn, params, int(x.shape[0]))


@contextlib.contextmanager
def _no_collection():
    """The cyclic garbage collector off while the probes run: a collection inside a measured pass
    would free memory whose reuse hides part of the pass's growth. No ``gc.collect()`` before a
    probe either: it cost 0.06-0.2 s a call with torch loaded (0.09-0.2 s in the forked child, whose
    collection copies every page of the Python heap it touches), 4 calls per choice, against
    0.001-0.05 s for the probes' passes on the shipped samples (profiled); garbage left alive only
    adds to ``in_use`` and ``before``, which does not shrink a measured growth."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _probe(model: nn.Module, x, y, loss_fn, params, device: torch.device) -> int:
    """Peak memory growth of the costliest pass (:func:`_costliest_pass`) on the batch ``(x, y)``
    (call it with the collector off: :func:`_no_collection`)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        _costliest_pass(model, x, y, loss_fn, params)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    before = rss_bytes()
    reset_peak_rss()
    _costliest_pass(model, x, y, loss_fn, params)
    return peak_rss_bytes() - before


def _probes(model, data, loss_fn, params, sizes, device) -> list[tuple[int, int]]:
    _probe(model, data.inputs[:1].to(device), data.targets[:1].to(device), loss_fn, params, device)  # warm-up: one-off allocations
    return [(b, _probe(model, data.inputs[:b].to(device), data.targets[:b].to(device), loss_fn, params, device)) for b in sizes]


def _cpu_probes(model, data, loss_fn, params, sizes) -> list[tuple[int, int]]:
    """The probes in a forked child whose glibc returns every block >= 128 KiB at once, so that
    its RSS growth is the memory the pass holds; this process's allocator is left as it is."""
    cpu = torch.device("cpu")
    _probe(model, data.inputs[:1], data.targets[:1], loss_fn, params, cpu)  # here too: one-off allocations count as in use
    if not hasattr(os, "fork"):
        return _probes(model, data, loss_fn, params, sizes, cpu)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: measure, write the figures, leave without cleanup
        code = 1
        try:
            os.close(read)
            torch.set_num_threads(1)
            _mallopt(128 * 1024, 128 * 1024)
            os.write(write, json.dumps(_probes(model, data, loss_fn, params, sizes, cpu)).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as f:
        text = f.read()
    _, status = os.waitpid(pid, 0)
    if status != 0 or not text:
        raise OSError("the memory probe of --batch-size auto failed (give --batch-size N)")
    return [tuple(p) for p in json.loads(text)]


def gram_bytes(gram_blocks: list[tuple[int, int]]) -> int:
    """Bytes of the float64 Gram matrices of ``gram_blocks`` ``(groups, d_in)``: ``sum groups * d_in^2 * 8``."""
    return sum(groups * d_in * d_in * 8 for groups, d_in in gram_blocks)


def basis_bytes(gram_blocks: list[tuple[int, int]]) -> int:
    """An upper bound on the bytes of the null-space bases of ``gram_blocks``: a group's basis keeps
    ``min(k, d_in - k) <= d_in // 2`` float64 columns of ``d_in`` (the smaller of the null and
    kept bases, :func:`teleport_cli.nullspace.bases.layer_basis`)."""
    return sum(groups * d_in * (d_in // 2) * 8 for groups, d_in in gram_blocks)


def eigh_bytes(gram_blocks: list[tuple[int, int]]) -> int:
    """Transient bytes of the largest group's eigendecomposition: ``EIGH_COPIES`` float64 ``d_in x d_in``
    matrices (the symmetrised Gram, its eigenvectors and LAPACK's divide-and-conquer workspace)."""
    return max((EIGH_COPIES * d_in * d_in * 8 for _, d_in in gram_blocks), default=0)


def reserve_bytes(model: nn.Module, gram_blocks: list[tuple[int, int]]) -> int:
    """Memory held during the ascent beside the batch's: ``PARAMETER_COPIES`` parameter copies and
    the bases of ``gram_blocks`` (:func:`basis_bytes`). The Grams are freed once their bases are
    built (:func:`teleport_cli.pipeline.teleport`), so they count only in :func:`bases_phase_bytes`."""
    params = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return PARAMETER_COPIES * params + basis_bytes(gram_blocks)


def bases_phase_bytes(gram_blocks: list[tuple[int, int]]) -> int:
    """Memory held while the bases are built, beside ``in_use``: every Gram, the bases built so far
    (bounded by all of them) and the largest eigendecomposition's workspace. No batch runs then."""
    return gram_bytes(gram_blocks) + basis_bytes(gram_blocks) + eigh_bytes(gram_blocks)


def choose_batch_size(model: nn.Module, data, loss_fn, device: torch.device, *, max_memory: int | None = None,
                      gram_blocks: list[tuple[int, int]] = ()) -> BatchChoice:
    """Measure and pick the largest power of two <= 256 whose estimated peak fits the budget.

    Args:
        model: the model (eval mode, on ``device``); its weights are not changed.
        data: :class:`~teleport_cli.data.tensors.TensorData`, the calibration set.
        loss_fn: summed loss of a batch, ``(logits, targets) -> scalar``.
        max_memory: budget in bytes; None: half of the free RAM or GPU memory.
        gram_blocks: ``(groups, d_in)`` of each teleportable layer (for the Gram reserve).

    Returns:
        :class:`BatchChoice`.

    Raises:
        OSError: ``/proc`` cannot be read (not Linux) on the CPU.
    """
    budget, source = (max_memory, "max_memory") if max_memory is not None else free_memory(device)
    params = [p for p in model.parameters() if p.requires_grad]
    sizes = [b for b in PROBES if b <= len(data)] or [len(data)]
    with _no_collection():
        peaks = _cpu_probes(model, data, loss_fn, params, sizes) if device.type != "cuda" else _probes(model, data, loss_fn, params, sizes, device)
    in_use = torch.cuda.memory_allocated(device) if device.type == "cuda" else rss_bytes()
    if len(peaks) > 1 and peaks[-1][1] > peaks[0][1]:
        per_sample = (peaks[-1][1] - peaks[0][1]) / (peaks[-1][0] - peaks[0][0])
        fixed = max(peaks[0][1] - per_sample * peaks[0][0], 0.0)
    else:  # one probe, or reuse hid the growth: all of the peak scales with the batch
        per_sample, fixed = max(p for _, p in peaks) / peaks[-1][0], 0.0
    reserve = reserve_bytes(model, list(gram_blocks))
    bases_phase = bases_phase_bytes(list(gram_blocks))
    slack = CPU_HEAP_SLACK if device.type != "cuda" else 1.0

    def estimate(b: int) -> int:  # the larger of the two phases: building the bases, and the ascent's passes
        return int(in_use + max(bases_phase, reserve + slack * (fixed + per_sample * min(b, len(data)))))

    chosen = 1
    b = MAX_BATCH
    while b >= 1:
        if estimate(b) <= budget:
            chosen = b
            break
        b //= 2
    while chosen > 1 and chosen // 2 >= len(data):  # batches beyond the set's size are all the same
        chosen //= 2
    return BatchChoice(chosen, int(budget), source, device.type, int(in_use), int(reserve), int(bases_phase), int(fixed), int(per_sample),
                       estimate(chosen), estimate(chosen) <= budget, tuple(peaks))
