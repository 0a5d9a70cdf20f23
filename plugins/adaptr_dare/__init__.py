"""Built-in DARE strategies: ``dare_linear`` and ``dare_ties`` (drop and rescale, seeded)."""

from __future__ import annotations

from adaptr import hookimpl
from adaptr.interfaces import ParamDef

DENSITY = ParamDef("density", float, 0.2, "Probability that each delta entry is kept (1 - drop rate p).")
LAMBDA = ParamDef("lambda", float, 1.0, "Scale applied to the merged delta.")
RESCALE = ParamDef(
    "rescale",
    str,
    "density",
    "How kept entries are rescaled: density (1/density, the paper), l1 (mergekit), none.",
)
NORMALIZE = ParamDef("normalize", bool, False, "Divide the sum by the sum of the weights.")
_RESCALES = {"density": "density", "l1": "l1", "none": None}


def _drop(deltas, params, seeds):
    from adaptr.errors import InvalidInputError
    from adaptr.ops.random_drop import random_drop

    if params["rescale"] not in _RESCALES:
        raise InvalidInputError(f"rescale must be one of density, l1, none; got {params['rescale']!r}")
    rescale = _RESCALES[params["rescale"]]
    return [random_drop(d, params["density"], seed=k, rescale=rescale) for d, k in zip(deltas, seeds)]


class DareLinear:
    """Drop entries with probability 1-density, rescale, then λ · Σ w_i dropped_i."""

    name = "dare_linear"
    pretty_name = "DARE (linear)"
    paper_url = "https://arxiv.org/abs/2311.03099"
    description = "Random drop and rescale of each delta, then a weighted sum."
    params = (DENSITY, LAMBDA, RESCALE, NORMALIZE)
    allows_negative_weights = True
    max_adapters = None

    def merge(self, deltas, weights, params, *, seeds):
        from adaptr.ops.weighted_sum import weighted_sum

        out = weighted_sum(_drop(deltas, params, seeds), weights, normalize=bool(params["normalize"]))
        return out if params["lambda"] == 1.0 else out.mul_(params["lambda"])


class DareTies:
    """Drop and rescale each delta, then TIES sign election and disjoint weighted mean, × λ."""

    name = "dare_ties"
    pretty_name = "DARE-TIES"
    paper_url = "https://arxiv.org/abs/2311.03099"
    description = "Random drop and rescale, then TIES's sign election and disjoint mean."
    params = (DENSITY, LAMBDA, RESCALE)
    allows_negative_weights = False
    max_adapters = None

    def merge(self, deltas, weights, params, *, seeds):
        from adaptr.ops.ties_merge import ties_merge

        return ties_merge(_drop(deltas, params, seeds), weights, lam=params["lambda"], trim=False)

    def merge_onto(self, base, deltas, weights, params, *, seeds, out_dtype):
        from adaptr.ops.ties_merge import ties_merge

        dropped = _drop(deltas, params, seeds)
        return ties_merge(dropped, weights, lam=params["lambda"], trim=False, base=base, out_dtype=out_dtype)


@hookimpl
def register_merge_strategies(register) -> None:
    register(DareLinear())
    register(DareTies())
