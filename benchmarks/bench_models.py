"""The benchmark models: Bayesian MLPs and a LeNet-like CNN as Pyro models.

Every weight and bias is a ``PyroSample`` latent with prior ``N(0, prior_scale²)``; the network
is built from ``nn.Linear`` / ``nn.Conv2d`` subclasses, so the layer-Gram backend applies. The
network is evaluated on ``x[idx]`` *outside* the data plate (inside it, the weights would get a
batch dimension); the plate may subsample (``subsample_size``) or cover the whole batch.

``VLinear`` / ``VConv2d`` behave exactly like ``nn.Linear`` / ``nn.Conv2d`` for ordinary
weights, and also accept a leading particle dimension on the weights (``(K, 1, out, in)``: the
particle plate of ``vectorize_particles=True`` at dim -2 over a data plate at dim -1), which
``PyroModule[nn.Linear]`` does not. The output then has shape ``(K, B, ...)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.nn import PyroModule, PyroSample
from torch import Tensor, nn

__all__ = ["BNN", "LeNet", "MLP", "Problem", "VConv2d", "VLinear", "make_problem"]


class VLinear(nn.Linear):
    """``nn.Linear`` that also takes particle-batched weights ``(K, 1, out, in)``."""

    def forward(self, x: Tensor) -> Tensor:
        w, b = self.weight, self.bias
        if w.dim() == 2:
            return F.linear(x, w, b)
        W = w.reshape(-1, *w.shape[-2:])  # (K, out, in); x: (B, in) or (K, B, in)
        out = torch.matmul(x, W.transpose(-1, -2))
        return out if b is None else out + b.reshape(W.shape[0], 1, -1)


class VConv2d(nn.Conv2d):
    """``nn.Conv2d`` that also takes particle-batched weights: one grouped convolution."""

    def forward(self, x: Tensor) -> Tensor:
        w, b = self.weight, self.bias
        if w.dim() == 4:
            return self._conv_forward(x, w, b)
        W = w.reshape(-1, *w.shape[-4:])  # (K, C_out, C_in, kh, kw)
        K, c_out = W.shape[:2]
        if x.dim() == 4:
            x = x.expand(K, *x.shape)
        n = x.shape[1]
        xg = x.transpose(0, 1).reshape(n, -1, *x.shape[-2:])  # (B, K·C_in, H, W)
        out = F.conv2d(xg, W.reshape(K * c_out, *W.shape[2:]),
                       None if b is None else b.reshape(-1), self.stride, self.padding,
                       self.dilation, K)
        return out.reshape(n, K, c_out, *out.shape[-2:]).transpose(0, 1)


def _pool(h: Tensor) -> Tensor:
    return F.max_pool2d(h.flatten(0, -4), 2).unflatten(0, h.shape[:-3])


class MLP(nn.Module):
    def __init__(self, widths, act: Callable[[Tensor], Tensor]):
        super().__init__()
        self.layers = nn.ModuleList(VLinear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = self.act(x)
        return x


class LeNet(nn.Module):
    """Conv(1,6,5)-relu-pool-Conv(6,16,5)-relu-pool-Linear(256,120)-Linear(120,84)-Linear(84,10)
    on 1×28×28 inputs (relu between the linear layers)."""

    def __init__(self, c1: int = 6, c2: int = 16, f1: int = 120, f2: int = 84, out: int = 10):
        super().__init__()
        self.c1, self.c2 = VConv2d(1, c1, 5), VConv2d(c1, c2, 5)
        self.f1, self.f2, self.f3 = VLinear(16 * c2, f1), VLinear(f1, f2), VLinear(f2, out)

    def forward(self, x: Tensor) -> Tensor:
        h = _pool(torch.relu(self.c1(x)))
        h = _pool(torch.relu(self.c2(h))).flatten(-3)
        return self.f3(torch.relu(self.f2(torch.relu(self.f1(h)))))


class BNN(PyroModule):
    """``y ~ Categorical(logits=net(x))`` or ``N(net(x), noise²)``; weights ``N(0, prior²)``.

    ``init_values`` holds the network's (PyTorch-initialised) weights under the site names,
    for ``init_to_value``.
    """

    def __init__(self, net: nn.Module, classification: bool, *, prior_scale: float = 0.1,
                 noise: float = 0.1, subsample_size: Optional[int] = None):
        super().__init__()
        self.init_values = {f"net.{n}": p.detach().clone() for n, p in net.named_parameters()}
        pyro.nn.module.to_pyro_module_(net)
        for m in net.modules():
            for n, p in list(m.named_parameters(recurse=False)):
                zero = torch.zeros((), dtype=p.dtype, device=p.device)
                prior = dist.Normal(zero, prior_scale).expand(p.shape).to_event(p.dim())
                setattr(m, n, PyroSample(prior))
        self.net = net
        self.classification = classification
        self.noise = noise
        self.subsample_size = subsample_size

    def forward(self, x: Tensor, y: Optional[Tensor] = None):
        data = pyro.plate("data", x.shape[0], subsample_size=self.subsample_size,
                          device=x.device)
        with data as idx:
            pass
        out = self.net(x[idx])
        obs = None if y is None else y[idx]
        with data:
            if self.classification:
                pyro.sample("y", dist.Categorical(logits=out), obs=obs)
            else:
                pyro.sample("y", dist.Normal(out.squeeze(-1), self.noise), obs=obs)


@dataclass
class Problem:
    """A benchmark problem: Bayesian model, one fixed minibatch, and a plain-torch twin."""

    name: str
    model: BNN
    x: Tensor
    y: Tensor
    torch_net: nn.Module  # same architecture, ordinary parameters (for the plain MAP step)
    classification: bool
    noise: float = 0.1

    @property
    def init_values(self) -> Dict[str, Tensor]:
        return self.model.init_values

    @property
    def num_params(self) -> int:
        return sum(v.numel() for v in self.init_values.values())

    def torch_loss(self) -> Tensor:
        out = self.torch_net(self.x)
        if self.classification:
            return F.cross_entropy(out, self.y, reduction="sum")
        return 0.5 * ((out.squeeze(-1) - self.y) / self.noise).pow(2).sum()


#: name -> description
PROBLEMS = {
    "mlp_2_50_50_1": "MLP 2-50-50-1, tanh, regression",
    "mlp_784_256_256_10": "MLP 784-256-256-10, relu, 10 classes",
    "lenet": "LeNet-like CNN, 1x28x28, 10 classes",
}


def _net(name: str, quick: bool) -> nn.Module:
    if name == "mlp_2_50_50_1":
        return MLP([2, 8, 8, 1] if quick else [2, 50, 50, 1], torch.tanh)
    if name == "mlp_784_256_256_10":
        return MLP([784, 16, 16, 10] if quick else [784, 256, 256, 10], torch.relu)
    if name == "lenet":
        return LeNet(2, 4, 12, 8, 10) if quick else LeNet()
    raise ValueError(f"unknown problem {name!r}; choose from {sorted(PROBLEMS)}")


def make_problem(name: str, batch_size: int, *, quick: bool = False, seed: int = 0,
                 device="cpu", dtype=torch.float32, map_steps: int = 0,
                 subsample_size: Optional[int] = None, noise: float = 0.1,
                 prior_scale: float = 0.1) -> Problem:
    """Random inputs with teacher-network labels (learnable, no download); the model is
    initialised at the weights of ``map_steps`` plain-MAP Adam steps (lr 1e-3) on minibatches of
    ``batch_size`` from ``16 · batch_size`` such data, and the problem's data are the first
    minibatch (a partly trained network: not the random initialisation, not memorised data)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net, teacher = _net(name, quick), _net(name, quick)
    classification = name != "mlp_2_50_50_1"
    shape = (1, 28, 28) if name == "lenet" else (net.layers[0].in_features,)
    n_train = 16 * batch_size if map_steps else batch_size
    x = torch.randn(n_train, *shape, generator=gen)
    with torch.no_grad():
        t = teacher(x)
        y = t.argmax(-1) if classification else t.squeeze(-1) / t.std() + 0.1 * torch.randn(
            n_train, generator=gen)
    net = net.to(device=device, dtype=dtype)
    x = x.to(device=device, dtype=dtype)
    y = y.to(device) if classification else y.to(device=device, dtype=dtype)
    twin = _net(name, quick).to(device=device, dtype=dtype)
    prob = Problem(name, None, x, y, net, classification, noise)  # type: ignore[arg-type]
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for step in range(map_steps):
        i = (step % 16) * batch_size
        prob.x, prob.y = x[i:i + batch_size], y[i:i + batch_size]
        opt.zero_grad()
        (prob.torch_loss() / batch_size).backward()
        opt.step()
    prob.x, prob.y, prob.torch_net = x[:batch_size], y[:batch_size], twin
    twin.load_state_dict(net.state_dict())
    prob.model = BNN(net, classification, prior_scale=prior_scale, noise=noise,
                     subsample_size=subsample_size)
    return prob


def dense_bytes(batch_size: int, num_params: int, itemsize: int = 4) -> int:
    """Memory of a dense ``(B, D)`` Jacobian."""
    return batch_size * num_params * itemsize


def layer_widths_bytes(prob: Problem, batch_size: int, itemsize: int = 4) -> int:
    """``B·Σ_l (in_l + out_l)·itemsize + B²·8``: what the layer-Gram route keeps for an MLP."""
    widths = sum(m.in_features + m.out_features for m in prob.torch_net.modules()
                 if isinstance(m, nn.Linear))
    return batch_size * widths * itemsize + batch_size ** 2 * 8
