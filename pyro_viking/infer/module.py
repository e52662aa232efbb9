"""VIKING as a PyTorch module: the loss of a model and its guide as an ``nn.Module`` that owns
every parameter it trains, for a ``torch.optim`` optimiser, a plain loop, DDP or Lightning.

Pyro's pattern (``pyro.infer.ELBO.__call__``): ``TraceViking_ELBO(beta=β)(model, guide)`` is an
``ELBOModule`` whose ``forward(*args)`` is the differentiable loss of one training call::

    pyro.settings.set(module_local_params=True)       # before building the guide
    bnn = BayesianNetwork(net, "classification", prior_scale="learned", num_data=N)
    guide = AutoViking(bnn, init_loc_fn=bnn.init_loc_fn)
    elbo = setup_parameters(TraceViking_ELBO(beta=0.1)(bnn, guide), x0, y0)
    optimizer = torch.optim.Adam(elbo.parameters(), lr=1e-3)
    for x, y in loader:
        optimizer.zero_grad()
        elbo(x, y).backward()
        optimizer.step()

With ``module_local_params`` on, the parameters live on the modules: the guide's ``θ̂``, ``σ_im``
and a learned ``σ_ker`` (``PyroParam`` s of :class:`~pyro_viking.AutoViking`), and a
:class:`~pyro_viking.BayesianNetwork`'s learned prior and noise scales and point-estimated
layers (``bnn.local_params``, :mod:`pyro_viking.nn.scales`). The loss is
``TraceViking_ELBO.differentiable_loss``: the value and gradients of ``SVI``'s step with the same
ELBO, so one ``torch.optim.Adam`` over ``elbo.parameters()`` takes ``SVI``'s steps with
``pyro.optim.Adam`` (same seed, same steps: ``tests/infer/test_module_path.py``).
``elbo.parameters()`` also lists the weights of the network a ``BayesianNetwork`` wraps, which
are its initial values, never trained (they get no gradient; optimisers skip them; DDP needs
``find_unused_parameters=True``, or use :mod:`pyro_viking.infer.distributed`).

The guide and the model create their parameters at their first call (Pyro's lazy set-up):
:func:`setup_parameters` makes that call before an optimiser (or DDP) is built, without taking a
step, and restores the random stream.
"""

from __future__ import annotations

import pyro
import torch
from pyro.infer.elbo import ELBOModule
from pyro.nn import PyroModule

__all__ = ["check_module_local", "setup_parameters"]


def check_module_local(elbo: ELBOModule) -> None:
    """Raise ``RuntimeError`` with the fix unless ``module_local_params`` is on and the guide
    (and every ``PyroModule`` inside the ELBO module) was built with it on: otherwise the
    parameters live in Pyro's global param store, where ``elbo.parameters()`` misses a model's
    ``pyro.param`` s (a learned prior scale would silently not train)."""
    if not pyro.settings.get("module_local_params"):
        raise RuntimeError(
            "the ELBO module trains only its own parameters: call "
            "pyro.settings.set(module_local_params=True) before building the guide (Pyro's mode "
            "for torch.optim, DDP and Lightning), or train with SVI")
    for name, module in elbo.named_modules():
        if isinstance(module, PyroModule) and not hasattr(module._pyro_context, "param_state"):
            raise RuntimeError(
                f"{name or type(module).__name__} was built while module_local_params was off: "
                "build the guide (and any PyroModule) after "
                "pyro.settings.set(module_local_params=True)")


def setup_parameters(elbo: ELBOModule, *args, **kwargs) -> ELBOModule:
    """Create the lazily made parameters of ``elbo`` (an ``ELBOModule``: the guide's, and the
    model's learned ones) by one loss evaluation on a training call ``elbo(*args, **kwargs)``
    without backward (which leaves the guide's carried samples as they were), with the random
    stream restored afterwards (its draws do not shift those of training). Returns ``elbo``,
    after :func:`check_module_local`.

    The guide is set up on this call's data, as on the first step of ``SVI``, with gradients
    enabled (it tells a learned prior scale that ``σ_ker`` follows from a constant by its
    gradient); the call also counts as the first of its shape for ``TraceViking_ELBO`` (which
    inspects each new call shape once)."""
    check_module_local(elbo)
    values = list(args) + list(kwargs.values())
    cuda = sorted({v.device.index or 0 for v in values if torch.is_tensor(v) and v.is_cuda})
    with torch.random.fork_rng(devices=cuda), torch.enable_grad():
        elbo(*args, **kwargs)
    return elbo
