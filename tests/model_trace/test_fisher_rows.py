"""``jacobian="fisher"``: rows ``S(z) · f(z)`` with ``SᵀS = Λ`` (the likelihood's Fisher w.r.t. the
network output, ``S`` held constant), so the rows' Jacobian is ``S J_f`` and its kernel is the
null space of the GGN ``J_fᵀ Λ J_f`` (the Fisher-Rao metric).

Dense references (float64): the GGN from ``jacrev`` of the network output and the closed-form
``Λ`` (softmax ``diag(p) − ppᵀ``, Gaussian ``I/σ²``, Bernoulli ``p(1 − p)``); the projector onto
its null space from ``eigh`` against the library's projector on the rows, and the layer-Gram
Jacobian of several rows per datum against ``jacrev`` of the rows.
"""

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from pyro_viking import BayesianNetwork
from pyro_viking.infer.autoguide.projector_choice import build_projector
from pyro_viking.linalg.layer_gram import LayerGramJacobian, LayerGramNotApplicable
from pyro_viking.model_trace.layout import LatentLayout
from pyro_viking.model_trace.rows import make_rows_fn

B = 5


def _layout(model, *args):
    return LatentLayout.from_trace(poutine.trace(model).get_trace(*args))


def _null_space_projector(H):
    """``I − V Vᵀ``, ``V`` the eigenvectors of the PSD ``H`` above ``1e-10 · max``."""
    lam, V = torch.linalg.eigh(H)
    V = V[:, lam > 1e-10 * lam.max()]
    return torch.eye(H.shape[0], dtype=H.dtype) - V @ V.T


def _bnn_problem(likelihood, out, net=None):
    torch.manual_seed(1)
    net = net or nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, out))
    bnn = BayesianNetwork(net, likelihood, noise_scale=0.3)
    x = torch.randn(B, *((2,) if isinstance(net[0], nn.Linear) else (1, 4, 4)))
    y = {"classification": torch.randint(0, out, (B,)),
         "binary": torch.randint(0, 2, (B,)).to(x.dtype),
         "regression": torch.randn(B, out).squeeze(-1)}[likelihood]
    layout = _layout(bnn, x, y)
    z = layout.pack({bnn.site_name(n): p.detach() for n, p in net.named_parameters()})

    def output(z):  # (B, O), raw logits or mean
        values = layout.unpack(z)
        params = {n: values[bnn.site_name(n)] for n in bnn.latent_shapes}
        return functional_call(net, params, (x,))

    return bnn, (x, y), layout, z, output


def _ggn(likelihood, output, z):
    """``Σ_i J_iᵀ Λ_i J_i`` with ``J_i = ∂f(x_i)/∂z`` and the closed-form Fisher ``Λ_i``."""
    Jf, f = jacrev(output)(z), output(z)  # (B, O, D), (B, O)
    if likelihood == "classification":
        p = f.softmax(-1)
        lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    elif likelihood == "binary":
        p = f.sigmoid()
        lam = (p * (1 - p))[:, :, None]
    else:
        lam = torch.eye(f.shape[1]).expand(B, -1, -1) / 0.3**2
    return torch.einsum("bod,bop,bpe->de", Jf, lam, Jf)


@pytest.mark.float64_only
@pytest.mark.parametrize("likelihood,out", [("classification", 3), ("binary", 1),
                                            ("regression", 1), ("regression", 2)])
def test_kernel_of_fisher_rows_is_the_null_space_of_the_ggn(default_dtype, likelihood, out):
    """Softmax MLP, Bernoulli and Gaussian (one and two outputs, ``.to_event(1)``) regression:
    ``J_rowsᵀ J_rows`` is the GGN, and the projector onto the kernel of the rows' Jacobian is
    the projector onto the GGN's null space (1e-8), with one row per output and datum."""
    bnn, args, layout, z, output = _bnn_problem(likelihood, out)
    rows = make_rows_fn(bnn, layout, args, jacobian="fisher")
    assert rows(z).shape == (B * out,)
    J, H = jacrev(rows)(z), _ggn(likelihood, output, z)
    torch.testing.assert_close(J.T @ J, H, rtol=0, atol=1e-10)
    P_ref = _null_space_projector(H)
    assert 0 < torch.trace(P_ref).round() < z.numel()  # a proper kernel
    for backend in ("per_example", "layer_gram"):
        proj = build_projector(bnn, layout, args, {}, z, jacobian="fisher", backend=backend,
                               differentiable=False)
        P = proj(torch.eye(z.numel()))
        torch.testing.assert_close(P, P_ref, rtol=0, atol=1e-8)
        assert proj.operator.backend_name == backend


@pytest.mark.float64_only
@pytest.mark.parametrize("likelihood,out", [("classification", 3), ("binary", 1),
                                            ("regression", 2)])
def test_fisher_and_output_kernels_coincide_until_data_saturate(default_dtype, likelihood, out):
    """``S`` is injective on the range of the output Jacobian (``p > 0``; for the softmax that
    range is ``p^⊥``, where ``S = diag(√p)``), so in exact arithmetic the Fisher rows have the
    kernel of the ``"output"`` rows: equal projectors (1e-8). Scaled weights saturate the
    softmax: data with ``p_c ≈ 0`` then weigh ``√p_c`` in the Fisher rows and fall below the
    Gram's rank threshold, so the numerical Fisher kernel is the larger one."""
    bnn, args, layout, z, _ = _bnn_problem(likelihood, out)
    P = {}
    for jacobian in ("fisher", "output"):
        proj = build_projector(bnn, layout, args, {}, z, jacobian=jacobian,
                               backend="per_example", differentiable=False)
        P[jacobian] = proj(torch.eye(z.numel()))
    torch.testing.assert_close(P["fisher"], P["output"], rtol=0, atol=1e-8)
    if likelihood == "classification":
        rank = {j: build_projector(bnn, layout, args, {}, 30 * z, jacobian=j,
                                   backend="per_example", differentiable=False).rank
                for j in ("fisher", "output")}
        assert rank["fisher"] < rank["output"] == B * (out - 1)


@pytest.mark.float64_only
def test_fisher_rows_of_a_pyro_model_with_probs_and_a_mask(default_dtype):
    """A hand-written Pyro model: ``Bernoulli(probs=…)`` (the Fisher taken w.r.t. its logits)
    under a plate with some data masked out: masked data give zero rows, the others the
    Bernoulli GGN's null space (1e-8)."""
    x = torch.randn(6, 3)
    y = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    mask = torch.tensor([True, True, False, True, True, True])

    def model(x, y=None):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([3, 4]).to_event(2))
        v = pyro.sample("v", dist.Normal(0.0, 1.0).expand([4]).to_event(1))
        with pyro.plate("data", x.shape[0]), poutine.mask(mask=mask):
            pyro.sample("y", dist.Bernoulli(probs=torch.sigmoid(torch.tanh(x @ w) @ v)), obs=y)

    layout = _layout(model, x, y)
    z = torch.randn(layout.latent_dim)
    rows = make_rows_fn(model, layout, (x, y), jacobian="fisher")
    J = jacrev(rows)(z)
    assert torch.all(J[~mask] == 0)

    def logits(z):
        w, v = layout.unpack(z).values()
        return (torch.tanh(x[mask] @ w) @ v)[:, None]

    H = _ggn("binary", logits, z)
    proj = build_projector(model, layout, (x, y), {}, z, jacobian="fisher",
                           backend="per_example", differentiable=False)
    torch.testing.assert_close(proj(torch.eye(z.numel())), _null_space_projector(H),
                               rtol=0, atol=1e-8)


@pytest.mark.float64_only
@pytest.mark.parametrize("net", ["mlp", "cnn"])
@pytest.mark.parametrize("keep_graph", [False, True])
def test_layer_gram_with_several_rows_per_datum_matches_the_dense_jacobian(default_dtype, net,
                                                                           keep_graph):
    """The per-layer Gram with C rows per datum (one batched backward over the C outputs,
    inputs repeated): ``U J``, ``J Jᵀ`` and the implicit-gradient products against ``jacrev``
    of the Fisher rows of a softmax MLP and CNN (1e-8); ``rows_per_datum=1`` (the default)
    refuses them, as before."""
    torch.manual_seed(2)
    module = (nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 4)) if net == "mlp" else
              nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                            nn.Flatten(), nn.Linear(12, 4)))
    bnn, args, layout, z, _ = _bnn_problem("classification", 4, module)
    rows = make_rows_fn(bnn, layout, args, jacobian="fisher")
    J = jacrev(rows)(z)
    z = z.clone().requires_grad_(keep_graph)
    op = LayerGramJacobian(rows, z, rows_per_datum=None, keep_graph=keep_graph)
    assert op.rows_per_datum == 4 and op.shape == J.shape
    torch.testing.assert_close(op.rmv(torch.eye(B * 4)), J, rtol=0, atol=1e-8)
    torch.testing.assert_close(op.gram(), J @ J.T, rtol=0, atol=1e-8)
    V = torch.randn(3, z.numel())
    torch.testing.assert_close(op.mv(V), V @ J.T, rtol=0, atol=1e-8)
    if keep_graph:
        U = torch.randn(3, B * 4)
        ref = torch.autograd.grad((U * (jacrev(rows)(z) @ V.T).T).sum(), z)[0]
        torch.testing.assert_close(op.bilinear_grad(U, V)[0], ref, rtol=0, atol=1e-8)
    with pytest.raises(LayerGramNotApplicable, match="leading data dimension"):
        LayerGramJacobian(rows, z.detach())


def test_layer_gram_rejects_rows_that_are_not_datum_major(default_dtype):
    """Two observed sites of one datum each (site-major rows, 2 per datum): inferring
    ``rows_per_datum = 2`` would pair the wrong rows; the autograd check refuses."""
    x = torch.randn(4, 3)
    net = nn.Linear(3, 2)

    def model(x, y=None):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([2, 3]).to_event(2))
        out = functional_call(net, {"weight": w}, (x,))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("a", dist.Normal(out[:, 0], 1.0), obs=y)
            pyro.sample("b", dist.Normal(out[:, 1] ** 3, 1.0), obs=y)

    y = torch.randn(4)
    layout = _layout(model, x, y)
    rows = make_rows_fn(model, layout, (x, y), jacobian="fisher")
    with pytest.raises(LayerGramNotApplicable, match="does not match autograd"):
        LayerGramJacobian(rows, torch.randn(layout.latent_dim), rows_per_datum=None)


@pytest.mark.parametrize("site", [dist.Poisson(torch.ones(4)),
                                  dist.StudentT(3.0, torch.zeros(4), 1.0),
                                  dist.LogNormal(torch.zeros(4), 1.0).to_event(1)])
def test_fisher_rows_of_other_likelihoods_are_refused_with_the_alternatives(default_dtype, site):
    def model():
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        with pyro.plate("data", 4):
            fn = site.base_dist if isinstance(site, dist.Independent) else site
            pyro.sample("y", fn, obs=torch.ones(4) + 0 * w)

    layout = _layout(model)
    rows = make_rows_fn(model, layout, jacobian="fisher")
    name = type(site.base_dist if isinstance(site, dist.Independent) else site).__name__
    with pytest.raises(ValueError, match=f"not of {name}; use jacobian='loss' or "
                                         "jacobian='output'"):
        rows(torch.zeros(1))


@pytest.mark.dtype_independent
def test_fisher_rows_are_finite_on_saturated_outputs(default_dtype):
    """float32, logits ±60 (p rounds to 0 or 1): the rows and their Jacobian stay finite."""
    x = torch.tensor([[60.0], [-60.0], [0.5]])

    def model(x, kind):
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        with pyro.plate("data", 3):
            if kind == "binary":
                pyro.sample("y", dist.Bernoulli(logits=w * x[:, 0]), obs=torch.ones(3))
            else:
                logits = torch.cat([w * x, -w * x, 0 * x], -1)
                pyro.sample("y", dist.Categorical(logits=logits), obs=torch.zeros(3).long())

    for kind in ("binary", "categorical"):
        layout = _layout(model, x, kind)
        rows = make_rows_fn(model, layout, (x, kind), jacobian="fisher")
        z = torch.ones(1)
        assert rows(z).isfinite().all() and jacrev(rows)(z).isfinite().all()


def test_unknown_jacobian_names_the_three(default_dtype):
    with pytest.raises(ValueError, match="'loss', 'output', 'fisher'"):
        make_rows_fn(lambda: None, LatentLayout.from_trace(poutine.trace(lambda: None)
                                                            .get_trace()), jacobian="ggn")
