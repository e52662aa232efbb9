"""Cost of one SVI step of a ``BayesianNetwork`` (CNN or MLP): K = 4 vectorised particles vs K = 1.

The LeNet-like CNN of ``bench_models`` (1×28×28 inputs, 10 classes, ≈ 44k parameters;
``--quick``: a narrow one) wrapped by :class:`pyro_viking.BayesianNetwork` (learned prior
scale, plate of N = 8·B random inputs subsampled to B). Configurations, timed *interleaved* (one
step of each in turn, in a rotating order, ``--repeats`` rounds after ``--warmup`` rounds;
median and interquartile range in ms):

* ``MAP``: ``AutoDelta`` + ``Trace_ELBO`` (K = 1);
* ``AutoNormal K=1``: ``Trace_ELBO``;
* ``VIKING K=1``: ``AutoViking`` (default options) + ``TraceViking_ELBO``;
* ``VIKING K=4 vec``: the same with ``num_particles=4, vectorize_particles=True`` (one
  projection, one batched network call over 4 weight samples);
* ``VIKING K=4 vec vmap`` / ``loop``: the same with ``BayesianNetwork(weight_samples=...)``
  forced to ``torch.vmap`` or to one network call per weight sample (the default ``"auto"``
  picks the loop for LeNet's layer outputs on CPU and for the MLP's 269k weights);
* ``VIKING K=4 seq``: ``num_particles=4`` sequential (4 model runs, 4 minibatches);
* ``VIKING K=1 fixed prior``: ``prior_scale=0.1`` (a learned prior scale makes AutoViking run
  the model once more per step to read it);
* ``VIKING K=1 (PyroModule)``: the hand-written ``PyroSample`` BNN of ``bench_models`` (fixed
  prior scale, plate of B data), for the overhead of the wrapper.

Usage: ``python benchmarks/bench_bnn.py [--quick] [--net lenet|mlp] [--batch-size 128]
[--repeats 20] [--predict]``; ``--net mlp`` runs the 784-256-256-10 relu MLP instead of the CNN.

``--predict`` times prediction instead (issue #12: ``Predictive(num_samples=100)`` with a learned
prior scale ≤ 1.1× AutoNormal's): after a few SVI steps each, ``AutoNormal`` and ``AutoViking``
(its samples projected on the training set once, untimed, as ``project_training_data`` or the
lazy projection leaves them) each predict 100 samples on 512 new inputs, sequential and
``parallel=True``, interleaved as above.

Results (with the run each comes from): ``benchmarks/README.md``, "Results, fifth round".
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import pyro
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoDelta, AutoNormal, init_to_value

if __package__ in (None, ""):  # run as a script: import this checkout's packages
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import bench_models as bm  # noqa: E402
from pyro_viking import AutoViking, TraceViking_ELBO  # noqa: E402
from pyro_viking.nn.bayesian_network import BayesianNetwork  # noqa: E402


def make_runs(quick: bool, B: int, device: str, net_name: str = "lenet"):
    torch.manual_seed(0)
    N = 8 * B
    shape = (1, 28, 28) if net_name == "lenet" else (784,)
    x = torch.randn(N, *shape, device=device)
    y = torch.randint(0, 10, (N,), device=device)

    def lenet():
        torch.manual_seed(1)
        if net_name == "mlp":  # 784-256-256-10 relu, plain nn.Linear layers
            w = (784, 32, 32, 10) if quick else (784, 256, 256, 10)
            layers = []
            for a, b in zip(w[:-1], w[1:]):
                layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
            return torch.nn.Sequential(*layers[:-1]).to(device)
        net = bm.LeNet(2, 4, 12, 8, 10) if quick else bm.LeNet()
        return torch.nn.Sequential(net).to(device)  # plain nn.Linear/Conv2d subclasses

    runs = {}

    def add(name, guide_cls, elbo, model=None, init=None, prior="learned", samples="auto"):
        # a subclass per configuration: distinct param names in Pyro's param store
        cls = type(f"{guide_cls.__name__}_{len(runs)}", (guide_cls,), {})
        if model is None:
            model = BayesianNetwork(lenet(), "classification", prior_scale=prior,
                                    batch_size=B, name=f"bnn{len(runs)}", weight_samples=samples)
            init = model.init_loc_fn
        guide = cls(model, init_loc_fn=init)
        runs[name] = (SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), elbo), guide)

    add("MAP", AutoDelta, Trace_ELBO())
    add("AutoNormal K=1", AutoNormal, Trace_ELBO())
    add("VIKING K=1", AutoViking, TraceViking_ELBO())
    add("VIKING K=4 vec", AutoViking,
        TraceViking_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1))
    add("VIKING K=4 vec vmap", AutoViking,
        TraceViking_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1),
        samples="vmap")
    add("VIKING K=4 vec loop", AutoViking,
        TraceViking_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1),
        samples="loop")
    add("VIKING K=4 seq", AutoViking, TraceViking_ELBO(num_particles=4))
    add("VIKING K=1 fixed prior", AutoViking, TraceViking_ELBO(), prior=0.1)
    problem = "lenet" if net_name == "lenet" else "mlp_784_256_256_10"
    prob = bm.make_problem(problem, B, quick=quick, device=device, subsample_size=B)
    add("VIKING K=1 (PyroModule)", AutoViking, TraceViking_ELBO(), prob.model,
        init_to_value(values=prob.init_values))
    data = {name: (x, y) for name in runs}
    data["VIKING K=1 (PyroModule)"] = (prob.x, prob.y)
    return runs, data


def time_interleaved(fns: dict, rounds: int, warmup: int, device: str) -> dict:
    """Seconds per call of each of ``fns`` (name → callable): ``warmup`` untimed rounds, then
    ``rounds`` timed ones, each calling every function once in an order rotated by the round
    (so load changes fall on every configuration alike)."""
    times = {name: [] for name in fns}
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    names = list(fns)
    for rnd in range(warmup + rounds):
        for name in names[rnd % len(names):] + names[:rnd % len(names)]:
            sync()
            t = time.perf_counter()
            fns[name]()
            sync()
            if rnd >= warmup:
                times[name].append(time.perf_counter() - t)
    return times


def time_predictive(args) -> None:
    """Interleaved timing of Predictive(num_samples=100) on 512 inputs: AutoNormal vs
    AutoViking (learned prior scale; projection done beforehand, untimed)."""
    runs, data = make_runs(args.quick, args.batch_size, args.device, args.net)
    x, y = data["VIKING K=1"]
    x_new = torch.randn((512,) + x.shape[1:], device=x.device)
    S = 10 if args.quick else 100
    predictors = {}
    for name in ("AutoNormal K=1", "VIKING K=1"):
        svi, guide = runs[name]
        for _ in range(3):
            svi.step(x, y)
        if name.startswith("VIKING"):
            guide.project_training_data(x, y, num_samples=S)
        for parallel in (False, True):
            label = f"{name.split()[0]}{' parallel' if parallel else ''}"
            predictors[label] = Predictive(svi.model, guide=guide, num_samples=S,
                                           parallel=parallel, return_sites=["logits"])
    rounds = max(3, args.repeats // 4)
    with torch.no_grad():
        times = time_interleaved({name: (lambda p=p: p(x_new)) for name, p in predictors.items()},
                                 rounds, 1, args.device)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    label = "LeNet" if args.net == "lenet" else "MLP 784-256-256-10"
    print(f"{label}{' (quick)' if args.quick else ''}: Predictive(num_samples={S}) on 512 inputs, "
          f"device {args.device}, {args.threads} thread(s), {rounds} interleaved rounds")
    for name, m in med.items():
        ref = med["AutoNormal parallel" if "parallel" in name else "AutoNormal"]
        print(f"{name:<22} {1e3 * m:>9.1f} ms {m / ref:>6.2f}× AutoNormal")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--net", choices=("lenet", "mlp"), default="lenet",
                    help="the LeNet-like CNN or the 784-256-256-10 relu MLP")
    ap.add_argument("--predict", action="store_true",
                    help="time Predictive(num_samples=100) instead of the SVI step")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    pyro.set_rng_seed(0)
    if args.predict:
        return time_predictive(args)
    runs, data = make_runs(args.quick, args.batch_size, args.device, args.net)
    times = time_interleaved({name: (lambda n=name: runs[n][0].step(*data[n])) for name in runs},
                             args.repeats, args.warmup, args.device)
    base = statistics.median(times["VIKING K=1"])
    label = "LeNet" if args.net == "lenet" else "MLP 784-256-256-10"
    print(f"{label}{' (quick)' if args.quick else ''}, B = {args.batch_size}, device "
          f"{args.device}, {args.threads} thread(s), {args.repeats} interleaved rounds")
    print(f"{'configuration':<26} {'median ms':>10} {'IQR ms':>14} {'× VIKING K=1':>13} backend")
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=4)
        backend = getattr(runs[name][1], "backend_used", "") or ""
        print(f"{name:<26} {1e3 * statistics.median(ts):>10.1f} "
              f"{1e3 * q[0]:>6.1f}–{1e3 * q[2]:<6.1f} {statistics.median(ts) / base:>13.2f} "
              f"{backend}")


if __name__ == "__main__":
    main()
