"""Numerical core: Jacobian operators, Gram solvers and kernel projectors (no Pyro inside)."""

from .operators import CallableJacobian, FunctionalJacobian, JacobianOperator
from .per_example import PerExampleJacobian
from .projectors import SOLVERS, DenseProjector, KernelProjector, MatrixFreeProjector
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
    "DenseProjector",
    "FunctionalJacobian",
    "JacobianOperator",
    "KernelProjector",
    "MatrixFreeProjector",
    "PerExampleJacobian",
    "SOLVERS",
    "SolveInfo",
    "cg_solve",
    "cholesky_factor",
    "cholesky_solve",
    "eigh_solve",
]
