"""From a Pyro model call to a kernel projector: choose the Jacobian backend and the solver.

Backends (``backend=``):

* ``"layer_gram"`` — :class:`~pyro_viking.linalg.layer_gram.LayerGramJacobian`: exact,
  per-layer Gram (one forward + one backward) of networks built from ``nn.Linear``,
  ``nn.Conv{1,2,3}d``, batch norm in eval mode, ``nn.LayerNorm``/``GroupNorm``/``RMSNorm``,
  ``nn.Embedding`` and ``nn.MultiheadAttention`` (``pyro_viking.linalg.layer_rules``), with the
  other parameters' columns from per-example gradients;
* ``"per_example"`` — :class:`~pyro_viking.linalg.per_example.PerExampleJacobian`: the dense
  ``(B, D)`` Jacobian from vectorised per-example gradients;
* ``"matrix_free"`` — :class:`~pyro_viking.linalg.operators.FunctionalJacobian` with CG;
* ``"auto"`` — layer Gram when it applies, else dense when ``B·D·itemsize`` fits in
  ``max_dense_bytes`` (default :data:`DEFAULT_MAX_DENSE_BYTES` of this module, read at call
  time, so it can be changed for callers such as the guide that do not pass it), else
  matrix-free (the rule of :func:`~pyro_viking.linalg.layer_gram.select_jacobian_backend`).

Rows (``jacobian=``, :data:`~pyro_viking.model_trace.rows.JACOBIANS`): ``"loss"`` (per-datum
log-likelihoods), ``"output"`` (network outputs) or ``"fisher"`` (outputs whitened by the
likelihood's Fisher, whose kernel is the GGN's; :mod:`pyro_viking.model_trace.rows`). The last
two give several rows per datum for several outputs (C classes). For ``"fisher"`` the layer-Gram
backend takes them datum-major (``rows_per_datum`` inferred; one batched backward over the C
outputs); ``"output"`` keeps one row per datum there, so ``"auto"`` gives it the dense or
matrix-free route, as before.

:class:`ProjectorBuilder` is what a guide keeps between calls: the backend chosen (and verified)
at the first projection, and whether iterative refinement has been found useless lately.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
from torch import Tensor

from pyro_viking.linalg import SOLVERS, DenseProjector, FunctionalJacobian, KernelProjector
from pyro_viking.linalg.layer_gram import DEFAULT_MAX_DENSE_BYTES, select_jacobian_backend
from pyro_viking.model_trace.layout import LatentLayout
from pyro_viking.model_trace.rows import JACOBIANS, make_rows_fn

__all__ = ["BACKENDS", "DEFAULT_MAX_DENSE_BYTES", "SOLVERS", "ProjectorBuilder",
           "build_projector", "projector_from_rows"]

#: the Jacobian backends (module docstring); ``SOLVERS``: those of
#: :class:`~pyro_viking.linalg.KernelProjector`
BACKENDS = ("auto", "layer_gram", "per_example", "matrix_free")


def build_projector(
    model: Callable,
    layout: LatentLayout,
    args: tuple,
    kwargs: dict,
    loc: Tensor,
    *,
    jacobian: str = "loss",
    subsample: Optional[Dict[str, Tensor]] = None,
    backend: str = "auto",
    solver: str = "auto",
    solver_options: Optional[dict] = None,
    differentiable: bool = True,
    check: bool = True,
    max_dense_bytes: Optional[int] = None,
    condition: Optional[Dict[str, Tensor]] = None,
) -> KernelProjector:
    """Projector onto the kernel of the Jacobian of ``model(*args, **kwargs)``'s rows at ``loc``.

    ``projector.operator.backend_name`` records the backend used. ``check`` verifies a
    layer-Gram Jacobian against autograd once (one extra backward pass); a caller that has
    already verified the same model structure can skip it. ``max_dense_bytes`` bounds the
    dense Jacobian of ``backend="auto"`` (default :data:`DEFAULT_MAX_DENSE_BYTES`).
    ``condition`` fixes latents outside ``layout`` (see :func:`make_rows_fn`).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    fn = make_rows_fn(model, layout, args, kwargs, jacobian=jacobian, subsample=subsample,
                      condition=condition)
    return projector_from_rows(fn, loc, backend=backend, solver=solver,
                               solver_options=solver_options, differentiable=differentiable,
                               check=check, max_dense_bytes=max_dense_bytes,
                               rows_per_datum=_datum_rows_of(jacobian))


def _datum_rows_of(jacobian: str) -> Optional[int]:
    """What the layer-Gram backend assumes of the rows of ``jacobian`` (module docstring):
    ``None`` (inferred, datum-major) for ``"fisher"``, else 1."""
    return None if jacobian == "fisher" else 1


def projector_from_rows(fn: Callable[[Tensor], Tensor], loc: Tensor, *, backend: str = "auto",
                        solver: str = "auto", solver_options: Optional[dict] = None,
                        differentiable: bool = True, check: bool = True,
                        max_dense_bytes: Optional[int] = None,
                        rows_per_datum: Optional[int] = 1) -> KernelProjector:
    """Projector onto the kernel of the Jacobian of ``fn: z (D,) -> rows (B,)`` at ``loc``
    (the backend and solver choice of :func:`build_projector`, for a rows function given
    directly; ``rows_per_datum`` as in
    :class:`~pyro_viking.linalg.layer_gram.LayerGramJacobian`)."""
    op = None
    if backend != "matrix_free":
        op = select_jacobian_backend(
            fn, loc, prefer=None if backend == "auto" else backend, check=check,
            max_dense_bytes=DEFAULT_MAX_DENSE_BYTES if max_dense_bytes is None
            else max_dense_bytes, rows_per_datum=rows_per_datum)
    if op is None:
        op = FunctionalJacobian(fn, loc)
        op.backend_name = "matrix_free"
    return KernelProjector(op, solver=solver, differentiable=differentiable,
                           **(solver_options or {}))


class ProjectorBuilder:
    """Builds a guide's projectors with fixed settings, remembering between calls the backend
    resolved (and verified against autograd) at the first projection and the refinement state.

    Refinement check: once a training projection's first pass was already within
    ``refine_tol``, the next :attr:`REFINE_CHECK_INTERVAL` − 1 training projections skip
    iterative refinement and its residual check (one ``mv`` each).
    """

    #: training projections between two residual checks once a check found refinement useless
    REFINE_CHECK_INTERVAL = 16

    def __init__(self, *, jacobian: str = "loss", backend: str = "auto", solver: str = "auto",
                 solver_options: Optional[dict] = None):
        for name, value, allowed in (("backend", backend, BACKENDS), ("solver", solver, SOLVERS),
                                     ("jacobian", jacobian, JACOBIANS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        self.jacobian, self.backend, self.solver = jacobian, backend, solver
        self.solver_options = dict(solver_options or {})
        self.backend_used: Optional[str] = None
        self._clean, self._since, self._pending = False, 0, None

    def build(self, model: Callable, layout: LatentLayout, args: tuple, kwargs: dict,
              loc: Tensor, *, subsample: Optional[Dict[str, Tensor]] = None,
              condition: Optional[Dict[str, Tensor]] = None, differentiable: bool = False,
              training: bool = False) -> KernelProjector:
        """Projector onto the kernel of the model's Jacobian at ``loc`` for this call's data."""
        fn = make_rows_fn(model, layout, args, kwargs, jacobian=self.jacobian,
                          subsample=subsample, condition=condition)
        return self.build_from_rows(fn, loc, differentiable=differentiable, training=training)

    def build_from_rows(self, fn: Callable[[Tensor], Tensor], loc: Tensor, *,
                        differentiable: bool = False, training: bool = False) -> KernelProjector:
        """As :meth:`build`, for rows ``fn: z (D,) -> (B,)`` computed by the caller (e.g. a
        model that evaluates its own likelihood rows without a Pyro trace)."""
        options = self.solver_options
        if training and self._skip_refinement():
            options = {**options, "refine": 0}
        proj = projector_from_rows(  # no gradient through P: no graph of the build to keep
            fn, loc if differentiable else loc.detach(),
            backend=self.backend_used or self.backend, solver=self.solver,
            solver_options=options, differentiable=differentiable,
            check=self.backend_used is None, rows_per_datum=_datum_rows_of(self.jacobian))
        self.backend_used = proj.operator.backend_name
        if training:
            self._pending = proj
        return proj

    @staticmethod
    def identity(D: int, like: Tensor) -> KernelProjector:
        """``P = I`` (no likelihood: the whole space is the kernel)."""
        return DenseProjector(torch.zeros(1, D, dtype=like.dtype, device=like.device),
                              solver="eigh")

    def _skip_refinement(self) -> bool:
        if self.solver_options.get("refine", 1) == 0 \
                or self.solver_options.get("refine_tol", 1.0) == 0:
            return False
        last, self._pending = self._pending, None
        if last is not None and last.info is not None and last.refine and last.solver != "cg":
            self._clean, self._since = last.info.refinements == 0, 0  # a checked projection
        self._since += 1
        return self._clean and self._since < self.REFINE_CHECK_INTERVAL

    def __getstate__(self):
        return {**self.__dict__, "_pending": None}
