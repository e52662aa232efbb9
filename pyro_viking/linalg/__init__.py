"""Numerical core: Jacobian operators, Gram solvers and kernel projectors (no Pyro inside)."""

from pyro_viking.linalg.distributed_projection import (
    ShardedJacobian,
    StackedJacobian,
    sharded_projector,
)
from pyro_viking.linalg.operators import CallableJacobian, FunctionalJacobian, JacobianOperator
from pyro_viking.linalg.per_example import PerExampleJacobian
from pyro_viking.linalg.projectors import (
    SOLVERS,
    DenseProjector,
    KernelProjector,
    MatrixFreeProjector,
)
from pyro_viking.linalg.solvers import (
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
    "ShardedJacobian",
    "SolveInfo",
    "StackedJacobian",
    "cg_solve",
    "cholesky_factor",
    "cholesky_solve",
    "eigh_solve",
    "sharded_projector",
]
