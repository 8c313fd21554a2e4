"""The library API inside a DDP training job: 2 gloo ranks that started their own group.

``teleport(DistributedDataParallel(model), ...)`` moves ``model.module`` exactly as one process
moves the plain model (same step counts, weight changes to 1e-4 relative), hands every rank
the same weights, leaves the caller's group running and the model in training mode, warns
that the optimizer state must be reset, and refuses a model with BatchNorm in training mode.
A 3-rank run on a held-out set of 2 samples has a rank with no held-out sample at all.
"""

from __future__ import annotations

import torch
from _ckpt import CAL, HOLD, MID
from _ranks import run

from teleport_cli.checkpoints.tensor_files import read_tensor_file

OPTIONS = {"steps": 3, "batch_size": 64}


def _data(holdout: int | None = None):
    cal, _ = read_tensor_file(CAL, what="data")
    hold, _ = read_tensor_file(HOLD, what="data")
    n = holdout or len(hold["targets"])
    return (cal["inputs"], cal["targets"]), (hold["inputs"][:n], hold["targets"][:n])


def _model():
    from teleport_cli.models.builtin import MLP

    model = MLP(64, (128, 64), 10)
    state, _ = read_tensor_file(MID, what="checkpoint")
    model.load_state_dict(state)
    return model


def _job(rank: int, ddp: bool, holdout: int | None) -> dict:
    import warnings

    import torch.distributed as dist
    from torch import nn

    from teleport_cli import TeleportConfig, teleport
    from teleport_cli.errors import ConfigError

    cal, hold = _data(holdout)
    model = _model()
    world = int(__import__("os").environ["WORLD_SIZE"])
    if world > 1:
        dist.init_process_group("gloo")
    wrapped = nn.parallel.DistributedDataParallel(model) if ddp else model
    wrapped.train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outcome = teleport(wrapped, cal, TeleportConfig(**OPTIONS), holdout=hold)
    out = {"accepted": outcome.stats.steps_accepted, "rejected": outcome.stats.steps_rejected,
           "delta": torch.cat([(a.detach() - b.detach()).reshape(-1).double() for a, b in zip(outcome.model.parameters(), model.parameters())]),
           "training": model.training, "warned": any("optimizer state" in str(w.message) for w in caught),
           "holdout_samples": outcome.verification.holdout.samples}
    if world > 1:
        bn = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(64, 8), nn.BatchNorm1d(8), nn.Linear(8, 10)))
        try:
            teleport(bn.train(), cal, TeleportConfig(**OPTIONS), holdout=hold)
            out["refused"] = ""
        except ConfigError as e:
            out["refused"] = e.one_line()
        out["group_left_running"] = dist.is_initialized()
        dist.destroy_process_group()
    return out


def test_teleport_inside_a_ddp_job_moves_the_module_as_one_process():
    one = run(_job, 1, False, None)[0]
    two = run(_job, 2, True, None)
    assert one["accepted"] > 0 and not one["warned"]
    for o in two:
        assert (o["accepted"], o["rejected"]) == (one["accepted"], one["rejected"])
        assert float((o["delta"] - one["delta"]).norm()) <= 1e-4 * float(one["delta"].norm())
        assert o["training"] and o["warned"] and o["group_left_running"]
        assert o["refused"].startswith("the model is in training mode with BatchNorm"), o["refused"]
    assert torch.equal(two[0]["delta"], two[1]["delta"])  # the same bits on both ranks


def test_a_rank_without_any_held_out_sample_still_joins():
    one = run(_job, 1, False, 2)[0]
    three = run(_job, 3, False, 2)  # held-out shards of 0, 1 and 1 samples
    for o in three:
        assert o["holdout_samples"] == one["holdout_samples"] == 2
        assert (o["accepted"], o["rejected"]) == (one["accepted"], one["rejected"])
        assert float((o["delta"] - one["delta"]).norm()) <= 1e-4 * float(one["delta"].norm())
