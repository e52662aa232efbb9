"""Which Jacobian backend ``backend="auto"`` picks for the benchmark models (and models outside
the layer-Gram route), and every backend against a dense float64 reference projection, through
:func:`pyro_viking.infer.autoguide.projector_choice.build_projector`; plus a smoke run of the
benchmark."""

import importlib.util
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from problems import dense_projector, known_weight_data
from pyro import poutine
from pyro.infer import SVI
from pyro.infer.autoguide import init_to_value
from pyro.nn import PyroModule, PyroSample
from torch import nn

from pyro_viking import AutoViking, TraceViking_ELBO
from pyro_viking.infer.autoguide import projector_choice as jacobian_backends
from pyro_viking.infer.autoguide.projector_choice import build_projector
from pyro_viking.linalg import per_example
from pyro_viking.model_trace.layout import LatentLayout
from pyro_viking.model_trace.rows import make_rows_fn

ROOT = str(Path(__file__).resolve().parents[3])
BENCH = os.path.join(ROOT, "benchmarks")
BENCH_MODELS = ("mlp_2_50_50_1", "mlp_784_256_256_10", "lenet")


def _bench_models():
    if "bench_models" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_models",
                                                      os.path.join(BENCH, "bench_models.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules["bench_models"] = mod  # dataclasses look their module up
        spec.loader.exec_module(mod)
    return sys.modules["bench_models"]


def bench_problem(name, N=12, B=6):
    """Tiny-width benchmark model, float64, plate of N data subsampled to B (the network runs
    on ``x[idx]`` outside the plate)."""
    return _bench_models().make_problem(name, N, quick=True, dtype=torch.float64,
                                        subsample_size=B)


# --------------------------------------------------------------------------- models off the route
def _prior(shape):
    return PyroSample(dist.Normal(0.0, 1.0).expand(shape).to_event(len(shape)))


class WeightOutsideLayer(PyroModule):
    """A layer's weight is also used outside the layer: the layer-Gram check must refuse."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = PyroModule[nn.Linear](3, 8), PyroModule[nn.Linear](8, 1)
        for layer in (self.l1, self.l2):
            layer.weight = _prior(tuple(layer.weight.shape))
            layer.bias = _prior(tuple(layer.bias.shape))

    def forward(self, x, y=None):
        h = torch.tanh(self.l1(x))
        out = self.l2(h).squeeze(-1) + x @ self.l1.weight.sum(0)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(out, 0.5), obs=y)


class FunctionalWeight(PyroModule):
    """A 3×30 weight used through ``torch.matmul`` (90 columns outside any layer > 64)."""

    def __init__(self):
        super().__init__()
        self.l1 = PyroModule[nn.Linear](30, 1)
        self.l1.weight = _prior((1, 30))
        self.l1.bias = _prior((1,))
        self.w = _prior((3, 30))

    def forward(self, x, y=None):
        out = self.l1(torch.tanh(x @ self.w)).squeeze(-1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(out, 0.5), obs=y)


def off_route_problem(cls, N=6):
    model = cls()
    x, y = torch.randn(N, 3), torch.randn(N)
    return model, x, y


def _setup(model, x, y, init=None):
    layout = LatentLayout.from_trace(poutine.trace(model).get_trace(x, y))
    if init is None:
        loc = 0.5 * torch.randn(layout.latent_dim)
    else:
        loc = layout.pack(init)
    return layout, loc


# --------------------------------------------------------------------------- selection
@pytest.mark.parametrize("K", [1, 2])
@pytest.mark.parametrize("name", BENCH_MODELS)
def test_guide_selects_layer_gram_for_benchmark_models(name, K):
    prob = bench_problem(name)
    guide = AutoViking(prob.model, init_loc_fn=init_to_value(values=prob.init_values))
    elbo = TraceViking_ELBO(num_particles=K, vectorize_particles=K > 1, max_plate_nesting=1)
    svi = SVI(prob.model, guide, pyro.optim.Adam({"lr": 1e-3}), elbo)
    for _ in range(2):
        assert math.isfinite(svi.step(prob.x, prob.y))
    assert guide.backend_used == "layer_gram"
    assert guide.last_projector.operator.backend_name == "layer_gram"
    assert guide.last_projector.num_rows == 6  # the subsampled batch, not the N data


@pytest.mark.parametrize("cls", [WeightOutsideLayer, FunctionalWeight])
def test_guide_selects_per_example_off_the_layer_route(cls):
    model, x, y = off_route_problem(cls)
    guide = AutoViking(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), TraceViking_ELBO())
    assert math.isfinite(svi.step(x, y))
    assert guide.backend_used == "per_example"


def test_guide_selects_matrix_free_over_the_dense_limit(monkeypatch):
    monkeypatch.setattr(jacobian_backends, "DEFAULT_MAX_DENSE_BYTES", 0)
    model, x, y = off_route_problem(WeightOutsideLayer)
    guide = AutoViking(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), TraceViking_ELBO())
    assert math.isfinite(svi.step(x, y))
    assert guide.backend_used == "matrix_free"


def test_build_projector_auto_rule():
    prob = bench_problem("lenet")
    layout, loc = _setup(prob.model, prob.x, prob.y, prob.init_values)
    sub = {"data": torch.arange(6)}

    def auto(model, args, layout, loc, **kw):
        return build_projector(model, layout, args, {}, loc, subsample=kw.pop("sub", None),
                               **kw).operator.backend_name

    assert auto(prob.model, (prob.x, prob.y), layout, loc, sub=sub) == "layer_gram"
    # the output Jacobian has no per-layer form
    assert auto(prob.model, (prob.x, prob.y), layout, loc, sub=sub,
                jacobian="output") == "per_example"
    model, x, y = off_route_problem(FunctionalWeight)
    layout, loc = _setup(model, x, y)
    assert auto(model, (x, y), layout, loc) == "per_example"
    assert auto(model, (x, y), layout, loc, max_dense_bytes=0) == "matrix_free"


# --------------------------------------------------------------------------- exactness
def _cases():
    for name in BENCH_MODELS:
        yield pytest.param(name, id=name)
    yield pytest.param(WeightOutsideLayer, id="weight_outside_layer")
    yield pytest.param(FunctionalWeight, id="functional_weight")


def _problem(case):
    if isinstance(case, str):
        prob = bench_problem(case)
        layout, loc = _setup(prob.model, prob.x, prob.y, prob.init_values)
        return prob.model, (prob.x, prob.y), layout, loc, {"data": torch.arange(3, 9)}
    model, x, y = off_route_problem(case)
    layout, loc = _setup(model, x, y)
    return model, (x, y), layout, loc, None


@pytest.mark.float64_only
@pytest.mark.parametrize("case", list(_cases()))
def test_every_backend_matches_dense_projection(case):
    model, args, layout, loc, sub = _problem(case)
    fn = make_rows_fn(model, layout, args, subsample=sub)
    J = torch.func.jacrev(fn)(loc)
    s = torch.linalg.svdvals(J)
    assert s[-1] > 1e-6 * s[0], "reference J is too ill-conditioned for a 1e-8 comparison"
    E = torch.randn(3, loc.numel())
    ref = E - (torch.linalg.pinv(J) @ (J @ E.T)).T
    backends = ["auto", "per_example", "matrix_free"]
    if isinstance(case, str):
        backends.append("layer_gram")
    for backend in backends:
        proj = build_projector(model, layout, args, {}, loc, subsample=sub, backend=backend,
                               solver_options={"rtol": 1e-13} if backend == "matrix_free"
                               else None)
        err = float((proj(E) - ref).norm() / E.norm())
        assert err < 1e-8, (backend, proj.operator.backend_name, err)
        assert float((J @ proj(E).T).norm() / (J @ E.T).norm()) < 1e-8, backend


@pytest.mark.float64_only
def test_per_example_rejects_non_finite_jacobian(monkeypatch):
    """The finiteness check runs by row chunks (here one row each) and still catches a NaN."""
    monkeypatch.setattr(per_example, "_GRAM_CHUNK_ELEMENTS", 1)
    x = torch.randn(5, 3)

    def fn(z):
        out = x @ z
        return torch.where(torch.arange(5) == 3, out * float("nan"), out)

    with pytest.raises(ValueError, match="non-finite"):
        per_example.PerExampleJacobian(fn, torch.randn(3), vectorize=False)
    op = per_example.PerExampleJacobian(lambda z: x @ z, torch.randn(3))
    torch.testing.assert_close(op.gram(), x @ x.T)


def test_per_example_loop_builds_under_no_grad(default_dtype):
    """The loop of reverse passes (modules without a vmap rule) builds the same Jacobian under
    ``torch.no_grad()`` (``Predictive`` projecting lazily) as with gradients enabled."""
    torch.manual_seed(0)
    x = torch.randn(5, 3, dtype=default_dtype)

    def fn(z):
        return torch.tanh(x @ z) ** 2

    z = torch.randn(3, dtype=default_dtype)
    want = per_example.PerExampleJacobian(fn, z, vectorize=False).J
    with torch.no_grad():
        got = per_example.PerExampleJacobian(fn, z, vectorize=False).J
    torch.testing.assert_close(got, want)
    assert float(want.abs().max()) > 0


# --------------------------------------------------------------------------- benchmark smoke test
def test_bench_step_quick_runs():
    """``benchmarks/bench_step.py --quick`` end to end (about 20 s on 2 busy CPU cores)."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, os.path.join(BENCH, "bench_step.py"), "--quick",
                          "--device", "cpu"], capture_output=True, text=True, timeout=300,
                         env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    assert out.count("SVI step,") == 3  # 3 models, K in {1, 2} in each table
    assert out.count("Projection accuracy and cost") == 3
    assert "Peak memory" in out and "Acceptance ratios" in out
    for word in ("AutoViking default (stop-grad P) [layer_gram]", "AutoViking grad through P",
                 "AutoNormal", "matrix_free, CG", "K=2 vectorised / K=1"):
        assert word in out


# -- every backend in the user's dtype: scalar latents and zero Jacobian blocks ------------------
BACKENDS = ["layer_gram", "per_example", "matrix_free"]


def regression_with_scalar_noise(X, y=None):
    """The commonest regression model: a weight vector and a scalar ``HalfNormal`` noise."""
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("obs", dist.Normal(X @ w, sigma), obs=y)


def likelihood_without_latents(X, y=None):
    """J = 0: the observation depends on no latent."""
    pyro.sample("w", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("obs", dist.Normal(0.0, 1.0), obs=y)


def likelihood_ignoring_one_latent(X, y=None):
    """A block of J is zero: ``u`` is not used by the likelihood."""
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
    pyro.sample("u", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("obs", dist.Normal(torch.tanh(X @ w), 0.5), obs=y)


def _train(model, backend, grad_through_projection, steps=3):
    X, y = known_weight_data()
    guide = AutoViking(model, backend=backend, grad_through_projection=grad_through_projection)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), TraceViking_ELBO())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CG convergence on the exactly singular Grams below
        losses = [svi.step(X, y) for _ in range(steps)]
    return guide, losses


@pytest.mark.parametrize("through", [True, False], ids=["grad-through-P", "stop-grad"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_scalar_latent_beside_vector_trains_in_every_dtype(dtype, backend, through):
    """A scalar latent beside a vector (``jvp`` tangents of ``0-dim * float`` are float64):
    every backend trains in the default dtype, with and without the gradient through P."""
    guide, losses = _train(regression_with_scalar_noise, backend, through)
    assert all(torch.isfinite(torch.tensor(v)) for v in losses)
    assert guide.backend_used == backend
    assert guide.loc.dtype == dtype
    assert guide.loc.grad is None or torch.isfinite(guide.loc.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_jacobian_products_keep_the_parameters_dtype(dtype, backend):
    """Every operator's ``mv``, ``rmv`` and Gram agree with a dense float64 Jacobian, and the
    products come back in the parameters' dtype (``jvp`` of ``0-dim * float`` is float64)."""
    X, y = known_weight_data(8)
    model = regression_with_scalar_noise
    layout = LatentLayout.from_trace(poutine.trace(model).get_trace(X, y))
    z = torch.randn(layout.latent_dim, generator=torch.Generator().manual_seed(2)).to(dtype)
    proj = build_projector(model, layout, (X, y), {}, z, backend=backend, differentiable=False)
    op = proj.operator
    fn64 = make_rows_fn(model, layout, (X.double(), y.double()))
    J64 = torch.func.jacrev(fn64)(z.double())
    V, U = torch.randn(2, layout.latent_dim).to(dtype), torch.randn(2, 8).to(dtype)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-9)
    assert op.mv(V).dtype == dtype and op.rmv(U).dtype == dtype
    torch.testing.assert_close(op.mv(V).double(), V.double() @ J64.T, **tol)
    torch.testing.assert_close(op.rmv(U).double(), U.double() @ J64, **tol)
    PE = proj(V)
    assert PE.dtype == dtype
    torch.testing.assert_close(PE.double(), V.double() @ dense_projector(J64), **tol)


@pytest.mark.parametrize("model", [likelihood_without_latents, likelihood_ignoring_one_latent])
@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_jacobian_blocks_train_with_the_implicit_gradient(dtype, backend, model):
    """A likelihood that depends on no latent (J = 0), or not on one of them (a zero block of
    J): every backend trains with the gradient through P (implicit differentiation)."""
    guide, losses = _train(model, backend, True)
    assert all(torch.isfinite(torch.tensor(v)) for v in losses)
    assert guide.loc.dtype == dtype
