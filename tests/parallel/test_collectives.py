"""The process-group helpers: shards without padding, and every collective in a real 2- and
3-process gloo group against sums computed in one process (float64 references)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from _procs import ENV, ROOT
from _ranks import run

from teleport_cli.errors import PeerFailed
from teleport_cli.parallel import collective, group
from teleport_cli.parallel.shards import shard_range


@pytest.mark.parametrize("n,world", [(0, 3), (1, 2), (24, 8), (24, 32), (205, 2), (7, 3)])
def test_shards_cover_the_range_once_in_rank_order_without_padding(n, world):
    parts = [shard_range(n, r, world) for r in range(world)]
    assert [i for p in parts for i in p] == list(range(n))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError):
        shard_range(n, world, world)


def test_single_process_is_a_no_op_without_torch_distributed_initialised():
    code = (
        "import os, torch\n"
        "os.environ.pop('WORLD_SIZE', None)\n"
        "from teleport_cli.parallel import group, collective\n"
        "from teleport_cli.data.tensors import TensorData\n"
        "from teleport_cli.parallel.shards import shard\n"
        "assert group.start(torch.device('cpu')) is None and group.active() is None\n"
        "t = torch.ones(3)\n"
        "assert collective.all_reduce_sum([t], 1.5, 2.0) == [1.5, 2.0] and t.tolist() == [1.0, 1.0, 1.0]\n"
        "assert collective.agree(True) and not collective.agree(False)\n"
        "d = TensorData(torch.zeros(5, 2), torch.zeros(5, dtype=torch.long))\n"
        "assert shard(d) is d\n"
        "import torch.distributed as dist\n"
        "assert not dist.is_initialized()\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in ENV.items() if k not in ("WORLD_SIZE", "RANK")}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert p.stdout.strip() == "ok", p.stderr


def _collectives(rank: int, n: int) -> dict:
    g = group.start(torch.device("cpu"))
    world = g.world_size
    part = shard_range(n, rank, world)
    values = torch.arange(n, dtype=torch.float64) ** 1.5 / 7.0
    mine = values[part.start: part.stop]
    grad32 = torch.stack([mine.sum(), (mine ** 2).sum()]).float()
    gram = torch.stack([(mine ** 3).sum()])  # float64, as the Grams
    loss, count = collective.all_reduce_sum([grad32, gram], float(mine.sum()), float(len(mine)))
    top, = collective.all_reduce_max(float(mine.max()) if len(mine) else float("-inf"))
    smallest, = collective.all_reduce_min(float(100 + rank))
    decided = collective.agree(rank == 0)
    gathered = collective.all_gather_cat(mine)
    mapped = collective.map_by_rank(lambda k: (group.active().rank, torch.full((2,), float(k))), list(range(5)))
    w = torch.full((4,), float(rank))
    collective.broadcast_([w])
    collective.assert_identical([w])
    try:
        collective.assert_identical([torch.full((2,), float(rank))])
        differs = False
    except AssertionError:
        differs = True
    return {"world": world, "loss": loss, "count": count, "grad": grad32, "gram": gram, "top": top, "smallest": smallest,
            "decided": decided, "gathered": gathered, "mapped": mapped, "w": w, "differs": differs, "rank": group.finish()}


@pytest.mark.parametrize("world,n", [(2, 9), (3, 2)])  # with 2 samples on 3 ranks, one rank holds none
def test_collectives_in_a_real_gloo_group_match_one_process(world, n):
    values = torch.arange(n, dtype=torch.float64) ** 1.5 / 7.0
    out = run(_collectives, world, n)
    for r, o in enumerate(out):
        assert o["world"] == world and o["rank"] == r
        assert o["loss"] == pytest.approx(float(values.sum()), rel=1e-15) and o["count"] == n
        assert torch.allclose(o["grad"].double(), torch.stack([values.sum(), (values ** 2).sum()]), rtol=1e-6)
        assert o["gram"].dtype == torch.float64 and float(o["gram"]) == pytest.approx(float((values ** 3).sum()), rel=1e-15)
        assert o["top"] == float(values.max()) and o["smallest"] == 100.0
        assert o["decided"] is True  # rank 0's decision everywhere
        assert torch.equal(o["gathered"], values)  # in the set's order
        assert [o["mapped"][k][0] for k in range(5)] == [k % world for k in range(5)]  # computed by its owner alone
        assert all(torch.equal(o["mapped"][k][1], torch.full((2,), float(k))) for k in range(5))
        assert torch.equal(o["w"], torch.zeros(4))  # rank 0's values
        assert o["differs"]
    assert all(torch.equal(out[0]["grad"], o["grad"]) for o in out)  # the same bits on every rank


def _lost_peer(rank: int) -> str:
    import os

    os.environ["TELEPORT_TIMEOUT"] = "60"
    group.start(torch.device("cpu"))
    collective.all_reduce_sum([], 1.0)
    if rank == 1:
        return "left"  # and the process ends, its sockets closed, while rank 0 waits in a collective
    try:
        collective.all_reduce_sum([torch.ones(3)], 1.0)
    except PeerFailed as e:
        return e.one_line()
    return "no error"


def test_a_rank_that_leaves_ends_the_others_collective_with_one_line_not_a_hang():
    import time

    t0 = time.monotonic()
    first, second = run(_lost_peer, 2)
    assert second == "left"
    assert first.startswith("a collective with the other ranks failed") and "\n" not in first, first
    assert time.monotonic() - t0 < 50  # not the 60 s timeout


def _stalled_peer(rank: int, folder: str) -> tuple[str, float]:
    import os
    import time
    from pathlib import Path

    (Path(folder) / str(rank)).touch()  # both ranks past their imports before the 3 s clock starts
    while len(list(Path(folder).iterdir())) < 2:
        time.sleep(0.05)
    os.environ["TELEPORT_TIMEOUT"] = "3"
    group.start(torch.device("cpu"))
    collective.all_reduce_sum([], 1.0)
    if rank == 1:
        time.sleep(12)  # alive but silent: a hung rank
        return "slept", 0.0
    t0 = time.monotonic()
    try:
        collective.agree(True)
    except PeerFailed as e:
        return e.one_line(), time.monotonic() - t0
    return "no error", time.monotonic() - t0


def test_a_silent_rank_ends_the_others_wait_after_the_timeout(tmp_path):
    (first, waited), (second, _) = run(_stalled_peer, 2, str(tmp_path))
    assert second == "slept"
    assert first.startswith("a collective with the other ranks failed") and "within 3 s" in first, first
    assert 2.5 <= waited < 11, waited  # the 3 s timeout, not the sleep
