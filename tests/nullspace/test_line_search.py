"""The ascent's line search against its rules, recomputed independently for every candidate.

Every candidate the loop tries is recorded (its weights after ``propose``); the drift gates and
the objective are then recomputed from those weights in float64 (per-sample cross-entropy of a
float64 copy of the model, its gradient norm by autograd in float64), not through the loop's
code. Two properties are checked:

* the order of the rules changes only the cost: each candidate is accepted exactly when every
  rule holds, and one that the guard rejects never costs a forward pass over the fit set;
* a search ends after ``FLAT_REJECTIONS`` consecutive candidates, each shorter than every step
  accepted before, that passed every gate but did not improve the objective: the loop ends where a
  brute-force replay of that rule over the candidates of the unlimited search (the rule switched
  off) says it ends, with the same weights.
"""

import pytest
import torch
import torch.nn.functional as F

import teleport_cli.nullspace.ascent as ascent
from teleport_cli.config import TeleportConfig
from teleport_cli.models.builtin import MLP
from teleport_cli.nullspace.bases import layer_basis
from teleport_cli.nullspace.capture import capture_grams
from teleport_cli.nullspace import linesearch
from teleport_cli.nullspace.guard import Guard
from teleport_cli.nullspace.losses import LOSS_FUNCTIONS
from teleport_cli.nullspace.selection import find_layers

CE = LOSS_FUNCTIONS["ce"]
FLAT = ascent.FLAT_REJECTIONS  # the default, before any test replaces it
REAL_CHECK = Guard.check
MARGIN = 1e-5  # relative distance from a rule's threshold below which float32 and float64 may disagree


def _data(seed, n_fit=6, n_guard=20):
    torch.manual_seed(seed)
    model = MLP(8, [12], 4).eval()
    x, y = torch.randn(n_fit, 8), torch.randint(0, 4, (n_fit,))
    gx, gy = torch.randn(n_guard, 8), torch.randint(0, 4, (n_guard,))
    return model, (x, y), (gx, gy)


def _run(model, fit, guard, config, guard_tolerance, monkeypatch, flat=None):
    """ascend with every candidate recorded: (stats, candidates, fit-set forwards per candidate, final weights)."""
    moved = MLP(8, [12], 4).eval()
    moved.load_state_dict(model.state_dict())
    layers, _ = find_layers(moved)
    accs = capture_grams(moved, layers, [fit])
    bases = {s.name: layer_basis(s.name, accs[s.name].gram, 1.0) for s, _ in layers}
    candidates, fit_forwards = [], []
    n_fit = int(fit[0].shape[0])

    def count(module, args) -> None:  # forward passes over the fit set, charged to the last candidate
        if fit_forwards and args[0].shape[0] == n_fit:
            fit_forwards[-1] += 1

    moved.register_forward_pre_hook(count)
    real = linesearch.backtrack  # the module's own, not an earlier run's wrapper

    def backtrack(tensors, propose, accept, eta, max_backtracks, on_reject, **kw):
        search = 1 + max((c["search"] for c in candidates), default=-1)

        def recorded_propose(e):
            out = propose(e)
            candidates.append({"search": search, "eta": e, "weights": {k: v.detach().clone() for k, v in moved.state_dict().items()}})
            fit_forwards.append(0)
            return out

        def recorded_accept(cand):
            ok = accept(cand)
            candidates[-1]["accepted"] = ok
            return ok

        return real(tensors, recorded_propose, recorded_accept, eta, max_backtracks, on_reject, **kw)

    real_check = REAL_CHECK

    def check(self, m):  # the guard's decisions, for the replay of the stop rule
        out = real_check(self, m)
        candidates[-1]["guard"] = out[0] and out[1]
        return out

    monkeypatch.setattr(ascent, "backtrack", backtrack)
    monkeypatch.setattr(Guard, "check", check)
    if flat is not None:
        monkeypatch.setattr(ascent, "FLAT_REJECTIONS", flat)
    stats = ascent.ascend(moved, [fit], layers, bases, config, CE, guard=[guard] if guard else None, guard_tolerance=guard_tolerance)
    return stats, candidates, fit_forwards, {k: v.detach().clone() for k, v in moved.state_dict().items()}


def _float64(weights, x, y):
    """(mean loss, gradient norm) of a float64 copy of the model with ``weights``."""
    m = MLP(8, [12], 4).double().eval()
    m.load_state_dict({k: v.double() for k, v in weights.items()})
    loss = F.cross_entropy(m(x.double()), y)
    grads = torch.autograd.grad(loss, list(m.parameters()))
    return float(loss.detach()), float(torch.sqrt(sum((g ** 2).sum() for g in grads)))


def _rules(candidates, start, fit, guard, tolerance, guard_tolerance):
    """Each candidate's rules in float64, with its margins: gates passed, objective improved."""
    x, y = fit
    loss0, gnorm = _float64(start, x, y)
    gloss0 = _float64(start, *guard)[0] if guard else None
    margins, out = [], []
    for c in candidates:
        loss, g = _float64(c["weights"], x, y)
        limit = tolerance * abs(loss0) + 1e-6
        gates = [(limit - abs(loss - loss0)) / limit]
        if guard:
            gl = _float64(c["weights"], *guard)[0]
            glimit = guard_tolerance * abs(gloss0) + 1e-6
            gates.append((glimit - abs(gl - gloss0)) / glimit)
        passed = all(m > 0 for m in gates)
        improved = g > gnorm
        margins.append(min(abs(m) for m in gates + [(g - gnorm) / gnorm]))
        out.append((passed, improved))
        if c["accepted"]:
            gnorm = g
    return out, margins


CASES = {  # seed, config, guard tolerance: searches the guard cuts short, and searches that overshoot the objective
    "guard": (0, dict(step_size=0.05, max_step=1.0, tolerance=10.0), 1e-3),
    "objective": (1, dict(step_size=0.5, max_step=100.0, tolerance=10.0, max_backtracks=10), None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_candidate_is_accepted_exactly_when_its_rules_hold(case, monkeypatch):
    seed, kwargs, guard_tol = CASES[case]
    model, fit, guard = _data(seed)
    config = TeleportConfig(objective="grad-norm", tau=1.0, steps=12, device="cpu", **kwargs)
    stats, cands, forwards, _ = _run(model, fit, guard if guard_tol else None, config, guard_tol or 0.0, monkeypatch, flat=10**9)
    rules, margins = _rules(cands, model.state_dict(), fit, guard if guard_tol else None, config.tolerance, guard_tol)
    clear = [i for i, m in enumerate(margins) if m > MARGIN]
    assert len(clear) >= 0.8 * len(cands) and len(cands) >= 12
    for i in clear:
        passed, improved = rules[i]
        assert cands[i]["accepted"] == (passed and improved), (i, cands[i]["eta"], rules[i])
    if guard_tol:  # the guard rejects first: those candidates never ran the fit set
        gated = [i for i in clear if not rules[i][0]]
        assert gated and all(forwards[i] == 0 for i in gated)
        assert all(forwards[i] >= 1 for i in clear if rules[i][0])
    assert stats.steps_accepted == sum(c["accepted"] for c in cands)


def _replay(cands, passed, flat):
    """Where the loop with the flat rule ends, from the unlimited loop's candidates (``passed[i]``:
    candidate i passed every drift gate): (accepted steps, rejected candidates)."""
    accepted = rejected = 0
    shortest = None
    for search in sorted({c["search"] for c in cands}):
        chain = 0
        for i in [i for i, c in enumerate(cands) if c["search"] == search]:
            if cands[i]["accepted"]:
                accepted += 1
                shortest = cands[i]["eta"] if shortest is None else min(shortest, cands[i]["eta"])
                break
            rejected += 1
            chain = chain + 1 if passed[i] and shortest is not None and cands[i]["eta"] < shortest else 0
            if chain >= flat:
                return accepted, rejected
        else:
            return accepted, rejected
    return accepted, rejected


@pytest.mark.parametrize("case", list(CASES))
def test_a_search_ends_where_a_replay_of_the_flat_rule_ends_it(case, monkeypatch):
    """Without a guard every gate is recomputed in float64 (all far from their thresholds); with one,
    the guard's own decisions are replayed (the guard is checked against float64 in test_guard.py,
    and backtracking lands its candidates within roundoff of the threshold) and the fit drift is
    recomputed in float64."""
    seed, kwargs, guard_tol = CASES[case]
    model, fit, guard = _data(seed)
    g = guard if guard_tol else None
    config = TeleportConfig(objective="grad-norm", tau=1.0, steps=12, device="cpu", **kwargs)
    _, free, _, _ = _run(model, fit, g, config, guard_tol or 0.0, monkeypatch, flat=10**9)
    rules, margins = _rules(free, model.state_dict(), fit, None, config.tolerance, None)  # fit drift and objective
    if g is None:
        assert min(margins) > MARGIN  # every rule decided far from its threshold: the replay is exact
    passed = [fit_ok and c.get("guard", True) for (fit_ok, _), c in zip(rules, free)]
    accepted, rejected = _replay(free, passed, FLAT)
    stats, cands, _, final = _run(model, fit, g, config, guard_tol or 0.0, monkeypatch, flat=FLAT)
    assert (stats.steps_accepted, stats.steps_rejected) == (accepted, rejected)
    if case == "objective":  # the rule cut candidates there
        assert stats.steps_rejected < sum(not c["accepted"] for c in free)
    # the same candidates up to there, so the weights of the unlimited loop's accepted point
    assert [c["eta"] for c in cands] == [c["eta"] for c in free[:len(cands)]]
    last = [c for c in free[:len(cands)] if c["accepted"]][-1]["weights"] if accepted else model.state_dict()
    assert all(torch.equal(final[k], last[k]) for k in final)
