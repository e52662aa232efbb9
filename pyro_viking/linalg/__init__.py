"""Numerical core: Jacobian operators, Gram solvers and kernel projectors (no Pyro inside)."""

from .operators import CallableJacobian, FunctionalJacobian, JacobianOperator
from .per_example import PerExampleJacobian
from .projectors import DenseProjector, KernelProjector, MatrixFreeProjector
from .solvers import (
    ConvergenceWarning,
    SolveInfo,
    cg_solve,
    cholesky_factor,
    cholesky_solve,
    eigh_solve,
)

#: Deprecated alias (the former ``DenseJacobian`` class, merged into :class:`PerExampleJacobian`):
#: ``DenseJacobian(J)`` is ``PerExampleJacobian.from_matrix(J)``. Kept only for
#: ``pyro_viking/autoguide.py``'s last use; delete with it.
DenseJacobian = PerExampleJacobian.from_matrix

__all__ = [
    "CallableJacobian",
    "ConvergenceWarning",
    "DenseJacobian",
    "DenseProjector",
    "FunctionalJacobian",
    "JacobianOperator",
    "KernelProjector",
    "MatrixFreeProjector",
    "PerExampleJacobian",
    "SolveInfo",
    "cg_solve",
    "cholesky_factor",
    "cholesky_solve",
    "eigh_solve",
]
