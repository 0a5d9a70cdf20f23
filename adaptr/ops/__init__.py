"""Pure-torch tensor operations: the production CPU path and the oracle for every accelerated kernel.

Each merge strategy (task arithmetic, TIES, DARE, DARE-TIES) is a composition of the step functions
in this package. They operate on **float32 deltas** ``δ_i = ΔW_i`` of one tensor (callers upcast; nothing here
down-casts), are exact (no approximation anywhere: thresholds are exact order statistics, masks are
exact Bernoulli draws) and never produce NaN for finite inputs.

Semantics follow mergekit 0.1.5's generalized task arithmetic (``merge_methods/generalized_task_arithmetic``
and ``sparsify``) wherever the tools disagree, because that is the form that has paper meaning on full
deltas:

* weights multiply the deltas **before** sign election (``δ̃_i = w_i·δ_i``);
* the disjoint merge is normalised by the **sum of agreeing weights** (TIES with ``normalize: true``);
* exact-zero sums elect ``+`` (as both PEFT and mergekit do);
* trimming keeps ``k = max(1, int(density·n))`` entries per tensor.

DARE's rescale is selectable: ``1/density`` (paper, PEFT) or the L1-norm ratio (mergekit).

Papers: task arithmetic, Ilharco et al., arXiv 2212.04089; TIES-merging, Yadav et al., arXiv 2306.01708;
DARE, Yu et al., arXiv 2311.03099.

Modules are named for what they do, and each accelerated kernel (``plugins/adaptr_triton``) has the
same module name as its torch twin here and its test in ``tests/kernels``.
"""
