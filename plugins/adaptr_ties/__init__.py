"""Built-in magnitude-based strategies: ``ties`` and ``magnitude_prune``."""

from __future__ import annotations

from adaptr import hookimpl
from adaptr.interfaces import ParamDef

DENSITY = ParamDef("density", float, 0.2, "Fraction of each delta's entries kept, by magnitude.")
LAMBDA = ParamDef("lambda", float, 1.0, "Scale applied to the merged delta.")


class Ties:
    """Trim each delta to its top-density magnitudes, elect signs by mass, disjoint weighted mean, × λ."""

    name = "ties"
    pretty_name = "TIES-Merging"
    paper_url = "https://arxiv.org/abs/2306.01708"
    description = "Trim, elect sign, disjoint merge: resolves interference between adapters."
    params = (DENSITY, LAMBDA)
    allows_negative_weights = False
    max_adapters = None

    def merge(self, deltas, weights, params, *, seeds):
        from adaptr.ops.ties_merge import ties_merge

        return ties_merge(deltas, weights, density=params["density"], lam=params["lambda"])

    def merge_onto(self, base, deltas, weights, params, *, seeds, out_dtype):
        from adaptr.ops.ties_merge import ties_merge

        return ties_merge(
            deltas, weights, density=params["density"], lam=params["lambda"], base=base, out_dtype=out_dtype
        )


class MagnitudePrune:
    """Trim each delta to its top-density magnitudes, then λ · Σ w_i trimmed_i."""

    name = "magnitude_prune"
    pretty_name = "Magnitude prune"
    paper_url = "https://arxiv.org/abs/2306.01708"
    description = "TIES's trim step followed by a weighted sum (no sign election)."
    params = (DENSITY, LAMBDA)
    allows_negative_weights = True
    max_adapters = None

    def merge(self, deltas, weights, params, *, seeds):
        from adaptr.ops.magnitude_threshold import trim_by_magnitude
        from adaptr.ops.weighted_sum import weighted_sum

        trimmed = [trim_by_magnitude(d, params["density"]) for d in deltas]
        out = weighted_sum(trimmed, weights)
        return out if params["lambda"] == 1.0 else out.mul_(params["lambda"])


@hookimpl
def register_merge_strategies(register) -> None:
    register(Ties())
    register(MagnitudePrune())
