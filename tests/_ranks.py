"""Several real processes in one process group (gloo, CPU) for the data-parallel tests.

``run(worker, world_size, *args)`` spawns ``world_size`` processes (``torch.multiprocessing``,
start method spawn); each sets the torchrun environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), runs ``worker(rank, *args)`` on one thread
and saves its return value; the list of return values comes back in rank order. A worker that
raises fails the run with its traceback; a run past ``timeout`` seconds is killed.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, worker, world_size: int, port: int, out: str, args: tuple) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
    torch.set_num_threads(1)
    torch.manual_seed(0)
    result = worker(rank, *args)
    torch.save(result, Path(out) / f"{rank}.pt")
    # leave without the interpreter's shutdown: a worker that returns with its process group alive
    # (a rank that leaves on purpose) can abort in gloo's thread destructors under load
    # ("terminate called without an active exception", SIGABRT), which would fail the run; the
    # kernel closes its sockets all the same, which is what the other ranks are to notice
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)


def run(worker, world_size: int, *args, timeout: float = 240.0) -> list:
    """``[worker(0, *args), ..., worker(world_size - 1, *args)]``, each in its own process."""
    with tempfile.TemporaryDirectory() as out:
        ctx = mp.start_processes(_entry, args=(worker, world_size, free_port(), out, args), nprocs=world_size,
                                 join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                raise TimeoutError(f"{world_size} ranks still running after {timeout:g} s")
        return [torch.load(Path(out) / f"{r}.pt", weights_only=False) for r in range(world_size)]
