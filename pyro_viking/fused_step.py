r"""The training step of a :class:`~pyro_viking.BayesianNetwork` under an
:class:`~pyro_viking.AutoViking` guide and :class:`~pyro_viking.TraceViking_ELBO`, without
Pyro's traces.

The traced step runs the guide and the model under Pyro's handlers (the model once more inside
the guide, for the Jacobian's rows), which on small networks costs as much as the numerics. This
step computes the same loss and gradients directly::

    idx  ~ the model's data plate (B of N)                      # the same random draw
    P    = projector of J(θ̂), J the Jacobian of the rows  log p(y_i | f(x_i; θ̂)), i ∈ idx
    z    = θ̂ + σ_ker k + σ_im i                                 # the guide's SamplingState
    loss = −(N / B) Σ_{i∈idx} log p(y_i | f(x_i; z)) + β KL(q ‖ N(0, s² I))

and draws its random numbers in the traced step's order (the plate's permutation, then the
noise), so under one seed both give the same losses (``tests/test_fused_step.py``). Parameters
are read through ``pyro.param`` (``SVI`` captures and updates them as usual).

With ``K`` vectorised particles (``vectorize_particles=True``) the K draws share the minibatch
and the projector, the network runs on the K weight samples as the model batches them
(:meth:`~pyro_viking.BayesianNetwork.forward_network`: ``torch.vmap`` or a loop), and the
loss is averaged over them, as in Pyro's vectorised ELBO.

It is taken only where it is exactly the traced step: one particle or vectorised particles,
the guide set up by an earlier traced step on this very network and guiding its latents alone,
the model called as ``bnn(x, y)``, no gradient through ``P``, and no Pyro handler active other
than ``SVI``'s parameter capture. Anything else goes through Pyro
(``TraceViking_ELBO(fused=False)`` always does).
"""

from __future__ import annotations

from typing import Optional

import pyro.poutine as poutine
from pyro.poutine.runtime import _PYRO_STACK
from pyro.poutine.trace_messenger import TraceMessenger
from pyro.util import warn_if_nan
from torch import Tensor

from .bnn import BayesianNetwork
from .distributions.kl import kl_kernel_image_normal_isotropic, squared_norm

__all__ = ["fused_applies", "fused_loss_and_grads"]


def _only_parameter_capture() -> bool:
    # SVI.step records the params it optimises with poutine.trace(param_only=True); any other
    # handler (scale, condition, block, a plate, ...) could change the step: leave it to Pyro.
    return all(isinstance(m, TraceMessenger) and m.param_only for m in _PYRO_STACK)


def _as_defined_by(obj, cls, *methods: str) -> bool:
    """``obj`` is a ``cls`` whose ``methods`` are ``cls``'s own (a subclass may change them)."""
    return isinstance(obj, cls) and all(getattr(type(obj), m) is getattr(cls, m)
                                        for m in methods)


def fused_applies(elbo, model, guide, args: tuple, kwargs: dict) -> bool:
    """Whether :func:`fused_loss_and_grads` computes exactly the traced step for this call."""
    from .autoguide import AutoViking
    from .elbo import TraceViking_ELBO

    return (getattr(elbo, "fused", False)
            and (elbo.num_particles == 1 or elbo.vectorize_particles)
            and _as_defined_by(elbo, TraceViking_ELBO, "_differentiable_loss_particle",
                               "_get_trace", "_get_traces")
            and _as_defined_by(model, BayesianNetwork, "forward", "forward_network",
                               "observation_distribution", "row_log_likelihood", "data_plate")
            and _as_defined_by(guide, AutoViking, "forward", "get_posterior",
                               "training_posterior")
            and guide.prototype_trace is not None
            and guide.master is None and poutine.unwrap(guide.model) is model
            and not guide.grad_through_projection and guide.jacobian == "loss"
            and set(guide.layout.names) == set(model.latent_sites)
            and not kwargs and len(args) == 2 and args[1] is not None
            and _only_parameter_capture())


def _rows_fn(bnn: BayesianNetwork, layout, x: Tensor, y: Tensor):
    """``z (..., D) -> (..., B)``: ``log p(y_i | f(x_i; z))`` with z's site views as the
    weights (a leading batch of weight samples runs as ``forward_network`` batches it)."""
    names = {bnn.site_name(n): n for n in bnn.latent_shapes}

    def rows(z: Tensor) -> Tensor:
        latent = {names[site]: value for site, value in layout.unpack(z).items()}
        return bnn.row_log_likelihood(bnn.forward_network(latent, x), y)

    return rows


def fused_loss_and_grads(elbo, model: BayesianNetwork, guide, args: tuple,
                         kwargs: dict) -> Optional[float]:
    """The step's loss (after ``backward``), or ``None`` when :func:`fused_applies` is false."""
    if not (getattr(elbo, "fused", False) and isinstance(model, BayesianNetwork)):
        return None  # every other model: no bookkeeping on its steps
    # The traced step inspects each new call shape (observed values finite and in their
    # support, ...): leave the first step of every shape to it.
    seen = elbo.__dict__.setdefault("_fused_call_shapes", set())
    shapes = (id(guide),) + tuple((getattr(a, "shape", None), getattr(a, "dtype", None))
                                  for a in args)
    new_shape = shapes not in seen
    seen.add(shapes)
    if new_shape or not fused_applies(elbo, model, guide, args, kwargs):
        return None
    x, y = args
    model.check_inputs(x)  # once per training tensor
    data = model.data_plate(x, y)
    idx = data.indices
    rows = _rows_fn(model, guide.layout, x[idx], y[idx])
    K = elbo.num_particles  # > 1 only when vectorised: K draws on the one minibatch
    guide.num_chains = 1
    q = guide.training_posterior(args, kwargs, rows=rows)
    z = q.rsample((K,)) if K > 1 else q.rsample()  # (K, D): one batched network call
    loglik = rows(z).sum() * (data.size / data.subsample_size) / K
    s = model.prior_scale_value(q.loc)
    kl = kl_kernel_image_normal_isotropic(q, squared_norm(q.loc), s)
    loss = elbo.beta * kl - loglik
    warn_if_nan(loss, "loss")
    loss.backward()
    return float(loss.detach())
