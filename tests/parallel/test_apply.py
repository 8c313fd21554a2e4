"""Data-parallel ``apply`` equals one process: 2 gloo ranks on the CPU against a single process.

Each run is a real process group (``torch.multiprocessing``, :mod:`_ranks`). The checks:

* rank 0 writes the output, rank 1 writes nothing and gets no output path;
* the same accepted and rejected step counts as one process, and weight changes with
  ``||D_dist - D_1|| <= 1e-4 ||D_1||`` (D = output - input, from the files);
* after every accepted step all ranks hold bit-identical weights (a digest compared across ranks);
* the smallest relative decision margin (drift gates and objective comparisons) is logged and
  stays above 1e-4: below it, float reordering between 1 and 2 processes could flip a decision.
"""

from __future__ import annotations

import pytest
import torch
from _ckpt import CAL, SAMPLES
from _ranks import run

from teleport_cli.checkpoints.tensor_files import read_tensor_file

MLP = SAMPLES / "mlp_digits_mid.safetensors"
RESNET = SAMPLES / "fmnist_test_resnet_mid.safetensors"
FMNIST = SAMPLES / "fmnist_calibration"


def _apply(rank: int, checkpoint: str, data: str, output: str, options: dict, samples: int | None) -> dict:
    import teleport_cli.pipeline as pipeline
    from teleport_cli.config import TeleportConfig
    from teleport_cli.nullspace import ascent, guard
    from teleport_cli.parallel.collective import assert_identical

    margins, reference, last, checked = [], [], [None], [0]
    gate = ascent.drift_ok

    def drift_ok(loss, loss0, tolerance, noise_floor=0.0):
        bound = tolerance * abs(loss0) + 1e-6 + noise_floor
        margins.append(abs(bound - abs(loss - loss0)) / bound)
        return gate(loss, loss0, tolerance, noise_floor)

    ascent.drift_ok = guard.drift_ok = drift_ok
    make = pipeline.make_objective

    def make_objective(*a, **k):
        objective = make(*a, **k)
        score = objective.score

        def scored(*args, **kw):
            s = score(*args, **kw)
            if reference:
                margins.append(abs(s - reference[-1]) / max(abs(reference[-1]), 1e-30))
            else:
                reference.append(s)
            last[0] = s
            return s

        objective.score = scored
        return objective

    pipeline.make_objective = make_objective
    climb = pipeline.ascend

    def ascend(model, *a, on_step=None, **k):
        def stepped(accepted, record, log):
            if record is not None:  # an accepted step: every rank holds the same bits
                reference.append(last[0])
                assert_identical(list(model.parameters()))
                checked[0] += 1
            on_step(accepted, record, log)

        return climb(model, *a, on_step=stepped, **k)

    pipeline.ascend = ascend
    result = pipeline.apply(checkpoint, data, output, TeleportConfig(**options), force=True, samples=samples)
    s = result.outcome.stats
    return {"output": result.output, "accepted": s.steps_accepted, "rejected": s.steps_rejected, "grad_norm_after": s.grad_norm_after,
            "margin": min(margins), "checked": checked[0], "batch_size": result.batch_size}


def _delta(path, original) -> torch.Tensor:
    a, _ = read_tensor_file(path, what="output")
    b, _ = read_tensor_file(original, what="input")
    return torch.cat([(a[k].double() - b[k].double()).reshape(-1) for k in sorted(b)])


@pytest.mark.parametrize("checkpoint,data,options,samples", [
    (MLP, CAL, {"steps": 5}, None),
    (RESNET, FMNIST, {"steps": 2, "batch_size": 32}, 96),  # 96 of the 256 images: 61 fit, 16 guard, 19 held out
], ids=["mlp", "resnet"])
def test_two_gloo_ranks_give_the_single_process_result(tmp_path, checkpoint, data, options, samples):
    one = run(_apply, 1, str(checkpoint), str(data), str(tmp_path / "one.safetensors"), options, samples)[0]
    two = run(_apply, 2, str(checkpoint), str(data), str(tmp_path / "two.safetensors"), options, samples)
    assert two[0]["output"] == str(tmp_path / "two.safetensors") and two[1]["output"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.safetensors", "two.safetensors"]  # rank 1 wrote nothing
    assert (two[0]["accepted"], two[0]["rejected"]) == (one["accepted"], one["rejected"]) == (two[1]["accepted"], two[1]["rejected"])
    assert one["accepted"] > 0
    assert two[0]["checked"] == two[1]["checked"] == one["accepted"]  # every accepted step compared across ranks
    d1, d2 = _delta(tmp_path / "one.safetensors", checkpoint), _delta(tmp_path / "two.safetensors", checkpoint)
    assert float(d1.norm()) > 0
    print(f"{checkpoint.name}: {one['accepted']} accepted, {one['rejected']} rejected; ||D_2 - D_1|| / ||D_1|| = "
          f"{float((d2 - d1).norm()) / float(d1.norm()):.3g}; smallest decision margin: one process {one['margin']:.3g}, "
          f"two ranks {two[0]['margin']:.3g}")
    assert float((d2 - d1).norm()) <= 1e-4 * float(d1.norm())
    assert min(one["margin"], two[0]["margin"]) > 1e-4
