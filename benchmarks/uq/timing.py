"""Seconds per pass over the data, interleaved in one process (``run.py --timing``).

The main run's ``epoch_seconds`` are measured method after method, so on a shared machine their
ratios absorb changes of load. Here one epoch of each method (MAP, IVON, AutoNormal, VIKING,
``VIKING module``: the same ELBO steps taken by ``fit_viking(engine="module")``'s engine, the
ELBO module and ``torch.optim``, and Pyro's ``AutoDelta`` MAP on VIKING's own
``BayesianNetwork``: what any Pyro SVI step costs on this model) is timed in turn,
``TIMING_ROUNDS`` times, and the median per method is reported, with the ratios of issue #12
(VIKING ÷ IVON per pass; issue #22: ``VIKING module`` ÷ IVON). Settings are the main run's
(batch size, K = 1, the VIKING model and options of ``viking_fit``: a ``BayesianNetwork`` with
a learned prior scale); every method starts at a MAP point fitted for two untimed epochs, so
VIKING's Jacobians are those of a trained-ish network.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import replace

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoDelta, AutoNormal, init_to_value

from benchmarks.uq.methods import _batches, _new_net, _nll, run_svi, train_map
from benchmarks.uq.protocol import budget_for
from benchmarks.uq.pyro_models import PyroBNN
from benchmarks.uq.tasks import load_task
from benchmarks.uq.viking_fit import DEFAULT_GAMMA, DEFAULT_OPTIONS, make_bnn
from pyro_viking import AutoViking, TraceViking_ELBO
from pyro_viking.infer.recipe.engine import ModuleStepper

#: interleaved rounds (full, quick): short epochs move with the machine's load, and a median over
#: few rounds moved the VIKING / IVON ratio between runs (README: "Cost per pass")
TIMING_ROUNDS = {False: 9, True: 2}


def _epoch_fns(task, budget):
    """One-epoch closures of each method, all started from one trained-ish network."""
    import ivon  # optional: the benchmark's extra packages (setup.sh)

    net, log_noise, _ = train_map(task, 0, 1.0, replace(budget, epochs=2))
    values = {f"net.{n}": p.detach().clone() for n, p in net.named_parameters()}
    n, gen = len(task.x_fit), torch.Generator().manual_seed(0)
    map_opt = torch.optim.Adam(net.parameters(), lr=budget.lr)
    ivon_net = _new_net(task, 0)
    ivon_net.load_state_dict(net.state_dict())
    ivon_opt = ivon.IVON(ivon_net.parameters(), lr=budget.ivon_lr, ess=n)

    def map_epoch():
        for idx in _batches(n, budget.batch_size, gen):
            map_opt.zero_grad()
            _nll(task, net(task.x_fit[idx]), task.y_fit[idx], log_noise).backward()
            map_opt.step()

    def ivon_epoch():
        for idx in _batches(n, budget.batch_size, gen):
            with ivon_opt.sampled_params(train=True):
                ivon_opt.zero_grad()
                _nll(task, ivon_net(task.x_fit[idx]), task.y_fit[idx], log_noise).backward()
            ivon_opt.step()

    fns = {"MAP": map_epoch, "IVON": ivon_epoch}
    model = PyroBNN(_new_net(task, 0), task.kind, 1.0)
    guide = AutoNormal(model, init_loc_fn=init_to_value(values=values), init_scale=1e-2)
    fns["AutoNormal"] = lambda: run_svi(model, guide, Trace_ELBO(), task, 1, budget)
    bnn = make_bnn(task, 0, budget.batch_size)
    bnn.net.load_state_dict(net.state_dict())  # the trained-ish start, as the others
    viking = AutoViking(bnn, init_loc_fn=bnn.init_loc_fn, gamma=DEFAULT_GAMMA, **DEFAULT_OPTIONS)
    svi = SVI(bnn, viking, pyro.optim.Adam({"lr": budget.lr}), TraceViking_ELBO(beta=0.01))
    steps = math.ceil(n / budget.batch_size)

    def viking_epoch():
        for _ in range(steps):
            svi.step(task.x_fit, task.y_fit)

    fns["VIKING"] = viking_epoch
    fns["VIKING module"] = _module_epoch(task, budget, net, steps)
    # Pyro's own MAP on the very model VIKING trains: what any Pyro guide's step costs here
    map_bnn = make_bnn(task, 0, budget.batch_size)
    map_bnn.net.load_state_dict(net.state_dict())
    delta = AutoDelta(map_bnn, init_loc_fn=map_bnn.init_loc_fn)
    map_svi = SVI(map_bnn, delta, pyro.optim.Adam({"lr": budget.lr}), Trace_ELBO())
    fns["AutoDelta"] = lambda: [map_svi.step(task.x_fit, task.y_fit) for _ in range(steps)]
    return fns


def _module_epoch(task, budget, net, steps):
    """One epoch of VIKING's ELBO steps on the module engine (``ModuleStepper``: the steps of
    ``SVI``, without its per-parameter optimisers), on a copy of the benchmark's model, in a
    param store scope of its own (its guide's parameters have the ``SVI`` guide's names)."""
    store = pyro.get_param_store()
    with store.scope() as state:
        bnn = make_bnn(task, 0, budget.batch_size)
        bnn.net.load_state_dict(net.state_dict())
        guide = AutoViking(bnn, init_loc_fn=bnn.init_loc_fn, gamma=DEFAULT_GAMMA,
                           **DEFAULT_OPTIONS)
        stepper = ModuleStepper(bnn, guide, pyro.optim.Adam({"lr": budget.lr}),
                                TraceViking_ELBO(beta=0.01))

    def epoch():
        with store.scope(state):
            for _ in range(steps):
                stepper.step(task.x_fit, task.y_fit)

    return epoch


def run_timing(args) -> dict:
    out = {}
    for task_name in args.tasks:
        pyro.clear_param_store()  # guide parameters are named per guide class, not per task
        task = load_task(task_name).to(args.device)
        budget = budget_for(task_name, args.quick)
        fns = _epoch_fns(task, budget)
        # a GPU runs asynchronously: wait for its queue around every timed epoch
        sync = torch.cuda.synchronize if task.x_fit.is_cuda else (lambda: None)
        for fn in fns.values():  # one untimed epoch each (start-up costs)
            fn()
        times = {k: [] for k in fns}
        for _ in range(TIMING_ROUNDS[args.quick]):
            for name, fn in fns.items():
                sync()
                start = time.perf_counter()
                fn()
                sync()
                times[name].append(time.perf_counter() - start)
        med = {k: statistics.median(v) for k, v in times.items()}
        out[task_name] = {"seconds_per_epoch": med,
                          "viking_over_ivon": med["VIKING"] / med["IVON"],
                          "viking_over_map": med["VIKING"] / med["MAP"],
                          "viking_over_autonormal": med["VIKING"] / med["AutoNormal"],
                          "viking_over_autodelta": med["VIKING"] / med["AutoDelta"],
                          "viking_module_over_ivon": med["VIKING module"] / med["IVON"],
                          "viking_module_over_viking": med["VIKING module"] / med["VIKING"],
                          "steps_per_epoch": math.ceil(len(task.x_fit) / budget.batch_size),
                          "device": str(task.x_fit.device)}
        print(task_name, json.dumps(out[task_name]), flush=True)
    (args.out / "timing.json").write_text(json.dumps(out, indent=1))
    return out
