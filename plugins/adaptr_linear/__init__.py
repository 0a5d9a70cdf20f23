"""Built-in strategies that add deltas: ``simple``, ``linear`` and ``task_arithmetic``.

Each is a composition of the step functions in :mod:`adaptr.ops`; torch is
imported only when a merge runs.
"""

from __future__ import annotations

from typing import Any

from adaptr import hookimpl
from adaptr.interfaces import ParamDef

LAMBDA = ParamDef("lambda", float, 1.0, "Scale applied to the merged delta.")
NORMALIZE = ParamDef("normalize", bool, False, "Divide by the sum of the weights (mergekit's linear).")


def scale(t: Any, lam: float) -> Any:
    return t if lam == 1.0 else t.mul_(lam)


class Simple:
    """W' = W + w·s·BA for one adapter; the only strategy that merges DoRA adapters."""

    name = "simple"
    pretty_name = "Simple (merge_and_unload)"
    paper_url = "https://arxiv.org/abs/2106.09685"
    description = "Add one adapter's delta to the base, as PEFT's merge_and_unload does."
    params: tuple[ParamDef, ...] = ()
    allows_negative_weights = True
    max_adapters = 1
    supports_dora = True
    elementwise = True  # each output entry depends only on the same entry of the deltas

    def merge(self, deltas, weights, params, *, seeds):
        (delta,), (w,) = deltas, weights
        return delta if w == 1.0 else delta.mul_(w)


class Linear:
    """Σ w_i ΔW_i, optionally divided by Σ w_i."""

    name = "linear"
    pretty_name = "Linear (weighted sum)"
    paper_url = "https://arxiv.org/abs/2203.05482"
    description = "Weighted sum of the adapters' deltas; --normalize turns it into a weighted mean."
    params = (NORMALIZE,)
    allows_negative_weights = True
    max_adapters = None
    elementwise = True

    def merge(self, deltas, weights, params, *, seeds):
        from adaptr.ops.weighted_sum import weighted_sum

        return weighted_sum(deltas, weights, normalize=bool(params["normalize"]))


class TaskArithmetic:
    """λ · Σ w_i ΔW_i; negative weights negate a task."""

    name = "task_arithmetic"
    pretty_name = "Task Arithmetic"
    paper_url = "https://arxiv.org/abs/2212.04089"
    description = "Scaled sum of task vectors (the adapters' deltas); negative weights subtract a task."
    params = (LAMBDA, NORMALIZE)
    allows_negative_weights = True
    max_adapters = None
    elementwise = True

    def merge(self, deltas, weights, params, *, seeds):
        from adaptr.ops.weighted_sum import weighted_sum

        return scale(weighted_sum(deltas, weights, normalize=bool(params["normalize"])), params["lambda"])


@hookimpl
def register_merge_strategies(register) -> None:
    register(Simple())
    register(Linear())
    register(TaskArithmetic())
