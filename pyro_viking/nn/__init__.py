"""Bayesian neural networks from ordinary ``nn.Module``: :class:`BayesianNetwork` (a Pyro
model), :func:`network_output` (a network under given, or linearised, parameters) and
:func:`linearised_model` (a network's linearised predictive, as a Pyro model)."""

from pyro_viking.nn.bayesian_network import BayesianNetwork
from pyro_viking.nn.linearised_model import linearised_model
from pyro_viking.nn.linearization import network_output

__all__ = ["BayesianNetwork", "linearised_model", "network_output"]
