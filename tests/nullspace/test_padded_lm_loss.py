"""Language-model targets that do not count (-100: padding, or left out): the loss of a set is
the sum of the counted cross-entropies over their global count, whatever the batching, checked
against a loop over tokens in float64; without ignored targets it is the pinned per-token mean."""

from __future__ import annotations

import math

import pytest
import torch

from teleport_cli.errors import InputError
from teleport_cli.nullspace.losses import IGNORE, LOSS_FUNCTIONS, loss_for


def _set(n=7, t=6, v=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, t, v, generator=g, dtype=torch.float64)
    targets = torch.randint(0, v, (n, t), generator=g)
    lengths = torch.randint(1, t + 1, (n,), generator=g)  # right padding: row n counts lengths[n] targets
    targets[torch.arange(t)[None, :] >= lengths[:, None]] = IGNORE
    targets[0, 0] = IGNORE  # and one left out inside a row
    return logits, targets


def _hand(logits, targets) -> float:
    total, count = 0.0, 0
    for n in range(targets.shape[0]):
        for t in range(targets.shape[1]):
            if int(targets[n, t]) != IGNORE:
                p = math.exp(float(logits[n, t, targets[n, t]])) / sum(math.exp(float(z)) for z in logits[n, t])
                total -= math.log(p)
                count += 1
    return total / count


@pytest.mark.parametrize("batch", [1, 2, 3, 7])
def test_set_loss_is_the_mean_over_counted_targets_whatever_the_batching(batch):
    logits, targets = _set()
    fn = loss_for("lm", targets)
    n = targets.shape[0]
    total = sum(float(fn(logits[i : i + batch], targets[i : i + batch])) for i in range(0, n, batch))
    assert total / n == pytest.approx(_hand(logits, targets), rel=1e-12)
    # the same figure transformers reports for the set as one batch (mean over labels != -100)
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    assert total / n == pytest.approx(float(ref), rel=1e-12)


def test_without_ignored_targets_the_set_loss_is_the_pinned_per_token_mean():
    logits, targets = _set()
    full = targets.clamp(min=0)
    assert loss_for("lm", full) is LOSS_FUNCTIONS["lm"]
    assert float(LOSS_FUNCTIONS["lm"](logits, full)) / full.shape[0] == pytest.approx(_hand(logits, full), rel=1e-12)
    assert loss_for("ce", full[:, 0]) is LOSS_FUNCTIONS["ce"]


def test_a_subset_keeps_the_sets_per_sample_terms():
    # the guard's samples are a subset of the calibration set: their losses are the set's terms
    logits, targets = _set()
    fn = loss_for("lm", targets)
    per_sample = [float(fn(logits[i : i + 1], targets[i : i + 1])) for i in range(targets.shape[0])]
    assert sum(per_sample) / len(per_sample) == pytest.approx(_hand(logits, targets), rel=1e-12)


def test_a_set_with_no_counted_target_is_refused():
    with pytest.raises(InputError, match="no target counts"):
        loss_for("lm", torch.full((2, 3), IGNORE))
