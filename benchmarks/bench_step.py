#!/usr/bin/env python
"""Cost of one AutoViking SVI step against its peers, and the Jacobian backends' projections.

    python benchmarks/bench_step.py            # full run: < 10 min on 2 CPU cores
    python benchmarks/bench_step.py --quick    # tiny sizes, a smoke test (< 30 s)

Three sections (``--sections``):

``step``
    One SVI step (``svi.step``) on one fixed minibatch of B data (the data plate covers the
    whole batch, so every method does the same work every step) for AutoViking +
    TraceViking_ELBO (backend ``auto``; the default ``grad_through_projection=False`` and
    the paper's gradient through P, ``True``), relative to MAP (AutoDelta + Trace_ELBO, one
    particle), to a plain PyTorch forward/backward/Adam step of the same network, and to
    AutoNormal with Trace_ELBO and the same number of particles K
    (AutoLowRankMultivariateNormal(rank=10) at the first K).
    K > 1 uses ``vectorize_particles=True`` (the models' layers accept particle-batched weights,
    see ``bench_models.py``). Every K of a problem is timed in the same interleaved rounds; a
    final table gives the ratios the speed issue's acceptance names (the default stop-grad
    step and the step through P / AutoNormal at K=1, K=4 / K=1, and ‖JPε‖/‖Jε‖ of the default
    projection at the trained θ̂).
``accuracy``
    For each Jacobian backend and solver: time of ``build_projector`` +
    ``kernel_and_image`` of 2 vectors (the kernel parts of 2 vectors and 2 image draws: what
    a step with 2 particles does), and the accuracy ``‖J Pε‖ / ‖J ε‖`` measured with a float64
    Jacobian-vector product of the model's rows function (backend-independent reference).
``memory``
    Peak memory added by building the projector and drawing 2 vectors so, per route and batch
    size, each in a fresh subprocess (``bench_step_memory.py``; Linux: peak RSS reset through
    ``/proc/self/clear_refs``; CUDA: ``torch.cuda.max_memory_allocated``).

Timing protocol: every method is warmed up (2 steps), then ``--repeats`` rounds, interleaved
(the order rotates each round), each round timing several consecutive steps; the tables give
the median over rounds. One intra-op thread by default (``--threads``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from typing import Callable, List

import pyro
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import (
    AutoDelta,
    AutoLowRankMultivariateNormal,
    AutoNormal,
    init_to_value,
)

if __package__ in (None, ""):  # run as a script: import this checkout's packages
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_models import PROBLEMS, dense_bytes, make_problem  # noqa: E402
from benchmarks.bench_step_memory import memory_section  # noqa: E402
from benchmarks.harness import (  # noqa: E402
    device_sync,
    format_ratio,
    print_table,
    time_interleaved,
)
from pyro_viking import AutoViking, TraceViking_ELBO  # noqa: E402
from pyro_viking.infer.autoguide.projector_choice import build_projector  # noqa: E402
from pyro_viking.model_trace.layout import LatentLayout  # noqa: E402
from pyro_viking.model_trace.rows import make_rows_fn  # noqa: E402


# --------------------------------------------------------------------------- steppers
def torch_stepper(prob) -> Callable[[], None]:
    opt = torch.optim.Adam(prob.torch_net.parameters(), lr=1e-3)

    def step():
        opt.zero_grad()
        prob.torch_loss().backward()
        opt.step()

    return step


def svi_stepper(prob, guide, elbo) -> Callable[[], float]:
    svi = SVI(prob.model, guide, pyro.optim.Adam({"lr": 1e-3}), elbo)
    return lambda: svi.step(prob.x, prob.y)


# --------------------------------------------------------------------------- step section
DEFAULT, THROUGH = "AutoViking default (stop-grad P)", "AutoViking grad through P"


def _named(cls, label: str, K: int):
    """A subclass of guide ``cls`` with its own name (its own param-store prefix), so that all
    guides of a table train side by side in one param store."""
    return type(f"{cls.__name__}_{label.replace(' ', '_')}_K{K}", (cls,), {})


def _guides(prob, K: int, with_lowrank: bool):
    """label -> (guide, ELBO class) for K particles."""
    init = init_to_value(values=prob.init_values)
    vik = dict(init_loc_fn=init)
    out = {"AutoNormal": (_named(AutoNormal, "n", K)(prob.model, init_loc_fn=init), Trace_ELBO)}
    if with_lowrank:
        out["AutoLowRankMVN(rank=10)"] = (_named(AutoLowRankMultivariateNormal, "lr", K)(
            prob.model, init_loc_fn=init, rank=10), Trace_ELBO)
    out[DEFAULT] = (_named(AutoViking, "stop", K)(prob.model, grad_through_projection=False, **vik),
                 TraceViking_ELBO)
    out[THROUGH] = (_named(AutoViking, "through", K)(prob.model, grad_through_projection=True,
                                                      **vik), TraceViking_ELBO)
    return out


def _default_accuracy(prob, loc: torch.Tensor) -> float:
    """``max ‖J Pε‖ / ‖J ε‖`` over 2 random ε of the default projection (backend and solver
    ``auto``, default refinement) at ``loc``, against a float64 Jacobian-vector product."""
    model, x, y = prob.model, prob.x, prob.y
    layout = LatentLayout.from_trace(poutine.trace(model).get_trace(x, y))
    loc = loc.detach()
    E = torch.randn(2, loc.numel(), generator=torch.Generator().manual_seed(1)).to(loc)
    with torch.no_grad():
        proj = build_projector(model, layout, (x, y), {}, loc, differentiable=False)
        PE, _ = proj.kernel_and_image(E)
    jv = _jvp64(prob, layout, loc)
    return float((torch.stack([jv(v) for v in PE]).norm(dim=-1)
                  / torch.stack([jv(e) for e in E]).norm(dim=-1)).max())


def _jvp64(prob, layout, loc):
    """``v ↦ J v`` in float64 (the model's rows function converted to float64)."""
    y64 = prob.y if prob.classification else prob.y.double()
    fn64 = make_rows_fn(prob.model, layout, (prob.x.double(), y64))
    z64 = loc.double()
    return lambda v: torch.func.jvp(fn64, (z64,), (v.double(),))[1]


def step_section(args) -> None:
    """One interleaved table per problem (every K in it, so that K-ratios are measured in the
    same rounds), then the acceptance summary of the speed issue."""
    sync = device_sync(args.device)
    summary = []
    for name in args.problems:
        prob = make_problem(name, args.batch_size, quick=args.quick, device=args.device,
                            map_steps=args.map_steps)
        init = init_to_value(values=prob.init_values)
        pyro.clear_param_store()
        steppers = {
            ("torch MAP step", 1): torch_stepper(prob),
            ("MAP (AutoDelta)", 1): svi_stepper(prob, AutoDelta(prob.model, init_loc_fn=init),
                                                Trace_ELBO(max_plate_nesting=1)),
        }
        guides = {}
        for K in args.particles:
            elbo_kw = dict(num_particles=K, vectorize_particles=K > 1, max_plate_nesting=1)
            for label, (guide, elbo_cls) in _guides(prob, K, K == args.particles[0]).items():
                guides[label, K] = guide
                steppers[label, K] = svi_stepper(prob, guide, elbo_cls(**elbo_kw))
        med, counts = time_interleaved(steppers, repeats=args.repeats,
                                       target_s=args.target_seconds, sync=sync)
        K1 = args.particles[0]
        rows = []
        for (label, K), t in med.items():
            backend = getattr(guides.get((label, K)), "backend_used", None)
            own1 = med.get((label, K1))
            rows.append([label + (f" [{backend}]" if backend else ""), K, f"{t * 1e3:.2f}",
                         counts[label, K], format_ratio(t / med["torch MAP step", 1]),
                         format_ratio(t / med["MAP (AutoDelta)", 1]),
                         format_ratio(t / med.get(("AutoNormal", K), float("nan"))),
                         format_ratio(t / own1) if own1 and K != K1 else ""])
        print_table(
            f"SVI step, {PROBLEMS[name]}{' (quick)' if args.quick else ''}, "
            f"D={prob.num_params}, B={args.batch_size}, K particles (K > 1 vectorised); "
            f"median of {args.repeats} interleaved rounds",
            ["method", "K", "ms/step", "steps/round", "x torch MAP", "x MAP (AutoDelta)",
             "x AutoNormal (same K)", f"x own K={K1}"], rows)
        acc = _default_accuracy(prob, guides[DEFAULT, K1].loc)
        summary.append((name, prob.num_params, med, acc))
    _acceptance_table(args, summary)


def _acceptance_table(args, summary) -> None:
    """The ratios the speed issue's acceptance names, one row per problem and setting."""
    K1, Ks = args.particles[0], args.particles[1:]
    rows = []
    for name, D, med, acc in summary:
        for label in (DEFAULT, THROUGH):
            row = [f"{PROBLEMS[name]} (D={D})", label,
                   format_ratio(med[label, K1] / med["AutoNormal", K1])]
            row += [format_ratio(med[label, K] / med[label, K1]) for K in Ks]
            row.append(f"{acc:.1e}" if label == DEFAULT else "(same route)")
            rows.append(row)
    print_table(
        f"Acceptance ratios (B={args.batch_size}; same interleaved rounds as the tables above)",
        ["problem", "AutoViking", f"K={K1} step / AutoNormal K={K1}"]
        + [f"K={K} vectorised / K={K1}" for K in Ks] + ["max |JPe|/|Je| (default route)"],
        rows)


# --------------------------------------------------------------------------- accuracy section
def _backends(args, B: int, D: int, dtype: torch.dtype):
    """(label, backend, solver options, projection passes)."""
    out = [("layer_gram (default: cholesky, refined if > 1e-6)", "layer_gram", {}, 1),
           ("layer_gram, no refinement", "layer_gram", {"refine": 0}, 1),
           ("layer_gram, eigh", "layer_gram", {"solver": "eigh"}, 1)]
    if dense_bytes(B, D) <= args.max_dense_mb * 2**20:
        out.append(("per_example", "per_example", {}, 1))
    out.append(("matrix_free, CG rtol=1e-6 (default)", "matrix_free", {}, 1))
    out.append(("matrix_free, CG maxiter=10", "matrix_free", {"maxiter": 10}, 1))
    return out


def accuracy_section(args) -> None:
    for name in args.problems:
        _accuracy_problem(args, name)


def _accuracy_problem(args, name: str) -> None:
    """One table: every backend's time and accuracy on one problem."""
    sync = device_sync(args.device)
    prob = make_problem(name, args.batch_size, quick=args.quick, device=args.device,
                        map_steps=args.map_steps)
    model, x, y = prob.model, prob.x, prob.y
    layout = LatentLayout.from_trace(poutine.trace(model).get_trace(x, y))
    loc = layout.pack(prob.init_values).detach()
    B, D = x.shape[0], loc.numel()
    gen = torch.Generator(device="cpu").manual_seed(1)
    E = torch.randn(2, D, generator=gen).to(loc)
    y64 = y if prob.classification else y.double()
    fn64 = make_rows_fn(model, layout, (x.double(), y64))
    z64 = loc.double()

    def jv(v):
        return torch.func.jvp(fn64, (z64,), (v.double(),))[1]

    JE64 = torch.stack([jv(e) for e in E])
    JE = JE64.norm(dim=-1)
    # what float32 itself allows: a route exact for the float32 J still leaves about
    # ‖(J32 − J64) ε‖ / ‖J64 ε‖ (J32 by a float32 jvp)
    fn32 = make_rows_fn(model, layout, (x, y))
    JE32 = torch.stack([torch.func.jvp(fn32, (loc,), (e,))[1] for e in E]).double()
    floor = float(((JE32 - JE64).norm(dim=-1) / JE).max())
    results, steppers = {}, {"torch MAP step": torch_stepper(prob)}
    for label, backend, opts, passes in _backends(args, B, D, loc.dtype):
        def run(backend=backend, opts=opts, label=label, passes=passes):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # CG's ConvergenceWarning: reported below
                opts = dict(opts)
                solver = opts.pop("solver", "auto")
                proj = build_projector(model, layout, (x, y), {}, loc, backend=backend,
                                       solver=solver, solver_options=opts,
                                       differentiable=False, check=False)
                PE = E
                for _ in range(passes):
                    PE, _ = proj.kernel_and_image(PE)
                results[label] = (proj, PE)

        steppers[label] = run
    med, counts = time_interleaved(steppers, repeats=max(3, args.repeats // 2),
                                   target_s=args.target_seconds, sync=sync, max_steps=10)
    rows = []
    for label, *_ in _backends(args, B, D, loc.dtype):
        proj, PE = results[label]
        acc = float((torch.stack([jv(v) for v in PE]).norm(dim=-1) / JE).max())
        info = proj.info
        detail = (f"CG {info.iterations} it" if info.method == "cg"
                  else f"{info.method}, rank {info.rank}, {info.refinements} refinement"
                       f"{'' if info.refinements == 1 else 's'}")
        rows.append([label, proj.operator.backend_name, f"{acc:.1e}", detail,
                     f"{med[label] * 1e3:.1f}", format_ratio(med[label] / med["torch MAP step"])])
    print_table(
        f"Projection accuracy and cost, {PROBLEMS[name]}{' (quick)' if args.quick else ''},"
        f" D={D}, B={B}, float32 (reference: float64 jvp; float32 floor {floor:.1e}; "
        f"build + kernel parts of 2 vectors and 2 image draws; torch MAP step "
        f"{med['torch MAP step'] * 1e3:.2f} ms)",
        ["backend", "operator", "max |JPe|/|Je|", "solver", "ms", "x torch MAP"], rows)


# --------------------------------------------------------------------------- main
def _ints(s: str) -> List[int]:
    return [int(v) for v in s.split(",") if v]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"],
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds (≥ 5)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    p.add_argument("--sections", default="step,accuracy,memory")
    p.add_argument("--problems", default=",".join(PROBLEMS))
    p.add_argument("--batch-size", type=int, default=None, help="default 128 (quick: 8)")
    p.add_argument("--particles", type=_ints, default=None, help="default 1,4 (quick: 1,2)")
    p.add_argument("--memory-batch-sizes", type=_ints, default=None,
                   help="default 32,64,128,256 (quick: 16)")
    p.add_argument("--map-steps", type=int, default=None,
                   help="plain MAP Adam steps giving θ̂ (default 100; quick: 5)")
    p.add_argument("--target-seconds", type=float, default=None,
                   help="time per method per round (default 0.3; quick: 0.01)")
    p.add_argument("--max-dense-mb", type=float, default=1024,
                   help="largest dense (B, D) Jacobian the accuracy section builds")
    args = p.parse_args(argv)
    q = args.quick
    defaults = dict(batch_size=8 if q else 128, particles=[1, 2] if q else [1, 4],
                    memory_batch_sizes=[16] if q else [32, 64, 128, 256],
                    map_steps=5 if q else 100, target_seconds=0.01 if q else 0.3)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if q and "--repeats" not in " ".join(argv if argv is not None else sys.argv):
        args.repeats = 2
    args.problems = [s for s in args.problems.split(",") if s]
    args.sections = [s for s in args.sections.split(",") if s]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    pyro.set_rng_seed(0)
    t0 = time.perf_counter()
    print(f"bench_step: torch {torch.__version__}, pyro {pyro.__version__}, device "
          f"{args.device}, {args.threads} thread(s), {os.cpu_count()} CPUs, "
          f"repeats {args.repeats}{', quick' if args.quick else ''}")
    for section in args.sections:
        {"step": step_section, "accuracy": accuracy_section,
         "memory": memory_section}[section](args)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
