r"""The training step of a :class:`~pyro_viking.BayesianNetwork` under an
:class:`~pyro_viking.AutoViking` guide and :class:`~pyro_viking.TraceViking_ELBO`, without
Pyro's traces.

The traced step runs the guide and the model under Pyro's handlers (the model once more inside
the guide, for the Jacobian's rows), a per-call overhead that weighs most on small networks (the
step's cost with and without it: ``benchmarks/README.md``). This step computes the same loss and
gradients directly::

    idx  ~ the model's data plate (B of N)                      # the same random draw
    P    = projector of J(θ̂), J the Jacobian of the rows  log p(y_i | f(x_i; θ̂)), i ∈ idx
    z    = θ̂ + σ_ker k + σ_im i                                 # the guide's SamplingState
    loss = −(N / B) Σ_{i∈idx} log p(y_i | f(x_i; z)) + β KL(q ‖ N(0, s² I))

and draws its random numbers in the traced step's order (the plate's permutation, then the
noise), so under one seed both give the same losses (``tests/infer/test_fused_step.py``).
Parameters are read through ``pyro.param`` (``SVI`` captures and updates them as usual).

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

from pyro.util import warn_if_nan
from torch import Tensor

from pyro_viking.distributions.kl import kl_kernel_image_normal_isotropic, squared_norm
from pyro_viking.nn.batch_norm import update_running_statistics
from pyro_viking.nn.bayesian_network import BayesianNetwork
from pyro_viking.nn.likelihoods import row_log_likelihood

__all__ = ["fused_loss", "fused_loss_and_grads"]


def _rows_fn(bnn: BayesianNetwork, layout, x: Tensor, y: Tensor):
    """``z (..., D) -> (..., B)``: ``log p(y_i | f(x_i; z))`` with z's site views as the
    weights (a leading batch of weight samples runs as ``forward_network`` batches it).

    The noise scale (``None`` unless regression) is read once, at the first call: the rows at
    θ̂ (the projector) and at the sample (the loss) of one step see the same parameter value,
    and each read through Pyro costs a pass through its handlers and the constraint's
    transform (``row_log_likelihood`` would read it at every call)."""
    names = {bnn.site_name(n): n for n in bnn.latent_shapes}
    noise = []

    def rows(z: Tensor) -> Tensor:
        latent = {names[site]: value for site, value in layout.unpack(z).items()}
        out = bnn.forward_network(latent, x)
        if not noise:
            noise.append(bnn.noise_scale_value(out))
        return row_log_likelihood(bnn.likelihood, out, y, noise[0])

    return rows


def fused_loss(model: BayesianNetwork, guide, args: tuple, *, beta: float,
               num_particles: int) -> Tensor:
    """The step's differentiable loss (a 0-dim tensor) for ``model(*args)`` (``args = (x, y)``)
    under the set-up :class:`~pyro_viking.AutoViking` ``guide``: ``β KL − (N/B) Σ log p(y_i |
    f(x_i; z))`` averaged over ``num_particles`` vectorised draws of ``z``. The caller
    (:class:`~pyro_viking.TraceViking_ELBO`) has checked that this is exactly the traced step."""
    x, y = args
    model.check_inputs(x)  # once per training tensor
    data = model.data_plate(x, y)
    idx = data.indices
    rows = _rows_fn(model, guide.layout, x[idx], y[idx])
    K = num_particles  # > 1 only when vectorised: K draws on the one minibatch
    guide.num_chains = 1
    q = guide.training_posterior(args, {}, rows=rows)
    z = q.rsample((K,)) if K > 1 else q.rsample()  # (K, D): one batched network call
    loglik = rows(z).sum() * (data.size / data.subsample_size) / K
    s = model.prior_scale_value(q.loc)
    kl = kl_kernel_image_normal_isotropic(q, squared_norm(q.loc), s)
    loss = beta * kl - loglik
    warn_if_nan(loss, "loss")
    # batch norms in training mode (batch_norm="running"): one update at θ̂, as the traced step
    if model.batch_norm_layers.tracked():
        update_running_statistics(model, x[idx], guide.layout.unpack(q.loc.detach()))
    return loss


def fused_loss_and_grads(model: BayesianNetwork, guide, args: tuple, *, beta: float,
                         num_particles: int) -> float:
    """:func:`fused_loss`, after ``backward``, as a float (``SVI``'s step)."""
    loss = fused_loss(model, guide, args, beta=beta, num_particles=num_particles)
    loss.backward()
    return float(loss.detach())
