"""Bayesian neural networks from ordinary ``nn.Module``: :class:`BayesianNetwork` (a Pyro
model), :func:`network_output` (a network under given, or linearised, parameters),
:func:`linearised_model` (a network's linearised predictive, as a Pyro model) and
:func:`add_lora` (low-rank adapters on a frozen network, latent with ``LORA_LATENT``)."""

from pyro_viking.nn.bayesian_network import BayesianNetwork
from pyro_viking.nn.linearised_model import linearised_model
from pyro_viking.nn.linearization import network_output
from pyro_viking.nn.lora import LORA_LATENT, LoRALinear, add_lora

__all__ = ["BayesianNetwork", "LORA_LATENT", "LoRALinear", "add_lora", "linearised_model",
           "network_output"]
