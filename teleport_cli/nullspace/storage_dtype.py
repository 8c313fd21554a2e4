"""Half-precision storage: verify again after casting the teleported weights back.

The teleport runs in float32 (float16 and bfloat16 values load exactly). Written back in the
stored dtype, each moved weight ``W1`` becomes ``cast(W1) = W1 + r`` with a rounding error
``|r| <= eps/2 * |W1|`` (eps = 2^-10 for float16, 2^-7 for bfloat16). ``r`` is not in the null
space, so the outputs move by about ``eps * |W| * |x|`` even at tau = 1.

The rounding floor measures what that rounding alone does: the same error ``r`` applied to the
original weights, ``W0 + r``, evaluated against the original model. Verification after the cast
compares the cast model with the original, and a set passes when
``|L_cast - L0| <= tolerance * |L0| + 1e-6 + noise floor + rounding floor`` where the rounding
floor is ``|L(W0 + r) - L0|``: the teleport is judged against what rounding costs anyway.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..config import TeleportConfig
from ..data.tensors import TensorData, split_holdout
from ..errors import VerificationFailed
from .losses import loss_for
from .verify import compare

COMPUTE = torch.float32


def _with(model: nn.Module, values: dict[str, torch.Tensor]) -> nn.Module:
    m = copy.deepcopy(model)
    with torch.no_grad():
        for k, v in values.items():
            m.get_parameter(k).copy_(v)
    return m


def verify_storage(
    original: nn.Module,
    teleported: nn.Module,
    stored: dict[str, torch.Tensor],
    calibration: TensorData,
    holdout: TensorData | None,
    config: TeleportConfig,
    noise_floor: float,
) -> dict:
    """Cast check: verification of the weights as they will be written.

    Args:
        original: the original model (compute dtype, eval mode).
        teleported: the teleported model (compute dtype).
        stored: moved parameter name -> its value cast to the stored dtype.
        calibration, holdout: the sets given to the teleport (``holdout`` None: the same seeded
            split is taken again).
        noise_floor: the run-to-run loss difference measured by the teleport.

    Returns:
        a JSON-ready dict: ``cast`` (False when every moved weight is stored in the compute
        dtype: nothing to check), ``dtypes``, per set the loss after the cast, its drift, max
        |logit difference|, the rounding floor (loss and logits) and ``passed``.

    A failed check is ``passed: False``; :func:`storage_failure` makes its error.
    """
    dtypes = sorted({str(v.dtype).replace("torch.", "") for v in stored.values()})
    if all(v.dtype == COMPUTE for v in stored.values()):
        return {"cast": False, "dtypes": dtypes, "passed": True}
    # in eval mode, as the teleport ran: a model left in training mode would use (and update)
    # BatchNorm batch statistics, and the cast check would compare other losses than the teleport's
    was_training = original.training
    original.eval()
    try:
        return _verify(original, teleported.eval(), stored, calibration, holdout, config, noise_floor, dtypes)
    finally:
        original.train(was_training)


def _verify(original, teleported, stored, calibration, holdout, config, noise_floor, dtypes) -> dict:
    device = next(original.parameters()).device
    params = {k: teleported.get_parameter(k).detach() for k in stored}
    back = {k: v.to(device=device, dtype=COMPUTE) for k, v in stored.items()}
    rounding = {k: back[k] - params[k] for k in stored}
    cast_model = _with(teleported, back)
    floor_model = _with(original, {k: original.get_parameter(k).detach() + r for k, r in rounding.items()})
    if holdout is None:
        calibration, holdout, _ = split_holdout(calibration, config.holdout_fraction, config.seed)
    out: dict = {"cast": True, "dtypes": dtypes, "max_abs_rounding": max(float(r.abs().max()) for r in rounding.values())}
    passed = True
    for name, data, tol in (("calibration", calibration, config.tolerance), ("holdout", holdout, config.holdout_tolerance)):
        batches, loss_fn = data.batches(config.batch_size, device), loss_for(config.loss, data.targets, data.source)
        fl = compare(original, floor_model, batches, loss_fn, name=name, tolerance=0.0, floor=noise_floor)
        rounding_floor = abs(fl.loss_after - fl.loss_before)
        c = compare(original, cast_model, batches, loss_fn, name=name, tolerance=tol, floor=noise_floor + rounding_floor)
        out[name] = {
            "loss_before": c.loss_before,
            "loss_after_cast": c.loss_after,
            "relative_loss_drift": c.loss_drift,
            "max_abs_logit_diff": c.max_abs_logit_diff,
            "rounding_floor_loss": rounding_floor,
            "rounding_floor_max_abs_logit_diff": fl.max_abs_logit_diff,
            "tolerance": tol,
            "passed": c.passed,
        }
        passed = passed and c.passed
    out["passed"] = passed
    return out


def storage_failure(out: dict, result: object = None) -> VerificationFailed:
    """The error for a failed :func:`verify_storage` (exit 4, nothing written)."""
    bad = [n for n in ("calibration", "holdout") if not out[n]["passed"]]
    detail = "; ".join(
        f"{n} loss {out[n]['loss_before']:.6g} -> {out[n]['loss_after_cast']:.6g} (rounding floor {out[n]['rounding_floor_loss']:.3g})" for n in bad
    )
    return VerificationFailed(
        f"verification after casting back to {'/'.join(out['dtypes'])} failed: {detail}; nothing written",
        hint="raise --tau or lower --step-size: the moved weights do not survive the rounding",
        result=result,
    )
