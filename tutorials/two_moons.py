# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # VIKING on two moons: the kernel and the image of a classifier's posterior
#
# A Bayesian neural network classifier on scikit-learn's two-moons data, fitted with
# `AutoViking` and **minibatches**. The approximate posterior over the flat weight vector θ is
#
#     q(θ) = N(θ̂, σ_ker² P + σ_im² (I − P)),
#
# with P the projector onto the kernel of the **loss Jacobian** J (row i: the gradient
# ∇_θ log p(y_i | x_i, θ) of datum i's log-likelihood at θ̂; `jacobian="loss"`, the paper's
# default for classification). Moving θ along ker J changes no training log-likelihood to first
# order, so those directions keep the prior's spread σ_ker; the remaining ≤ N directions are
# constrained by the data and get a small learned σ_im.
#
# With minibatches the guide never sees all of J at once. VIKING uses **stochastic alternating
# projections**: it carries a kernel sample k from step to step, mixes it with fresh noise,
# e = √γ k + √(1 − γ) η, and projects e onto the kernel of the current batch. Projecting onto the
# kernels of every batch in turn converges to the projection onto the kernel of the full-data
# Jacobian (von Neumann), and γ sets how many recent batches the sample "remembers".
#
# The figure at the end has one column per component of the posterior — full, kernel only,
# image only — each with a normalised-uncertainty heatmap and sampled decision boundaries.

# %%
# ruff: noqa: E402
import os
import time
from pathlib import Path

import matplotlib

if not os.environ.get("MPLBACKEND"):
    matplotlib.use("Agg")  # write PNGs; no display needed
import matplotlib.pyplot as plt
import pyro
import torch
import torch.nn as nn
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoDelta, init_to_value
from sklearn.datasets import make_moons
from tqdm.auto import tqdm

from pyro_viking import AutoViking, TraceViking_ELBO
from pyro_viking.nn.bayesian_network import BayesianNetwork

# %% [markdown]
# `SMOKE_TEST=1` (used by the test suite) shrinks every budget so that the script finishes in a
# few seconds; figures go to `tutorials/figures/` unless `PYRO_VIKING_FIGURES` names another
# folder.

# %%
SMOKE_TEST = os.environ.get("SMOKE_TEST") == "1"
NUM_DATA = 150
BATCH_SIZE = 32
MAP_EPOCHS = 5 if SMOKE_TEST else 300
VIKING_EPOCHS = 2 if SMOKE_TEST else 300
NUM_SAMPLES = 10 if SMOKE_TEST else 100  # posterior samples for prediction
GRID = 30 if SMOKE_TEST else 120  # points per side of the evaluation grid
FIGURES = Path(os.environ.get("PYRO_VIKING_FIGURES", "tutorials/figures"))
FIGURES.mkdir(parents=True, exist_ok=True)

# These models are tiny: one intra-op thread is fastest, and avoids OpenMP oversubscription (which
# can slow small linear algebra down a hundredfold) when other processes share the cores.
torch.set_num_threads(int(os.environ.get("PYRO_VIKING_THREADS", "1")))
pyro.set_rng_seed(0)
t_start = time.time()

# %% [markdown]
# ## Data
#
# 150 points of two interleaved half-circles, standardised. The noise (0.25) makes the classes
# overlap a little, and that matters for the *loss* Jacobian: the row of a datum whose label the
# network predicts with near certainty is (y_i − p_i) ∇f_i ≈ 0 — its log-likelihood is nearly
# flat in every direction — so such a datum hardly constrains anything (see the numerical rank
# below). On cleanly separated moons every training point ends up that confident, and the
# kernel samples then move even the logits at the data (without changing any prediction). With
# overlapping classes every datum keeps a say.

# %%
X, Y = make_moons(n_samples=NUM_DATA, noise=0.25, random_state=0)
x_train = torch.tensor(X, dtype=torch.float32)
x_train = (x_train - x_train.mean(0)) / x_train.std(0)
y_train = torch.tensor(Y, dtype=torch.float32)

# %% [markdown]
# ## Model
#
# A 2-50-50-1 tanh network (D = 2,751 weights and biases), every parameter a latent with prior
# N(0, 1), and a Bernoulli likelihood on the logit. We write the network as an ordinary
# `nn.Module` and let `pyro_viking.BayesianNetwork` turn it into the Pyro model: one latent
# site per parameter tensor (`"bnn.0.weight"`, ...), the data plate, and the observed site
# `"obs"`; no `PyroSample` code.
#
# The data plate **subsamples** minibatches of 32 during training (`batch_size=32`; Pyro then
# rescales the likelihood by N/B). Inside, the model follows the pattern VIKING needs: the plate
# draws the indices, the network runs on `x[idx]` *outside* the plate (its weights are not
# per-datum), and the observation is inside it. At prediction (`y=None`) the plate covers every
# input. The network's output is recorded as the deterministic site `"logits"`, which
# `Predictive` returns (a deterministic site is not an observed datum for `AutoViking`).
#
# As in the sinusoid tutorial, the model can replace the network by its **linearisation**
# around a reference point θ_ref (`bnn(x, y, linearise_at=θ_ref)`, latent values keyed by site
# name), f_lin(x; θ) = f(x; θ_ref) + J_f(x; θ_ref) (θ − θ_ref), one `torch.func.jvp` per call.
# The paper's toy experiments (and the authors' two-moons example) train and predict with it: a
# step of size σ_ker = 1 along the kernel in a 2,751-dimensional weight space has a norm of
# about 50, far beyond the reach of a first-order argument for the plain network, whereas the
# linearised network's training log-likelihoods are unchanged by it, as the theory says.

# %%
PRIOR_SCALE = 1.0
network = nn.Sequential(nn.Linear(2, 50), nn.Tanh(), nn.Linear(50, 50), nn.Tanh(),
                        nn.Linear(50, 1))
model = BayesianNetwork(network, "binary", prior_scale=PRIOR_SCALE, batch_size=BATCH_SIZE)

steps_per_epoch = -(-NUM_DATA // BATCH_SIZE)

# %% [markdown]
# ## Step 1: MAP warm-up
#
# VIKING starts from a point estimate: we fit the MAP of the plain network with `AutoDelta`. It
# is VIKING's initial θ̂ and the linearisation point θ_ref (a dict keyed by site name). (The
# start is Pyro's default, the prior median of a few draws, weights of size ≈ 0.3; PyTorch's
# smaller initialisation, `init_loc_fn=model.init_loc_fn`, gives a MAP network in the near-linear
# regime of tanh, whose kernel samples spread much less away from the data: mean kernel-only
# logit std on the grid 0.08 instead of 0.55 in our runs.)

# %%
map_guide = AutoDelta(model)
svi = SVI(model, map_guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
for _ in (bar := tqdm(range(MAP_EPOCHS), desc="MAP")):
    loss = sum(svi.step(x_train, y_train) for _ in range(steps_per_epoch)) / steps_per_epoch
    bar.set_postfix(loss=f"{loss:.1f}")
theta_map = {k: v.detach() for k, v in map_guide.median(x_train, y_train).items()}

# %% [markdown]
# ## Step 2: VIKING with stochastic alternating projections
#
# All latents share the prior N(0, 1), so `kernel_scale="auto"` ties σ_ker to it (σ_ker = 1, as
# in the paper where σ_ker² = 1/α). Each SVI step computes the loss Jacobian of the 32 data of
# the batch at θ̂ (here a dense 32 × 2,751 matrix) and projects the carried sample onto its
# kernel. For the linearised network row i of J is (y_i − p_i) J_f(x_i; θ_ref): its kernel does
# not move with θ̂, so we skip differentiating through the projection
# (`grad_through_projection=False`). At the start of every epoch,
# `project_training_data(..., refresh_training_state=True)` gives the carried sample one full
# alternating pass over all batches, as the paper does.
#
# With 150 data and 2,751 parameters the KL term dominates the true ELBO (β = 1) and pulls the
# image scale towards the prior; like the paper, we temper it: β = 0.05 (the value of the
# authors' two-moons example). The two scales learn faster than θ̂ (Pyro's optimisers accept a
# function of the parameter name).

#
# Finally, the **numerical rank** of J. In exact arithmetic a confidently classified datum, whose
# row (y_i − p_i) ∇f_i is tiny but not zero, removes one whole direction from the kernel, although
# the posterior along it is barely tighter than the prior. The eigen-solver's `rcond` decides
# which directions count: eigenvalues of JJᵀ below `rcond` times the largest (singular values of
# J below √rcond of the largest) are treated as zero, so their directions stay in the kernel.
# The default resolves J to floating-point precision, where every datum counts however weakly;
# the paper's solver (10 conjugate-gradient iterations) in effect resolves only the dominant
# directions. We count singular values down to 1% of the largest: `rcond = 1e-4`. (With the
# default, the kernel of these 150 training gradients leaves almost no freedom on this grid.)
# %%
BETA = 0.05
RCOND = 1e-4


def learning_rates(name, param):
    return {"lr": 1e-2 if "scale" in name else 1e-3}


guide = AutoViking(model, init_loc_fn=init_to_value(values=theta_map), init_image_scale=0.05,
                   kernel_scale="auto", gamma=0.5, jacobian="loss",
                   grad_through_projection=False, solver_options={"rcond": RCOND})
svi = SVI(model, guide, pyro.optim.Adam(learning_rates), TraceViking_ELBO(beta=BETA))
svi.step(x_train, y_train, linearise_at=theta_map)  # sets the guide up
for _ in (bar := tqdm(range(VIKING_EPOCHS), desc="VIKING")):
    guide.project_training_data(x_train, y_train, linearise_at=theta_map, num_samples=1,
                                refresh_training_state=True)
    loss = sum(svi.step(x_train, y_train, linearise_at=theta_map)
               for _ in range(steps_per_epoch)) / steps_per_epoch
    bar.set_postfix(loss=f"{loss:.1f}", sigma_im=f"{guide.image_scale.item():.4f}")
print(f"backend: {guide.backend_used};  σ_ker = {guide.kernel_scale.item():.3f},  "
      f"σ_im = {guide.image_scale.item():.4f};  D = {guide.latent_dim}")

# %% [markdown]
# ## Step 3: predict on a grid
#
# `project_training_data` draws S fresh noise vectors and projects them onto the kernel of the
# *whole* training set's Jacobian (one alternating pass over the batches of 32); `Predictive`
# then uses those samples. Prediction never projects on the grid: the kernel belongs to the
# training data.

# %%
lims = (-3.0, 3.0)
g = torch.linspace(*lims, GRID)
gx, gy = torch.meshgrid(g, g, indexing="xy")
x_grid = torch.stack([gx.reshape(-1), gy.reshape(-1)], -1)

guide.project_training_data(x_train, y_train, linearise_at=theta_map, num_samples=NUM_SAMPLES,
                            progress=True)
predictive = Predictive(model, guide=guide, num_samples=NUM_SAMPLES, return_sites=["logits"])
with torch.no_grad():
    logits_predictive = predictive(x_grid, linearise_at=theta_map)["logits"]
    logits_predictive = logits_predictive.reshape(NUM_SAMPLES, -1)

# %% [markdown]
# For the kernel-only and image-only columns we build the weight samples ourselves from the
# cached noise ε and its kernel part k (`guide.projected_samples`):
# θ = θ̂ + σ_ker k (kernel only) and θ = θ̂ + σ_im (ε − k) (image only), and run the model
# conditioned on each θ (`guide.layout.unpack` turns the flat vector into named latents).

# %%
loc = guide.loc.detach()
sk, si = guide.kernel_scale, guide.image_scale.detach()
eps, ker = guide.projected_samples
deltas = {
    "full posterior": sk * ker + si * (eps - ker),
    "kernel component only": sk * ker,
    "image component only": si * (eps - ker),
}


@torch.no_grad()
def logits_at(thetas, x):
    return torch.stack([
        pyro.poutine.condition(model, data=guide.layout.unpack(t))(x, linearise_at=theta_map)
        for t in thetas]).squeeze(-1)


logits = {name: logits_at(loc + d, x_grid) for name, d in deltas.items()}
logits_loc = logits_at(loc[None], x_grid)[0]
# Predictive returned the same set of samples as the hand-built full posterior:
assert torch.allclose(logits_predictive.mean(0), logits["full posterior"].mean(0), atol=1e-3)

# %% [markdown]
# ## Uncertainty and fit
#
# The heatmaps show the **predictive standard deviation of the logit** across samples, divided
# by its largest value over the grid and the three columns, so all three share one scale in
# [0, 1]: 0 where the samples agree, 1 where they disagree most. (A measure of the averaged
# probability, such as the entropy of the Bayesian model average, would mostly light up along the
# decision boundary: away from it the logits at θ̂ are large — their median size on the grid is
# printed below — and a spread of about one unit hardly moves a probability close to 0 or 1.)
#
# We also check that the samples fit the data — VIKING's kernel samples should not *underfit* —
# through the training accuracy of the Bayesian model average (BMA) and of the samples.

# %%
std = {name: lg.std(0) for name, lg in logits.items()}
top = max(s.max() for s in std.values())
train_logits = {name: logits_at(loc + d, x_train) for name, d in deltas.items()}
acc = {}
for name, lg in train_logits.items():
    bma = (torch.sigmoid(lg).mean(0) > 0.5).float()
    acc[name] = ((bma == y_train).float().mean().item(),
                 ((lg > 0).float() == y_train).float().mean().item())
    print(f"{name:>22}: train accuracy BMA {acc[name][0]:.3f}, mean per sample "
          f"{acc[name][1]:.3f}; logit std on the grid {std[name].mean():.2f} (max "
          f"{std[name].max():.2f})")
with torch.no_grad():
    map_logits = model.set_weights(theta_map)(x_train).squeeze(-1)  # the MAP network itself
map_acc = ((map_logits > 0).float() == y_train).float().mean().item()
near = torch.cdist(x_grid, x_train).min(-1).values < 0.1
far = torch.cdist(x_grid, x_train).min(-1).values > 1.0
std_near = std["full posterior"][near].mean().item()
std_far = std["full posterior"][far].mean().item()
print(f"logit std (full posterior): within 0.1 of a training point {std_near:.2f}, more than "
      f"1.0 away {std_far:.2f};  median |logit| at θ̂ on the grid {logits_loc.abs().median():.1f}")

# %% [markdown]
# ## Figure
#
# * **Kernel component only** (middle): the samples agree on the data — the kernel directions
#   leave every training log-likelihood unchanged — and disagree more and more away from them.
#   Their decision boundaries coincide with θ̂'s among the data and fan out only beyond them.
# * **Image component only** (right): the directions the data constrain carry a small spread of
#   about the same size everywhere; the boundaries shift a little, also among the data.
# * **Full posterior** (left): the sum of the two — confident where the data are, uncertain
#   away from them.

# %%
fig, axes = plt.subplots(2, 3, figsize=(15, 9.5), sharex=True, sharey=True)
mask0, mask1 = y_train == 0, y_train == 1
for c, name in enumerate(deltas):
    ax = axes[0, c]
    mesh = ax.pcolormesh(gx, gy, (std[name] / top).reshape(GRID, GRID), cmap="magma",
                         vmin=0.0, vmax=1.0, shading="auto")
    fig.colorbar(mesh, ax=ax, label="normalised std of the logit")
    ax.set_title(f"{name}\nnormalised predictive uncertainty")
    ax = axes[1, c]
    for s in range(min(10, NUM_SAMPLES)):
        ax.contour(gx, gy, logits[name][s].reshape(GRID, GRID), levels=[0.0], colors="C0",
                   linewidths=1.0, alpha=0.8)
    ax.contour(gx, gy, logits_loc.reshape(GRID, GRID), levels=[0.0], colors="k",
               linewidths=1.5, linestyles="--")
    ax.set_title(f"{name}\n10 sampled decision boundaries (p = 0.5)")
    ax.plot([], [], color="C0", label="sampled boundaries")
    ax.plot([], [], color="k", ls="--", label="boundary at θ̂")
    for r in range(2):
        ax = axes[r, c]
        ax.scatter(x_train[mask0, 0], x_train[mask0, 1], s=14, c="C1", edgecolors="k",
                   linewidths=0.4, label="class 0")
        ax.scatter(x_train[mask1, 0], x_train[mask1, 1], s=14, c="C2", edgecolors="k",
                   linewidths=0.4, label="class 1")
        ax.set_xlim(lims)
        ax.set_ylim(lims)
        ax.set_aspect("equal")
        if r == 1:
            ax.set_xlabel("x₁ (standardised)")
        if c == 0:
            ax.set_ylabel("x₂ (standardised)")
axes[1, 0].legend(loc="lower right", fontsize=8, framealpha=0.9)
fig.suptitle(f"VIKING on two moons (linearised network, loss Jacobian, minibatches of "
             f"{BATCH_SIZE}, β = {BETA}): σ_ker = {sk.item():.2f}, σ_im = {si.item():.3f}")
fig.tight_layout(rect=(0, 0, 1, 0.97))
fig.savefig(FIGURES / "two_moons_posterior.png", dpi=90)
plt.close(fig)

# %% [markdown]
# ## Summary

# %%
print(f"SUMMARY two_moons: train accuracy MAP {map_acc:.3f}, VIKING BMA "
      f"{acc['full posterior'][0]:.3f} (per sample {acc['full posterior'][1]:.3f}, kernel-only "
      f"samples {acc['kernel component only'][1]:.3f}); logit std near the data {std_near:.2f} "
      f"vs far {std_far:.2f}; σ_im {si.item():.4f}, σ_ker {sk.item():.2f}; "
      f"{time.time() - t_start:.1f} s")
