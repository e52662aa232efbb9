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
# # VIKING on a small transformer, and on part of it
#
# A transformer classifier reads each of scikit-learn's 8 × 8 digit images as a sequence of
# **8 tokens** (its rows) of 8 features: a linear token embedding, a learned positional
# embedding (`nn.Embedding`), one `nn.TransformerEncoderLayer` (multi-head self-attention,
# feed-forward, two `nn.LayerNorm`), a final `LayerNorm`, mean pooling over the tokens and a
# linear head. `BayesianNetwork` turns it into a Pyro model with no change to the module.
#
# VIKING's posterior is q(θ) = N(θ̂, σ_ker² P + σ_im² (I − P)), P the projector onto the kernel
# of the per-datum loss Jacobian J. The exact **layer-Gram** backend builds J Jᵀ from one
# forward and one backward pass, layer by layer; it has rules for every layer here — the
# attention's packed input projection and output projection (linear maps on sequences,
# recomputed from the attention module's inputs), the LayerNorm gains and biases, and the
# embedding lookup — each checked against the dense Jacobian in `tests/linalg/`. The guide picks
# it automatically.
#
# We then fit VIKING on **part** of the trained network (`docs/partial_latents.md`):
#
# * the **last layers** (final LayerNorm and head) of the trained network, the rest frozen;
# * **LoRA adapters** (rank-4 matrices A, B with ΔW = B A) added to the frozen trained network's
#   feed-forward layers and head, the adapters the only latents.
#
# and compare accuracy, NLL and calibration (ECE) to the MAP network, with the cost of a step.

# %%
# ruff: noqa: E402
import copy
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
from pyro.infer import Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoDelta, init_to_value
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.profiler import ProfilerActivity, profile

import pyro_viking.metrics as ev
from pyro_viking import AutoViking, BayesianNetwork, TraceViking_ELBO, fit_viking
from pyro_viking.nn import LORA_LATENT, add_lora

# %% [markdown]
# ## Settings
#
# `SMOKE_TEST=1` (used by the test suite) shrinks every budget so the script runs in well under
# a minute; its numbers are then meaningless. Figures go to `tutorials/figures/` unless
# `PYRO_VIKING_FIGURES` names another folder. `TUTORIAL_SEED` (default 0) sets the seed of the
# initialisation and of the training noise (the train/test split stays the same).

# %%
SMOKE_TEST = os.environ.get("SMOKE_TEST") == "1"
BATCH_SIZE = 64
MAP_EPOCHS = 2 if SMOKE_TEST else 60  # MAP warm-up of the whole network
VIKING_EPOCHS = 1 if SMOKE_TEST else 20  # full-ELBO epochs of the trained VIKING fits
LORA_WARMUP_EPOCHS = 1 if SMOKE_TEST else 5  # MAP epochs of the adapters
NUM_SAMPLES = 8 if SMOKE_TEST else 100  # posterior samples for prediction
TIMING_STEPS = 2 if SMOKE_TEST else 20  # steps averaged per cost measurement
LR = 3e-3
LORA_RANK = 4
DATA_SEED = 0  # the train/test split
SEED = int(os.environ.get("TUTORIAL_SEED", "0"))  # initialisation and training noise

if "__file__" in globals():
    _default_figures = Path(__file__).resolve().parent / "figures"
else:  # inside a notebook
    _default_figures = Path("figures")
FIGURES = Path(os.environ.get("PYRO_VIKING_FIGURES", _default_figures))
FIGURES.mkdir(parents=True, exist_ok=True)
torch.set_num_threads(1)  # small matrices: extra threads only add synchronisation

# %% [markdown]
# ## Data: digit images as sequences of 8 rows
#
# 1797 images, pixels scaled to [0, 1], split 75 % / 25 % (stratified, fixed seed). An image
# `(64,)` becomes the sequence `(8, 8)`: token t is row t of the image.

# %%
digits = load_digits()
X = torch.tensor(digits.data / 16.0, dtype=torch.float32).reshape(-1, 8, 8)
Y = torch.tensor(digits.target, dtype=torch.long)
x_train, x_test, y_train, y_test = (torch.as_tensor(a) for a in train_test_split(
    X.numpy(), Y.numpy(), test_size=0.25, stratify=Y.numpy(), random_state=DATA_SEED))
STEPS_PER_EPOCH = -(-len(x_train) // BATCH_SIZE)
print(f"train {tuple(x_train.shape)}, test {tuple(x_test.shape)}")


# %% [markdown]
# ## The network
#
# An ordinary `nn.Module`. The positional embedding is looked up at the positions *expanded to
# the batch*, `(B, T)`, so that every lookup has a data dimension (the layer-Gram rule needs
# one row per datum; `pos(arange(T))` broadcast over the batch would send the guide to the
# slower per-example backend). Dropout is 0 (VIKING needs a deterministic network).

# %%
class DigitTransformer(nn.Module):
    def __init__(self, features=8, tokens=8, width=32, heads=4, classes=10):
        super().__init__()
        self.embed, self.pos = nn.Linear(features, width), nn.Embedding(tokens, width)
        self.layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=2 * width,
                                                dropout=0.0, batch_first=True)
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, classes)

    def forward(self, x):  # (B, T, features) -> (B, classes)
        pos = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
        h = self.layer(self.embed(x) + self.pos(pos))
        return self.head(self.norm(h).mean(1))


pyro.set_rng_seed(SEED)
net = DigitTransformer()
print(f"D = {sum(p.numel() for p in net.parameters())} parameters")

# %% [markdown]
# ## The cost of a step
#
# For each model below we time the loss and gradients of one training step (the optimiser's update
# excluded) on minibatches of 64, averaged over repeated steps, and record the peak of the tensor
# memory allocated during one step (`torch.profiler`, CPU allocations; the parameters and the
# optimiser's state, O(D) numbers, come on top). "per-example backend" is the same full model
# with the dense per-example Jacobian that the guide would fall back to without the layer rules.

# %%
def step_cost(model, guide, elbo):
    """(milliseconds, peak MB) of `elbo.loss_and_grads` on the training set's minibatches."""
    for _ in range(2):
        elbo.loss_and_grads(model, guide, x_train, y_train)
    start = time.perf_counter()
    for _ in range(TIMING_STEPS):
        elbo.loss_and_grads(model, guide, x_train, y_train)
    ms = 1e3 * (time.perf_counter() - start) / TIMING_STEPS
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        elbo.loss_and_grads(model, guide, x_train, y_train)
    total = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        total += e.self_cpu_memory_usage
        peak = max(peak, total)
    for p in pyro.get_param_store().values():
        p.grad = None
    return ms, peak / 2**20


# %% [markdown]
# ## MAP, then VIKING on every weight
#
# `fit_viking` runs the library recipe: a MAP warm-up (`AutoDelta`, here 60 epochs: the MAP
# network we compare with), then the scales σ_im and s = σ_ker from the curvature at the MAP
# (no training step), then the full ELBO (`TraceViking_ELBO`, β = `DEFAULT_BETA`). We fit two
# posteriors on every weight: **post-hoc** (`num_steps=0`: the posterior at the MAP with the
# curvature scales, no ELBO step, as a Laplace approximation is post-hoc) and **trained**
# (20 more epochs of the ELBO from the MAP, `map_values=`). The prior scale s is learned
# (`prior_scale="learned"`). Each posterior is evaluated, and its step cost measured, right
# after its fit: the guides share Pyro's parameter names, and the next fit starts afresh.

# %%
def bnn_of(module, **kw):
    return BayesianNetwork(module, "classification", prior_scale="learned",
                           batch_size=BATCH_SIZE, **kw)


def predict(model, guide):
    """(S, N, C) class probabilities on the test set, after projecting the prediction samples
    on the kernel of the training set's Jacobian."""
    guide.project_training_data(x_train, y_train, num_samples=NUM_SAMPLES)
    with torch.no_grad():
        logits = Predictive(model, guide=guide, num_samples=NUM_SAMPLES,
                            return_sites=["logits"])(x_test)["logits"]
    return logits.reshape(NUM_SAMPLES, len(x_test), -1).softmax(-1)


def viking(model, name, epochs=0, **kw):
    """`fit_viking` for `epochs` ELBO epochs (0: post-hoc); test probabilities in `probs`."""
    fit = fit_viking(model, x_train, y_train, num_steps=epochs * STEPS_PER_EPOCH,
                     optim=pyro.optim.Adam({"lr": LR}), progress=False, **kw)
    probs[name] = predict(model, fit.guide)
    dims[name] = fit.guide.latent_dim
    return fit


probs, dims, costs = {}, {}, {}
full = bnn_of(net)
start = time.perf_counter()
fit = viking(full, "all weights, post-hoc", warmup_steps=MAP_EPOCHS * STEPS_PER_EPOCH)
print(f"MAP and post-hoc fit in {time.perf_counter() - start:.0f} s; Jacobian backend: "
      f"{fit.guide.backend_used}")
trained = copy.deepcopy(full.set_weights(fit.map_values))  # the MAP network
with torch.no_grad():
    probs["MAP"] = trained(x_test).softmax(-1)[None]
dims["MAP"] = fit.guide.latent_dim
costs["all weights"] = step_cost(full, fit.guide, TraceViking_ELBO())
at_map = init_to_value(values=fit.map_values)
costs["MAP"] = step_cost(full, AutoDelta(full, init_loc_fn=at_map), Trace_ELBO())
dense = AutoViking(full, init_loc_fn=at_map, backend="per_example")
costs["all weights, per-example backend"] = step_cost(full, dense, TraceViking_ELBO())
dims["all weights, per-example backend"] = dense.latent_dim
viking(bnn_of(copy.deepcopy(trained)), "all weights, 20 ELBO epochs", VIKING_EPOCHS,
       map_values=fit.map_values)

# %% [markdown]
# ## VIKING on the last layers of the trained network
#
# `latent=["norm", "head"]` makes only the final LayerNorm and the head latent;
# `fit_hidden=False` keeps every other parameter a constant at its trained value (with
# `fit_hidden=True` they would be trained as point estimates alongside). The MAP values of the
# chosen layers are the start (`map_values`: no warm-up); post-hoc, then trained.

# %%
def last_layers():
    return bnn_of(copy.deepcopy(trained), latent=["norm", "head"], fit_hidden=False)


last = last_layers()
at_map = {s: fit.map_values[s] for s in last.latent_sites}
fit_last = viking(last, "last layers, post-hoc", map_values=at_map)
costs["last layers"] = step_cost(last, fit_last.guide, TraceViking_ELBO())
viking(last_layers(), "last layers, 20 ELBO epochs", VIKING_EPOCHS, map_values=at_map)

# %% [markdown]
# ## VIKING on LoRA adapters of the frozen network
#
# `add_lora` copies the trained network, freezes all of it, and wraps the chosen `nn.Linear`
# layers as `W₀ x + b₀ + B A x` with rank-4 adapters `A` (`lora_a`) and `B` (`lora_b`, zero at
# the start, so the copy computes what the trained network does). `latent=LORA_LATENT` makes
# the adapter matrices the latents. At `B = 0` the Jacobian w.r.t. `A` vanishes, so a short MAP
# warm-up of the adapters (5 epochs) comes first, then the post-hoc posterior.
# (The attention's own projections are applied inside `F.multi_head_attention_forward`, not
# as modules, so they cannot be wrapped this way.)

# %%
lora = bnn_of(add_lora(trained, ["layer.linear1", "layer.linear2", "head"], rank=LORA_RANK),
              latent=LORA_LATENT)
fit_lora = viking(lora, "LoRA adapters, post-hoc",
                  warmup_steps=LORA_WARMUP_EPOCHS * STEPS_PER_EPOCH)
costs["LoRA adapters"] = step_cost(lora, fit_lora.guide, TraceViking_ELBO())


# %% [markdown]
# ## Results
#
# Test accuracy, NLL and ECE of the Bayesian model average (S = 100 samples), and the cost of
# one training step of each set of latents.

# %%
probs = {"MAP": probs.pop("MAP"), **probs}  # MAP first
costs = {"MAP": costs.pop("MAP"), **costs}
metrics = {name: ev.classification_metrics(p, y_test) for name, p in probs.items()}
print(f"{'posterior':32s} {'D':>6s} {'acc':>6s} {'NLL':>6s} {'ECE':>6s}")
for name, m in metrics.items():
    print(f"{name:32s} {dims[name]:6d} {m['accuracy']:6.3f} {m['nll']:6.3f} {m['ece']:6.3f}")
print(f"\n{'step of':32s} {'ms':>6s} {'peak MB':>8s}")
for name, (ms, mb) in costs.items():
    print(f"{name:32s} {ms:6.1f} {mb:8.1f}")

fig, axes = plt.subplots(2, 3, figsize=(12, 8))
for ax, (name, p) in zip(axes.flat, probs.items()):
    ev.reliability_diagram(ax, p, y_test, title=name)
fig.tight_layout()
fig.savefig(FIGURES / "transformer_reliability.png", dpi=80)
plt.close(fig)

# %% [markdown]
# One seed on a shared 2-core CPU: `docs/tutorials.md` quotes a run and what it shows, and
# `docs/partial_latents.md` the recipe and its costs.

# %%
nll = {n: m["nll"] for n, m in metrics.items()}
ms = {n: c[0] for n, c in costs.items()}
print(f"SUMMARY transformer: NLL MAP {nll['MAP']:.3f}, all post-hoc "
      f"{nll['all weights, post-hoc']:.3f}, all ELBO {nll['all weights, 20 ELBO epochs']:.3f}, "
      f"last post-hoc {nll['last layers, post-hoc']:.3f}, LoRA post-hoc "
      f"{nll['LoRA adapters, post-hoc']:.3f}; ms/step MAP {ms['MAP']:.1f}, all "
      f"{ms['all weights']:.1f} (per-example {ms['all weights, per-example backend']:.1f}), "
      f"last {ms['last layers']:.1f}, LoRA {ms['LoRA adapters']:.1f}")
