"""Batch norm in training mode in a ``BayesianNetwork`` (``batch_norm="running"``,
:mod:`pyro_viking.nn.batch_norm`): the network is evaluated on running statistics, one datum at a
time; each training step updates them at θ̂ exactly as a hand-computed momentum update says; the
layer-Gram Jacobian has an exact rule for eval-mode batch norm (checked against the dense
Jacobian); a small residual CNN with batch norms trains with ``fit_viking``, predicts and pickles.
"""

import copy
import math
import pickle

import pyro
import pytest
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoDelta
from torch import nn
from torch.func import functional_call, jacrev

from pyro_viking import AutoViking, BayesianNetwork, TraceViking_ELBO, fit_viking
from pyro_viking.infer import fused_step
from pyro_viking.linalg.layer_gram import LayerGramJacobian
from pyro_viking.nn.batch_norm import update_running_statistics


def mlp_bn(momentum=0.1):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8, momentum=momentum), nn.Tanh(),
                         nn.Linear(8, 3))


class ResidualBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus the identity, then ReLU (in place, as in torchvision)."""

    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        h = self.relu(self.bn1(self.conv1(x)))
        return self.relu(x + self.bn2(self.conv2(h)))


def resnet(c=6, classes=10):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, c, 3, padding=1, bias=False), nn.BatchNorm2d(c),
                         nn.ReLU(inplace=True), ResidualBlock(c), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(c, classes))


def data(n=40, shape=(4,), classes=3):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, *shape, generator=g)
    return x, torch.randint(0, classes, (n,), generator=g)


def statistics(net):
    return {n: b.clone() for n, b in net.named_buffers()}


def test_the_option_is_checked(default_dtype):
    """Training-mode batch norm is refused by default, with the new option named in the fix;
    an unknown option, a batch norm without running statistics and active dropout are refused
    with it."""
    with pytest.raises(ValueError, match=r"BatchNorm1d.*batch_norm='running'"):
        BayesianNetwork(mlp_bn())
    with pytest.raises(ValueError, match="batch_norm must be one of"):
        BayesianNetwork(mlp_bn(), batch_norm="batch")
    no_stats = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8, track_running_stats=False))
    with pytest.raises(ValueError, match="track_running_stats"):
        BayesianNetwork(no_stats, batch_norm="running")
    dropout = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2), nn.BatchNorm1d(8), nn.Linear(8, 3))
    with pytest.raises(ValueError, match="Dropout"):
        BayesianNetwork(dropout, batch_norm="running")
    assert BayesianNetwork(mlp_bn(), batch_norm="running").batch_norm == "running"


def test_evaluation_runs_on_running_statistics_one_datum_at_a_time(default_dtype):
    """The model's outputs are the eval-mode network's, each row its datum's alone; the batch
    norm stays in training mode, and prediction or a call without labels changes nothing."""
    net = mlp_bn().to(default_dtype)
    net[1].running_mean.normal_()
    net[1].running_var.uniform_(0.5, 2.0)
    bnn = BayesianNetwork(net, batch_norm="running")
    x, y = data()
    x = x.to(default_dtype)
    before = statistics(net)
    latent = {n: p.detach() for n, p in net.named_parameters()}
    out = bnn.forward_network(latent, x)
    torch.testing.assert_close(out, copy.deepcopy(net).eval()(x))
    torch.testing.assert_close(bnn.forward_network(latent, x[:3]), out[:3])
    assert net[1].training
    pyro.clear_param_store()
    guide = AutoViking(bnn, init_loc_fn=bnn.init_loc_fn)
    with pyro.poutine.block():
        guide(x, y)  # the guide's set-up and Jacobian: hidden runs of the model
    Predictive(bnn, guide=guide, num_samples=3)(x[:5])
    bnn(x)  # no labels: not a training step
    with torch.no_grad():
        bnn(x, y)  # no gradients: an evaluation
    for name, b in statistics(net).items():
        assert torch.equal(b, before[name]), name


def _hand_update(net, values, x, bnn):
    """The momentum update of ``net[1]`` (BatchNorm1d after the Linear ``net[0]``) at the site
    values ``values``, written out: μ ← (1−m)μ + m mean, σ² ← (1−m)σ² + m var (unbiased)."""
    W, b = values.get(bnn.site_name("0.weight")), values.get(bnn.site_name("0.bias"))
    if W is None:  # hidden: the param store's value
        W, b = pyro.param(bnn.site_name("0.weight")), pyro.param(bnn.site_name("0.bias"))
    a = (x @ W.T + b).detach()
    m = net[1].momentum
    return ((1 - m) * net[1].running_mean + m * a.mean(0),
            (1 - m) * net[1].running_var + m * a.var(0, unbiased=True))


@pytest.mark.parametrize("guide_kind", ["AutoViking", "AutoDelta"])
@pytest.mark.parametrize("latent", [None, "3"])
def test_a_training_step_updates_the_statistics_at_the_point_estimate(guide_kind, latent,
                                                                      default_dtype):
    """One SVI step by hand (traced) moves the statistics by the hand-computed update with the
    minibatch statistics of the network at θ̂ (the guide's mean before the step, not the
    sample the step drew: σ_im is large here), once per step; no random number is drawn."""
    pyro.clear_param_store()
    net = mlp_bn().to(default_dtype)
    bnn = BayesianNetwork(net, batch_norm="running", latent=latent)
    x, y = data()
    x = x.to(default_dtype)
    if guide_kind == "AutoViking":
        guide = AutoViking(bnn, init_loc_fn=bnn.init_loc_fn, init_image_scale=0.5)
        elbo = TraceViking_ELBO(fused=False)
    else:
        guide, elbo = AutoDelta(bnn, init_loc_fn=bnn.init_loc_fn), Trace_ELBO()
    svi = SVI(bnn, guide, pyro.optim.Adam({"lr": 1e-2}), elbo)
    svi.step(x, y)
    assert int(net[1].num_batches_tracked) == 1
    theta = {k: v.detach().clone() for k, v in guide.median().items()}
    mean, var = _hand_update(net, theta, x, bnn)
    svi.step(x, y)
    assert int(net[1].num_batches_tracked) == 2
    tol = dict(rtol=1e-5, atol=1e-6) if default_dtype == torch.float32 else {}
    torch.testing.assert_close(net[1].running_mean, mean, **tol)
    torch.testing.assert_close(net[1].running_var, var, **tol)
    rng = torch.get_rng_state()
    update_running_statistics(bnn, x, theta)
    assert torch.equal(torch.get_rng_state(), rng)
    assert int(net[1].num_batches_tracked) == 3


def test_batch_norms_in_eval_mode_keep_their_statistics(default_dtype):
    """Under ``batch_norm="running"`` a batch norm left in eval mode is frozen: training
    evaluates it on its statistics and never updates them, with vectorised particles and a
    parallel ``Predictive`` (the weight samples run through ``torch.vmap``)."""
    pyro.clear_param_store()
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 8),
                        nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).to(default_dtype)
    net[4].eval()
    frozen = statistics(net[4])
    bnn = BayesianNetwork(net, batch_norm="running", batch_size=10, weight_samples="vmap")
    x, y = data()
    x = x.to(default_dtype)
    guide = AutoViking(bnn, init_loc_fn=bnn.init_loc_fn)
    elbo = TraceViking_ELBO(num_particles=3, vectorize_particles=True, fused=False)
    svi = SVI(bnn, guide, pyro.optim.Adam({"lr": 1e-2}), elbo)
    assert all(math.isfinite(svi.step(x, y)) for _ in range(3))
    assert int(net[1].num_batches_tracked) == 3 and not net[4].training
    for name, b in statistics(net[4]).items():
        assert torch.equal(b, frozen[name]), name
    pred = Predictive(bnn, guide=guide, num_samples=4, parallel=True)(x[:5])
    assert pred["logits"].shape == (4, 5, 3) and torch.isfinite(pred["logits"]).all()


def _fused_with_update(monkeypatch):
    """The fused step's loss followed by the update the traced step makes in the model's call
    (``update_running_statistics`` on the step's minibatch at the guide's mean), unless the
    fused step already makes it. Returns the count of fused steps."""
    count = {"fused": 0}
    original = fused_step.fused_loss

    def fused(model, guide, args, **kwargs):
        drawn = {}
        plate = model.data_plate

        def spy(x, y):
            drawn["plate"] = plate(x, y)
            return drawn["plate"]

        model.data_plate = spy
        try:
            tracked = int(model.net[1].num_batches_tracked)
            loss = original(model, guide, args, **kwargs)
        finally:
            del model.data_plate
        if int(model.net[1].num_batches_tracked) == tracked:
            update_running_statistics(model, args[0][drawn["plate"].indices], guide.median())
        count["fused"] += 1
        return loss

    monkeypatch.setattr(fused_step, "fused_loss", fused)
    return count


def _train_mlp(fused, steps=6):
    pyro.clear_param_store()
    pyro.set_rng_seed(3)
    net = mlp_bn()
    bnn = BayesianNetwork(net, prior_scale="learned", batch_size=16, batch_norm="running")
    guide = AutoViking(bnn, init_loc_fn=bnn.init_loc_fn, init_image_scale=0.05)
    svi = SVI(bnn, guide, pyro.optim.Adam({"lr": 1e-2}), TraceViking_ELBO(beta=0.1, fused=fused))
    x, y = data(60)
    x = x.to(torch.get_default_dtype())
    losses = [svi.step(x, y) for _ in range(steps)]
    params = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    return losses, params, statistics(net)


def test_traced_and_fused_steps_agree_when_the_fused_step_updates(default_dtype, monkeypatch):
    """With the update after the fused step's loss (on its minibatch, at θ̂), the fused and
    the traced steps give the same losses, parameters and running statistics."""
    count = _fused_with_update(monkeypatch)
    fused, params_f, stats_f = _train_mlp(fused=True)
    assert count["fused"] == 5  # the first step sets the guide up
    traced, params_t, stats_t = _train_mlp(fused=False)
    assert count["fused"] == 5
    tol = 1e-4 if default_dtype == torch.float32 else 1e-9
    assert fused == pytest.approx(traced, rel=tol, abs=tol)
    for name in params_f:
        torch.testing.assert_close(params_f[name], params_t[name], rtol=tol * 10, atol=tol * 10)
    assert int(stats_t["1.num_batches_tracked"]) == 6
    for name in stats_f:
        torch.testing.assert_close(stats_f[name], stats_t[name], rtol=tol * 10, atol=tol * 10)


# --------------------------------------------------------------------------- layer-Gram rule
def _flat(model, x, rows_per_datum=1, latent=None):
    """``fn(z)``: the latent parameters of ``model`` as views of z, the others fixed; rows:
    log-softmax outputs of class ``i % C`` (``rows_per_datum = 1``) or all C outputs."""
    named = [(n, p) for n, p in model.named_parameters() if latent is None or latent(n)]
    sizes = [p.numel() for _, p in named]

    def fn(z):
        params = {n: v.view(p.shape) for (n, p), v in zip(named, z.split(sizes))}
        out = functional_call(model, params, (x,)).flatten(1).log_softmax(-1)
        if rows_per_datum > 1:
            return out.reshape(-1)
        return out.gather(-1, (torch.arange(len(x)) % out.shape[1])[:, None]).squeeze(-1)

    return fn, torch.cat([p.detach().flatten() for _, p in named])


def _bn_eval(bn):
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    return bn


BN_PROBLEMS = {
    "BatchNorm1d on (B, C)": (lambda: nn.Sequential(nn.Linear(4, 6), _bn_eval(nn.BatchNorm1d(6)),
                                                    nn.Tanh(), nn.Linear(6, 3)), (4,), 1, None),
    "BatchNorm1d on (B, C, L)": (lambda: nn.Sequential(
        nn.Conv1d(2, 4, 3), _bn_eval(nn.BatchNorm1d(4)), nn.Tanh(), nn.Flatten(),
        nn.Linear(16, 3)), (2, 6), 1, None),
    "residual CNN, 3 rows per datum": (lambda: nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1, bias=False), _bn_eval(nn.BatchNorm2d(3)), nn.ReLU(),
        nn.Conv2d(3, 3, 3, padding=1), _bn_eval(nn.BatchNorm2d(3)), nn.Tanh(), nn.Flatten(),
        nn.Linear(48, 3)), (1, 4, 4), 3, None),
    "hidden gain γ, latent shift β": (lambda: nn.Sequential(
        nn.Conv2d(1, 3, 3), _bn_eval(nn.BatchNorm2d(3)),
        nn.Tanh(), nn.Flatten(), nn.Linear(12, 3)), (1, 4, 4), 1,
        lambda n: not n.endswith("1.weight")),
}


@pytest.mark.float64_only
@pytest.mark.parametrize("problem", list(BN_PROBLEMS))
def test_layer_gram_rule_for_eval_batch_norm_matches_the_dense_jacobian(problem):
    """Eval-mode batch norm takes its own exact rule (no dense ``J_rest`` columns): the
    operator, its Gram, its products and the gradient of its bilinear form (from the build's
    graph) equal those of the dense Jacobian (``jacrev``) to 1e-8 in float64."""
    make, shape, m, latent = BN_PROBLEMS[problem]
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(7, *shape)
    fn, z = _flat(model, x, m, latent)
    op = LayerGramJacobian(fn, z, rows_per_datum=m)
    assert op.rest_columns.numel() == 0
    J = jacrev(fn)(z)
    B, D = J.shape
    torch.testing.assert_close(op.to_dense(), J, atol=1e-8, rtol=0)
    torch.testing.assert_close(op.gram(), J @ J.T, atol=1e-8, rtol=1e-8)
    V, U = torch.randn(3, D), torch.randn(3, B)
    torch.testing.assert_close(op.mv(V), V @ J.T, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(op.rmv(U), U @ J, atol=1e-8, rtol=1e-8)
    zg = z.clone().requires_grad_()
    graph_op = LayerGramJacobian(fn, zg, rows_per_datum=m, keep_graph=True)
    (got,) = graph_op.bilinear_grad(U[:2], V[:2])
    Jg = torch.autograd.functional.jacobian(fn, zg, create_graph=True)
    (ref,) = torch.autograd.grad((U[:2] * (V[:2] @ Jg.T)).sum(), zg)
    torch.testing.assert_close(got, ref, atol=1e-8, rtol=1e-8)


# --------------------------------------------------------------------------- the recipe
def _digits(n_train=300, n_test=200):
    sklearn = pytest.importorskip("sklearn.datasets")
    digits = sklearn.load_digits()
    X = torch.tensor(digits.images, dtype=torch.get_default_dtype()).unsqueeze(1) / 16
    Y = torch.tensor(digits.target)
    return X[:n_train], Y[:n_train], X[n_train:n_train + n_test], Y[n_train:n_train + n_test]


@pytest.mark.dtype_independent
def test_residual_cnn_with_batch_norm_trains_with_fit_viking_predicts_and_pickles():
    """A residual CNN (conv-BN-ReLU blocks, a skip connection) on 8×8 digits: ``fit_viking``
    trains it (finite losses, the warm-up's falling; from scratch on running statistics, slowly),
    the layer-Gram backend serves it, the running statistics move from their initial values,
    ``Predictive`` beats chance, and a pickled model keeps the statistics (and updates its own
    copy)."""
    x, y, x_test, y_test = _digits()
    net = resnet()
    bnn = BayesianNetwork(net, prior_scale="learned", batch_size=32, batch_norm="running")
    fit = fit_viking(bnn, x, y, num_steps=20, warmup_steps=100, progress=False,
                     optim=pyro.optim.Adam({"lr": 1e-2}))
    losses = fit.history["loss"]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[90:100]) < sum(losses[:10])
    assert fit.guide.backend_used == "layer_gram"
    assert int(net[1].num_batches_tracked) >= 100
    assert not torch.allclose(net[1].running_mean, torch.zeros(6))
    assert not torch.allclose(net[3].bn2.running_var, torch.ones(6))
    probs = Predictive(bnn, guide=fit.guide, num_samples=8)(x_test)["logits"].softmax(-1)
    assert float((probs.mean(0).argmax(-1) == y_test).float().mean()) > 0.35
    loaded = pickle.loads(pickle.dumps(bnn))
    for name, b in loaded.net.named_buffers():
        assert torch.equal(b, net.get_buffer(name)), name
    assert loaded.batch_norm_layers.layers[0][1] is loaded.net[1]
    update_running_statistics(loaded, x[:32], fit.guide.median())
    assert int(loaded.net[1].num_batches_tracked) == int(net[1].num_batches_tracked) + 1
