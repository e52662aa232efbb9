"""Numerical core: Jacobian operators, Gram solvers and kernel projectors (no Pyro inside)."""

from .operators import CallableJacobian, DenseJacobian, FunctionalJacobian, JacobianOperator
from .projectors import DenseProjector, KernelProjector, MatrixFreeProjector
from .solvers import (
    ConvergenceWarning,
    SolveInfo,
    cg_solve,
    cholesky_factor,
    cholesky_solve,
    eigh_solve,
)

__all__ = [
    "CallableJacobian",
    "ConvergenceWarning",
    "DenseJacobian",
    "DenseProjector",
    "FunctionalJacobian",
    "JacobianOperator",
    "KernelProjector",
    "MatrixFreeProjector",
    "SolveInfo",
    "cg_solve",
    "cholesky_factor",
    "cholesky_solve",
    "eigh_solve",
]
