r"""VIKING's two scales at a MAP estimate, from curvature: no step count, no learning rate.

Notation (``shared/design.md``): ``θ ∈ R^D`` the flat unconstrained latents, ``θ̂`` the MAP,
``q = N(θ̂, σ_ker² P + σ_im² (I − P))`` with ``P`` the projector onto the kernel of the
minibatch's loss Jacobian ``J ∈ R^{B×D}`` (rows ``g_i = ∇_θ log p(y_i | θ̂)``), ``R = tr P``,
``r = D − R = rank J`` (the image dimension), prior ``N(μ, α⁻¹ I)``.

**The objective.** One SVI step with :class:`~pyro_viking.TraceViking_ELBO` minimises

    L = E_q[ −Σ_{i∈batch} w_i log p(y_i | θ) ] + β · KL(q ‖ p),

where ``w_i`` is the scale Pyro attaches to the observed site (``N/B`` for a subsampled plate,
times any ``poutine.scale``), so ``β = 1`` is the full-data ELBO. Expanding the likelihood to
second order around ``θ̂`` with its Gauss–Newton (GGN) matrix ``H = Σ_i w_i H_i`` (the linearised
model; the first-order term has mean zero under q):

    E_q[−Σ w_i log p_i] ≈ −Σ w_i log p_i(θ̂) + ½ tr(H Σ) = const + ½ σ_ker² K + ½ σ_im² A,
    A = tr(H (I − P))   (curvature seen by the image),   K = tr(H P)   (by the kernel).

(With the loss Jacobian and more than one output per datum, ``P`` is not the kernel of ``H``:
``K > 0``. With the exact posterior family of a linear-Gaussian model, ``K = 0``.) The KL of the
family against ``N(μ, α⁻¹ I)`` (``v = σ_ker²``, ``s = σ_im²``, ``m = ‖θ̂ − μ‖²``) is

    KL = ½ [ α (r s + R v + m) − D − D log α − R log v − r log s ],

so the objective in the scales is

    F(s, v, α) = ½ A s + ½ K v + (β/2) [ α (r s + R v + m) − D log α − R log v − r log s ].

**Stationary points.** ``∂F/∂s = 0``, ``∂F/∂v = 0``, ``∂F/∂α = 0`` give

    s = β r / (A + β r α),     v = β R / (K + β R α),     α = D / (r s + R v + m).

* *Fixed prior* (``α`` known): the first two are the answer.
* *Tied kernel scale* (``v = 1/α``, the paper's choice): ``F = ½ A s + ½ K/α
  + (β/2)[r(αs − 1 − log αs) + αm] + const``; ``∂F/∂s = 0`` gives ``s(α)`` above, and, writing
  ``u = 1/α = σ_ker²``, ``∂F/∂α = 0`` becomes
  ``m − r A u² / (A u + β r) = K u² / β``, i.e. the cubic

      (K A / β) u³ + r (K + A) u² − m A u − β m r = 0,

  whose coefficients change sign once, so it has exactly one positive root (Descartes). With
  ``K = 0`` it is ``u = m/(2r) + √(m²/(4r²) + β m / A)``.
* *Learned prior and free kernel scale*: alternate the three closed-form updates (each is the
  exact minimiser in its coordinate, so ``F`` decreases monotonically) until they agree.

**Minibatches.** A training step sees one batch: ``A``, ``K`` and ``r`` are those of the batch
(with the plate's ``N/B`` in ``w_i``), and ``F`` is linear in them, so the expected objective over
batches is ``F`` at their averages: :func:`curvature_statistics` averages them over several
batches of the training plate (or of an iterable of batches).

**Traces from per-example gradients (Monte Carlo Fisher).** ``H`` is replaced by the Fisher
``E_ỹ[Σ_i w_i g̃_i g̃_iᵀ]``, ``g̃_i = ∇_θ log p(ỹ_i | θ̂)`` with labels ``ỹ_i`` drawn from the
model's own predictive at ``θ̂``. For likelihoods in their natural parameter (Categorical or
Bernoulli logits, Normal mean with fixed noise, Poisson log-rate) the Fisher *equals* the GGN,
so the estimate is exact in expectation; it needs only per-example gradients (the same rows the
guide's projector uses), works for any Pyro likelihood that can ``sample``, and needs no output
Jacobian or likelihood Hessian. With ``G = J Jᵀ`` and ``C = J J̃ᵀ``:

    tr(H (I − P)) ≈ (1/S) Σ_s Σ_i w_i c_{s,i}ᵀ G⁺ c_{s,i},   tr(H) ≈ (1/S) Σ_s Σ_i w_i ‖g̃_{s,i}‖²,

(``(I − P) g = Jᵀ G⁺ J g``), ``K = tr H − A``; ``G⁺`` is the eigen-thresholded pseudo-inverse
(float64) and ``r`` its numerical rank. Cost per batch: ``1 + S`` per-example Jacobians, built
as the guide's projector builds them (the layer Gram where it applies: one forward and backward
each, with ``G`` and ``C`` from the layers' pieces; else dense ``(B, D)``); the relative Monte
Carlo error of ``A`` is about ``√(2 / (S · B · batches))``.

**Beyond the linearisation, along the kernel.** ``σ_im`` is small, so the image term is well
described by the quadratic model; ``σ_ker`` is not: with the loss Jacobian the kernel is flat
only to first order, ``tr(HP)`` is 0 for one output per datum, and the linearised optimum of a
learned, tied prior scale is then the KL's own, ``σ_ker² ≈ ‖θ̂‖²/r`` — far outside the region
where the network is linear. So the kernel term ``½ K v`` is replaced by its measured value

    c(v) = E_{k ~ N(0, P)} [ −Σ w_i log p(y_i | θ̂ + √v k) ] + Σ w_i log p(y_i | θ̂),

on a log-spaced grid of ``v`` (the same kernel draws for every ``v``, so ``c`` is smooth in
``v``), interpolated linearly in ``log v``; for ``v`` below the grid, ``½ K v``. The scales
then minimise ``F`` with ``c(v)`` in place of ``½ K v`` (a 1-D search in ``v``; ``s`` and ``α``
stay in closed form). On a linear-Gaussian model ``c ≡ 0`` and the result is the closed form.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Optional, Tuple

import pyro.poutine as poutine
import torch
from pyro.poutine.util import site_is_subsample
from torch import Tensor

from pyro_viking.linalg.cross_gram import batch_jacobian, cross_gram
from pyro_viking.linalg.operators import JacobianOperator
from pyro_viking.linalg.solvers import default_rcond, eigh_factor
from pyro_viking.model_trace.inspection import batch_call
from pyro_viking.model_trace.layout import LatentLayout
from pyro_viking.model_trace.rows import make_rows_fn, observed_sites, trace_model

__all__ = ["CurvatureStatistics", "curvature_statistics", "optimal_scales", "scale_objective"]


@dataclass(frozen=True)
class CurvatureStatistics:
    """Batch-averaged quantities of the linearised ELBO at ``θ̂`` (see the module docstring).

    ``image_trace`` A = tr(H(I − P)); ``kernel_trace`` K = tr(HP); ``image_dim`` r = rank J;
    ``latent_dim`` D; ``sq_distance`` m = ‖θ̂ − μ‖² (prior mean μ); ``num_batches``;
    optionally the measured kernel cost ``c(v)`` (``kernel_curve``) at the kernel variances
    ``kernel_grid`` (``None``: the quadratic ``½ K v``).
    """

    image_trace: float
    kernel_trace: float
    image_dim: float
    latent_dim: int
    sq_distance: float
    num_batches: int = 1
    kernel_grid: Optional[Tuple[float, ...]] = None
    kernel_curve: Optional[Tuple[float, ...]] = None

    def kernel_cost(self, v: float) -> float:
        """``c(v)``: the expected likelihood cost of kernel noise of variance ``v``."""
        grid, curve = self.kernel_grid, self.kernel_curve
        if grid is None or v <= grid[0]:
            return 0.5 * max(self.kernel_trace, 0.0) * v
        if v >= grid[-1]:
            return curve[-1] * v / grid[-1]
        lv = math.log(v)
        j = next(i for i in range(1, len(grid)) if grid[i] >= v)
        l0, l1 = math.log(grid[j - 1]), math.log(grid[j])
        t = (lv - l0) / (l1 - l0)
        return (1 - t) * curve[j - 1] + t * curve[j]


def scale_objective(stats: CurvatureStatistics, beta: float, image_scale: float,
                    kernel_scale: float, prior_precision: float) -> float:
    """``F(σ_im², σ_ker², α)`` of the module docstring (up to a constant), in float64."""
    A, K, r = stats.image_trace, stats.kernel_trace, stats.image_dim
    D, m = stats.latent_dim, stats.sq_distance
    R = D - r
    s, v, a = image_scale ** 2, kernel_scale ** 2, prior_precision
    kl = a * (r * s + R * v + m) - D * math.log(a) - R * math.log(v) - r * math.log(s)
    del K  # the kernel term is stats.kernel_cost (½ K v without a measured curve)
    return 0.5 * A * s + stats.kernel_cost(v) + 0.5 * beta * kl


def _tied_kernel_variance(A: float, K: float, r: float, m: float, beta: float) -> float:
    """The positive root ``u = σ_ker² = 1/α`` of ``(KA/β)u³ + r(K+A)u² − mAu − βmr = 0``."""
    if m <= 0:
        raise ValueError("a learned prior precision needs ‖θ̂ − μ‖² > 0")
    if K <= 0:  # the quadratic case, in closed form
        return m / (2 * r) + math.sqrt((m / (2 * r)) ** 2 + beta * m / A)

    def g(u: float) -> float:
        return ((K * A / beta) * u + r * (K + A)) * u * u - m * A * u - beta * m * r

    lo, hi = 0.0, 1.0
    while g(hi) < 0:  # g(0) < 0 and g → ∞: bracket the single positive root
        hi *= 2.0
    for _ in range(200):  # bisection, then a few Newton polishes are not needed at 1e-15
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if g(mid) < 0 else (lo, mid)
        if hi - lo <= 1e-15 * hi:
            break
    return 0.5 * (lo + hi)


def optimal_scales(
    stats: CurvatureStatistics,
    beta: float = 1.0,
    *,
    prior_scale: Optional[float] = None,
    kernel: str = "prior",
    max_iter: int = 1000,
) -> Dict[str, float]:
    """Minimise the linearised ELBO ``F`` in the scales (module docstring).

    :param stats: from :func:`curvature_statistics` (or built by hand).
    :param beta: the KL weight of :class:`~pyro_viking.TraceViking_ELBO`.
    :param prior_scale: the prior's standard deviation ``1/√α`` if it is fixed; ``None`` to
        optimise it too (a learned prior scale).
    :param kernel: ``"prior"`` ties ``σ_ker`` to the prior scale; ``"learned"`` optimises it.
    :returns: ``{"image_scale": σ_im, "kernel_scale": σ_ker, "prior_scale": 1/√α}``.
    """
    if kernel not in ("prior", "learned"):
        raise ValueError(f"kernel must be 'prior' or 'learned', got {kernel!r}")
    if not beta > 0:
        raise ValueError(f"beta must be positive, got {beta}")
    A, K, r = float(stats.image_trace), max(float(stats.kernel_trace), 0.0), stats.image_dim
    D, m = stats.latent_dim, float(stats.sq_distance)
    R = D - r
    if A <= 0 or r <= 0:
        raise ValueError(f"no curvature in the image (tr = {A}, rank = {r}): is θ̂ a fit?")

    def image_var(alpha: float) -> float:
        return beta * r / (A + beta * r * alpha)

    def kernel_var(alpha: float) -> float:
        return beta * R / (K + beta * R * alpha) if R > 0 else 1.0 / alpha

    curve = stats.kernel_grid is not None
    if curve:  # c(v) measured: the kernel variance by a 1-D search (module docstring)
        lo, hi = stats.kernel_grid[0] * 1e-3, stats.kernel_grid[-1] * 10

        def kernel_var(alpha: float) -> float:  # noqa: F811 - replaces the closed form
            return _argmin_log(lambda v: stats.kernel_cost(v) + 0.5 * beta * R * (
                alpha * v - math.log(v)), lo, hi)

    if prior_scale is not None:
        alpha = float(prior_scale) ** -2
        v = 1.0 / alpha if kernel == "prior" else kernel_var(alpha)
        s = image_var(alpha)
    elif kernel == "prior" and not curve:
        v = _tied_kernel_variance(A, K, r, m, beta)
        alpha = 1.0 / v
        s = image_var(alpha)
    elif kernel == "prior":
        v = _argmin_log(lambda u: scale_objective(stats, beta, math.sqrt(image_var(1 / u)),
                                                  math.sqrt(u), 1 / u), lo, hi)
        alpha = 1.0 / v
        s = image_var(alpha)
    else:
        alpha = D / max(m, 1e-300)
        for _ in range(max_iter):
            s, v = image_var(alpha), kernel_var(alpha)
            new = D / (r * s + R * v + m)
            done = abs(new - alpha) <= 1e-10 * alpha
            alpha = new
            if done:
                break
        s, v = image_var(alpha), kernel_var(alpha)
    return {"image_scale": math.sqrt(s), "kernel_scale": math.sqrt(v),
            "prior_scale": 1.0 / math.sqrt(alpha)}


def _argmin_log(fn: Callable[[float], float], lo: float, hi: float, num: int = 241) -> float:
    """Minimiser of ``fn`` on ``[lo, hi]``: a log-spaced grid, then golden section around the
    best grid point."""
    ll, lh = math.log(lo), math.log(hi)
    xs = [ll + (lh - ll) * i / (num - 1) for i in range(num)]
    vals = [fn(math.exp(x)) for x in xs]
    i = min(range(num), key=vals.__getitem__)
    a, b = xs[max(i - 1, 0)], xs[min(i + 1, num - 1)]
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = fn(math.exp(c)), fn(math.exp(d))
    for _ in range(80):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = fn(math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = fn(math.exp(d))
    return math.exp(0.5 * (a + b))


# -- per-example gradients ----------------------------------------------------------------------
def _row_weights(sites, like: Tensor) -> Tensor:
    """Per-row scale ``w_i`` (the site's ``scale``: ``N/B`` of its plates, ``poutine.scale``)."""
    parts = []
    for site in sites:
        n = math.prod(f.size for f in site["cond_indep_stack"] if f.vectorized)
        scale = site["scale"]
        if torch.is_tensor(scale) and scale.numel() > 1:
            raise ValueError(f"site '{site['name']}' has a non-scalar scale; not supported")
        parts.append(torch.full((n,), float(scale), dtype=torch.float64, device=like.device))
    return torch.cat(parts)


def _batch_traces(model, layout, z, args, kwargs, num_label_samples, rcond, grid,
                  num_kernel_samples):
    """``(A, T = tr H, r, c(grid))`` of one batch (float64 Python floats; ``c`` may be None)."""
    trace = trace_model(model, args, kwargs, layout.unpack(z))
    subsample = {name: site["value"] for name, site in trace.nodes.items()
                 if site["type"] == "sample" and site_is_subsample(site)}
    sites = observed_sites(trace, layout.names)
    if not sites:
        raise ValueError("the model has no observed site: no likelihood, no curvature")
    w = _row_weights(sites, z)
    rows = make_rows_fn(model, layout, args, kwargs, subsample=subsample)
    jac = batch_jacobian(rows, z)  # as the guide's projector builds J
    if jac.shape[0] != w.shape[0]:
        raise ValueError(f"{jac.shape[0]} likelihood rows but {w.shape[0]} row weights")
    if rcond is None:  # the guide's projector threshold, so r is the rank its KL uses
        rcond = default_rcond(jac.shape[0], z.dtype)
    evals, evecs, keep = eigh_factor(jac.gram(), rcond)
    basis = evecs[:, keep] / evals[keep].sqrt()  # G⁺ = basis basisᵀ on the numerical range
    image, total = 0.0, 0.0
    for _ in range(num_label_samples):
        labels = {site["name"]: site["fn"].sample() for site in sites}
        fn = make_rows_fn(poutine.condition(model, data=labels), layout, args, kwargs,
                          subsample=subsample)
        jt = batch_jacobian(fn, z)
        coef = basis.T @ cross_gram(jac, jt)  # (rank, B): coordinates of (I − P) g̃_i
        image += float((w * coef.pow(2).sum(0)).sum())
        total += float((w * jt.gram().diagonal()).sum())  # Σ_i w_i ‖g̃_i‖²
    curve = None
    if grid is not None:
        curve = _kernel_curve(rows, z, jac, basis, w, grid, num_kernel_samples)
    return image / num_label_samples, total / num_label_samples, int(keep.sum()), curve


def _kernel_curve(rows: Callable[[Tensor], Tensor], z: Tensor, jac: JacobianOperator,
                  basis: Tensor, w: Tensor, grid, num_samples: int) -> list:
    """``c(v)`` at the kernel variances ``grid`` (module docstring): the weighted likelihood
    cost of ``z + √v k`` over ``num_samples`` kernel draws ``k = P ε``, the same for every
    ``v``; ``jac`` the batch's Jacobian operator and ``basis`` (``G⁺ = basis basisᵀ``, float64)."""
    eps = torch.randn(num_samples, z.shape[0], dtype=torch.float64, device=z.device)
    eps = eps.to(jac.dtype)
    coef = (jac.mv(eps).double() @ basis) @ basis.T  # (S, B): J⁺ᵀ-coordinates of (I − P) ε
    kernel = (eps - jac.rmv(coef.to(jac.dtype))).to(z.dtype)  # rows of P ε
    roots = torch.tensor(grid, dtype=z.dtype, device=z.device).sqrt()
    Z = (z + roots[:, None, None] * kernel).reshape(-1, z.shape[0])  # (grid · samples, D)
    with torch.no_grad():
        base = float((w * rows(z).double()).sum())
        try:
            L = torch.func.vmap(rows)(Z)
        except Exception:  # noqa: BLE001 - model code that does not vectorise
            L = torch.stack([rows(zz) for zz in Z])
        cost = base - (L.double() @ w).reshape(len(grid), -1).mean(1)
    return [float(c) if math.isfinite(c) else 1e300 for c in cost.tolist()]


def curvature_statistics(
    model: Callable,
    loc: Dict[str, Tensor],
    *args,
    batches: Optional[Iterable] = None,
    num_batches: int = 8,
    num_label_samples: int = 4,
    kernel_curve: bool = True,
    num_kernel_samples: int = 4,
    prior_loc: Optional[Dict[str, Tensor]] = None,
    rcond: Optional[float] = None,
    **kwargs,
) -> CurvatureStatistics:
    """Estimate ``A = tr(H(I − P))``, ``K = tr(HP)``, ``r = rank J`` at ``θ̂``, batch-averaged.

    :param model: the Pyro model (as given to the guide).
    :param loc: ``θ̂`` as ``{site: constrained value}`` (e.g. ``AutoDelta(model).median()``).
    :param args, kwargs: the model's training arguments; each call draws a fresh minibatch of
        a subsampled plate (the model's own subsampling), ``num_batches`` calls in all.
    :param batches: alternatively an iterable of batches (argument tuples, kwargs dicts or
        ``(args, kwargs)`` pairs); at most ``num_batches`` are used.
    :param num_label_samples: S, labels drawn from the predictive per batch (Monte Carlo Fisher).
    :param kernel_curve: measure the kernel cost ``c(v)`` (module docstring) with
        ``num_kernel_samples`` kernel draws per batch, on 48 kernel variances log-spaced over
        ``[10⁻⁶, 10²] · ‖θ̂‖²/D``.
    :param prior_loc: the prior mean ``μ`` per site (default 0) for ``m = ‖θ̂ − μ‖²``.
    :param rcond: relative eigenvalue threshold of the Gram pseudo-inverse (default: the
        projectors' :func:`~pyro_viking.linalg.solvers.default_rcond`).
    """
    if batches is not None:
        batches = list(batches)
    first = (args, kwargs) if batches is None else batch_call(batches[0])
    with poutine.block(), torch.no_grad():
        proto = poutine.trace(model).get_trace(*first[0], **first[1])
    layout = LatentLayout.from_trace(proto)  # latents only (observed sites are skipped)
    z = layout.pack({name: torch.as_tensor(loc[name]).detach() for name in layout.names})
    calls = [(args, kwargs)] * num_batches if batches is None \
        else [batch_call(b) for b in batches[:num_batches]]
    mu = layout.pack(prior_loc) if prior_loc is not None else torch.zeros_like(z)
    m = float((z - mu).double().pow(2).sum())
    grid = None
    if kernel_curve:
        typical = max(float(z.double().pow(2).mean()), 1e-12)
        grid = [typical * 10 ** (-6 + 8 * i / 47) for i in range(48)]
    stats = [_batch_traces(model, layout, z, a, kw, num_label_samples, rcond, grid,
                           num_kernel_samples) for a, kw in calls]
    A = sum(s[0] for s in stats) / len(stats)
    T = sum(s[1] for s in stats) / len(stats)
    r = sum(s[2] for s in stats) / len(stats)
    curve = None if grid is None else tuple(
        sum(st[3][i] for st in stats) / len(stats) for i in range(len(grid)))
    return CurvatureStatistics(image_trace=A, kernel_trace=max(T - A, 0.0), image_dim=r,
                               latent_dim=layout.latent_dim, sq_distance=m,
                               num_batches=len(stats),
                               kernel_grid=None if grid is None else tuple(grid),
                               kernel_curve=curve)

