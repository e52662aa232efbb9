"""Regressions of issue #11 in the numerical core, in the user's default dtype (float32) and in
float64: scalar latents next to vectors (float64 tangents of ``torch.func.jvp``), likelihoods
that do not depend on a latent (J = 0) under the implicit gradient, and ``.to_event``
likelihoods without a plate (one row per element, as with a plate)."""

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from problems import dense_projector
from pyro import poutine
from pyro.infer import SVI

from pyro_viking import AutoViking, TraceViking_ELBO
from pyro_viking.infer.autoguide.projector_choice import build_projector
from pyro_viking.linalg import FunctionalJacobian, KernelProjector
from pyro_viking.linalg.layer_gram import LayerGramJacobian
from pyro_viking.linalg.per_example import PerExampleJacobian
from pyro_viking.model_trace.layout import LatentLayout
from pyro_viking.model_trace.rows import make_rows_fn

DTYPES = [torch.float32, torch.float64]
BACKENDS = ["layer_gram", "per_example", "matrix_free"]


@pytest.fixture(params=DTYPES, ids=["float32", "float64"])
def dtype(request):
    """Run the test with this default dtype (Pyro makes its Python-float parameters in it)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(request.param)
    yield request.param
    torch.set_default_dtype(old)


def _data(N=20):
    g = torch.Generator().manual_seed(1)
    X = torch.randn(N, 3, generator=g)
    y = X @ torch.tensor([1.0, -2.0, 0.5]) + 0.3 * torch.randn(N, generator=g)
    return X.to(torch.get_default_dtype()), y.to(torch.get_default_dtype())


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
    X, y = _data()
    guide = AutoViking(model, backend=backend, grad_through_projection=grad_through_projection)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), TraceViking_ELBO())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CG convergence on the exactly singular Grams below
        losses = [svi.step(X, y) for _ in range(steps)]
    return guide, losses


@pytest.mark.parametrize("through", [True, False], ids=["grad-through-P", "stop-grad"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_scalar_latent_beside_vector_trains_in_every_dtype(dtype, backend, through):
    guide, losses = _train(regression_with_scalar_noise, backend, through)
    assert all(torch.isfinite(torch.tensor(v)) for v in losses)
    assert guide.backend_used == backend
    assert guide.loc.dtype == dtype
    assert guide.loc.grad is None or torch.isfinite(guide.loc.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_jacobian_products_keep_the_parameters_dtype(dtype, backend):
    """Every operator's ``mv``, ``rmv`` and Gram agree with a dense float64 Jacobian, and the
    products come back in the parameters' dtype (``jvp`` of ``0-dim * float`` is float64)."""
    X, y = _data(8)
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


# ------------------------------------------------------------------------------ J = 0
@pytest.mark.parametrize("make", [PerExampleJacobian, LayerGramJacobian, FunctionalJacobian])
def test_implicit_gradient_when_rows_do_not_depend_on_theta(dtype, make):
    """Rows independent of θ (no autograd graph at all): P = I, the gradient w.r.t. the vectors
    is the cotangent and θ gets none (no 'does not require grad' error)."""
    x = torch.randn(5)
    theta = torch.randn(3, requires_grad=True)
    proj = KernelProjector(make(lambda z: x.clone(), theta))
    E = torch.randn(2, 3, requires_grad=True)
    C = torch.randn(2, 3)
    (proj(E) * C).sum().backward()
    torch.testing.assert_close(E.grad, C)
    assert theta.grad is None or torch.all(theta.grad == 0)
    assert proj.rank in (0, None)  # None: CG, which does not know the rank


@pytest.mark.parametrize("model", [likelihood_without_latents, likelihood_ignoring_one_latent])
@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_jacobian_blocks_train_with_the_implicit_gradient(dtype, backend, model):
    guide, losses = _train(model, backend, True)
    assert all(torch.isfinite(torch.tensor(v)) for v in losses)
    assert guide.loc.dtype == dtype


# ------------------------------------------------------------------------------ .to_event rows
def linreg_plate(X, y=None):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("obs", dist.Normal(X @ w, 0.5), obs=y)


def linreg_to_event(X, y=None):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
    pyro.sample("obs", dist.Normal(X @ w, 0.5).to_event(1), obs=y)


def linreg_mvn(X, y=None):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
    cov = 0.25 * torch.eye(X.shape[0])
    pyro.sample("obs", dist.MultivariateNormal(X @ w, cov), obs=y)


def _rows_and_projector(model, X, y, z):
    layout = LatentLayout.from_trace(poutine.trace(model).get_trace(X, y))
    rows = make_rows_fn(model, layout, (X, y))(z)
    proj = build_projector(model, layout, (X, y), {}, z, backend="per_example",
                           differentiable=False)
    return rows, proj


@pytest.mark.parametrize("jacobian", ["loss", "output"])
def test_to_event_likelihood_has_one_row_per_element(dtype, jacobian):
    """``Normal(..).to_event(1)`` over 20 data gives the plate version's 20 rows, rank and P."""
    X, y = _data(20)
    z = torch.tensor([0.3, -1.0, 0.2])
    got, ref = [], []
    for model, out in ((linreg_to_event, got), (linreg_plate, ref)):
        layout = LatentLayout.from_trace(poutine.trace(model).get_trace(X, y))
        out.append(make_rows_fn(model, layout, (X, y), jacobian=jacobian)(z))
        proj = build_projector(model, layout, (X, y), {}, z, jacobian=jacobian,
                               backend="per_example", differentiable=False)
        out += [proj.rank, proj.operator.to_dense()]
    assert got[0].shape == (20,)
    torch.testing.assert_close(got[0], ref[0])
    assert got[1] == ref[1] == 3
    torch.testing.assert_close(got[2], ref[2])


def test_to_event_rows_inside_a_plate_stay_per_datum(dtype):
    """Inside a plate the plate's elements are the data: plate of 6 × ``to_event(1)`` over 2
    outputs, half the data masked, gives 6 rows (outputs summed), masked rows zero."""
    X, _ = _data(6)
    Y = torch.randn(6, 2)
    mask = torch.arange(6) < 3

    def model(X, Y=None):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
        loc = (X @ w)[:, None].expand(6, 2)
        with pyro.plate("data", 6):
            pyro.sample("obs", dist.Normal(loc, 0.5).to_event(1).mask(mask), obs=Y)

    layout = LatentLayout.from_trace(poutine.trace(model).get_trace(X, Y))
    z = torch.tensor([0.3, -1.0, 0.2])
    rows = make_rows_fn(model, layout, (X, Y))(z)
    ref = dist.Normal((X @ z)[:, None], 0.5).log_prob(Y).sum(-1)
    torch.testing.assert_close(rows, torch.where(mask, ref, 0.0))


def test_to_event_rows_without_plate_are_masked(dtype):
    """No plate: ``.mask(m).to_event(1)`` gives one row per element, zero where masked."""
    X, y = _data(6)
    mask = torch.arange(6) < 3

    def model(X, y=None):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
        pyro.sample("obs", dist.Normal(X @ w, 0.5).mask(mask).to_event(1), obs=y)

    layout = LatentLayout.from_trace(poutine.trace(model).get_trace(X, y))
    z = torch.tensor([0.3, -1.0, 0.2])
    rows = make_rows_fn(model, layout, (X, y))(z)
    ref = dist.Normal(X @ z, 0.5).log_prob(y)
    torch.testing.assert_close(rows, torch.where(mask, ref, 0.0))


def test_non_factorising_likelihood_without_plate_warns(dtype):
    X, y = _data(20)
    z = torch.tensor([0.3, -1.0, 0.2])
    with pytest.warns(UserWarning, match="one Jacobian row for 20 observed values") as caught:
        rows, proj = _rows_and_projector(linreg_mvn, X, y, z)
    assert caught[0].filename == __file__  # the first frame outside the libraries
    assert rows.shape == (1,) and proj.rank == 1
