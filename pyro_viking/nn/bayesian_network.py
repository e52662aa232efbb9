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
weights and the layer-Gram Jacobian backend applies. With a leading batch of weight samples
(vectorised particles, ``Predictive(parallel=True)``) the same call is mapped over the batch
with ``torch.vmap`` (K samples in one batched pass) or once per sample (``weight_samples``: on
CPU the loop is faster for large convolution outputs, and for many weights when training, and
is chosen for them by default).

Scales, measured on a 20k-parameter CNN trained from PyTorch's initialisation (scikit-learn
digits, 1000 images): ``AutoViking`` ties ``σ_ker`` to ``s``, and a kernel sample has norm
``≈ s·√D``, so ``s = 0.1`` (norm 14) or the default ``init_image_scale=0.1`` left the network at
chance; ``init_prior_scale=0.01``, ``init_image_scale=1e-3`` and ``beta=1e-4`` reached 0.88 test
accuracy in 100 steps, like MAP. A too tight prior at a large β (``s/√β ≲ 0.3`` here) shrinks
θ̂ to the all-zero network. Warming up with MAP first (the library recipe) avoids both.
"""

from __future__ import annotations

import math
import weakref
from fnmatch import fnmatchcase
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.infer.autoguide.initialization import init_to_median, init_to_value
from torch import Tensor, nn
from torch.distributions import constraints
from torch.func import functional_call, jvp

__all__ = ["BayesianNetwork", "LIKELIHOODS", "LOOP_GRAD_WEIGHTS", "LOOP_OUTPUT_ELEMENTS",
           "WEIGHT_SAMPLES"]

LIKELIHOODS = ("classification", "binary", "regression")
WEIGHT_SAMPLES = ("auto", "vmap", "loop")
#: ``weight_samples="auto"`` on CPU: weight samples run in a loop when one sample's
#: ``nn.Linear`` and convolution outputs together exceed this many elements (measured
#: crossovers between 35k and 105k for MLPs, 41k and 246k for CNNs, see
#: :class:`BayesianNetwork`)
LOOP_OUTPUT_ELEMENTS = 100_000
#: ``weight_samples="auto"`` on CPU: with gradients, weight samples also run in a loop when one
#: sample has more latent weights than this (vmap's backward then copies every sample's weight
#: gradients into place; measured crossover between 82k and 118k, see :class:`BayesianNetwork`)
LOOP_GRAD_WEIGHTS = 100_000

#: A rule selecting latent parameters: a glob pattern or module/parameter name prefix
#: (``"fc3"``, ``"*.weight"``), a module type (``nn.Conv2d``), or ``rule(name, parameter)``.
Rule = Union[str, type, Callable[[str, nn.Parameter], bool]]


def _matches(rule: Rule, name: str, param: nn.Parameter, owner: nn.Module) -> bool:
    if isinstance(rule, str):
        return fnmatchcase(name, rule) or name == rule or name.startswith(rule + ".")
    if isinstance(rule, type):
        return isinstance(owner, rule)
    if callable(rule):
        return bool(rule(name, param))
    raise TypeError(f"latent rules are strings, module types or callables, got {rule!r}")


def _select_latent(net: nn.Module, latent: Optional[Union[Rule, Sequence[Rule]]]) -> List[str]:
    """Names (as in ``net.named_parameters()``) of the parameters that get a prior."""
    named = list(net.named_parameters())
    if latent is None:
        return [n for n, _ in named]
    rules = list(latent) if isinstance(latent, (list, tuple)) else [latent]
    chosen = []
    for rule in rules:
        hits = [n for n, p in named
                if _matches(rule, n, p, net.get_submodule(n.rpartition(".")[0]))]
        if not hits:
            raise ValueError(f"latent rule {rule!r} selects no parameter of the network; its "
                             f"parameters are {[n for n, _ in named]}")
        chosen += [n for n in hits if n not in chosen]
    return [n for n, _ in named if n in chosen]  # network order


def _batch_dependent_modules(net: nn.Module) -> List[Tuple[str, nn.Module]]:
    """Modules whose output can be random or depend on the other rows of the batch."""
    kinds = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm)
    return [(n, m) for n, m in net.named_modules() if isinstance(m, kinds)]


def _check_deterministic(modules: List[Tuple[str, nn.Module]]) -> None:
    """Raise ``ValueError`` if a dropout layer is active or a batch norm uses the statistics of
    its minibatch: ``f(x_i; θ)`` must be a fixed function of ``x_i`` and ``θ``."""
    for name, m in modules:
        kind = type(m).__name__
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.training:
            raise ValueError(
                f"the network's module '{name}' ({kind}) is in training mode: dropout makes "
                "f(x; θ) random, so the likelihood and its Jacobian change from call to call. "
                "Call net.eval() before building the BayesianNetwork (the posterior over the "
                "weights takes dropout's place), or remove the layer.")
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training
                                                               or m.running_mean is None):
            raise ValueError(
                f"the network's module '{name}' ({kind}) normalises with the statistics of "
                "each minibatch, so one datum's likelihood depends on the other data and the "
                "per-datum Jacobian rows VIKING needs do not exist. Call net.eval() to use its "
                "running statistics (e.g. those of a pre-trained network), or use nn.LayerNorm "
                "or nn.GroupNorm.")


def _scale_arg(value, what: str) -> Optional[float]:
    """``None`` for ``"learned"``, else the positive float."""
    if value == "learned":
        return None
    if isinstance(value, str) or not float(value) > 0:
        raise ValueError(f"{what} must be a positive float or 'learned', got {value!r}")
    return float(value)


class BayesianNetwork(nn.Module):
    """The Pyro model of a Bayesian neural network built from ``net``.

    :param net: any ``nn.Module`` mapping inputs ``(B, ...)`` to outputs ``(B, ...)`` with
        independent, deterministic rows: dropout and batch norm only in eval mode (a clear
        error otherwise). Its current parameter values serve as the initial posterior mean
        through :meth:`init_loc_fn`. Modules ``torch.vmap`` cannot batch (``nn.GRU``,
        ``nn.LSTM``) run once per weight sample instead.
    :param likelihood: ``"classification"`` (``Categorical(logits=f)``, outputs ``(B, C)``,
        labels ``(N,)`` long), ``"binary"`` (``Bernoulli(logits=f)``, outputs ``(B, 1)``,
        labels ``(N,)`` float) or ``"regression"`` (``Normal(f, σ²)``; outputs ``(B, 1)`` give
        targets ``(N,)``, outputs ``(B, d)`` targets ``(N, d)``).
    :param prior_scale: ``s`` of the iid prior ``N(0, s²)`` on every latent parameter, or
        ``"learned"``: one ``pyro.param`` named :attr:`prior_scale_name` (positive constraint),
        initialised at ``init_prior_scale``, shared by all latents (so ``AutoViking``'s
        ``kernel_scale="prior"`` ties ``σ_ker`` to it and the closed-form KL sees one scale).
    :param noise_scale: σ of the regression likelihood, or ``"learned"`` (``pyro.param``
        :attr:`noise_scale_name`, initialised at ``init_noise_scale``).
    :param num_data: N when the model is called with *minibatches* (``bnn(x_batch, y_batch)``
        from a data loader): the likelihood is scaled by ``N / len(x_batch)``. Leave ``None``
        when the model is called with the whole training set.
    :param batch_size: B: when called with the whole training set and labels, the data plate
        draws a random minibatch of B indices (``pyro.plate("data", N, subsample_size=B)``;
        Pyro rescales the likelihood by N/B). Prediction (``y=None``) uses every input.
    :param latent: which parameters are latent (``None``: all). A rule or list of rules, each a
        glob pattern or a module/parameter name prefix (``"fc3"`` = the last layer,
        ``"*.weight"``), a module type (``nn.Linear``), or ``rule(name, parameter) -> bool``.
        The other parameters are point estimates (``pyro.param`` under their site names) or,
        with ``fit_hidden=False``, constants.
    :param fit_hidden: learn the non-latent parameters (default) or keep them fixed.
    :param name: prefix of the latent site and parameter names (``"bnn.fc1.weight"``).
    :param weight_samples: how a batch of weight samples (vectorised particles,
        ``Predictive(parallel=True)``) runs: ``"vmap"`` (one ``torch.vmap``ped call; modules
        without a batching rule fall back to the loop), ``"loop"`` (one call per sample), or
        ``"auto"``: the loop on CPU when one sample's ``nn.Linear`` and convolution outputs
        on these inputs exceed :data:`LOOP_OUTPUT_ELEMENTS` elements (counted once per input
        shape), or, when gradients are taken, one sample has more than
        :data:`LOOP_GRAD_WEIGHTS` latent weights; else vmap. vmap batches the samples' matmuls
        and convolutions (grouped ones, slow on CPU) over activations K times one sample's,
        which stop fitting in cache, and its backward transposes each sample's weight gradient
        (a copy of K·D numbers). Measured loop/vmap time, one CPU thread (inputs B, layer
        outputs per sample in brackets). Without gradients, S = 100 samples (``Predictive``):
        MLP 64-64-64-8 2.92 / 1.31 / 0.88 / 0.29 at B 64 / 256 / 512 / 2048 (9k / 35k / 70k /
        279k), 784-64-64-10 2.07 / 1.33 / 1.20 / 0.64 (9k / 35k / 71k / 283k), 200-200-200-10
        1.58 / 0.82 / 0.62 / 0.46 (26k / 105k / 210k / 840k), 784-256-256-10 1.25 / 0.91 /
        0.69 / 0.62 (33k / 134k / 267k / 1.1M), 784-1024-1024-10 0.96 / 0.74 at B 64 / 256
        (132k / 527k). With gradients, K = 4, by latent weights D: 784-256-256-10 (D 269k) 0.89
        / 0.82 / 0.91 / 0.99 at B 16 / 128 / 256 / 512, 784-192-192-10 (190k) 0.64 / 0.87 at
        B 32 / 128, 784-128-128-10 (118k) 0.83 / 0.91, 200-200-200-10 (82k) 1.02 / 1.04 and
        0.99 / 1.01 at B 256 / 1024 (105k / 420k), 784-64-64-10 (55k) 1.06 / 1.04 and 1.02 /
        0.84 at B 512 / 2048 (71k / 283k), 64-64-64-10 (9k) 1.13 / 1.16 at B 16 / 64 and
        0.96 / 0.75 at B 512 / 2048 (70k / 279k). Convolutions (K weight samples, B inputs,
        outputs per sample): 8×8-digits CNN 1.15 (4, 64, 41k) and 0.49 (100, 512, 328k);
        MNIST-1D CNN 1.64 (4, 64, 31k), 2.83 (100, 64, 31k) and 0.28 (100, 512, 246k); LeNet
        on 28×28 0.71 (4, 128, 573k) and 0.52 (100, 512, 2.3M).

    Sites: latents ``f"{name}.{parameter name}"``, the plate ``"data"`` (dim −1), the observed
    site ``"obs"``, and the network output as the deterministic site ``"logits"``
    (classification, binary) or ``"loc"`` (regression), shape ``(..., B, *outputs)``, which
    :class:`~pyro.infer.Predictive` returns alongside ``"obs"``.
    """

    def __init__(self, net: nn.Module, likelihood: str = "classification", *,
                 prior_scale: Union[float, str] = 1.0, init_prior_scale: float = 0.1,
                 noise_scale: Union[float, str] = 0.1, init_noise_scale: float = 0.1,
                 num_data: Optional[int] = None, batch_size: Optional[int] = None,
                 latent: Optional[Union[Rule, Sequence[Rule]]] = None,
                 fit_hidden: bool = True, name: str = "bnn", weight_samples: str = "auto"):
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        for what, v in (("num_data", num_data), ("batch_size", batch_size)):
            if v is not None and int(v) < 1:
                raise ValueError(f"{what} must be a positive integer, got {v}")
        self.net = net
        self.likelihood = likelihood
        self.prior_scale = _scale_arg(prior_scale, "prior_scale")
        self.init_prior_scale = float(init_prior_scale)
        self.noise_scale = _scale_arg(noise_scale, "noise_scale")
        self.init_noise_scale = float(init_noise_scale)
        if min(self.init_prior_scale, self.init_noise_scale) <= 0:
            raise ValueError("init_prior_scale and init_noise_scale must be positive")
        self.num_data = None if num_data is None else int(num_data)
        self.batch_size = None if batch_size is None else int(batch_size)
        self.fit_hidden = bool(fit_hidden)
        self.name = name
        latent_names = _select_latent(net, latent)
        params = dict(net.named_parameters())
        self.latent_shapes: Dict[str, torch.Size] = {n: params[n].shape for n in latent_names}
        self.hidden_names: Tuple[str, ...] = tuple(n for n in params if n not in latent_names)
        self.output_site = "loc" if likelihood == "regression" else "logits"
        self._batch_dependent = _batch_dependent_modules(net)
        _check_deterministic(self._batch_dependent)
        if weight_samples not in WEIGHT_SAMPLES:
            raise ValueError(f"weight_samples must be one of {WEIGHT_SAMPLES}, got "
                             f"{weight_samples!r}")
        self.weight_samples = weight_samples
        # vmap until it fails on the network (e.g. nn.GRU has no batching rule)
        self._vmappable = weight_samples != "loop"
        self._layers = [m for m in net.modules()
                        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
        self._vmap_for_shape: Dict[Tuple[int, ...], bool] = {}  # "auto": choice per input shape
        self._finite_inputs: Optional[tuple] = None  # (weakref, version) of the last finite x
        self._row_shape: Optional[Tuple[int, ...]] = None  # x.shape[1:] of the first good call

    # -- names ----------------------------------------------------------------------------------
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

    # -- the network ----------------------------------------------------------------------------
    @property
    def network(self) -> nn.Module:
        """The wrapped ``nn.Module``, with the current values of the learned non-latent
        parameters (latent ones hold their initial values or those of :meth:`set_weights`)."""
        store = pyro.get_param_store()
        with torch.no_grad():
            for n in self.hidden_names if self.fit_hidden else ():
                p = self.net.get_parameter(n)
                site = self.site_name(n)
                if site in store and store[site] is not p:
                    p.copy_(store[site])
        return self.net

    @torch.no_grad()
    def set_weights(self, values: Dict[str, Tensor]) -> nn.Module:
        """Copy latent values keyed by site name (e.g. ``guide.median()``) into the network's
        parameters; returns :attr:`network` (e.g. a MAP network from an ``AutoDelta``)."""
        for n in self.latent_shapes:
            if self.site_name(n) in values:
                self.net.get_parameter(n).copy_(values[self.site_name(n)])
        return self.network

    def init_loc_fn(self, site: dict) -> Tensor:
        """Pyro init strategy: the network's current parameter values for its latent sites
        (PyTorch's initialisation, or a pre-trained network), ``init_to_median`` for other
        sites. Use as ``AutoViking(bnn, init_loc_fn=bnn.init_loc_fn)``."""
        n = site["name"][len(self.name) + 1:] if site["name"].startswith(self.name + ".") else ""
        if n in self.latent_shapes:
            value = self.net.get_parameter(n).detach().clone()
            return init_to_value(site, values={site["name"]: value}, fallback=init_to_median)
        return init_to_median(site)

    def _hidden_values(self) -> Dict[str, Tensor]:
        out = {}
        for n in self.hidden_names:
            p = self.net.get_parameter(n)
            out[n] = pyro.param(self.site_name(n), p) if self.fit_hidden else p.detach()
        return out

    def _call(self, latent: Dict[str, Tensor], hidden: Dict[str, Tensor], x: Tensor,
              ref: Optional[Dict[str, Tensor]]) -> Tensor:
        """``f(x; θ)`` for one weight sample, or ``f(x; θ_ref) + J_f(x; θ_ref)(θ − θ_ref)``."""
        try:
            if ref is None:
                return functional_call(self.net, {**hidden, **latent}, (x,))
            step = {n: latent[n] - ref[n] for n in latent}
            f_ref, f_step = jvp(lambda p: functional_call(self.net, {**hidden, **p}, (x,)),
                                (ref,), (step,))
            return f_ref + f_step
        except RuntimeError as e:
            hint = self._input_mismatch(x, str(e))
            if hint is None:
                raise
            raise RuntimeError(f"{e}\n{hint}") from e

    def _input_mismatch(self, x: Tensor, error: str = "") -> Optional[str]:
        """What to do when the inputs' dtype or device differs from the network's (e.g. a
        float64 tensor made from a NumPy array), or, for torch's shape errors (``error``), when
        their rows' shape differs from that of the network's first call, or ``None``."""
        p = next(iter(self.net.parameters()), None)
        if p is None or not torch.is_tensor(x):
            return None
        if x.is_floating_point() and x.dtype != p.dtype:
            return (f"BayesianNetwork: x is {x.dtype} but the network's parameters are "
                    f"{p.dtype}; pass x.to({p.dtype}) (NumPy arrays become float64 tensors), "
                    f"or convert the network before wrapping it (net.to({x.dtype})).")
        if x.device != p.device:
            return (f"BayesianNetwork: x is on {x.device} but the network is on {p.device}; "
                    f"pass x.to('{p.device}').")
        rows = tuple(x.shape[1:])
        shape_error = "shape" in error or "size" in error
        if shape_error and self._row_shape is not None and rows != self._row_shape:
            want = ", ".join(str(n) for n in self._row_shape)
            fix = (f", e.g. x.reshape(len(x), {want})"
                   if math.prod(rows) == math.prod(self._row_shape) else "")
            return (f"BayesianNetwork: x has rows of shape {rows} (x is {tuple(x.shape)}) but "
                    f"the network ran on rows of shape {self._row_shape} before; pass inputs "
                    f"of shape (N, {want}){fix}.")
        return None

    def forward_network(self, latent: Dict[str, Tensor], x: Tensor,
                        linearise_at: Optional[Dict[str, Tensor]] = None) -> Tensor:
        """The network on inputs ``x`` ``(B, ...)`` with latent values ``latent`` (parameter
        name → tensor ``(*batch, *shape)``), or its linearisation around ``linearise_at``
        (site name → tensor, e.g. ``guide.median()``).

        Unbatched weights: one ``functional_call`` on the tensors as given (views stay views,
        so Jacobian backends see the layers' weights). A leading weight batch ``batch``
        (``(K, 1)`` for vectorised particles over the data plate at dim −1, ``(S,)`` under
        ``Predictive(parallel=True)``): ``torch.vmap`` over the flattened batch; the output is
        ``(*batch', B, ...)`` with ``batch'`` the batch without a trailing 1 (the data dim).
        """
        _check_deterministic(self._batch_dependent)  # the mode may have changed since
        hidden = self._hidden_values()
        ref = None if linearise_at is None else {
            n: linearise_at[self.site_name(n)].to(x.dtype) for n in self.latent_shapes}
        batch = torch.broadcast_shapes(*(v.shape[:v.dim() - len(self.latent_shapes[n])]
                                         for n, v in latent.items()))
        if not batch:
            out = self._call(latent, hidden, x, ref)
        else:
            flat = {n: v.expand(batch + self.latent_shapes[n])
                    .reshape((-1,) + self.latent_shapes[n]) for n, v in latent.items()}
            out = self._map_samples(flat, hidden, x, ref)
            out_batch = batch[:-1] if batch[-1] == 1 else batch
            out = out.reshape(out_batch + out.shape[1:])
        if self._row_shape is None:
            self._row_shape = tuple(x.shape[1:])
        return out

    def _map_samples(self, flat: Dict[str, Tensor], hidden: Dict[str, Tensor], x: Tensor,
                     ref: Optional[Dict[str, Tensor]]) -> Tensor:
        """The network for each of the ``S`` weight samples ``flat`` (``(S, *shape)``):
        ``torch.vmap``, or a loop over the samples (``weight_samples``)."""
        if self._vmappable and self._auto_vmap(flat, hidden, x):
            try:
                return torch.vmap(lambda p: self._call(p, hidden, x, ref),
                                  randomness="different")(flat)
            except (RuntimeError, NotImplementedError) as e:
                if "atching rule" not in str(e) and "vmap" not in str(e):
                    raise
                self._vmappable = False  # e.g. nn.GRU/LSTM: no batching rule; loop from now on
        # unbind, not v[i]: one stack in the backward where each index would allocate and
        # zero a full (S, ...) gradient per sample and parameter
        per_sample = zip(*(v.unbind(0) for v in flat.values()))
        return torch.stack([self._call(dict(zip(flat, values)), hidden, x, ref)
                            for values in per_sample])

    def _auto_vmap(self, flat: Dict[str, Tensor], hidden: Dict[str, Tensor], x: Tensor) -> bool:
        """``weight_samples="auto"``: vmap unless, on CPU, gradients flow to more than
        :data:`LOOP_GRAD_WEIGHTS` weights per sample, or one sample's ``nn.Linear`` and
        convolution outputs on inputs of this shape exceed :data:`LOOP_OUTPUT_ELEMENTS` (one
        probe call per shape)."""
        if self.weight_samples != "auto" or x.device.type != "cpu":
            return True
        if torch.is_grad_enabled() and any(v.requires_grad for v in flat.values()) \
                and sum(v[0].numel() for v in flat.values()) > LOOP_GRAD_WEIGHTS:
            return False
        if not self._layers:
            return True
        key = tuple(x.shape)
        if key not in self._vmap_for_shape:
            count = [0]

            def add(module, inputs, output):
                count[0] += output.numel()

            hooks = [m.register_forward_hook(add) for m in self._layers]
            try:
                with torch.no_grad():
                    self._call({n: v[0] for n, v in flat.items()}, hidden, x, None)
            finally:
                for h in hooks:
                    h.remove()
            self._vmap_for_shape[key] = count[0] <= LOOP_OUTPUT_ELEMENTS
        return self._vmap_for_shape[key]

    def __getstate__(self):
        # The param store tags the hidden parameters with a weakref to themselves (Pyro's
        # identity-constrained params); drop it, as PyroModule.__getstate__ does.
        for p in self.net.parameters():
            p.__dict__.pop("unconstrained", None)
        return {**super().__getstate__(), "_finite_inputs": None}  # (a weakref: not picklable)

    # -- the model ------------------------------------------------------------------------------
    def _scale(self, value: Optional[float], name: Optional[str], init: float,
               like: Tensor) -> Tensor:
        if value is not None:
            return torch.tensor(value, dtype=like.dtype, device=like.device)
        init_t = torch.tensor(init, dtype=like.dtype, device=like.device)
        return pyro.param(name, init_t, constraint=constraints.positive)

    def prior_scale_value(self, like: Tensor) -> Tensor:
        """The prior's ``s`` now: the fixed value, or the learned ``pyro.param``."""
        return self._scale(self.prior_scale, self.prior_scale_name, self.init_prior_scale, like)

    def data_plate(self, x: Tensor, y: Optional[Tensor]) -> pyro.plate:
        """The data plate of a call ``bnn(x, y)`` (a new random minibatch when it subsamples;
        its ``indices`` select the rows of ``x``)."""
        n = x.shape[0]
        if y is not None and self.num_data is not None and self.num_data != n:
            return pyro.plate("data", self.num_data, subsample=torch.arange(n, device=x.device),
                              dim=-1)
        size = self.batch_size if y is not None and self.batch_size is not None \
            and self.batch_size < n else None
        return pyro.plate("data", n, subsample_size=size, dim=-1, device=x.device)

    def forward(self, x: Tensor, y: Optional[Tensor] = None, *,
                linearise_at: Optional[Dict[str, Tensor]] = None) -> Tensor:
        """Sample the latents, evaluate the network on the plate's inputs, observe ``y``.

        :param x: inputs ``(N, ...)`` (all training data, a minibatch with ``num_data``, or
            prediction inputs).
        :param y: labels/targets ``(N, ...)``, or ``None`` to predict.
        :param linearise_at: evaluate the linearised network around these latent values
            (site name → tensor, e.g. ``guide.median()`` of a MAP fit).
        :returns: the network output at the plate's inputs, ``(..., B, *outputs)``.
        """
        if y is not None and y.shape[:1] != x.shape[:1]:
            raise ValueError(f"x and y must have one row per datum: x has {x.shape[0]} rows, "
                             f"y has {y.shape[0] if y.dim() else 'none (a scalar)'}")
        self.check_inputs(x)
        like = next(iter(self.net.parameters()))
        s = self.prior_scale_value(like)
        zero = torch.zeros((), dtype=like.dtype, device=like.device)
        latent = {n: pyro.sample(self.site_name(n),
                                 dist.Normal(zero, s).expand(shape).to_event(len(shape)))
                  for n, shape in self.latent_shapes.items()}
        data = self.data_plate(x, y)
        with data as idx:
            pass
        out = self.forward_network(latent, x[idx], linearise_at)  # outside the plate
        obs = None if y is None else y[idx]
        if y is not None:
            self._check_targets(out, y)
        with data:
            self._observe(out, obs)
        return out

    def check_inputs(self, x: Tensor) -> None:
        """Raise ``ValueError`` naming the rows when the inputs ``x`` ``(N, ...)`` hold NaN or
        inf (the network would give NaN outputs, Jacobians and gradients). One pass over ``x``
        per tensor: the same, unmodified training tensor passed at every step is checked once."""
        if not torch.is_tensor(x) or not x.is_floating_point():
            return
        last = self._finite_inputs
        if last is not None and last[0]() is x and last[1] == x._version:
            return
        rows = x.flatten(1) if x.dim() > 1 else x.reshape(-1, 1)  # (N, features), N may be 0
        finite = torch.isfinite(rows)
        if not bool(finite.all()):
            bad = (~finite.all(-1)).nonzero().flatten()
            shown = ", ".join(str(int(i)) for i in bad[:5]) + (", ..." if len(bad) > 5 else "")
            raise ValueError(f"x holds NaN or inf in {len(bad)} of its {len(finite)} rows "
                             f"(rows {shown}): drop or impute them before training or "
                             "predicting")
        self._finite_inputs = (weakref.ref(x), x._version)

    def _check_targets(self, out: Tensor, y: Tensor) -> None:
        """Raise ``ValueError`` if the labels/targets ``y`` ``(N, ...)`` do not fit the
        likelihood and the outputs ``out`` ``(..., B, O)``."""
        lik, n_out = self.likelihood, out.shape[-1]
        if lik == "regression" and n_out > 1:
            want, what = (n_out,), f"targets (N, {n_out}) for outputs (B, {n_out})"
        else:
            want = ()
            what = {"classification": "class indices of shape (N,)",
                    "binary": "0./1. labels of shape (N,)",
                    "regression": "targets of shape (N,) for outputs (B, 1)"}[lik]
        shape = tuple(y.shape[1:])
        if shape != want:
            fix = " (y.squeeze(-1))" if shape == (1,) and want == () else ""
            raise ValueError(f"likelihood={lik!r} takes {what}; got y of shape "
                             f"{tuple(y.shape)}{fix}")
        if lik == "binary" and not y.is_floating_point():
            raise ValueError(f"likelihood='binary' takes float labels (0. or 1.); got {y.dtype}"
                             ": pass y.float() (or y.to(x.dtype))")

    def _observe(self, out: Tensor, obs: Optional[Tensor]) -> None:
        """The likelihood of the plate's data given the outputs ``(..., B, O)``."""
        pyro.deterministic(self.output_site, out, event_dim=1)
        pyro.sample("obs", self.observation_distribution(out), obs=obs)

    def row_log_likelihood(self, out: Tensor, y: Tensor) -> Tensor:
        """``log p(y_i | f_i)`` ``(..., B)`` for outputs ``out`` ``(..., B, O)`` and the plate's
        labels/targets ``y`` ``(B, ...)``: ``observation_distribution(out).log_prob(y)``
        without building a distribution (the fused training step evaluates it twice per
        step; for classification and binary labels one fused cross-entropy kernel)."""
        if self.likelihood == "classification":
            flat = out.reshape(-1, out.shape[-1])
            labels = y.long().expand(out.shape[:-1]).reshape(-1)
            return -F.cross_entropy(flat, labels, reduction="none").reshape(out.shape[:-1])
        if self.likelihood == "binary" and out.shape[-1] == 1:
            logits = out.squeeze(-1)
            return -F.binary_cross_entropy_with_logits(logits, y.expand(logits.shape),
                                                       reduction="none")
        return self.observation_distribution(out).log_prob(y)

    def observation_distribution(self, out: Tensor) -> dist.TorchDistribution:
        """``p(y_i | f_i)`` for network outputs ``out`` ``(..., B, O)``: batch shape
        ``(..., B)``, one datum per batch element (reads a learned noise scale from Pyro's
        param store)."""
        if self.likelihood == "classification":
            return dist.Categorical(logits=out)
        if self.likelihood == "binary":
            if out.shape[-1] != 1:
                raise ValueError(f"likelihood='binary' needs outputs (B, 1), got "
                                 f"{tuple(out.shape)}")
            return dist.Bernoulli(logits=out.squeeze(-1))
        sigma = self._scale(self.noise_scale, self.noise_scale_name, self.init_noise_scale, out)
        if out.shape[-1] == 1:
            return dist.Normal(out.squeeze(-1), sigma)
        return dist.Normal(out, sigma).to_event(1)
