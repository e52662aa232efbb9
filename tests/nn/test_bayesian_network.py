"""``BayesianNetwork``: a Pyro model from an ordinary ``nn.Module``.

Checked against a hand-written ``PyroSample`` model (same log joint on the same weights), the
linearised network, the learned prior scale (gradient, one shared scale tied to ``σ_ker``,
closed-form KL), vectorised against sequential particles, the layer-Gram backend, Pyro's guides,
``Predictive``, minibatch plates, pickling, and a ≤ 15-line LeNet classifier."""

import copy
import math
import pickle

import pyro
import pyro.distributions as dist
import pytest
import torch
from bnn_networks import DTYPES, NETS, TOL, data, mlp, weights_of
from pyro import poutine
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoDelta, AutoLowRankMultivariateNormal, AutoNormal
from pyro.nn import PyroModule, PyroSample
from pyro.nn.module import to_pyro_module_
from torch import nn

from pyro_viking import AutoViking, TraceViking_ELBO
from pyro_viking.nn.bayesian_network import BayesianNetwork


class HandBNN(PyroModule):
    """The same model written by hand: ``PyroSample`` priors on every parameter (a lambda reading
    the ``pyro.param`` prior scale when it is learned)."""

    def __init__(self, net, likelihood, prior_scale, noise=0.1):
        super().__init__()
        to_pyro_module_(net)
        for m in net.modules():
            for n, p in list(m.named_parameters(recurse=False)):
                zero = torch.zeros((), dtype=p.dtype)
                if prior_scale == "learned":
                    def prior(_, zero=zero, shape=p.shape):
                        s = pyro.param("net.prior_scale", torch.tensor(0.1, dtype=zero.dtype),
                                       constraint=dist.constraints.positive)
                        return dist.Normal(zero, s).expand(shape).to_event(len(shape))
                else:
                    prior = dist.Normal(zero, prior_scale).expand(p.shape).to_event(p.dim())
                setattr(m, n, PyroSample(prior))
        self.net, self.likelihood, self.noise = net, likelihood, noise

    def forward(self, x, y=None):
        out = self.net(x)
        with pyro.plate("data", x.shape[0]):
            if self.likelihood == "classification":
                return pyro.sample("obs", dist.Categorical(logits=out), obs=y)
            return pyro.sample("obs", dist.Normal(out.squeeze(-1), self.noise), obs=y)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("prior", [0.3, "learned"])
def test_log_joint_equals_hand_written_model(dtype, likelihood, prior):
    out = 3 if likelihood == "classification" else 1
    net = mlp(dtype, out)
    x, y = data(dtype, likelihood)
    bnn = BayesianNetwork(net, likelihood, prior_scale=prior, noise_scale=0.1, name="net")
    hand = HandBNN(copy.deepcopy(net), likelihood, prior)
    values = weights_of(hand, x, y)
    assert set(values) == set(bnn.latent_sites)
    tr_bnn = poutine.trace(poutine.condition(bnn, values)).get_trace(x, y)
    tr_hand = poutine.trace(poutine.condition(hand, values)).get_trace(x, y)
    lp_bnn, lp_hand = tr_bnn.log_prob_sum(), tr_hand.log_prob_sum()
    assert torch.allclose(lp_bnn, lp_hand, rtol=TOL[dtype])
    obs = [t.nodes["obs"]["fn"].log_prob(y) for t in (tr_bnn, tr_hand)]
    assert obs[0].shape == (x.shape[0],)  # one row per datum
    assert torch.allclose(obs[0], obs[1], rtol=TOL[dtype], atol=TOL[dtype])
    if prior == "learned":
        (g_bnn,) = torch.autograd.grad(lp_bnn, pyro.get_param_store()._params["net.prior_scale"],
                                       retain_graph=True)
        (g_hand,) = torch.autograd.grad(lp_hand,
                                        pyro.get_param_store()._params["net.prior_scale"])
        assert torch.allclose(g_bnn, g_hand, rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_linearised_network(dtype):
    bnn = BayesianNetwork(mlp(dtype), "classification", prior_scale=1.0)
    x, _ = data(dtype, n=5)
    ref = {bnn.site_name(n): p.detach() for n, p in bnn.net.named_parameters()}
    torch.manual_seed(3)
    step = {n: 1e-3 * torch.randn_like(v) for n, v in ref.items()}
    at = {n[len("bnn."):]: ref[n] + step[n] for n in ref}
    f, f_lin = bnn.forward_network(at, x), bnn.forward_network(at, x, linearise_at=ref)
    f0 = bnn.forward_network({n[len("bnn."):]: v for n, v in ref.items()}, x)
    # first order: the linearisation's error is O(|step|²), much below the step's effect
    assert (f_lin - f).abs().max() < 0.05 * (f - f0).abs().max()
    batched = {n: torch.stack([v, v]).unsqueeze(1) for n, v in at.items()}
    assert torch.allclose(bnn.forward_network(batched, x, linearise_at=ref)[1], f_lin,
                          atol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_learned_prior_scale_is_one_shared_scale_of_the_kl(dtype):
    """AutoViking (default options) ties σ_ker to the learned prior scale s; the KL term of
    TraceViking_ELBO is the closed form ½[(D−R)(σ_im²/s² − 1 − log σ_im²/s²) + ‖θ̂‖²/s²]
    (R = D − B for these B < D generic data) and gives s its gradient."""
    x, y = data(dtype, n=12)
    bnn = BayesianNetwork(mlp(dtype), "classification", prior_scale="learned",
                          init_prior_scale=0.2)
    guide = AutoViking(bnn, init_loc_fn=bnn.init_loc_fn, gamma=0.0)
    losses = {}
    for beta in (0.0, 1.0):
        pyro.set_rng_seed(5)  # same draws for both β (γ = 0: no carried state)
        loss = TraceViking_ELBO(beta=beta).differentiable_loss(bnn, guide, x, y)
        losses[beta] = loss
    assert guide.backend_used == "layer_gram"
    s = pyro.param(bnn.prior_scale_name)
    assert guide.kernel_scale.item() == pytest.approx(s.item(), rel=1e-6)
    D, B = guide.latent_dim, x.shape[0]
    r = guide.image_scale ** 2 / s ** 2
    kl = 0.5 * ((B) * (r - 1 - torch.log(r)) + guide.loc.pow(2).sum() / s ** 2)
    assert D > B
    diff = (losses[1.0] - losses[0.0]).to(dtype)
    assert torch.allclose(diff, kl, rtol=1e-3 if dtype == torch.float32 else 1e-8)
    u = pyro.get_param_store()._params[bnn.prior_scale_name]  # unconstrained (log s)
    (g_diff,) = torch.autograd.grad(diff, u, retain_graph=True)
    (g_kl,) = torch.autograd.grad(kl, u)
    assert torch.allclose(g_diff, g_kl, rtol=1e-3 if dtype == torch.float32 else 1e-7)
    (g,) = torch.autograd.grad(losses[1.0], u)
    assert torch.isfinite(g) and g != 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_vectorised_particles_match_sequential_in_expectation(dtype):
    """E[loss] is the same with K vectorised particles (one weight batch, one projection) and
    with sequential ones: |mean difference| < 4 standard errors."""
    x, y = data(dtype, n=20)
    bnn = BayesianNetwork(mlp(dtype), "classification", prior_scale="learned")
    guide = AutoViking(bnn, init_loc_fn=bnn.init_loc_fn, init_image_scale=0.3)
    seq = torch.tensor([TraceViking_ELBO(num_particles=1).loss(bnn, guide, x, y)
                        for _ in range(200)])
    K = 800
    vec = TraceViking_ELBO(num_particles=K, vectorize_particles=True,
                           max_plate_nesting=1).loss(bnn, guide, x, y)
    se = seq.std() * math.sqrt(1 / len(seq) + 1 / K)
    assert abs(vec - seq.mean()) < 4 * se, (vec, seq.mean(), se)
    assert guide.backend_used == "layer_gram"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("arch", ["mlp", "cnn", "cnn1d", "transformer"])
@pytest.mark.parametrize("vectorize", [False, True])
def test_autoviking_trains_on_the_layer_gram_backend(dtype, arch, vectorize):
    make, shape = NETS[arch]
    x, y = data(dtype, n=40, shape=shape)
    bnn = BayesianNetwork(make(dtype), "classification", prior_scale="learned", batch_size=10)
    guide = AutoViking(bnn, init_loc_fn=bnn.init_loc_fn)
    elbo = TraceViking_ELBO(num_particles=3, vectorize_particles=vectorize)
    svi = SVI(bnn, guide, pyro.optim.Adam({"lr": 1e-2}), elbo)
    losses = [svi.step(x, y) for _ in range(5)]
    assert all(math.isfinite(v) for v in losses)
    assert guide.backend_used == "layer_gram"
    assert guide.loc.dtype == dtype
    assert pyro.param(bnn.prior_scale_name).item() != pytest.approx(bnn.init_prior_scale)
    guide.project_training_data(x, y, num_samples=6)
    pred = Predictive(bnn, guide=guide, num_samples=6)(x[:5])
    assert pred["obs"].shape == (6, 5) and pred["logits"].shape == (6, 5, 3)


GUIDES = {
    "AutoNormal": lambda m: AutoNormal(m, init_loc_fn=m.init_loc_fn),
    "AutoDelta": lambda m: AutoDelta(m, init_loc_fn=m.init_loc_fn),
    "AutoLowRank": lambda m: AutoLowRankMultivariateNormal(m, init_loc_fn=m.init_loc_fn,
                                                          rank=2),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("guide_name", sorted(GUIDES))
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_pyro_guides_and_predictive(dtype, guide_name, likelihood):
    out = 3 if likelihood == "classification" else 1
    x, y = data(dtype, likelihood, n=40)
    bnn = BayesianNetwork(mlp(dtype, out), likelihood, prior_scale="learned",
                          noise_scale="learned", batch_size=10)
    guide = GUIDES[guide_name](bnn)
    svi = SVI(bnn, guide, pyro.optim.Adam({"lr": 1e-2}),
              Trace_ELBO(num_particles=2, vectorize_particles=True, max_plate_nesting=1))
    assert all(math.isfinite(svi.step(x, y)) for _ in range(5))
    if likelihood == "regression":
        assert pyro.param(bnn.noise_scale_name).item() != pytest.approx(0.1, abs=1e-6)
    preds = [Predictive(bnn, guide=guide, num_samples=4, parallel=p)(x[:5]) for p in (0, 1)]
    site = bnn.output_site
    for p in preds:
        assert p["obs"].shape == (4, 5)
        assert p[site].shape == ((4, 5, 3) if likelihood == "classification" else (4, 5, 1))
    if guide_name == "AutoDelta":  # one point: sequential and parallel agree exactly
        assert torch.allclose(preds[0][site], preds[1][site], atol=TOL[dtype])


def test_predictive_parallel_with_autoviking():
    x, y = data(torch.float32, n=40)
    bnn = BayesianNetwork(mlp(torch.float32), "classification", prior_scale=0.5, batch_size=10)
    guide = AutoViking(bnn, init_loc_fn=bnn.init_loc_fn)
    SVI(bnn, guide, pyro.optim.Adam({"lr": 1e-2}), TraceViking_ELBO()).step(x, y)
    guide.project_training_data(x, y, num_samples=8)
    seq, par = (Predictive(bnn, guide=guide, num_samples=8, parallel=p)(x[:5])
                for p in (False, True))
    # both use the 8 cached training-data samples (each once, in a rotated order)
    for power in (1, 2):
        assert torch.allclose((seq["logits"] ** power).mean(0), (par["logits"] ** power).mean(0),
                              atol=1e-4)


def test_predictive_parallel_learned_prior():
    x, y = data(torch.float32, n=40)
    bnn = BayesianNetwork(mlp(torch.float32), "classification", prior_scale="learned")
    guide = AutoViking(bnn, init_loc_fn=bnn.init_loc_fn)
    SVI(bnn, guide, pyro.optim.Adam({"lr": 1e-2}), TraceViking_ELBO()).step(x, y)
    guide.project_training_data(x, y, num_samples=8)
    assert Predictive(bnn, guide=guide, num_samples=8, parallel=True)(x[:5])["obs"].shape \
        == (8, 5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_hidden_parameters_train_with_vectorised_particles(dtype):
    x, y = data(dtype, n=20)
    bnn = BayesianNetwork(mlp(dtype), "classification", latent="2", prior_scale="learned")
    w0 = bnn.net[0].weight.detach().clone()
    guide = AutoViking(bnn, init_loc_fn=bnn.init_loc_fn)
    elbo = TraceViking_ELBO(num_particles=3, vectorize_particles=True, max_plate_nesting=1)
    svi = SVI(bnn, guide, pyro.optim.Adam({"lr": 1e-2}), elbo)
    assert all(math.isfinite(svi.step(x, y)) for _ in range(3))
    assert not torch.equal(bnn.network[0].weight, w0)
    assert guide.backend_used == "layer_gram"


@pytest.mark.parametrize("dtype", DTYPES)
def test_multi_output_regression_and_set_weights(dtype):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).to(dtype)
    x, _ = data(dtype, n=10)
    y = torch.randn(10, 2, dtype=dtype)
    bnn = BayesianNetwork(net, "regression", noise_scale=0.5)
    values = weights_of(bnn, x, y)
    tr = poutine.trace(poutine.condition(bnn, values)).get_trace(x, y)
    lp = tr.nodes["obs"]["fn"].log_prob(y)
    assert lp.shape == (10,)  # one row per datum, the two outputs summed
    with torch.no_grad():
        out = bnn.set_weights(values)(x)
    ref = dist.Normal(out, 0.5).log_prob(y).sum(-1)
    assert torch.allclose(lp, ref, atol=TOL[dtype])
    assert torch.equal(tr.nodes["loc"]["value"], out)


def test_minibatch_plates_scale_the_likelihood():
    x, y = data(torch.float64, n=30)
    # whole data set passed, plate subsamples B = 10: scale N/B, B rows
    bnn = BayesianNetwork(mlp(torch.float64), batch_size=10)
    site = poutine.trace(bnn).get_trace(x, y).nodes["obs"]
    assert site["value"].shape == (10,) and site["scale"] == pytest.approx(3.0)
    assert poutine.trace(bnn).get_trace(x).nodes["obs"]["value"].shape == (30,)  # prediction
    # data-loader minibatches of a data set of N = 300: scale N/len(x)
    bnn = BayesianNetwork(mlp(torch.float64), num_data=300)
    site = poutine.trace(bnn).get_trace(x, y).nodes["obs"]
    assert torch.equal(site["value"], y) and site["scale"] == pytest.approx(10.0)


def test_data_loader_minibatches_with_autoviking():
    """``num_data=N`` and minibatches passed to each step (a data loader), vectorised particles;
    the training-data projection then walks the same batches."""
    x, y = data(torch.float32, n=60)
    batches = [(x[i:i + 20], y[i:i + 20]) for i in range(0, 60, 20)]
    bnn = BayesianNetwork(mlp(torch.float32), num_data=60, prior_scale="learned")
    guide = AutoViking(bnn, init_loc_fn=bnn.init_loc_fn)
    elbo = TraceViking_ELBO(num_particles=2, vectorize_particles=True, max_plate_nesting=1)
    svi = SVI(bnn, guide, pyro.optim.Adam({"lr": 1e-2}), elbo)
    assert all(math.isfinite(svi.step(xb, yb)) for xb, yb in batches * 2)
    assert guide.backend_used == "layer_gram"
    guide.project_training_data(batches=batches, num_samples=10)
    assert Predictive(bnn, guide=guide, num_samples=10)(x[:5])["logits"].shape == (10, 5, 3)


def test_pickle_round_trip(tmp_path):
    x, y = data(torch.float32, n=20)
    bnn = BayesianNetwork(mlp(torch.float32), "classification", prior_scale="learned",
                          latent="2")
    guide = AutoNormal(bnn, init_loc_fn=bnn.init_loc_fn)
    SVI(bnn, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO()).step(x, y)
    clone = pickle.loads(pickle.dumps(bnn))
    torch.save(bnn, tmp_path / "bnn.pt")
    loaded = torch.load(tmp_path / "bnn.pt", weights_only=False)
    values = weights_of(bnn, x, y)
    outs = [poutine.condition(m, values)(x) for m in (bnn, clone, loaded)]
    assert torch.allclose(outs[0], outs[1]) and torch.allclose(outs[0], outs[2])
    assert clone.prior_scale_name == "bnn.prior_scale" and clone.latent_sites == bnn.latent_sites


def test_invalid_arguments():
    net = mlp(torch.float32)
    with pytest.raises(ValueError, match="likelihood"):
        BayesianNetwork(net, "poisson")
    with pytest.raises(ValueError, match="prior_scale"):
        BayesianNetwork(net, prior_scale=-1.0)
    with pytest.raises(ValueError, match="weight_samples must be one of"):
        BayesianNetwork(net, weight_samples="grouped")
    with pytest.raises(ValueError, match="binary"):
        BayesianNetwork(net, "binary")(torch.randn(4, 4, dtype=torch.float32),
                                       torch.ones(4, dtype=torch.float32))


@pytest.mark.dtype_independent
def test_lenet_classifier_in_fifteen_lines():
    """A LeNet-style CNN classifier on scikit-learn's 8×8 digits with VIKING in 14 user lines:
    4 import lines, then the network, the model, the guide, training and the Bayesian-model
    average (the guide projects on the training data by itself before the first prediction)."""
    sklearn = pytest.importorskip("sklearn.datasets")
    torch.set_default_dtype(torch.float32)
    digits = sklearn.load_digits()
    X = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16
    Y = torch.tensor(digits.target)
    x_train, y_train, x_test, y_test = X[:1000], Y[:1000], X[1000:1400], Y[1000:1400]
    # ---- the user's code ------------------------------------------------------------------
    import pyro  # 1
    from pyro.infer import SVI, Predictive  # 2
    from torch import nn  # 3

    from pyro_viking import AutoViking, BayesianNetwork, TraceViking_ELBO  # 4
    net = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),        # 5
                        nn.Conv2d(6, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),       # 6
                        nn.Flatten(), nn.Linear(64, 120), nn.ReLU(), nn.Linear(120, 84),  # 7
                        nn.ReLU(), nn.Linear(84, 10))                                     # 8
    bnn = BayesianNetwork(net, prior_scale="learned", init_prior_scale=0.01, batch_size=64)  # 9
    guide = AutoViking(bnn, init_loc_fn=bnn.init_loc_fn, init_image_scale=1e-3)           # 10
    svi = SVI(bnn, guide, pyro.optim.Adam({"lr": 1e-2}), TraceViking_ELBO(beta=1e-4))     # 11
    for _ in range(80):                                                                   # 12
        svi.step(x_train, y_train)                                                        # 13
    probs = Predictive(bnn, guide=guide, num_samples=20)(x_test)["logits"].softmax(-1).mean(0)
    # ---- 14 lines (the last one above) ----------------------------------------------------
    accuracy = (probs.argmax(-1) == y_test).float().mean()
    assert guide.backend_used == "layer_gram"
    print(f"LeNet BMA test accuracy {accuracy:.3f}")
    assert accuracy > 0.7, accuracy  # chance is 0.1; measured: benchmarks/README.md
