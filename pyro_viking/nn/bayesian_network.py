"""A Bayesian neural network from an ordinary ``nn.Module``, as a Pyro model.

:class:`BayesianNetwork` turns any ``nn.Module`` (MLP, CNN, ...) into the Pyro model

    θ_p ~ N(0, s² I)                      for every latent parameter tensor p of the network,
    y_i | x_i, θ ~ lik(f(x_i; θ, φ))      inside the data plate, i = 1..N (subsampled to B),

where ``φ`` are the parameters left out of the posterior (``pyro.param`` point estimates or
constants), ``s`` is a fixed prior scale or one shared learned ``pyro.param`` (positive), and
``lik`` is ``Categorical(logits=f)``, ``Bernoulli(logits=f)`` or ``Normal(f, σ²)`` with a
fixed or learned noise scale σ. The user writes no ``PyroSample`` lambdas::

    bnn = BayesianNetwork(net, "classification", prior_scale="learned", batch_size=32)
    guide = AutoViking(bnn, init_loc_fn=bnn.init_loc_fn)
    svi = SVI(bnn, guide, pyro.optim.Adam({"lr": 1e-3}), TraceViking_ELBO())
    svi.step(x_train, y_train)                      # x_train: all N training inputs

The structure VIKING needs is kept: the network is evaluated on ``x[idx]`` *outside* the data
plate (its weights are not per-datum), and the observed site ``"obs"`` has one row per datum
inside it. With unbatched weights the network runs as itself (``torch.func.functional_call``
with the sampled tensors), so ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d`` layers see ordinary
weights and the layer-Gram Jacobian backend applies; a leading batch of weight samples runs as
:mod:`pyro_viking.nn.weight_samples` says.

Partial latents (``docs/partial_latents.md``): ``latent=["norm", "head"]`` with
``fit_hidden=False`` puts the posterior on those layers of a trained network and keeps the rest
constant; on a copy with low-rank adapters (:func:`~pyro_viking.nn.lora.add_lora`, the network
frozen) ``latent=LORA_LATENT`` puts it on the adapters. The latent vector, and the Jacobian
VIKING projects with, are then those of the chosen parameters only.

The model keeps no hidden state: the network is its input, never trained in place (a learned
non-latent parameter is a ``pyro.param`` initialised from a copy of its value; a frozen one,
``requires_grad=False``, is a constant), and its ``pyro.param`` entries are
:attr:`BayesianNetwork.param_names`.

The parts: :mod:`~pyro_viking.nn.latent_rules` (which parameters are latent; deterministic
rows), :mod:`~pyro_viking.nn.hidden_parameters` (the others),
:mod:`~pyro_viking.nn.likelihoods` (the observation model), :mod:`~pyro_viking.nn.scales`
(fixed or learned ``s`` and ``σ``), :mod:`~pyro_viking.nn.data_plate`,
:mod:`~pyro_viking.nn.weight_samples`, :mod:`~pyro_viking.nn.input_checks`,
:mod:`~pyro_viking.nn.target_checks` (outputs and labels against the likelihood) and
:func:`~pyro_viking.nn.linearization.network_output` (the network call).

The prior and guide scales decide whether a network trained from PyTorch's initialisation
learns at all (a kernel sample has norm ``≈ s·√D``); warming up with MAP first, as the library
recipe does, avoids a network left at chance or shrunk to zero. Measured examples:
``benchmarks/README.md``, section "BayesianNetwork: measured figures".
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple, Union

import pyro
import pyro.distributions as dist
from torch import Tensor, nn

from pyro_viking.nn.batch_norm import BatchNormLayers, update_after_call
from pyro_viking.nn.data_plate import data_plate
from pyro_viking.nn.hidden_parameters import copy_learned, hidden_values, learned_hidden
from pyro_viking.nn.input_checks import InputChecks, check_rows_match
from pyro_viking.nn.latent_rules import (
    Rule,
    batch_dependent_modules,
    check_deterministic,
    split_parameters,
)
from pyro_viking.nn.latent_values import copy_latent, init_to_network
from pyro_viking.nn.likelihoods import (
    check_likelihood,
    observation_distribution,
    output_site,
    row_log_likelihood,
)
from pyro_viking.nn.linearised_model import linearised_model
from pyro_viking.nn.linearization import network_output
from pyro_viking.nn.scales import parse_scale, scale_value
from pyro_viking.nn.target_checks import TargetChecks, likelihood_outputs
from pyro_viking.nn.weight_samples import WeightSampleRunner

__all__ = ["BayesianNetwork"]


def _positive_int(value: Optional[int], what: str) -> Optional[int]:
    """``None``, or ``value`` as an int; ``ValueError`` unless it is positive."""
    if value is not None and int(value) < 1:
        raise ValueError(f"{what} must be a positive integer, got {value}")
    return None if value is None else int(value)


class BayesianNetwork(nn.Module):
    """The Pyro model of a Bayesian neural network built from ``net`` (module docstring).

    :param net: an ``nn.Module`` mapping inputs ``(B, ...)`` to one tensor ``(B, O)`` (or
        ``(B,)``: ``O = 1``, not for classification) with independent, deterministic rows
        (dropout in eval mode; batch norm too, unless ``batch_norm="running"``); its values the
        initial posterior mean (:meth:`init_loc_fn`), not changed (:attr:`network` copies in).
    :param likelihood: ``"classification"`` (``O = C ≥ 2``, labels ``0..C-1`` ``(N,)``),
        ``"binary"`` (``O = 1``, labels 0./1. ``(N,)``) or ``"regression"`` (targets ``(N,)`` for
        ``O = 1``, else ``(N, O)``): the observation models of :mod:`pyro_viking.nn.likelihoods`.
    :param prior_scale: ``s`` of the iid prior ``N(0, s²)`` on every latent, or ``"learned"``:
        one positive ``pyro.param`` :attr:`prior_scale_name` for all, from ``init_prior_scale``.
    :param noise_scale: σ of the regression likelihood, or ``"learned"`` (``pyro.param``
        :attr:`noise_scale_name`, initialised at ``init_noise_scale``).
    :param num_data: N when called with minibatches ``bnn(x_batch, y_batch)``: the likelihood
        is scaled by ``N / len(x_batch)``. ``None`` when called with the whole training set.
    :param batch_size: B: called with the whole training set and labels, the data plate draws
        a random minibatch of B indices (likelihood scaled by N/B). Prediction uses every row.
    :param latent: the latent parameters (``None``: all): a rule or list of rules
        (:data:`~pyro_viking.nn.latent_rules.Rule`: glob or name prefix, module type or
        callable). The others are point estimates (``pyro.param`` under their site names).
    :param fit_hidden: learn the non-latent parameters (those with ``requires_grad``) or not.
    :param name: prefix of the site and parameter names (``"bnn.fc1.weight"``).
    :param weight_samples: how a leading batch of weight samples runs: ``"vmap"``, ``"loop"``
        or ``"auto"`` (:mod:`pyro_viking.nn.weight_samples`); values do not depend on it.
    :param batch_norm: ``"running"``: batch norms run on running statistics, those of the layers
        in training mode updated by each training step at θ̂ (:mod:`pyro_viking.nn.batch_norm`,
        which says when and how); ``None``: batch norm in training mode is refused.

    Sites: latents ``f"{name}.{parameter name}"``, the plate ``"data"`` (dim −1), ``"obs"``,
    and the output ``(..., B, O)`` as deterministic :attr:`output_site` (``"logits"``/``"loc"``).

    Raises ``ValueError`` for an invalid argument, a latent rule selecting nothing, dropout in
    training mode or batch norm on minibatch statistics (built or called), inputs holding NaN
    or inf, outputs or ``y`` not fitting the likelihood (bad rows named), ``y`` without one row
    per datum, a minibatch over ``num_data``; ``TypeError`` for a network not returning one
    tensor. Torch's ``RuntimeError`` for inputs of another dtype, device or shape gets the fix.
    """

    def __init__(self, net: nn.Module, likelihood: str = "classification", *,
                 prior_scale: Union[float, str] = 1.0, init_prior_scale: float = 0.1,
                 noise_scale: Union[float, str] = 0.1, init_noise_scale: float = 0.1,
                 num_data: Optional[int] = None, batch_size: Optional[int] = None,
                 latent: Optional[Union[Rule, Sequence[Rule]]] = None,
                 fit_hidden: bool = True, name: str = "bnn", weight_samples: str = "auto",
                 batch_norm: Optional[str] = None):
        super().__init__()
        check_likelihood(likelihood)
        self.num_data = _positive_int(num_data, "num_data")
        self.batch_size = _positive_int(batch_size, "batch_size")
        self.net = net
        self.likelihood = likelihood
        self.prior_scale = parse_scale(prior_scale, "prior_scale")
        self.init_prior_scale = float(init_prior_scale)
        self.noise_scale = parse_scale(noise_scale, "noise_scale")
        self.init_noise_scale = float(init_noise_scale)
        if min(self.init_prior_scale, self.init_noise_scale) <= 0:
            raise ValueError("init_prior_scale and init_noise_scale must be positive")
        self.fit_hidden, self.name = bool(fit_hidden), name
        self.latent_shapes, self.hidden_names = split_parameters(net, latent)
        self.output_site = output_site(likelihood)
        self._batch_dependent = batch_dependent_modules(net)
        self.batch_norm, self.batch_norm_layers = batch_norm, BatchNormLayers(net, batch_norm)
        check_deterministic(self._batch_dependent, batch_norm)
        self._weight_samples = WeightSampleRunner(net, weight_samples)
        self.weight_samples = weight_samples
        self._inputs, self._targets = InputChecks(), TargetChecks()

    def site_name(self, param_name: str) -> str:
        """Pyro site (latent) or ``pyro.param`` (hidden) name of a network parameter."""
        return f"{self.name}.{param_name}"

    @property
    def latent_sites(self) -> Tuple[str, ...]:
        """Names of the latent sample sites, in network order."""
        return tuple(self.site_name(n) for n in self.latent_shapes)

    @property
    def prior_scale_name(self) -> Optional[str]:
        """Name of the learned prior-scale ``pyro.param`` (``None`` when the scale is fixed)."""
        return f"{self.name}.prior_scale" if self.prior_scale is None else None

    @property
    def noise_scale_name(self) -> Optional[str]:
        """Name of the learned noise-scale ``pyro.param`` (``None`` unless learned regression)."""
        learned = self.likelihood == "regression" and self.noise_scale is None
        return f"{self.name}.noise_scale" if learned else None

    @property
    def param_names(self) -> Tuple[str, ...]:
        """The ``pyro.param`` names this model owns: the learned prior and noise scales and the
        learned hidden parameters (a fit starting afresh deletes them from the store)."""
        hidden = learned_hidden(self.net, self.hidden_names, self.fit_hidden)
        names = (self.prior_scale_name, self.noise_scale_name, *map(self.site_name, hidden))
        return tuple(n for n in names if n is not None)

    @property
    def network(self) -> nn.Module:
        """The wrapped ``nn.Module``, with the current values of the learned non-latent
        parameters copied in (latent ones: their initial values, or :meth:`set_weights`'s)."""
        return copy_learned(self.net, self.hidden_names, self.fit_hidden, self.site_name, self)

    def set_weights(self, values: Dict[str, Tensor]) -> nn.Module:
        """Copy latent values keyed by site name (e.g. ``guide.median()``) into the network's
        parameters; returns :attr:`network` (e.g. a MAP network from an ``AutoDelta``)."""
        copy_latent(self.net, self.latent_shapes, self.site_name, values)
        return self.network

    def init_loc_fn(self, site: dict) -> Tensor:
        """Pyro init strategy: the network's current parameter values for its latent sites
        (PyTorch's initialisation, or a pre-trained network), ``init_to_median`` for other
        sites. Use as ``AutoViking(bnn, init_loc_fn=bnn.init_loc_fn)``."""
        return init_to_network(self.net, self.name, self.latent_shapes, site)

    def forward_network(self, latent: Dict[str, Tensor], x: Tensor,
                        linearise_at: Optional[Dict[str, Tensor]] = None) -> Tensor:
        """The network on inputs ``x`` ``(B, ...)`` with latent values ``latent`` (parameter
        name → ``(*batch, *shape)``), or linearised around ``linearise_at`` (site name → tensor,
        e.g. ``guide.median()``): ``(B, O)`` (``(B,)`` as ``(B, 1)``), one ``functional_call``
        on the tensors as given (Jacobian backends see the layers' weights), or with a leading
        weight batch ``(*batch', B, O)``, ``batch'`` without a trailing 1 (the data dim)."""
        check_deterministic(self._batch_dependent, self.batch_norm)  # modes may have changed
        hidden = hidden_values(self.net, self.hidden_names, self.fit_hidden, self.site_name, self)
        ref = None if linearise_at is None else {
            n: linearise_at[self.site_name(n)].to(x.dtype) for n in self.latent_shapes}

        def call(sample: Dict[str, Tensor], at: Optional[Dict[str, Tensor]] = ref) -> Tensor:
            with self._inputs.explaining(x, self.net):
                out = network_output(self.net, {**hidden, **sample}, x, at,
                                     tie_weights=self._weight_samples.tied)
            return likelihood_outputs(self.likelihood, out)

        with self.batch_norm_layers.evaluating(hidden):  # batch norms: running statistics
            out = self._weight_samples.run(latent, self.latent_shapes, x, call,
                                           probe=lambda sample: call(sample, None))
        self._inputs.remember_rows(x)
        self._targets.remember_outputs(out)
        return out

    def prior_scale_value(self, like: Tensor) -> Tensor:
        """The prior's ``s`` now: the fixed value, or the learned ``pyro.param``."""
        return scale_value(self, "prior", like)

    def noise_scale_value(self, like: Tensor) -> Optional[Tensor]:
        """The regression noise σ now (fixed, or the learned ``pyro.param``), else ``None``."""
        if self.likelihood != "regression":
            return None
        return scale_value(self, "noise", like)

    def data_plate(self, x: Tensor, y: Optional[Tensor]) -> pyro.plate:
        """The data plate of a call ``bnn(x, y)`` (:func:`~pyro_viking.nn.data_plate.data_plate`;
        its ``indices`` select the rows of ``x``), after :meth:`check_targets` of ``y``."""
        self.check_targets(y)
        return data_plate(x, y, self.num_data, self.batch_size)

    def forward(self, x: Tensor, y: Optional[Tensor] = None, *,
                linearise_at: Optional[Dict[str, Tensor]] = None) -> Tensor:
        """Sample the latents, run the network on the plate's inputs ``x[idx]`` (outside the
        plate), observe ``y[idx]``. ``x``: ``(N, ...)`` (all training data, a minibatch with
        ``num_data``, or prediction inputs); ``y``: ``(N, ...)``, ``None`` to predict;
        ``linearise_at``: as in :meth:`forward_network`. Returns ``(..., B, O)``."""
        check_rows_match(x, y)
        self.check_inputs(x)
        like = next(iter(self.net.parameters()))
        prior = dist.Normal(like.new_zeros(()), self.prior_scale_value(like))
        latent = {n: pyro.sample(self.site_name(n), prior.expand(shape).to_event(len(shape)))
                  for n, shape in self.latent_shapes.items()}
        data = self.data_plate(x, y)
        with data as idx:
            pass
        out = self.forward_network(latent, x[idx], linearise_at)  # outside the plate
        self.check_targets(y)  # (the first call: now that the outputs' width is known)
        with data:
            pyro.deterministic(self.output_site, out, event_dim=1)
            pyro.sample("obs", self.observation_distribution(out),
                        obs=None if y is None else y[idx])
        update_after_call(self, latent, x[idx], y)  # batch norms' statistics, in training
        return out

    def check_inputs(self, x: Tensor) -> None:
        """Raise ``ValueError`` naming the rows when the inputs ``x`` ``(N, ...)`` hold NaN or
        inf; an unmodified tensor passed again (the training set at every step) is not rescanned."""
        self._inputs.check_finite(x)

    def check_targets(self, y: Optional[Tensor]) -> None:
        """Raise ``ValueError`` with the fix when the labels ``y`` ``(N, ...)`` do not fit the
        likelihood and the network's outputs (:mod:`~pyro_viking.nn.target_checks`; the first
        bad row named); checked once per tensor, from the network's first call on."""
        self._targets.check(self.likelihood, y)

    def row_log_likelihood(self, out: Tensor, y: Tensor) -> Tensor:
        """``observation_distribution(out).log_prob(y)`` ``(..., B)`` for outputs ``(..., B, O)``
        and labels ``y`` ``(B, ...)``, without building the distribution where it can."""
        return row_log_likelihood(self.likelihood, out, y, self.noise_scale_value(out))

    linearised = linearised_model  # bnn.linearised(guide): the GLM predictive's model
    def observation_distribution(self, out: Tensor) -> dist.TorchDistribution:
        """``p(y_i | f_i)`` for network outputs ``out`` ``(..., B, O)``: batch shape ``(..., B)``,
        one datum per batch element (a learned noise scale is read from Pyro's param store)."""
        return observation_distribution(self.likelihood, out, self.noise_scale_value(out))
