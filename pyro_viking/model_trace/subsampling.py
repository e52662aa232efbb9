"""Which plates of a traced model see part of their data, and which draw that part at random.

A vectorised plate frame of a site is *subsampled* when it holds ``size < full_size`` of its
plate's elements. Its indices are *drawn at random* when the plate samples them itself
(``pyro.plate(name, N, subsample_size=B)``, ``B < N``), not when the model passes them
(``pyro.plate(name, N, subsample=idx)``): a guide may replay other indices over the former
only.
"""

from __future__ import annotations

from pyro.poutine.indep_messenger import CondIndepStackFrame
from pyro.poutine.util import site_is_subsample

__all__ = ["draws_random_indices", "subsampled_frames"]


def subsampled_frames(site) -> tuple[CondIndepStackFrame, ...]:
    """The vectorised plate frames of ``site`` that hold part of their plate
    (``size < full_size``), innermost last as in its ``cond_indep_stack``."""
    return tuple(f for f in site["cond_indep_stack"]
                 if f.vectorized and f.full_size is not None and f.size < f.full_size)


def draws_random_indices(trace, plate: str) -> bool:
    """Whether the plate named ``plate`` draws its subsample indices at random: its subsample
    site samples ``B < N`` indices (``subsample_size=B``) rather than taking given ones. A plate
    without a subsample site in ``trace`` counts as drawing at random."""
    node = trace.nodes.get(plate)
    if node is None or not site_is_subsample(node):
        return True
    fn = node["fn"]
    return fn.subsample_size is not None and fn.subsample_size < fn.size
