"""Jacobian operators: a matrix ``J ∈ R^{B×D}`` accessed through products.

Convention used throughout :mod:`pyro_viking.linalg`: vectors are stored as *rows*,
so a batch of K vectors in R^D is a ``(K, D)`` tensor and

* ``mv(V)``  returns ``V Jᵀ``  with shape ``(K, B)``  (K Jacobian-vector products),
* ``rmv(U)`` returns ``U J``   with shape ``(K, D)``  (K vector-Jacobian products).

An operator also exposes ``params``: the tensors that J depends on, through which
:class:`~pyro_viking.linalg.projectors.KernelProjector` differentiates the projection
(implicit differentiation needs ``bilinear``, which must be differentiable w.r.t. them).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = [
    "JacobianOperator",
    "CallableJacobian",
    "FunctionalJacobian",
]


class JacobianOperator:
    """Abstract ``B × D`` Jacobian accessed through ``mv`` / ``rmv``.

    Subclasses implement :meth:`mv` and :meth:`rmv`; they may override :meth:`gram`
    (when the ``B × B`` Gram matrix ``J Jᵀ`` is cheap) and :meth:`bilinear`.
    """

    #: True when :meth:`gram` is cheap (no B products needed); solvers then factorise it.
    has_cheap_gram: bool = False

    def __init__(self, shape: Tuple[int, int], dtype: torch.dtype, device: torch.device):
        self.shape = (int(shape[0]), int(shape[1]))
        self.dtype = dtype
        self.device = device

    @property
    def params(self) -> Tuple[Tensor, ...]:
        """Tensors that J depends on (differentiated through by the projection)."""
        return ()

    def mv(self, V: Tensor) -> Tensor:
        """``V Jᵀ``: ``(K, D) -> (K, B)``."""
        raise NotImplementedError

    def rmv(self, U: Tensor) -> Tensor:
        """``U J``: ``(K, B) -> (K, D)``."""
        raise NotImplementedError

    def to_dense(self) -> Tensor:
        """The explicit ``(B, D)`` matrix, from B vector-Jacobian products."""
        B = self.shape[0]
        eye = torch.eye(B, dtype=self.dtype, device=self.device)
        return self.rmv(eye)

    def gram(self) -> Tensor:
        """``J Jᵀ`` as a float64 ``(B, B)`` matrix (float64: fp32 Gram matrices of trained
        networks are too ill-conditioned to factorise)."""
        J = self.to_dense().to(torch.float64)
        return J @ J.T

    def bilinear(self, U: Tensor, V: Tensor) -> Tensor:
        """``Σ_k U_k J V_kᵀ`` (a scalar), differentiable w.r.t. :attr:`params`.

        Called with gradients enabled by the backward pass of the projection.
        """
        return (U * self.mv(V)).sum()

    def release_graph(self) -> None:
        """Drop any autograd graph kept for :meth:`bilinear_grad` (called by a projector that
        will not be differentiated through its params)."""

    def bilinear_grad(self, U: Tensor, V: Tensor) -> Tuple[Optional[Tensor], ...]:
        """``∇ Σ_k U_k J V_kᵀ`` w.r.t. each of the :attr:`params` that requires grad (``None``
        where J does not depend on it), U and V held constant: the second-order term of the
        implicit gradient of a projection. Default: autograd through :meth:`bilinear`."""
        params = tuple(p for p in self.params if p.requires_grad)
        with torch.enable_grad():
            b = self.bilinear(U, V)
            if not params or not b.requires_grad:  # J does not depend on its params
                return (None,) * len(params)
            # retained: an operator may keep its graph for later calls
            return torch.autograd.grad(b, params, allow_unused=True, retain_graph=True)


class CallableJacobian(JacobianOperator):
    """A Jacobian given by two callables, ``mv(V) = V Jᵀ`` and ``rmv(U) = U J``.

    :param mv: ``(K, D) -> (K, B)``.
    :param rmv: ``(K, B) -> (K, D)``.
    :param shape: ``(B, D)``.
    :param params: tensors the callables close over; the projection is differentiated
        w.r.t. them through ``bilinear`` (by default ``Σ U ⊙ mv(V)``, which must then be
        differentiable w.r.t. ``params``).
    :param bilinear: optional override of :meth:`JacobianOperator.bilinear`.
    """

    def __init__(
        self,
        mv: Callable[[Tensor], Tensor],
        rmv: Callable[[Tensor], Tensor],
        shape: Tuple[int, int],
        *,
        dtype: Optional[torch.dtype] = None,
        device: Optional[torch.device] = None,
        params: Sequence[Tensor] = (),
        bilinear: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
    ):
        super().__init__(shape, dtype or torch.get_default_dtype(), device or torch.device("cpu"))
        self._mv, self._rmv = mv, rmv
        self._params = tuple(params)
        self._bilinear = bilinear

    @property
    def params(self) -> Tuple[Tensor, ...]:
        return self._params

    def mv(self, V: Tensor) -> Tensor:
        return self._mv(V)

    def rmv(self, U: Tensor) -> Tensor:
        return self._rmv(U)

    def bilinear(self, U: Tensor, V: Tensor) -> Tensor:
        if self._bilinear is not None:
            return self._bilinear(U, V)
        return super().bilinear(U, V)


class FunctionalJacobian(JacobianOperator):
    """The Jacobian at ``theta`` of a function ``fn: R^D -> R^B``, matrix-free.

    ``mv`` uses forward mode (``torch.func.jvp``), ``rmv`` reverse mode (one linearisation of
    ``fn`` by ``torch.func.vjp``, reused for every call). Products over K vectors are
    vectorised with ``torch.func.vmap`` when ``fn`` allows it, else looped.

    ``params = (theta,)``: when ``theta`` requires grad, :meth:`bilinear` is differentiable
    w.r.t. it (reverse-over-forward through ``jvp``).
    """

    def __init__(self, fn: Callable[[Tensor], Tensor], theta: Tensor, *, vectorize: bool = True):
        with torch.no_grad():
            out = fn(theta.detach())
        if out.dim() != 1:
            raise ValueError(f"fn must map (D,) to (B,), got output shape {tuple(out.shape)}")
        super().__init__((out.shape[0], theta.shape[0]), theta.dtype, theta.device)
        self.fn = fn
        self.theta = theta
        self.vectorize = vectorize
        self._vjp_fn = None

    @property
    def params(self) -> Tuple[Tensor, ...]:
        return (self.theta,)

    def _batched(self, f: Callable[[Tensor], Tensor], X: Tensor) -> Tensor:
        if self.vectorize:
            try:
                return torch.func.vmap(f)(X)
            except Exception:  # noqa: BLE001 - fn not vmappable (data-dependent control flow)
                self.vectorize = False
        return torch.stack([f(x) for x in X])

    def _jvp(self, theta: Tensor, v: Tensor) -> Tensor:
        # cast: jvp of a 0-dim float32 value times a Python float gives a float64 tangent
        return torch.func.jvp(self.fn, (theta,), (v,))[1].to(self.dtype)

    def mv(self, V: Tensor) -> Tensor:
        theta = self.theta.detach()
        return self._batched(lambda v: self._jvp(theta, v), V)

    def rmv(self, U: Tensor) -> Tensor:
        if self._vjp_fn is None:
            _, self._vjp_fn = torch.func.vjp(self.fn, self.theta.detach())
        vjp_fn = self._vjp_fn
        return self._batched(lambda u: vjp_fn(u.to(self.dtype))[0].to(self.dtype), U)

    def bilinear(self, U: Tensor, V: Tensor) -> Tensor:
        return sum((u * self._jvp(self.theta, v)).sum() for u, v in zip(U, V))
