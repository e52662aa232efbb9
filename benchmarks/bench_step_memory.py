"""The memory section of ``bench_step.py``: peak memory added by building the projector and
drawing 2 vectors (the kernel parts of 2 vectors and 2 image draws), per route and batch size.

Each cell runs in a fresh process (``python benchmarks/bench_step_memory.py CONFIG_JSON``) that
first runs the same route at B = 4 (kernels and libraries loaded), then measures: Linux: peak
RSS reset through ``/proc/self/clear_refs``; CUDA: ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys

import torch
from pyro import poutine

if __package__ in (None, ""):  # run as a script: import this checkout's packages
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_models import (  # noqa: E402
    PROBLEMS,
    dense_bytes,
    layer_widths_bytes,
    make_problem,
)
from benchmarks.harness import print_table  # noqa: E402
from pyro_viking.infer.autoguide.projector_choice import build_projector  # noqa: E402
from pyro_viking.model_trace.layout import LatentLayout  # noqa: E402


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _project_once(prob, route: str):
    model, x, y = prob.model, prob.x, prob.y
    layout = LatentLayout.from_trace(poutine.trace(model).get_trace(x, y))
    loc = layout.pack(prob.init_values).detach()
    proj = build_projector(model, layout, (x, y), {}, loc, backend=route,
                           differentiable=False, check=False)
    out = proj.kernel_and_image(torch.randn(2, loc.numel(), dtype=loc.dtype, device=loc.device))
    return proj, out


def memory_child(cfg: dict) -> None:
    """Run in a fresh process: peak memory added by one projection, printed as JSON."""
    torch.set_num_threads(cfg["threads"])
    kw = dict(quick=cfg["quick"], device=cfg["device"])
    _project_once(make_problem(cfg["problem"], 4, **kw), cfg["route"])  # load kernels
    prob = make_problem(cfg["problem"], cfg["B"], **kw)
    gc.collect()
    method = "cuda"
    if cfg["device"] == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _status_kb("VmRSS") * 1024
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets the peak RSS (VmHWM) to the current RSS
            method = "VmHWM after clear_refs"
        except OSError:
            method = "ru_maxrss (upper bound)"
    _project_once(prob, cfg["route"])
    if cfg["device"] == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    elif method.startswith("VmHWM"):
        peak = _status_kb("VmHWM") * 1024
    else:
        import resource  # Unix only

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"delta": peak - base, "method": method, "D": prob.num_params}))


def memory_section(args) -> None:
    """Print the table of peak memory per route and batch size (``args.memory_batch_sizes``),
    each cell measured by :func:`memory_child` in a fresh process."""
    name = "mlp_784_256_256_10"
    ref = make_problem(name, 4, quick=args.quick)
    D = ref.num_params
    rows, method = [], ""
    for B in args.memory_batch_sizes:
        got = {}
        for route in ("layer_gram", "per_example"):
            cfg = dict(problem=name, route=route, B=B, quick=args.quick, device=args.device,
                       threads=args.threads)
            res = subprocess.run([sys.executable, os.path.abspath(__file__), json.dumps(cfg)],
                                 capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError(f"memory child failed:\n{res.stderr[-3000:]}")
            out = json.loads(res.stdout.strip().splitlines()[-1])
            got[route], method = out["delta"], out["method"]
        mb = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
        rows.append([B, mb(got["layer_gram"]), mb(layer_widths_bytes(ref, B)),
                     mb(got["per_example"]), mb(dense_bytes(B, D)),
                     f"{got['per_example'] / max(got['layer_gram'], 1):.0f}x"])
    print_table(
        f"Peak memory added by build + kernel parts of 2 vectors and 2 image draws, "
        f"{PROBLEMS[name]}"
        f"{' (quick)' if args.quick else ''}, D={D}, float32, fresh process per cell "
        f"({method}); MB",
        ["B", "layer_gram", "B*sum(in+out)*4 + B^2*8", "per_example", "B*D*4",
         "per_example / layer_gram"], rows)


if __name__ == "__main__":  # one cell: the child process of memory_section
    memory_child(json.loads(sys.argv[1]))
