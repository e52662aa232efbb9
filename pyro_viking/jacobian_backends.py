"""From a Pyro model call to a kernel projector: choose the Jacobian backend and the solver.

Backends (``backend=``):

* ``"layer_gram"`` — :class:`~pyro_viking.linalg.layer_gram.LayerGramJacobian`: exact,
  per-layer Gram of ``nn.Linear``/``nn.Conv2d`` networks (one forward + one backward);
* ``"per_example"`` — :class:`~pyro_viking.linalg.per_example.PerExampleJacobian`: the dense
  ``(B, D)`` Jacobian from vectorised per-example gradients;
* ``"matrix_free"`` — :class:`~pyro_viking.linalg.operators.FunctionalJacobian` with CG;
* ``"auto"`` — layer Gram when it applies, else dense when ``B·D·itemsize`` fits in
  ``max_dense_bytes`` (default :data:`DEFAULT_MAX_DENSE_BYTES` of this module, read at call
  time, so it can be changed for callers such as the guide that do not pass it), else
  matrix-free (the rule of :func:`~pyro_viking.linalg.layer_gram.select_jacobian_backend`).

The output Jacobian (``jacobian="output"``) has several rows per datum, which the layer-Gram
backend refuses (its rows must match the layers' batch), so ``"auto"`` then falls back to the
dense or matrix-free routes.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

from torch import Tensor

from .linalg import FunctionalJacobian, KernelProjector
from .linalg.layer_gram import DEFAULT_MAX_DENSE_BYTES, select_jacobian_backend
from .model_likelihood import LatentLayout, make_rows_fn

__all__ = ["BACKENDS", "DEFAULT_MAX_DENSE_BYTES", "build_projector"]

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
) -> KernelProjector:
    """Projector onto the kernel of the Jacobian of ``model(*args, **kwargs)``'s rows at ``loc``.

    ``projector.operator.backend_name`` records the backend used. ``check`` verifies a
    layer-Gram Jacobian against autograd once (one extra backward pass); a caller that has
    already verified the same model structure can skip it. ``max_dense_bytes`` bounds the
    dense Jacobian of ``backend="auto"`` (default :data:`DEFAULT_MAX_DENSE_BYTES`).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    fn = make_rows_fn(model, layout, args, kwargs, jacobian=jacobian, subsample=subsample)
    op = None
    if backend != "matrix_free":
        op = select_jacobian_backend(
            fn, loc, prefer=None if backend == "auto" else backend, check=check,
            max_dense_bytes=DEFAULT_MAX_DENSE_BYTES if max_dense_bytes is None
            else max_dense_bytes)
    if op is None:
        op = FunctionalJacobian(fn, loc)
        op.backend_name = "matrix_free"
    return KernelProjector(op, solver=solver, differentiable=differentiable,
                           **(solver_options or {}))
