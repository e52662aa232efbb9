"""LayerGramJacobian / PerExampleJacobian: build, densify, compare with ``jacrev``."""

import pytest
import torch
import torch.nn.functional as F
from layer_problems import (
    PROBLEMS,
    conditioned,
    flat_fn,
    lenet,
    mlp_rest,
    mlp_tanh,
    regression,
)
from torch import nn
from torch.func import functional_call

from pyro_viking.linalg import KernelProjector
from pyro_viking.linalg.cross_gram import cross_gram, dense64, pieces_match
from pyro_viking.linalg.layer_gram import (
    LayerGramJacobian,
    LayerGramNotApplicable,
    select_jacobian_backend,
)
from pyro_viking.linalg.per_example import PerExampleJacobian

TOL = 1e-10


# Dense-reference numerics at TOL = 1e-10 (the conftest seeds each test).
pytestmark = pytest.mark.float64_only


# --------------------------------------------------------------------------- contract
def check_operator(op, fn, z):
    J = torch.func.jacrev(fn)(z)
    B, D = J.shape
    assert op.shape == (B, D)
    torch.testing.assert_close(op.to_dense(), J, atol=TOL, rtol=0)
    for s in range(0, D, 512):  # mv with the identity, in chunks (a D×D eye may not fit)
        k = min(512, D - s)
        E = torch.zeros(k, D)
        E[torch.arange(k), torch.arange(s, s + k)] = 1
        torch.testing.assert_close(op.mv(E).T, J[:, s:s + k], atol=TOL, rtol=0)
    assert op.gram().dtype == torch.float64
    torch.testing.assert_close(op.gram(), J @ J.T, atol=TOL, rtol=1e-12)
    V, U = torch.randn(3, D), torch.randn(3, B)
    torch.testing.assert_close(op.mv(V), V @ J.T, atol=TOL, rtol=1e-12)
    torch.testing.assert_close(op.rmv(U), U @ J, atol=TOL, rtol=1e-12)


def check_bilinear(make, fn, z):
    z = z.clone().requires_grad_()
    op = make(fn, z)
    assert op.params[0] is z
    B, D = op.shape
    U, V = torch.randn(2, B), torch.randn(2, D)
    (got,) = torch.autograd.grad(op.bilinear(U, V), z)
    J = torch.autograd.functional.jacobian(fn, z, create_graph=True)
    (ref,) = torch.autograd.grad((U * (V @ J.T)).sum(), z)
    torch.testing.assert_close(got, ref, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(op.bilinear(U, V).detach(), (U * (V @ J.T)).sum().detach())
    (got,) = op.bilinear_grad(U, V)  # the closed-form cotangents of the kept graph
    torch.testing.assert_close(got, ref, atol=1e-9, rtol=1e-9)
    (got,) = op.bilinear_grad(3 * U, V)  # and again, on the same graph
    torch.testing.assert_close(got, 3 * ref, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_layer_gram_matches_jacrev(name):
    fn, z = PROBLEMS[name]()
    op = LayerGramJacobian(fn, z)
    assert op.backend_name == "layer_gram" and op.has_cheap_gram
    assert op.check_error < 1e-12
    check_operator(op, fn, z)


@pytest.mark.parametrize("name", ["cnn1d", "cnn1d_same_even_dilated", "cnn3d"])
def test_conv1d_and_conv3d_are_layers_not_rest_columns(name):
    fn, z = PROBLEMS[name]()
    assert LayerGramJacobian(fn, z).rest_columns.numel() == 0


def test_rest_column_is_the_noise_scale():
    fn, z = mlp_rest()
    op = LayerGramJacobian(fn, z)
    assert op.rest_columns.tolist() == [z.numel() - 1]


@pytest.mark.parametrize("keep_graph", [True, False], ids=["build-graph", "re-run"])
@pytest.mark.parametrize("name", ["mlp_tanh", "mlp_rest", "lenet", "cnn1d", "seq_linear"])
def test_layer_gram_bilinear_gradient(name, keep_graph):
    """The bilinear's gradient from the build's own graph (``keep_graph``) and from a new
    forward/backward, against autograd through the dense Jacobian."""
    fn, z = PROBLEMS[name]()
    check_bilinear(lambda f, x: LayerGramJacobian(f, x, keep_graph=keep_graph), fn, z)


def test_layer_gram_keeps_its_graph_only_when_asked_and_differentiable():
    fn, z = PROBLEMS["mlp_tanh"]()
    assert LayerGramJacobian(fn, z)._graph_pieces is None  # z does not require grad
    z = z.clone().requires_grad_()
    assert LayerGramJacobian(fn, z)._graph_pieces is not None
    assert LayerGramJacobian(fn, z, keep_graph=False)._graph_pieces is None
    with torch.no_grad():
        assert LayerGramJacobian(fn, z)._graph_pieces is None
    op = LayerGramJacobian(fn, z)
    KernelProjector(op, differentiable=False)  # a projector that will not use the graph
    assert op._graph_pieces is None
    op = LayerGramJacobian(fn, z)
    U, V = torch.randn(2, op.shape[0]), torch.randn(2, op.shape[1])
    g1 = torch.autograd.grad(op.bilinear(U, V), z)[0]
    torch.testing.assert_close(op.bilinear_grad(U, V)[0], g1)
    torch.testing.assert_close(op.bilinear_grad(2 * U, V)[0], 2 * g1)  # the graph is kept


@pytest.mark.parametrize("vectorize", [True, False])
@pytest.mark.parametrize("name", ["mlp_tanh", "mlp_rest", "lenet"])
def test_per_example_matches_jacrev(name, vectorize):
    fn, z = PROBLEMS[name]()
    op = PerExampleJacobian(fn, z, vectorize=vectorize)
    assert op.vectorized == vectorize and op.backend_name == "per_example"
    check_operator(op, fn, z)


def test_per_example_bilinear_gradient():
    fn, z = mlp_rest()
    check_bilinear(PerExampleJacobian, fn, z)


def test_rest_only_model_uses_jvp_columns():
    """No module at all (F.linear on slices): every column is a rest column."""
    x = torch.randn(10, 3)

    def fn(z):
        h = torch.tanh(F.linear(x, z[:12].view(4, 3), z[12:16]))
        return regression(F.linear(h, z[16:20].view(1, 4)), None)

    z = torch.randn(20)
    op = LayerGramJacobian(fn, z)
    assert op.num_layers == 0 and op.rest_columns.numel() == 20
    check_operator(op, fn, z)
    with pytest.raises(NotImplementedError, match="max_rest_columns"):
        LayerGramJacobian(fn, z, max_rest_columns=5)


# --------------------------------------------------------------------------- refusals
class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner, self.head = nn.Linear(3, 3), nn.Linear(3, 1)

    def forward(self, x):
        return self.head(torch.tanh(self.inner(torch.tanh(self.inner(x)))))


def test_weight_sharing_refused():
    fn, z = flat_fn(Twice(), torch.randn(8, 3), regression)
    with pytest.raises(LayerGramNotApplicable, match="more than once"):
        LayerGramJacobian(fn, z)
    assert issubclass(LayerGramNotApplicable, NotImplementedError)


def test_shared_columns_refused():
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3), nn.Tanh(),
                          nn.Linear(3, 1))
    x = torch.randn(8, 3)

    def fn(z):
        W, b = z[:9].view(3, 3), z[9:12]
        p = {"0.weight": W, "0.bias": b, "2.weight": W, "2.bias": b,
             "4.weight": z[12:15].view(1, 3), "4.bias": z[15:]}
        return regression(functional_call(model, p, (x,)), None)

    with pytest.raises(NotImplementedError, match="two layers"):
        LayerGramJacobian(fn, torch.randn(16))


def test_check_catches_weight_used_outside_layer():
    model = nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, 1))
    fn0, z = flat_fn(model, torch.randn(6, 2), regression)

    def fn(z):  # a penalty on the first weight added to every row
        return fn0(z) - 0.1 * (z[:10] ** 2).sum()

    with pytest.raises(NotImplementedError, match="does not match autograd"):
        LayerGramJacobian(fn, z)
    op = LayerGramJacobian(fn, z, check=False)  # unchecked: silently wrong
    assert not torch.allclose(op.to_dense(), torch.func.jacrev(fn)(z))


@pytest.mark.parametrize("how", ["transpose", "scaled", "clone"])
def test_transformed_weight_refused(how):
    model = nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, 1))
    ops = {"transpose": lambda W: W.reshape(2, 5).T, "scaled": lambda W: 2 * W,
           "clone": lambda W: W.clone()}

    def transform(p):
        return {**p, "0.weight": ops[how](p["0.weight"])}

    fn, z = flat_fn(model, torch.randn(6, 2), regression, transform=transform)
    with pytest.raises(NotImplementedError, match="view"):
        LayerGramJacobian(fn, z)


def test_batchnorm_in_train_mode_refused():
    model = nn.Sequential(nn.Linear(2, 5), nn.BatchNorm1d(5), nn.Linear(5, 1))
    fn, z = flat_fn(model, torch.randn(6, 2), regression)
    with pytest.raises(NotImplementedError, match="batch statistics"):
        LayerGramJacobian(fn, z)


def test_layer_input_without_data_dimension_refused():
    layer = nn.Linear(3, 1)
    x = torch.randn(8, 3)

    def fn(z):  # the layer sees 2B rows, each datum combines two of them
        out = functional_call(layer, {"weight": z[:3].view(1, 3), "bias": z[3:]},
                              (torch.cat([x, x ** 2]),)).squeeze(-1)
        return out[:8] * out[8:]

    with pytest.raises(NotImplementedError, match="leading data dimension"):
        LayerGramJacobian(fn, torch.randn(4))


# --------------------------------------------------------------------------- through Pyro
def test_pyro_module_bnn_through_make_rows_fn():
    """A PyroModule BNN seen through ``make_rows_fn``: weights are views of z, the noise
    scale is a rest column."""
    pyro = pytest.importorskip("pyro")
    dist = pyro.distributions
    from pyro import poutine
    from pyro.nn import PyroModule, PyroSample

    from pyro_viking.model_trace.layout import LatentLayout
    from pyro_viking.model_trace.rows import make_rows_fn

    def bayesian(layer):
        o, i = layer.weight.shape
        layer.weight = PyroSample(dist.Normal(0.0, 1.0).expand([o, i]).to_event(2))
        layer.bias = PyroSample(dist.Normal(0.0, 1.0).expand([o]).to_event(1))
        return layer

    class BNN(PyroModule):
        def __init__(self):
            super().__init__()
            self.l1 = bayesian(PyroModule[nn.Linear](3, 10))
            self.l2 = bayesian(PyroModule[nn.Linear](10, 1))

        def forward(self, x, y=None):
            mu = self.l2(torch.tanh(self.l1(x))).squeeze(-1)
            s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
            with pyro.plate("data", x.shape[0]):
                pyro.sample("obs", dist.Normal(mu, s), obs=y)

    model, x, y = BNN(), torch.randn(20, 3), torch.randn(20)
    layout = LatentLayout.from_trace(poutine.trace(model).get_trace(x, y))
    fn = make_rows_fn(model, layout, (x, y))
    z = torch.randn(layout.latent_dim)
    op = LayerGramJacobian(fn, z)
    assert op.num_layers == 2 and op.rest_columns.tolist() == [layout.latent_dim - 1]
    check_operator(op, fn, z)


# --------------------------------------------------------------------------- selection
def test_selection():
    kw = dict(batch_size=16)
    fn, z = mlp_tanh()
    assert isinstance(select_jacobian_backend(fn, z, **kw), LayerGramJacobian)
    assert isinstance(select_jacobian_backend(fn, z, prefer="per_example", **kw),
                      PerExampleJacobian)
    fn, z = lenet()
    assert isinstance(select_jacobian_backend(fn, z, **kw), LayerGramJacobian)
    fn, z = flat_fn(Twice(), torch.randn(16, 3), regression)
    assert isinstance(select_jacobian_backend(fn, z, **kw), PerExampleJacobian)
    assert select_jacobian_backend(fn, z, max_dense_bytes=0, **kw) is None
    with pytest.raises(NotImplementedError):
        select_jacobian_backend(fn, z, prefer="layer_gram", **kw)
    with pytest.raises(ValueError):
        select_jacobian_backend(fn, z, prefer="cg", **kw)


# ------------------------------------------------------------------ implicit gradient through P
def _dense_P(fn, z):
    """``I − Jᵀ (J Jᵀ)⁻¹ J`` with ``J = ∂fn/∂z`` by autograd (differentiable in z; J has full row
    rank on the ``CONDITIONED`` problems)."""
    J = torch.autograd.functional.jacobian(fn, z, create_graph=True)
    return torch.eye(J.shape[1]) - J.T @ torch.linalg.solve(J @ J.T, J)


@pytest.mark.parametrize("keep_graph", [True, False], ids=["build-graph", "re-run"])
@pytest.mark.parametrize("name", ["mlp_tanh", "mlp_rest", "lenet", "seq_linear"])
def test_projection_gradient_through_layer_gram_matches_dense(name, keep_graph):
    """``P(z) E`` and the differentiable ``kernel_and_image`` on the layer-Gram operator: the
    gradients w.r.t. z (and E) for random cotangents equal autograd through a dense projection
    ``I − Jᵀ (J Jᵀ)⁻¹ J`` (float64, 1e-8 relative to the largest entry)."""
    fn, z = conditioned(name)
    z = z.clone().requires_grad_()
    proj = KernelProjector(LayerGramJacobian(fn, z, keep_graph=keep_graph), solver="eigh")
    D = z.numel()
    E = torch.randn(2, D, requires_grad=True)
    C = torch.randn(2, D)
    got = torch.autograd.grad((proj(E) * C).sum(), (E, z))
    Pd = _dense_P(fn, z)
    ref = torch.autograd.grad(((E @ Pd) * C).sum(), (E, z), retain_graph=True)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-8 * float(r.abs().max()))
    k, img = proj.kernel_and_image(E.detach(), num_image=3)
    Ck, Ci = torch.randn(2, D), torch.randn(3, D)
    (got,) = torch.autograd.grad((k * Ck).sum() + (img * Ci).sum(), z)
    nu = img.detach()
    (ref,) = torch.autograd.grad(((E.detach() @ Pd) * Ck).sum()
                                 + ((nu - nu @ Pd) * Ci).sum(), z)
    torch.testing.assert_close(got, ref, rtol=1e-8, atol=1e-8 * float(ref.abs().max()))


def test_projection_through_layer_gram_gradcheck():
    """Finite differences of ``(E, z) ↦ P(z) E`` agree with the implicit gradient (gradcheck's
    default tolerances); on a well-conditioned Gram the forward's round-off, divided by the
    finite-difference step, stays far below them."""
    fn, z = conditioned("small_mlp")
    E = torch.randn(2, z.numel(), requires_grad=True)

    def project(e, t):
        return KernelProjector(LayerGramJacobian(fn, t), solver="eigh")(e)

    assert torch.autograd.gradcheck(project, (E, z.clone().requires_grad_()))


def _two_label_sets(model, x, num_classes):
    """``fn(z)`` of ``model`` on ``x`` with two sets of labels (the rows of a Monte Carlo
    Fisher), and the point z."""
    named = [(n, p.shape, p.numel()) for n, p in model.named_parameters()]
    z = torch.cat([p.detach().flatten() for p in model.parameters()])

    def rows_for(y):
        def fn(z):
            params, o = {}, 0
            for n, s, k in named:
                params[n], o = z[o:o + k].view(s), o + k
            out = functional_call(model, params, (x,))
            return out.log_softmax(-1).gather(-1, y[:, None]).squeeze(-1)
        return fn

    B = x.shape[0]
    return [rows_for(torch.randint(0, num_classes, (B,))) for _ in range(2)], z


@pytest.mark.parametrize("net, shape", [
    (lambda: nn.Sequential(nn.Linear(4, 9), nn.Tanh(), nn.Linear(9, 3)), (7, 4)),
    (lambda: nn.Sequential(nn.Conv1d(2, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                           nn.Linear(4 * 5, 3)), (7, 2, 10)),
    (lambda: nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 3)), (7, 5, 4)),
])
def test_cross_gram_matches_dense(net, shape):
    """``J_a J_bᵀ`` of one network at one point with two label sets (the curvature estimate's
    Monte Carlo Fisher): ghosts (on (B, in) and on sequences), conv blocks and norm rows."""
    model = net()
    x = torch.randn(*shape)
    if len(shape) == 3 and isinstance(model[0], nn.Linear):  # a sequence: pool it to (B, 3)
        model = nn.Sequential(*model, nn.Flatten(), nn.LazyLinear(3))
        model(x)
    (fa, fb), z = _two_label_sets(model, x, 3)
    a, b = LayerGramJacobian(fa, z), LayerGramJacobian(fb, z)
    assert pieces_match(a, b)
    Ja = torch.autograd.functional.jacobian(fa, z)
    Jb = torch.autograd.functional.jacobian(fb, z)
    assert not torch.allclose(Ja, Jb)  # the label sets differ
    torch.testing.assert_close(cross_gram(a, b), Ja @ Jb.T, atol=TOL, rtol=TOL)
    torch.testing.assert_close(cross_gram(b, a), Jb @ Ja.T, atol=TOL, rtol=TOL)
    torch.testing.assert_close(cross_gram(a, a), a.gram(), atol=TOL, rtol=TOL)
    # a dense operator on either side: the dense product
    dense = PerExampleJacobian(fb, z)
    torch.testing.assert_close(cross_gram(a, dense), Ja @ Jb.T, atol=TOL, rtol=TOL)
    torch.testing.assert_close(dense64(a), Ja, atol=TOL, rtol=TOL)


def test_cross_gram_at_another_point_and_which_layers_match():
    """The pieces' cross-Gram holds for two points of one network (``J(z) J(z')ᵀ``); networks
    of other widths do not match (their pair is multiplied densely)."""
    (fa, _), z = _two_label_sets(nn.Sequential(nn.Linear(4, 9), nn.Tanh(), nn.Linear(9, 3)),
                                 torch.randn(7, 4), 3)
    net = nn.Sequential(nn.Linear(4, 9), nn.Tanh(), nn.Flatten(), nn.Linear(9, 3))
    (fc, _), zc = _two_label_sets(net, torch.randn(7, 4), 3)
    a = LayerGramJacobian(fa, z)
    c = LayerGramJacobian(fc, z + 0.1 * torch.randn_like(z))
    c2 = LayerGramJacobian(fc, zc)
    assert pieces_match(a, c2)  # the same layers on the same columns (Flatten has none)
    Ja = torch.autograd.functional.jacobian(fa, z)
    Jc = torch.autograd.functional.jacobian(fc, c.z)
    torch.testing.assert_close(cross_gram(a, c), Ja @ Jc.T, atol=TOL, rtol=TOL)
    wider = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    (fw, _), zw = _two_label_sets(wider, torch.randn(7, 4), 3)
    assert not pieces_match(a, LayerGramJacobian(fw, zw))
