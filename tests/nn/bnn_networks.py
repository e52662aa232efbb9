"""Small networks and data shared by the ``BayesianNetwork`` tests (``tests/nn``): an MLP, 2-d and
1-d CNNs, recurrent classifiers (no ``torch.vmap`` batching rule), a batch norm in eval mode and
a small transformer, each seeded, in a given dtype."""

import torch
from pyro import poutine
from torch import nn

DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: 1e-4, torch.float64: 1e-10}


def mlp(dtype, out=3):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, out)).to(dtype)


def cnn(dtype, out=3):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(12, out)).to(dtype)


def cnn1d(dtype, out=3):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(1, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(12, out)
                         ).to(dtype)


class GRUClassifier(nn.Module):
    """A recurrent classifier: ``torch.vmap`` has no batching rule for ``nn.GRU`` (nor, for
    the per-example Jacobian, for ``nn.LSTM``'s backward: its Jacobian is built by a loop)."""

    def __init__(self, out, cell=nn.GRU):
        super().__init__()
        self.gru, self.head = cell(2, 4, batch_first=True), nn.Linear(4, out)

    def forward(self, x):
        return self.head(self.gru(x)[0][:, -1])


def gru(dtype, out=3):
    torch.manual_seed(0)
    return GRUClassifier(out).to(dtype)


def lstm(dtype, out=3):
    torch.manual_seed(0)
    return GRUClassifier(out, nn.LSTM).to(dtype)


def batchnorm_eval(dtype, out=3):
    """Batch norm in eval mode (fixed running statistics, here made non-trivial)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, out))
    net[1].running_mean.normal_()
    net[1].running_var.uniform_(0.5, 2.0)
    return net.to(dtype).eval()


class Transformer(nn.Module):
    """A small transformer classifier: tokens of ``F`` features (B, T, F) → Linear → + learned
    positional embedding → one ``TransformerEncoderLayer`` (dropout 0, batch first) →
    LayerNorm → mean over the T positions → Linear head."""

    def __init__(self, out=3, F=2, T=3, E=8, heads=2):
        super().__init__()
        self.inp, self.pos = nn.Linear(F, E), nn.Embedding(T, E)
        self.layer = nn.TransformerEncoderLayer(E, heads, dim_feedforward=16, dropout=0.0,
                                                batch_first=True)
        self.norm, self.head = nn.LayerNorm(E), nn.Linear(E, out)

    def forward(self, x):
        pos = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
        return self.head(self.norm(self.layer(self.inp(x) + self.pos(pos))).mean(1))


def transformer(dtype, out=3):
    torch.manual_seed(0)
    return Transformer(out).to(dtype)


NETS = {"mlp": (mlp, (4,)), "cnn": (cnn, (1, 4, 4)), "cnn1d": (cnn1d, (1, 6)),
        "transformer": (transformer, (3, 2))}
MORE_NETS = {**NETS, "gru": (gru, (3, 2)), "batchnorm_eval": (batchnorm_eval, (4,))}


def data(dtype, likelihood="classification", n=30, shape=(4,), classes=3):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, *shape, generator=g, dtype=dtype)
    if likelihood == "classification":
        return x, torch.randint(0, classes, (n,), generator=g)
    return x, torch.randn(n, generator=g, dtype=dtype)


def weights_of(model, x, y):
    with poutine.block():
        tr = poutine.trace(model).get_trace(x, y)
    return {n: s["value"].detach() for n, s in tr.nodes.items()
            if s["type"] == "sample" and not s["is_observed"] and n != "data"}
