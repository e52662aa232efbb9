"""Data-parallel scaling of VIKING training: examples per second at W = 1, 2, … ranks.

    python benchmarks/scaling.py --device cpu --world-sizes 1 2        # gloo, one thread a rank
    python benchmarks/scaling.py --device cuda --world-sizes 1 2 4     # nccl, one GPU a rank

``--network`` picks one of two networks of the uncertainty benchmark
(``benchmarks/uq/networks.py``): ``cnn1d``, the MNIST-1D authors' 1-D CNN (``CNN1d``, 32
channels, 10 classes) on MNIST-1D's 4,000 training sequences (``mnist1d`` package, generated
offline), or ``resnet``, the largest network of the benchmark, ``digits_resnet``'s residual CNN
(``SmallResNet``, 16 channels, 8 classes) on its fit split of the digits images, with its batch
norms frozen (eval mode: running statistics, as the benchmark and the README train it). Either as a
:class:`~pyro_viking.BayesianNetwork` (every weight latent, learned prior scale) with an
:class:`~pyro_viking.AutoViking` guide, trained on the module path
(``TraceViking_ELBO(beta)(bnn, guide)``, ``torch.optim.Adam``) with
:mod:`pyro_viking.infer.distributed` (``shard_loader``, ``seed_rank``, ``broadcast_parameters``,
``average_gradients``), each world size in its own process group started by
:func:`pyro_viking.infer.launch`.

**What is measured.** Every rank takes the same global minibatch of ``--batch-size`` B (B / W
rows a rank). After ``--warmup`` untimed steps, ``--rounds`` rounds of ``--steps`` steps are
timed between two barriers (with CUDA synchronised), so a round lasts as long as its slowest
rank; throughput = ``steps × B / seconds`` (examples per second over all ranks). The world sizes
are run in turn ``--repeats`` times (each run a new process group), so that a change of the
machine's load falls on every W; the median over all rounds of a W is reported, with
efficiency ``ex/s(W) / (W · ex/s(1))`` (1 = perfect scaling). On CPU each rank runs one torch
thread, so W ranks on W free cores is the fair comparison; the
``allreduce_share`` is the fraction of rank 0's time inside ``average_gradients`` (the
all-reduce, including waiting for the slower rank; CPU only: NCCL calls return before the
reduction ends). The load average of the machine is recorded before and after each run.
``--bound`` also times, in the main process (one thread on CPU), a step on ``B / W`` rows
against one on ``B`` rows, without communication: ``T(B) / T(B / W)`` bounds what W ranks can
reach (``step_ms_at_rows``, ``speedup_bound``; the dotted line of the figure).

Writes ``scaling_<device>[_<network>].json`` and ``.png`` (throughput against W with the ideal
line, and efficiency) to ``--out`` (default ``benchmarks/scaling/``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import pyro
import torch
import torch.distributed as dist
from torch.utils.data import TensorDataset

if __package__ in (None, ""):  # run as a script: import this checkout's packages
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.uq.classification_tasks import (  # noqa: E402
    IN_CLASSES,
    MNIST1D_CHANNELS,
    RESNET_CHANNELS,
    mnist1d_arrays,
)
from benchmarks.uq.networks import CNN1d, SmallResNet  # noqa: E402
from pyro_viking import AutoViking, BayesianNetwork, TraceViking_ELBO  # noqa: E402
from pyro_viking.infer.distributed import (  # noqa: E402
    average_gradients,
    broadcast_parameters,
    seed_rank,
    shard_loader,
)
from pyro_viking.infer.launch import launch  # noqa: E402
from pyro_viking.infer.module import setup_parameters  # noqa: E402

OUT = Path(__file__).resolve().parent / "scaling"


def make_network(name: str) -> torch.nn.Module:
    """The ``--network`` (built in each rank: a module-level function, which ``spawn`` can
    pickle by name): the 1-D CNN, or the residual CNN with its batch norms frozen (eval mode:
    running statistics, as the benchmark and the README train it)."""
    if name == "cnn1d":
        return CNN1d(10, MNIST1D_CHANNELS)
    return SmallResNet(IN_CLASSES, RESNET_CHANNELS).eval()


def network_data(name: str):
    """``(x, y, description)``: the training data of the ``--network``'s task."""
    if name == "cnn1d":
        x_train, y_train, _, _ = mnist1d_arrays()
        x, y = torch.as_tensor(x_train), torch.as_tensor(y_train, dtype=torch.long)
        return x, y, f"CNN1d(10, {MNIST1D_CHANNELS}) on MNIST-1D ({len(x)} training sequences)"
    from benchmarks.uq.tasks import load_task

    task = load_task("digits_resnet")
    return task.x_fit, task.y_fit, (
        f"SmallResNet({IN_CLASSES}, {RESNET_CHANNELS}), batch norms frozen, on digits "
        f"({len(task.x_fit)} training images)")


#: ``--network`` choices
NETWORKS = ("cnn1d", "resnet")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--network", choices=NETWORKS, default="cnn1d")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-size", type=int, default=128, help="global minibatch B")
    parser.add_argument("--steps", type=int, default=50, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=2,
                        help="passes over the world sizes, each a new process group")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--no-figure", action="store_true", help="JSON only")
    parser.add_argument("--bound", action="store_true",
                        help="also time one process's step at B / W rows (no communication): "
                             "the speed-up bound T(B) / T(B / W) of W ranks")
    return parser.parse_args(argv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _steps(loader, x: torch.Tensor, y: torch.Tensor):
    """This rank's minibatches ``(x, y)`` on the data's device, epoch after epoch."""
    epoch = 0
    while True:
        loader.sampler.set_epoch(epoch)
        for (idx,) in loader:
            idx = idx.to(x.device)
            yield x[idx], y[idx]
        epoch += 1


def _elbo_module(config: dict, num_data: int, device: torch.device):
    """``(ELBO module, guide)`` of the ``--network`` (module-local parameters)."""
    pyro.settings.set(module_local_params=True)
    bnn = BayesianNetwork(make_network(config["network"]).to(device), "classification",
                          prior_scale="learned", num_data=num_data)
    guide = AutoViking(bnn, init_loc_fn=bnn.init_loc_fn)
    return TraceViking_ELBO(beta=config["beta"])(bnn, guide), guide


def step_times(x: torch.Tensor, y: torch.Tensor, config: dict, rows: List[int]) -> Dict[int, float]:
    """Milliseconds per training step (the module path, without communication) at each number
    of ``rows``, one process, the steps of each size timed in turn (``--rounds`` rounds of
    ``--steps`` steps, medians): a rank's step at ``B / W`` rows against one process's at ``B``
    bounds the speed-up of W ranks, ``T(B) / T(B / W)``, whatever the communication costs."""
    device = torch.device("cuda" if config["device"] == "cuda" else "cpu")
    x, y = x.to(device), y.to(device)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)  # as each rank
    try:
        return _step_times(x, y, config, rows, device)
    finally:
        torch.set_num_threads(threads)


def _step_times(x, y, config: dict, rows: List[int], device: torch.device) -> Dict[int, float]:
    steps = {}
    for n in rows:
        pyro.set_rng_seed(config["seed"])
        elbo, _ = _elbo_module(config, len(x), device)
        gen = torch.Generator(device=device).manual_seed(n)

        def batch(n=n, gen=gen):
            idx = torch.randint(0, len(x), (n,), generator=gen, device=device)
            return x[idx], y[idx]

        setup_parameters(elbo, *batch())
        optimizer = torch.optim.Adam(elbo.parameters(), lr=config["lr"])

        def step(elbo=elbo, optimizer=optimizer, batch=batch):
            optimizer.zero_grad()
            elbo(*batch()).backward()
            optimizer.step()

        for _ in range(config["warmup"]):
            step()
        steps[n] = (step, [])
    for _ in range(config["rounds"]):
        for step, times in steps.values():
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(config["steps"]):
                step()
            _sync(device)
            times.append(1e3 * (time.perf_counter() - t0) / config["steps"])
    return {n: statistics.median(times) for n, (_, times) in steps.items()}


def train_rank(rank: int, world_size: int, x: torch.Tensor, y: torch.Tensor,
               config: dict) -> dict:
    """One rank's timed training (run by :func:`launch`): returns its round throughputs,
    its all-reduce share and its last loss (rank 0's reach the caller)."""
    device = torch.device(f"cuda:{rank}" if config["device"] == "cuda" else "cpu")
    x, y = x.to(device), y.to(device)
    loader = shard_loader(TensorDataset(torch.arange(len(x))), config["batch_size"],
                          seed=config["seed"])
    pyro.set_rng_seed(config["seed"])
    elbo, guide = _elbo_module(config, len(x), device)
    seed_rank(config["seed"])
    batches = _steps(loader, x, y)
    setup_parameters(elbo, *next(batches))
    broadcast_parameters(elbo)
    optimizer = torch.optim.Adam(elbo.parameters(), lr=config["lr"])
    reduce_s = [0.0]

    def step() -> float:
        optimizer.zero_grad()
        loss = elbo(*next(batches))
        loss.backward()
        t0 = time.perf_counter()
        average_gradients(elbo)
        reduce_s[0] += time.perf_counter() - t0
        optimizer.step()
        return loss.detach()

    for _ in range(config["warmup"]):
        step()
    throughputs, total_s = [], 0.0
    reduce_s[0] = 0.0
    for _ in range(config["rounds"]):
        _sync(device)
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(config["steps"]):
            loss = step()
        _sync(device)
        dist.barrier()
        seconds = time.perf_counter() - t0
        total_s += seconds
        throughputs.append(config["steps"] * config["batch_size"] / seconds)
    return {"rank": rank, "round_examples_per_s": throughputs,
            "allreduce_share": reduce_s[0] / total_s if device.type == "cpu" else None,
            "last_loss": float(loss), "backend_used": guide.backend_used,
            "num_latents": int(guide.loc.numel())}


def measure(args: argparse.Namespace) -> dict:
    """Every world size's median throughput and efficiency, with the machine's load."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU visible to torch")
    if args.device == "cuda" and max(args.world_sizes) > torch.cuda.device_count():
        raise SystemExit(f"--device cuda: {torch.cuda.device_count()} GPUs for "
                         f"world sizes {args.world_sizes}")
    x, y, network = network_data(args.network)
    config = {k: getattr(args, k) for k in ("device", "network", "batch_size", "steps", "rounds",
                                            "warmup", "repeats", "beta", "lr", "seed")}
    backend = "nccl" if args.device == "cuda" else "gloo"
    for world in args.world_sizes:
        if args.batch_size % world:
            raise SystemExit(f"--batch-size {args.batch_size} is not a multiple of W = {world}")
    runs: Dict[int, List[dict]] = {w: [] for w in args.world_sizes}
    for repeat in range(args.repeats):  # W = 1, 2, …, then again: load drifts hit every W
        for world in args.world_sizes:
            load_before = os.getloadavg()
            result = launch(train_rank, world, x, y, config, backend=backend,
                            num_threads=1 if args.device == "cpu" else None)
            result.update(load_average_before=load_before, load_average_after=os.getloadavg())
            runs[world].append(result)
            print(f"repeat {repeat}, W = {world}: rounds "
                  f"{', '.join(f'{v:.0f}' for v in result['round_examples_per_s'])} examples/s "
                  f"(load average before/after {load_before[0]:.2f}/{os.getloadavg()[0]:.2f})",
                  flush=True)
    rows: List[Dict] = []
    for world, results in runs.items():
        rounds = [v for r in results for v in r["round_examples_per_s"]]
        shares = [r["allreduce_share"] for r in results if r["allreduce_share"] is not None]
        rows.append({"world_size": world, "examples_per_s": statistics.median(rounds),
                     "round_examples_per_s": rounds,
                     "allreduce_share": statistics.median(shares) if shares else None,
                     "load_average_before": [r["load_average_before"] for r in results],
                     "load_average_after": [r["load_average_after"] for r in results],
                     "last_loss": results[-1]["last_loss"],
                     "backend_used": results[-1]["backend_used"],
                     "num_latents": results[-1]["num_latents"]})
    single = next((r["examples_per_s"] for r in rows if r["world_size"] == 1), None)
    for r in rows:
        r["efficiency"] = None if single is None else r["examples_per_s"] / (
            r["world_size"] * single)
    if args.bound:  # one process: a rank's step at B / W rows against B rows
        rows_per_rank = {args.batch_size // w for w in args.world_sizes}
        ms = step_times(x, y, config, sorted(rows_per_rank | {args.batch_size}))
        for r in rows:
            r["step_ms_at_rows"] = ms[args.batch_size // r["world_size"]]
            r["speedup_bound"] = ms[args.batch_size] / r["step_ms_at_rows"]
    return {"device": args.device, "backend": backend, "config": config,
            "network": network,
            "threads_per_rank": 1 if args.device == "cpu" else None,
            "cpu_count": os.cpu_count(), "machine": platform.platform(),
            "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
            "torch": torch.__version__, "results": rows}


def figure(report: dict, path: Path) -> None:
    """Throughput against W (with the ideal ``W · ex/s(1)``) and efficiency, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    ws = [r["world_size"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    left.plot(ws, [r["examples_per_s"] for r in rows], "o-", label="measured")
    if rows[0]["efficiency"] is not None:
        single = rows[0]["examples_per_s"] / (rows[0]["efficiency"] * rows[0]["world_size"])
        left.plot(ws, [w * single for w in ws], "k--", lw=1, label="ideal (W × W=1)")
        if "speedup_bound" in rows[0]:
            left.plot(ws, [r["speedup_bound"] * single for r in rows], "g:", lw=1.5,
                      label="bound: one process's step at B / W rows")
        right.plot(ws, [r["efficiency"] for r in rows], "o-")
        right.axhline(1.0, color="k", ls="--", lw=1)
    left.set(xlabel="ranks W", ylabel="examples / s (all ranks)", xticks=ws)
    right.set(xlabel="ranks W", ylabel="efficiency  ex/s(W) / (W · ex/s(1))", xticks=ws,
              ylim=(0, 1.1))
    left.legend()
    loads = [a[0] for r in rows for a in r["load_average_before"]]
    fig.suptitle(f"VIKING data-parallel, {report['network']}, B = {report['config']['batch_size']}"
                 f", {report['device']} ({report['backend']}, {report['cpu_count']} CPUs); "
                 f"1-min load average {min(loads):.1f}–{max(loads):.1f}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    report = measure(args)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"scaling_{args.device}" if args.network == "cnn1d" else \
        args.out / f"scaling_{args.device}_{args.network}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    if not args.no_figure:
        figure(report, stem.with_suffix(".png"))
    for r in report["results"]:
        eff = "n/a" if r["efficiency"] is None else f"{r['efficiency']:.2f}"
        share = "n/a" if r["allreduce_share"] is None else f"{r['allreduce_share']:.2f}"
        bound = "" if "speedup_bound" not in r else (
            f", one process's step at {args.batch_size // r['world_size']} rows "
            f"{r['step_ms_at_rows']:.1f} ms (speed-up bound {r['speedup_bound']:.2f}×)")
        print(f"W = {r['world_size']}: {r['examples_per_s']:.0f} ex/s, efficiency {eff}, "
              f"all-reduce share {share}{bound}")
    print(f"wrote {stem}.json" + ("" if args.no_figure else f" and {stem}.png"))


if __name__ == "__main__":
    main()
