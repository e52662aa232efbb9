"""Cost of one VIKING training step with all, the last layers', or LoRA adapters' parameters
latent, on a transformer classifier of a given width (``docs/partial_latents.md``).

    python scripts/partial_latents_cost.py --width 128 --layers 2

For each configuration: the latent dimension D, milliseconds per step (loss and gradients,
no optimiser update; mean over ``--steps`` minibatches of ``--batch`` sequences) and the peak
tensor memory allocated during one step (``torch.profiler`` CPU allocations, MB). Data are
random sequences (costs do not depend on the values); one torch thread.
"""

from __future__ import annotations

import argparse
import time

import pyro
import torch
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoDelta
from torch import nn
from torch.profiler import ProfilerActivity, profile

from pyro_viking import AutoViking, BayesianNetwork, TraceViking_ELBO
from pyro_viking.nn import LORA_LATENT, add_lora


class SequenceTransformer(nn.Module):
    """Tokens ``(B, T, F)`` → Linear → + positional embedding → ``layers`` encoder layers →
    LayerNorm → mean over T → Linear head."""

    def __init__(self, features, tokens, width, heads, layers, classes):
        super().__init__()
        self.embed, self.pos = nn.Linear(features, width), nn.Embedding(tokens, width)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(width, heads, dim_feedforward=2 * width, dropout=0.0,
                                       batch_first=True) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, classes)

    def forward(self, x):
        h = self.embed(x) + self.pos(torch.arange(x.shape[1]).expand(x.shape[0], -1))
        for layer in self.layers:
            h = layer(h)
        return self.head(self.norm(h).mean(1))


def step_cost(model, guide, elbo, x, y, steps):
    """(ms per step, peak MB) of ``elbo.loss_and_grads`` (warm-up steps excluded)."""
    for _ in range(2):
        elbo.loss_and_grads(model, guide, x, y)
    start = time.perf_counter()
    for _ in range(steps):
        elbo.loss_and_grads(model, guide, x, y)
    ms = 1e3 * (time.perf_counter() - start) / steps
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        elbo.loss_and_grads(model, guide, x, y)
    total = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        total += e.self_cpu_memory_usage
        peak = max(peak, total)
    return ms, peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--per-example", action="store_true",
                        help="also time the full model on the dense per-example backend")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pyro.set_rng_seed(0)
    net = SequenceTransformer(8, args.tokens, args.width, args.heads, args.layers, 10)
    x, y = torch.randn(8 * args.batch, args.tokens, 8), torch.randint(0, 10, (8 * args.batch,))
    adapted = [f"layers.{i}.linear{j}" for i in range(args.layers) for j in (1, 2)] + ["head"]
    last = [f"layers.{args.layers - 1}", "norm", "head"]
    configs = {
        "MAP (all weights)": (net, None, "map"),
        "VIKING, all weights": (net, None, "auto"),
        "VIKING, last encoder layer + norm + head": (net, last, "auto"),
        "VIKING, norm + head": (net, ["norm", "head"], "auto"),
        f"VIKING, LoRA rank {args.rank} (FFN + head)":
            (add_lora(net, adapted, rank=args.rank), LORA_LATENT, "auto"),
    }
    if args.per_example:
        configs["VIKING, all weights, per-example backend"] = (net, None, "per_example")
    print(f"{'configuration':46s} {'D':>8s} {'ms/step':>8s} {'peak MB':>8s}  backend")
    for name, (module, latent, backend) in configs.items():
        pyro.clear_param_store()
        bnn = BayesianNetwork(module, "classification", prior_scale=0.1, latent=latent,
                              fit_hidden=False, batch_size=args.batch)
        if backend == "map":
            guide, elbo = AutoDelta(bnn, init_loc_fn=bnn.init_loc_fn), Trace_ELBO()
        else:
            guide = AutoViking(bnn, init_loc_fn=bnn.init_loc_fn, backend=backend)
            elbo = TraceViking_ELBO()
        ms, mb = step_cost(bnn, guide, elbo, x, y, args.steps)
        D = sum(v.numel() for v in guide.median().values())
        print(f"{name:46s} {D:8d} {ms:8.1f} {mb:8.1f}  {getattr(guide, 'backend_used', '-')}")


if __name__ == "__main__":
    main()
