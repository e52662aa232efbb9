"""The floor of a VIKING training step: the same numerics written by hand, without Pyro or the
package's generality, timed against IVON and the package's module engine (issue #22).

    python benchmarks/uq/step_floor.py                      # the five original tasks, ~2 min
    python benchmarks/uq/step_floor.py --tasks mnist1d --rounds 9

What one step of the floor computes is what the package's fused step computes for a
``BayesianNetwork`` of ``nn.Linear`` / ``nn.Conv1d`` layers (the benchmark's MLP and 1-D CNN)
under ``AutoViking`` with its defaults (``jacobian="loss"``, ``image_noise="fresh"``, Cholesky,
the kernel chain carried with ``gamma``) and ``TraceViking_ELBO`` with a learned prior scale
tied to ``σ_ker``:

1. ``forward θ̂``: the network at the mean on the minibatch, recording each layer's input;
2. ``output grads``: one backward of ``Σ_i log p(y_i | θ̂)`` to the layers' outputs;
3. ``Gram``: per layer ``(G Gᵀ) ⊙ (A Aᵀ + 1)`` (Linear) or ``J_l J_lᵀ`` of the per-example
   weight gradients (Conv1d, from ``unfold``), summed in float64 (into preallocated buffers:
   the floor does not pay for allocating them);
4. ``Cholesky``; 5. ``noise``: ``η`` ``(D,)`` and the image coefficients ``C = Z L⁻ᵀ``;
6. ``project``: ``J e``, the solve, ``[Λ; C] J``, then one ``J k`` as the refinement's check;
7. ``forward z``: the network at ``z = θ̂ + σ_ker k + σ_im ν``, the rows and the closed-form KL;
8. ``backward + Adam``: the loss's gradients and one ``torch.optim.Adam`` step.

IVON, the package's module engine (``VIKING module``, as ``run.py --timing``) and the floor take
one epoch each in turn, ``--rounds`` times, from the same trained-ish network; the median per
method is reported, and the floor's phases as milliseconds per step. Writes ``step_floor.json``
and ``step_floor.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

if __package__ in (None, ""):  # run as a script: import this checkout's packages
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.uq.methods import _batches, train_map  # noqa: E402
from benchmarks.uq.protocol import budget_for  # noqa: E402
from benchmarks.uq.tasks import load_task  # noqa: E402
from benchmarks.uq.timing import _epoch_fns  # noqa: E402
from benchmarks.uq.viking_fit import DEFAULT_GAMMA  # noqa: E402

HERE = Path(__file__).resolve().parent
TASKS = ("digits", "mnist1d", "diabetes", "boston", "concrete")
PHASES = ("forward θ̂", "output grads", "Gram", "Cholesky", "noise", "project", "forward z",
          "backward + Adam")


class FloorStep:
    """A hand-written VIKING step on ``net`` (``nn.Linear`` / ``nn.Conv1d`` layers, each used
    once) at the mean ``θ̂`` = the network's weights: module docstring. ``step(x, y)`` takes one
    training step on a minibatch and adds each phase's seconds to ``self.seconds``."""

    def __init__(self, net: nn.Module, kind: str, num_data: int, batch_size: int,
                 lr: float, beta: float = 0.01, gamma: float = DEFAULT_GAMMA):
        self.net, self.kind, self.N, self.B = net, kind, num_data, batch_size
        self.beta, self.gamma = beta, gamma
        named = list(net.named_parameters())
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.sizes = [p.numel() for _, p in named]
        offsets, start = {}, 0
        for (_, p), size in zip(named, self.sizes):
            offsets[id(p)] = start
            start += size
        self.layers = [m for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv1d))]
        if any(isinstance(m, nn.Conv1d) and (m.groups != 1 or m.dilation != (1,))
               for m in self.layers):
            raise ValueError("the floor handles Conv1d with groups=1 and dilation 1")
        self.cols = [(offsets[id(m.weight)], offsets[id(m.bias)], m.bias.numel())
                     for m in self.layers]
        self.D = start
        self.loc = torch.cat([p.detach().reshape(-1) for _, p in named]).requires_grad_()
        self.log_image = torch.tensor(math.log(1e-3), requires_grad=True)
        self.log_prior = torch.tensor(0.0, requires_grad=True)
        self.log_noise = torch.tensor(0.0, requires_grad=True)
        params = [self.loc, self.log_image, self.log_prior]
        params += [self.log_noise] if kind == "regression" else []
        self.optimizer = torch.optim.Adam(params, lr=lr)
        self.carry = torch.zeros(self.D)
        self.buffers: Dict[tuple, Tensor] = {}
        self.seconds: Dict[str, float] = defaultdict(float)
        self.jittered = 0  # steps whose Gram needed a jitter to factorise

    def _weights(self, z: Tensor) -> Dict[str, Tensor]:
        return {n: t.view(s) for n, t, s in zip(self.names, z.split(self.sizes), self.shapes)}

    def _rows(self, out: Tensor, y: Tensor) -> Tensor:
        if self.kind == "regression":
            return torch.distributions.Normal(out.squeeze(-1), self.log_noise.exp()).log_prob(y)
        return -F.cross_entropy(out, y, reduction="none")

    def _float64(self, t: Tensor, key: tuple) -> Tensor:
        buf = self.buffers.get(key)
        if buf is None or buf.shape != t.shape:
            buf = self.buffers[key] = torch.empty(t.shape, dtype=torch.float64)
        return buf.copy_(t)

    def _pieces(self, inputs: List[Tensor], grads: List[Tensor]):
        """Ghosts ``(A, G, cols)`` of the Linear layers, blocks ``(cols, J)`` of the convs, and
        the float64 Gram."""
        B = self.B
        gram = torch.zeros(B, B, dtype=torch.float64)
        ghosts, blocks = [], []
        for i, (m, A, G, (w0, b0, nb)) in enumerate(zip(self.layers, inputs, grads, self.cols)):
            if isinstance(m, nn.Linear):
                A64, G64 = self._float64(A, (i, "A")), self._float64(G, (i, "G"))
                gram.addcmul_(G64 @ G64.T, (A64 @ A64.T).add_(1.0))
                ghosts.append((A, G, w0, b0))
            else:
                k, s, p = m.kernel_size[0], m.stride[0], m.padding[0]
                patches = F.pad(A, (p, p)).unfold(2, k, s)  # (B, C, T, k)
                patches = patches.permute(0, 2, 1, 3).reshape(B, G.shape[2], -1)
                J = torch.cat([torch.bmm(G, patches).reshape(B, -1), G.sum(2)], 1)
                J64 = self._float64(J, (i, "J"))
                gram.addmm_(J64, J64.T)
                blocks.append((w0, b0 + nb, J))
        return ghosts, blocks, gram

    def _mv(self, ghosts, blocks, V: Tensor) -> Tensor:
        out = V.new_zeros(V.shape[0], self.B)
        for A, G, w0, b0 in ghosts:
            W = V[:, w0:b0].reshape(V.shape[0], G.shape[1], A.shape[1])
            out += (torch.matmul(G, W) * A).sum(-1) + V[:, b0:b0 + G.shape[1]] @ G.T
        for c0, c1, J in blocks:
            out += V[:, c0:c1] @ J.T
        return out

    def _rmv(self, ghosts, blocks, U: Tensor) -> Tensor:
        out = U.new_empty(U.shape[0], self.D)
        for A, G, w0, b0 in ghosts:
            UG = U[:, None, :] * G.T  # (K, out, B)
            out[:, w0:b0] = (UG @ A).reshape(U.shape[0], -1)
            out[:, b0:b0 + G.shape[1]] = U @ G
        for c0, c1, J in blocks:
            out[:, c0:c1] = U @ J
        return out

    def _tick(self, phase: str, start: float) -> float:
        now = time.perf_counter()
        self.seconds[phase] += now - start
        return now

    def recorded_rows(self, z: Tensor, x: Tensor, y: Tensor):
        """``(rows, inputs, outputs)``: the rows at ``z`` and each layer's input (detached) and
        output (in the graph of the rows)."""
        inputs, outputs = [], []

        def record(module, args, out):
            inputs.append(args[0].detach())
            outputs.append(out)

        hooks = [m.register_forward_hook(record) for m in self.layers]
        try:
            rows = self._rows(functional_call(self.net, self._weights(z), (x,)), y)
        finally:
            for h in hooks:
                h.remove()
        return rows, inputs, outputs

    def step(self, x: Tensor, y: Tensor) -> float:
        t = time.perf_counter()
        rows, inputs, outputs = self.recorded_rows(self.loc.detach().requires_grad_(), x, y)
        t = self._tick("forward θ̂", t)
        grads = torch.autograd.grad(rows.sum(), outputs)
        t = self._tick("output grads", t)
        ghosts, blocks, gram = self._pieces(inputs, grads)
        t = self._tick("Gram", t)
        L, info = torch.linalg.cholesky_ex(gram)
        if int(info):  # (numerically) singular: the package falls back to eigh; the floor
            self.jittered += 1  # adds a relative jitter of 1e-10 (counted: ``jittered``)
            jitter = 1e-10 * float(gram.diagonal().max())
            L = torch.linalg.cholesky(gram + jitter * torch.eye(self.B, dtype=gram.dtype))
        t = self._tick("Cholesky", t)
        eta = torch.randn(self.D)
        e = eta.mul_(math.sqrt(1 - self.gamma)).add_(self.carry, alpha=math.sqrt(self.gamma))
        Z = torch.randn(1, self.B, dtype=torch.float64)
        C = torch.linalg.solve_triangular(L, Z, upper=False, left=False).to(e.dtype)
        t = self._tick("noise", t)
        Je = self._mv(ghosts, blocks, e[None])
        Lam = torch.cholesky_solve(Je.double().T, L).T.to(e.dtype)
        W = self._rmv(ghosts, blocks, torch.cat([Lam, C]))
        kernel, image = e - W[0], W[1]
        self._mv(ghosts, blocks, kernel[None])  # the refinement's check J k
        self.carry = kernel
        t = self._tick("project", t)
        si, sp = self.log_image.exp(), self.log_prior.exp()
        z = self.loc + sp * kernel + si * image
        loglik = self._rows(functional_call(self.net, self._weights(z), (x,)), y).sum()
        r, m = self.B, (self.loc ** 2).sum()  # rank of J: B (the Cholesky succeeded)
        kl = 0.5 * ((r * si ** 2 + m) / sp ** 2 - r + 2 * r * (self.log_prior - self.log_image))
        loss = self.beta * kl - loglik * (self.N / self.B)
        t = self._tick("forward z", t)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self._tick("backward + Adam", t)
        return float(loss.detach())


def _floor_epoch(task, budget):
    net, _, _ = train_map(task, 0, 1.0, replace(budget, epochs=2))  # the others' start
    floor = FloorStep(net, "classification" if task.classification else "regression",
                      len(task.x_fit), budget.batch_size, budget.lr)
    gen = torch.Generator().manual_seed(1)

    def epoch():
        for idx in _batches(len(task.x_fit), budget.batch_size, gen):
            if len(idx) == budget.batch_size:  # the floor's Gram buffers have one size
                floor.step(task.x_fit[idx], task.y_fit[idx])

    return epoch, floor


def run(task_name: str, rounds: int) -> dict:
    task = load_task(task_name)
    budget = budget_for(task_name, False)
    fns = {k: v for k, v in _epoch_fns(task, budget).items() if k in ("IVON", "VIKING module")}
    fns["floor"], floor = _floor_epoch(task, budget)
    steps = {"IVON": math.ceil(len(task.x_fit) / budget.batch_size),
             "VIKING module": math.ceil(len(task.x_fit) / budget.batch_size),
             "floor": len(task.x_fit) // budget.batch_size}
    for fn in fns.values():
        fn()  # start-up costs, untimed
    floor.seconds.clear()
    times = defaultdict(list)
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) / steps[name])
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    floor_steps = rounds * steps["floor"]
    return {"task": task_name, "ms_per_step": ms,
            "floor_over_ivon": ms["floor"] / ms["IVON"],
            "module_over_ivon": ms["VIKING module"] / ms["IVON"],
            "module_over_floor": ms["VIKING module"] / ms["floor"],
            "floor_phases_ms": {p: 1e3 * floor.seconds[p] / floor_steps for p in PHASES},
            "latents": floor.D, "batch_size": budget.batch_size,
            "floor_steps_jittered": floor.jittered}


def table(rows: List[dict]) -> str:
    head = ("| task | D | IVON ms/step | floor ms/step (× IVON) | module ms/step (× IVON) | "
            + " | ".join(PHASES) + " |")
    lines = [head, "|" + "---|" * (5 + len(PHASES))]
    for r in rows:
        ms = r["ms_per_step"]
        phases = " | ".join(f"{r['floor_phases_ms'][p]:.2f}" for p in PHASES)
        lines.append(f"| {r['task']} | {r['latents']:,} | {ms['IVON']:.2f} | "
                     f"{ms['floor']:.2f} ({r['floor_over_ivon']:.2f}×) | "
                     f"{ms['VIKING module']:.2f} ({r['module_over_ivon']:.2f}×) | {phases} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> List[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--out", type=Path, default=HERE)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    rows = []
    for name in args.tasks:
        rows.append(run(name, args.rounds))
        print(json.dumps(rows[-1]), flush=True)
    (args.out / "step_floor.json").write_text(json.dumps(rows, indent=1) + "\n")
    (args.out / "step_floor.md").write_text(table(rows))
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
