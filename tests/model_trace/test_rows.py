import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from problems import known_weight_data
from pyro.nn import PyroModule, PyroSample
from torch import nn
from torch.func import jacfwd, jacrev, jvp, vjp, vmap

from pyro_viking.infer.autoguide.projector_choice import build_projector
from pyro_viking.model_trace.layout import LatentLayout
from pyro_viking.model_trace.rows import make_rows_fn, observed_data_frames

N, P = 12, 3


def linreg(X, y=None, subsample_size=None):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([X.shape[1]]).to_event(1))
    b = pyro.sample("b", dist.Normal(0.0, 1.0))
    sigma = pyro.sample("sigma", dist.LogNormal(0.0, 1.0))
    with pyro.plate("data", X.shape[0], subsample_size=subsample_size) as idx:
        pyro.sample("y", dist.Normal(X[idx] @ w + b, sigma), obs=None if y is None else y[idx])


def data():
    return torch.randn(N, P), torch.randn(N)


def setup(model, *args, **kwargs):
    layout = LatentLayout.from_trace(poutine.trace(model).get_trace(*args, **kwargs))
    return layout, torch.randn(layout.latent_dim)


def test_layout_unpack_pack_views():
    X, y = data()
    layout, z = setup(linreg, X, y)
    assert layout.latent_dim == P + 2 and layout.names == ("w", "b", "sigma")
    v = layout.unpack(z)
    assert v["w"].shape == (P,) and v["b"].shape == () and v["sigma"].shape == ()
    assert v["w"]._base is z and v["w"].data_ptr() == z.data_ptr()
    assert v["b"].data_ptr() == z[P:].data_ptr()
    assert torch.allclose(v["sigma"], z[-1].exp())
    assert torch.allclose(layout.pack(v), z)
    Z = torch.randn(4, 2, layout.latent_dim)
    vb = layout.unpack(Z)
    assert vb["w"].shape == (4, 2, P) and vb["sigma"].shape == (4, 2)
    assert vb["w"].data_ptr() == Z.data_ptr()
    assert torch.allclose(layout.pack(vb), Z)


def test_layout_discrete_site_error():
    def model():
        pyro.sample("k", dist.Categorical(torch.ones(3)))

    with pytest.raises(ValueError, match="discrete sample site 'k'"):
        LatentLayout.from_trace(poutine.trace(model).get_trace())


def analytic_grad(X, y, z):
    w, b, s = z[:P], z[P], z[P + 1].exp()
    r = y - X @ w - b
    return torch.cat([r[:, None] * X / s**2, (r / s**2)[:, None], (r**2 / s**2 - 1)[:, None]], 1)


def test_linreg_loss_jacobian():
    X, y = data()
    layout, z = setup(linreg, X, y)
    f = make_rows_fn(linreg, layout, (X, y))
    w, b, s = z[:P], z[P], z[P + 1].exp()
    assert torch.allclose(f(z), dist.Normal(X @ w + b, s).log_prob(y))
    J = jacrev(f)(z)
    assert J.shape == (N, P + 2)
    assert torch.allclose(J, analytic_grad(X, y, z), atol=1e-12)
    out = make_rows_fn(linreg, layout, (X, y), jacobian="output")
    assert torch.allclose(out(z), X @ w + b)


def test_linreg_subsample():
    X, y = data()
    layout, z = setup(linreg, X, y, subsample_size=8)
    assert layout.latent_dim == P + 2
    idx = torch.randperm(N)[:8]
    f = make_rows_fn(linreg, layout, (X, y), {"subsample_size": 8}, subsample={"data": idx})
    full = make_rows_fn(linreg, layout, (X, y))
    assert torch.equal(f(z), full(z)[idx])
    assert torch.allclose(jacrev(f)(z), analytic_grad(X, y, z)[idx], atol=1e-12)
    trace = poutine.trace(linreg).get_trace(X, y, subsample_size=8)
    frames = observed_data_frames(trace)
    assert list(frames) == ["data"] and frames["data"].size == 8
    assert frames["data"].full_size == N and frames["data"].dim == -1
    assert observed_data_frames(poutine.trace(linreg).get_trace(X, y)) == {}
    with pytest.raises(ValueError, match="subsample=\\{'data'"):
        make_rows_fn(linreg, layout, (X, y), {"subsample_size": 8})(z)
    with pytest.raises(ValueError, match="not plates"):
        make_rows_fn(linreg, layout, (X, y), subsample={"nope": idx})(z)


class BNN(PyroModule):
    def __init__(self, d_in=2, width=5, n_classes=3):
        super().__init__()
        sizes = [d_in, width, width, n_classes]
        self.layers = PyroModule[nn.ModuleList](
            [PyroModule[nn.Linear](a, b) for a, b in zip(sizes[:-1], sizes[1:])]
        )
        for layer, (a, b) in zip(self.layers, zip(sizes[:-1], sizes[1:])):
            layer.weight = PyroSample(dist.Normal(0.0, 1.0).expand([b, a]).to_event(2))
            layer.bias = PyroSample(dist.Normal(0.0, 1.0).expand([b]).to_event(1))

    def forward(self, x, y=None):
        for layer in self.layers[:-1]:
            x = torch.tanh(layer(x))
        logits = self.layers[-1](x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Categorical(logits=logits), obs=y)
        return logits


@pytest.mark.float64_only
def test_bnn_rows_and_transforms():
    B, C = 7, 3
    x, y = torch.randn(B, 2), torch.randint(0, C, (B,))
    bnn = BNN()
    layout, z = setup(bnn, x, y)
    assert layout.latent_dim == (2 * 5 + 5) + (5 * 5 + 5) + (5 * 3 + 3)
    loss = make_rows_fn(bnn, layout, (x, y))
    out = make_rows_fn(bnn, layout, (x, y), jacobian="output")
    assert loss(z).shape == (B,) and out(z).shape == (B * C,)
    logp = out(z).reshape(B, C)
    assert torch.allclose(logp.logsumexp(-1), torch.zeros(B), atol=1e-12)
    assert torch.allclose(loss(z), logp[torch.arange(B), y])
    for f, rows in [(loss, B), (out, B * C)]:
        J = jacrev(f)(z)
        V, U = torch.randn(4, z.numel()), torch.randn(4, rows)
        assert torch.allclose(jvp(f, (z,), (V[0],))[1], J @ V[0], atol=1e-10)
        assert torch.allclose(vjp(f, z)[1](U[0])[0], U[0] @ J, atol=1e-10)
        jv = vmap(lambda v, f=f: jvp(f, (z,), (v,))[1])(V)
        assert torch.allclose(jv, V @ J.T, atol=1e-10)
        assert torch.allclose(vmap(vjp(f, z)[1])(U)[0], U @ J, atol=1e-10)
        Z = torch.randn(3, z.numel())
        assert torch.allclose(vmap(f)(Z), torch.stack([f(zi) for zi in Z]), atol=1e-12)
    assert dist.is_validation_enabled()


def test_multiple_sites_plates_and_masks():
    ya, yb, yc, yd = torch.randn(4), torch.randn(2, 3), torch.randn(5), torch.randn(2, 4)
    mask = torch.tensor([True, False, True, True])

    def model():
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("a", 4):
            with poutine.mask(mask=mask):
                pyro.sample("ya", dist.Normal(mu, 1.0), obs=ya)
            pyro.sample("yd", dist.Normal(mu, 1.0).expand([2, 4]), obs=yd)
        with pyro.plate("g", 2, dim=-2), pyro.plate("b", 3):
            pyro.sample("yb", dist.Normal(2 * mu, 1.0), obs=yb)
        pyro.sample("yc", dist.Normal(mu * torch.ones(5), 2.0), obs=yc)

    layout, z = setup(model)
    mu = z[0]
    rows = make_rows_fn(model, layout)(z)
    expected = torch.cat(
        [
            dist.Normal(mu, 1.0).log_prob(ya) * mask,
            dist.Normal(mu, 1.0).log_prob(yd).sum(0),
            dist.Normal(2 * mu, 1.0).log_prob(yb).reshape(-1),
            dist.Normal(mu, 2.0).log_prob(yc).sum().reshape(1),
        ]
    )
    assert rows.shape == (4 + 4 + 6 + 1,)
    assert torch.allclose(rows, expected)
    out = make_rows_fn(model, layout, jacobian="output")(z)
    assert out.shape == (4 + 4 * 2 + 6 + 5,)
    assert torch.allclose(out[:4], mu * mask)
    assert torch.allclose(out[4:], torch.cat([mu.expand(8), 2 * mu.expand(6), mu.expand(5)]))


def test_output_rows_independent_and_masked_dist():
    y = torch.randn(4, 2)
    m = torch.tensor([True, True, False, True])

    def model():
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        with pyro.plate("data", 4):
            loc = w * torch.arange(1.0, 5.0)[:, None]
            pyro.sample("y", dist.Normal(loc, 1.0).to_event(1).mask(m), obs=y)

    layout, z = setup(model)
    loss = make_rows_fn(model, layout)(z)
    loc = z * torch.arange(1.0, 5.0)[:, None]
    assert torch.allclose(loss, dist.Normal(loc, 1.0).log_prob(y).sum(-1) * m)
    out = make_rows_fn(model, layout, jacobian="output")(z)
    assert torch.allclose(out, (loc * m[:, None]).reshape(-1))


@pytest.mark.float64_only
def test_double_backward():
    X, y = torch.randn(4, 2), torch.randn(4)
    layout, z = setup(linreg, X, y)
    f = make_rows_fn(linreg, layout, (X, y))
    u, v = torch.randn(4), torch.randn(layout.latent_dim)
    H = jacfwd(jacrev(f))(z)
    expected = torch.einsum("b,bij,j->i", u, H, v)
    zg = z.clone().requires_grad_()
    (g,) = torch.autograd.grad((u * jvp(f, (zg,), (v,))[1]).sum(), zg)
    assert torch.allclose(g, expected, atol=1e-10)

    def phi(zz):
        return (u * jvp(f, (zz,), (v,))[1]).sum()

    eps = 1e-6
    fd = torch.stack(
        [(phi(z + eps * e) - phi(z - eps * e)) / (2 * eps) for e in torch.eye(z.numel())]
    )
    assert torch.allclose(g, fd, atol=1e-6)
    (Jv,) = torch.autograd.grad((u * f(zg)).sum(), zg, create_graph=True)
    (g2,) = torch.autograd.grad(Jv @ v, zg)
    assert torch.allclose(g2, expected, atol=1e-10)


def test_errors():
    """(Invalid observations and changed latent shapes: tests/model_trace/test_inspection.py.)"""
    X, y = data()
    layout, z = setup(linreg, X, y)
    with pytest.raises(ValueError, match="no observed sites"):
        make_rows_fn(linreg, layout, (X,))(z)
    with pytest.raises(ValueError, match="jacobian must be"):
        make_rows_fn(linreg, layout, (X, y), jacobian="hessian")


@pytest.mark.parametrize("dim", [-1, -2])
def test_isolated_from_outer_handlers(dim):
    X, y = data()
    layout, z = setup(linreg, X, y)
    f = make_rows_fn(linreg, layout, (X, y))
    expected, J = f(z), jacrev(f)(z)
    with poutine.trace() as tr, pyro.plate("particles", 3, dim=dim):
        with poutine.scale(scale=10.0), poutine.mask(mask=False):
            rows, J2 = f(z), jacrev(f)(z)
            jv = jvp(f, (z,), (torch.ones_like(z),))[1]
    assert set(tr.trace.nodes) <= {"particles"}
    assert torch.equal(rows, expected)
    # (torch.func.jvp of a 0-dim float32 value times a Python float gives a float64 tangent,
    # design §5: the package's Jacobian operators cast it back; a direct jvp of f does not)
    assert torch.allclose(J2, J) and torch.allclose(jv.to(J.dtype), J.sum(1))


def test_validation_outside_and_inside_transforms():
    def model(y):
        p = pyro.sample("p", dist.Normal(0.0, 1.0))
        with pyro.plate("data", 3):
            pyro.sample("y", dist.Bernoulli(logits=p), obs=y)

    y_bad = torch.tensor([0.0, 0.5, 1.0])
    layout, z = setup(model, torch.tensor([0.0, 1.0, 1.0]))
    f = make_rows_fn(model, layout, (y_bad,))
    with pytest.raises(ValueError):
        f(z)  # plain call: Pyro/torch validation is active
    assert vmap(f)(torch.randn(2, 1)).shape == (2, 3)  # no obscure vmap .item() error
    assert dist.is_validation_enabled()


def test_deterministic_sites_are_not_rows():
    X = torch.randn(6, 3)
    y = torch.randn(6)

    def model(X, y=None):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
        with pyro.plate("data", 6):
            pyro.deterministic("mu", X @ w)
            pyro.sample("y", dist.Normal(X @ w, 0.5), obs=y)

    layout = LatentLayout.from_trace(poutine.trace(model).get_trace(X, y))
    for kind in ("loss", "output"):
        rows = make_rows_fn(model, layout, (X, y), jacobian=kind)(torch.zeros(3))
        assert rows.shape == (6,)


# -- .to_event likelihoods: one row per element, with a plate or without ------------------------
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
    X, y = known_weight_data(20)
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
    X, _ = known_weight_data(6)
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
    X, y = known_weight_data(6)
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
    """A ``MultivariateNormal`` over all the data without a plate gives one row (rank 1), with a
    warning attributed to the caller's line."""
    X, y = known_weight_data(20)
    z = torch.tensor([0.3, -1.0, 0.2])
    with pytest.warns(UserWarning, match="one Jacobian row for 20 observed values") as caught:
        rows, proj = _rows_and_projector(linreg_mvn, X, y, z)
    assert caught[0].filename == __file__  # the first frame outside the libraries
    assert rows.shape == (1,) and proj.rank == 1
