"""Bayesian neural networks from ordinary ``nn.Module``: :class:`BayesianNetwork` (a Pyro
model) and :func:`network_output` (a network under given, or linearised, parameters)."""

from pyro_viking.nn.bayesian_network import BayesianNetwork
from pyro_viking.nn.linearization import network_output

__all__ = ["BayesianNetwork", "network_output"]
