"""The process group of a data-parallel teleport: detection, start, and the end.

``torchrun --nproc_per_node N -m teleport_cli apply ...`` sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` for each worker; :func:`start` joins the
group they describe (``init_method="env://"``), with the ``gloo`` backend on the CPU and
``nccl`` on a GPU, and a timeout on every collective (``TELEPORT_TIMEOUT`` seconds, default
:data:`DEFAULT_TIMEOUT`). A group the caller already initialised (a DDP training job) is used
as it is and left running by :func:`finish`.

Without ``WORLD_SIZE`` above 1 and without an initialised group, :func:`start` returns None,
:func:`active` stays None and ``torch.distributed`` is not imported.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Iterator

from ..errors import ConfigError, PeerFailed

DEFAULT_TIMEOUT = 600.0  # seconds a rank waits in a collective for the others


@dataclass(frozen=True)
class ParallelGroup:
    """The group this process computes in.

    Attributes:
        rank: this process's rank, 0 .. world_size - 1 (rank 0 decides, writes and prints).
        world_size: number of processes (> 1).
        device: where collectives run: ``cpu`` for gloo, this rank's ``cuda:LOCAL_RANK`` for nccl.
        owned: whether :func:`start` initialised the group (and :func:`finish` destroys it).
        timeout: seconds a collective waits.
    """

    rank: int
    world_size: int
    device: object
    owned: bool
    timeout: float


_CURRENT: ParallelGroup | None = None
_LOCAL = [False]
_ALONE = [False]


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when unset); no torch import."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def env_rank() -> int:
    """``RANK`` from the environment (0 when unset); no torch import."""
    return int(os.environ.get("RANK", "0") or 0)


def active() -> ParallelGroup | None:
    """The running group, or None (a single process, after :func:`finish`, or inside :func:`local`)."""
    return None if _LOCAL[0] else _CURRENT


def timeout_seconds() -> float:
    """``TELEPORT_TIMEOUT`` (seconds, > 0) or :data:`DEFAULT_TIMEOUT`.

    Raises:
        ConfigError: not a positive number.
    """
    text = os.environ.get("TELEPORT_TIMEOUT")
    if not text:
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ConfigError(f"TELEPORT_TIMEOUT={text!r} is not a positive number of seconds")
    return value


def start(device) -> ParallelGroup | None:
    """Join the process group of this job; None for a single process (nothing initialised).

    Args:
        device: the ``torch.device`` the run computes on; ``cuda`` selects ``nccl`` (and
            ``torch.cuda.set_device``), anything else ``gloo``.

    Returns:
        the :class:`ParallelGroup` (also :func:`active` from now on), or None.

    Raises:
        ConfigError: ``TELEPORT_TIMEOUT`` is malformed.
        PeerFailed: the rendezvous failed or timed out.
    """
    global _CURRENT
    if _CURRENT is not None:
        return _CURRENT
    if _ALONE[0]:
        return None
    initialised = False
    if env_world_size() <= 1:
        import sys

        dist = sys.modules.get("torch.distributed")  # a caller's group, if torch.distributed is loaded at all
        initialised = dist is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if not initialised:
            return None
    import datetime

    import torch
    import torch.distributed as dist

    timeout = timeout_seconds()
    owned = not dist.is_initialized()
    cuda = getattr(device, "type", str(device)) == "cuda"
    if cuda:
        index = device.index if getattr(device, "index", None) is not None else int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(index)
        where = torch.device("cuda", index)
    else:
        where = torch.device("cpu")
    if owned:
        guarded(lambda: dist.init_process_group("nccl" if cuda else "gloo", init_method="env://",
                                                timeout=datetime.timedelta(seconds=timeout)), timeout)
    elif dist.get_backend() == "nccl" and not cuda:
        raise ConfigError("the process group runs nccl but the model is on the CPU", hint="move the model to its GPU, or start the group with gloo")
    _CURRENT = ParallelGroup(dist.get_rank(), dist.get_world_size(), where, owned, timeout)
    return _CURRENT


def finish() -> int:
    """End the data-parallel part: destroy a group :func:`start` created (no collective), and
    return this process's rank (0 in a single process). Whatever runs afterwards runs alone,
    so rank 0 can write its output while the other ranks have already exited."""
    global _CURRENT
    group, _CURRENT = _CURRENT, None
    if group is None:
        return 0
    if group.owned:
        import torch.distributed as dist

        with contextlib.suppress(Exception):  # a broken group is being left anyway
            dist.destroy_process_group()
    return group.rank


def guarded(call: Callable, timeout: float | None = None):
    """Run ``call()`` (a collective); its failure becomes :class:`PeerFailed`."""
    try:
        return call()
    except RuntimeError as e:  # torch.distributed.DistBackendError and gloo's errors are RuntimeErrors
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        group = active()
        wait = timeout if timeout is not None else group.timeout if group is not None else None
        raise PeerFailed(
            f"a collective with the other ranks failed: another rank stopped, or did not answer within {wait:g} s ({first[:200]})",
            hint="the failing rank's own error line names it; TELEPORT_TIMEOUT sets the wait",
        ) from None


def run_alone() -> None:
    """From now on :func:`start` joins no group: this process works alone although torchrun
    started it (``teleport inspect``, ``report`` and ``bench`` on rank 0, the other ranks gone)."""
    _ALONE[0] = True


@contextlib.contextmanager
def local() -> Iterator[None]:
    """No collective inside the block: each rank computes for itself (the batch-size probe,
    whose forked child must never touch the group's sockets)."""
    previous = _LOCAL[0]
    _LOCAL[0] = True
    try:
        yield
    finally:
        _LOCAL[0] = previous
