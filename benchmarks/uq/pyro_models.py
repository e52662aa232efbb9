"""Turn a task's ``nn.Module`` into a Pyro BNN with an isotropic Gaussian prior.

Every parameter of the network becomes a ``PyroSample`` site ``net.<name>`` with prior
``N(0, s² I)``. ``s`` is a float (fixed prior: MAP-as-SVI, AutoNormal, AutoLowRank) or ``None``
for a *learned* prior scale ``pyro.param("prior_scale")`` (VIKING ties σ_ker to it). The model
is ``model(x, y=None, batch_size=None)``: training passes the full fit tensors and a batch size
(the ``"data"`` plate subsamples and Pyro rescales the likelihood by N/B), prediction passes
only inputs. Class probabilities (``"probs"``, (N, C)) or regression means (``"mean"``, (N,))
are recorded as deterministic sites. Regression uses a homoskedastic Gaussian likelihood whose
noise scale ``pyro.param("noise_scale")`` is a learned point estimate for every method.
"""

from __future__ import annotations

import copy
from typing import Dict, Optional

import pyro
import pyro.distributions as dist
import torch
import torch.nn as nn
from pyro.nn import PyroModule, PyroSample
from pyro.nn.module import to_pyro_module_
from torch.distributions import constraints

INIT_PRIOR_SCALE = 0.1353352832366127  # e⁻², the paper's init log α = 4


def _prior(shape: torch.Size, prior_scale: Optional[float], device: torch.device):
    def make(_module):
        if prior_scale is None:
            s = pyro.param("prior_scale", lambda: torch.tensor(INIT_PRIOR_SCALE, device=device),
                           constraint=constraints.positive)
        else:
            s = torch.tensor(prior_scale, device=device)
        return dist.Normal(0.0, s).expand(shape).to_event(len(shape))

    return make


class PyroBNN(PyroModule):
    """Pyro model around a copy of ``net`` (its parameters become latent sites)."""

    def __init__(self, net: nn.Module, kind: str, prior_scale: Optional[float]):
        super().__init__()
        net = copy.deepcopy(net)
        device = next(net.parameters()).device  # the priors' scales live where the weights do
        self.init_values = {f"net.{n}": p.detach().clone() for n, p in net.named_parameters()}
        to_pyro_module_(net)
        for module in net.modules():
            for name, p in list(module.named_parameters(recurse=False)):
                setattr(module, name, PyroSample(_prior(p.shape, prior_scale, device)))
        self.net = net
        self.kind = kind

    def forward(self, x, y=None, batch_size=None):
        data = pyro.plate("data", x.shape[0], subsample_size=batch_size)
        idx = data.indices
        out = self.net(x[idx])
        with data:
            if self.kind == "classification":
                pyro.deterministic("probs", out.softmax(-1), event_dim=1)
                pyro.sample("obs", dist.Categorical(logits=out),
                            obs=None if y is None else y[idx])
            else:
                mean = out.squeeze(-1)
                noise = pyro.param("noise_scale", lambda: torch.tensor(0.5, device=out.device),
                                   constraint=constraints.positive)
                pyro.deterministic("mean", mean)
                pyro.sample("obs", dist.Normal(mean, noise), obs=None if y is None else y[idx])
        return out


def init_values(model: PyroBNN) -> Dict[str, torch.Tensor]:
    """The PyTorch initialisation of the wrapped network, by site name (for ``init_to_value``),
    so that every method of a seed starts from the same weights."""
    return {k: v.clone() for k, v in model.init_values.items()}
