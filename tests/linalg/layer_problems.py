"""Test problems of the layer-Gram Jacobian (``tests/linalg/test_layer_gram.py``): small networks
seen as ``fn(z)``, one log-likelihood row per datum, of a flat latent vector z (``PROBLEMS``), and
variants with a well-conditioned Gram for the implicit-gradient tests (``conditioned``)."""

import torch
from torch import nn
from torch.func import functional_call


def flat_fn(model, x, loglik, extra=0, transform=None, latent=None):
    """``fn(z)``: z sliced into the parameters of ``model`` (views), plus ``extra`` trailing
    latents passed to ``loglik(out, z_extra)``; returns fn and a random point z. ``latent``:
    the names of the parameters in z (default all); the others are the module's constants."""
    named = [(n, p.shape, p.numel()) for n, p in model.named_parameters()
             if latent is None or n in latent]
    D = sum(k for _, _, k in named) + extra

    def fn(z):
        params, o = {}, 0
        for n, s, k in named:
            params[n] = z[o:o + k].view(s)
            o += k
        if transform is not None:
            params = transform(params)
        return loglik(functional_call(model, params, (x,)), z[o:])

    z = torch.cat([p.detach().flatten() for n, p in model.named_parameters()
                   if latent is None or n in latent] + [0.3 * torch.randn(extra)])
    assert z.numel() == D
    return fn, z


def regression(out, _):
    y = torch.linspace(-1, 1, out.shape[0])
    return -0.5 * (y - out.squeeze(-1)) ** 2


def regression_noise(out, log_s):
    y = torch.linspace(-1, 1, out.shape[0])
    return torch.distributions.Normal(out.squeeze(-1), log_s.exp()).log_prob(y)


def classification(out, _):
    y = torch.arange(out.shape[0]) % out.shape[1]
    return out.log_softmax(-1).gather(-1, y[:, None]).squeeze(-1)


def mlp_tanh(B=16):
    model = nn.Sequential(nn.Linear(2, 50), nn.Tanh(), nn.Linear(50, 50), nn.Tanh(),
                          nn.Linear(50, 1))
    return flat_fn(model, torch.randn(B, 2), regression)


def mlp_784(B=6):
    model = nn.Sequential(nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))
    return flat_fn(model, torch.randn(B, 784), classification)


def mlp_rest(B=12):
    model = nn.Sequential(nn.Linear(3, 20), nn.Tanh(), nn.Linear(20, 1))
    return flat_fn(model, torch.randn(B, 3), regression_noise, extra=1)


def lenet(B=5, conv2=None):
    conv2 = conv2 or nn.Conv2d(4, 6, 3)
    body = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2), conv2,
                         nn.Flatten())
    x = torch.randn(B, 1, 16, 16)
    n = body(x).shape[1]
    model = nn.Sequential(*body, nn.Tanh(), nn.Linear(n, 10))
    return flat_fn(model, x, classification)


def cnn1d(B=6, conv2=None):
    conv2 = conv2 or nn.Conv1d(3, 4, 5, stride=2, padding=2)
    body = nn.Sequential(nn.Conv1d(1, 3, 3), nn.Tanh(), conv2, nn.Flatten())
    x = torch.randn(B, 1, 20)
    model = nn.Sequential(*body, nn.Tanh(), nn.Linear(body(x).shape[1], 5))
    return flat_fn(model, x, classification)


def cnn3d(B=4):
    body = nn.Sequential(nn.Conv3d(2, 3, 3, padding=1, stride=(1, 2, 2)), nn.ReLU(),
                         nn.Flatten())
    x = torch.randn(B, 2, 3, 6, 6)
    model = nn.Sequential(*body, nn.Linear(body(x).shape[1], 4))
    return flat_fn(model, x, classification)


class SeqModel(nn.Module):
    """Linear on (B, T, in) inputs (materialised path) followed by a 2-D head."""

    def __init__(self, d_in=3):
        super().__init__()
        self.inner, self.head = nn.Linear(d_in, 8), nn.Linear(8, 1)

    def forward(self, x):
        return self.head(torch.tanh(self.inner(x)).mean(1))


def seq_model(B=7):
    return flat_fn(SeqModel(), torch.randn(B, 5, 3), regression)


def frozen_first(B=9):
    """Only the second layer's parameters are in z; the first layer is a constant."""
    model = nn.Sequential(nn.Linear(4, 10), nn.Tanh(), nn.Linear(10, 1))
    x = torch.randn(B, 4)

    def fn(z):
        p = {"2.weight": z[:10].view(1, 10), "2.bias": z[10:]}
        return regression(functional_call(model, p, (x,)), None)

    return fn, torch.randn(11)


def norms_mlp(B=8):
    """LayerNorm on (B, E) and on (B, T, E) with a 2-D normalised shape, GroupNorm and RMSNorm."""

    class Norms(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.ln = nn.Linear(3, 12), nn.LayerNorm(12)
            self.gn, self.ln2 = nn.GroupNorm(2, 4), nn.LayerNorm((3, 4), bias=False)
            self.rms, self.head = nn.RMSNorm(12), nn.Linear(12, 4)

        def forward(self, x):
            h = torch.tanh(self.ln(self.inp(x)))  # (B, 12)
            h = self.gn(h.view(-1, 4, 3)).transpose(1, 2)  # (B, 3, 4): 4 channels
            h = torch.tanh(self.ln2(h)).reshape(-1, 12)
            return self.head(self.rms(h))

    model = Norms()
    with torch.no_grad():  # affine parameters away from their (1, 0) initial values
        for n, p in model.named_parameters():
            if not n.startswith(("inp", "head")):
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return flat_fn(model, torch.randn(B, 3), classification)


class Tokens(nn.Module):
    """An embedding of (B, T) tokens (a padding row, repeated tokens) and a learned positional
    embedding of the expanded positions (B, T), then a Linear on (B, T, E) and a 2-D head."""

    def __init__(self, vocab=7, T=5, E=4):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, E, padding_idx=0), nn.Embedding(T, E)
        self.mix, self.head = nn.Linear(E, E), nn.Linear(E, 3)

    def forward(self, t):
        pos = torch.arange(t.shape[1]).expand(t.shape[0], -1)
        h = torch.tanh(self.mix(self.tok(t) + self.pos(pos)))
        return self.head(h.mean(1))


def tokens(B=6, T=5, vocab=12):
    t = torch.randint(0, vocab - 3, (B, T))  # the last three rows of the table are unused
    t[0, :2] = 0  # padding tokens
    t[1] = t[2]  # two data with the same tokens
    return flat_fn(Tokens(vocab, T), t, classification)


class Attention(nn.Module):
    """nn.MultiheadAttention on (B, T, E) inputs (or (T, B, E): ``batch_first=False``), self or
    cross (``"packed"``: other keys/values of width E; ``"separate"``: of another width, separate
    projection weights), with an attention mask and key padding, mean-pooled."""

    def __init__(self, E=6, heads=2, cross=False, batch_first=True, bias=True):
        super().__init__()
        kv = 5 if cross == "separate" else None
        self.attn = nn.MultiheadAttention(E, heads, batch_first=batch_first, bias=bias,
                                          kdim=kv, vdim=kv)
        self.cross, self.head = cross, nn.Linear(E, 3)

    def forward(self, x):
        T = x.shape[1]
        q = x[..., :6]
        kv = {"separate": x[..., 1:], "packed": q.flip(1), False: q}[self.cross]
        mask = torch.ones(T, T, dtype=torch.bool).triu(2)  # a banded attention mask
        pad = torch.zeros(x.shape[0], T, dtype=torch.bool)
        pad[0, -1] = True
        if not self.attn.batch_first:
            q, kv = q.transpose(0, 1), kv.transpose(0, 1)
        out, _ = self.attn(q, kv, kv, attn_mask=mask, key_padding_mask=pad)
        out = out if self.attn.batch_first else out.transpose(0, 1)
        return self.head(torch.tanh(out).mean(1))


def attention(B=5, **kw):
    return flat_fn(Attention(**kw), torch.randn(B, 4, 6), classification)


class TransformerClassifier(nn.Module):
    """Features (B, T, F) → Linear → + positional embedding → TransformerEncoderLayer
    (dropout 0, batch first) → LayerNorm → mean over T → Linear head."""

    def __init__(self, F=3, T=4, E=8, heads=2, norm_first=False, classes=3):
        super().__init__()
        self.inp, self.pos = nn.Linear(F, E), nn.Embedding(T, E)
        self.layer = nn.TransformerEncoderLayer(E, heads, dim_feedforward=12, dropout=0.0,
                                                batch_first=True, norm_first=norm_first)
        self.norm, self.head = nn.LayerNorm(E), nn.Linear(E, classes)

    def forward(self, x):
        pos = torch.arange(x.shape[1]).expand(x.shape[0], -1)
        return self.head(self.norm(self.layer(self.inp(x) + self.pos(pos))).mean(1))


def transformer(B=6, **kw):
    return flat_fn(TransformerClassifier(**kw), torch.randn(B, 4, 3), classification)


PROBLEMS = {
    "mlp_tanh": mlp_tanh,
    "mlp_784": mlp_784,
    "mlp_rest": mlp_rest,
    "lenet": lenet,
    "lenet_stride_pad_dil": lambda: lenet(conv2=nn.Conv2d(4, 6, 3, stride=2, padding=2,
                                                          dilation=2)),
    "lenet_same_even_kernel": lambda: lenet(conv2=nn.Conv2d(4, 6, 4, padding="same")),
    "cnn1d": cnn1d,
    "cnn1d_same_even_dilated": lambda: cnn1d(conv2=nn.Conv1d(3, 4, 4, padding="same",
                                                             dilation=2)),
    "cnn3d": cnn3d,
    "seq_linear": seq_model,
    "frozen_first": frozen_first,
    "norms": norms_mlp,
    "embedding": tokens,
    "attention_self": attention,
    "attention_cross_seq_first": lambda: attention(cross="separate", batch_first=False),
    "attention_cross_packed": lambda: attention(cross="packed"),
    "attention_no_bias": lambda: attention(bias=False),
    "transformer": transformer,
    "transformer_norm_first": lambda: transformer(norm_first=True),
}


# --------------------------------------------------------------- well-conditioned problems
# Tests of the implicit gradient compare with a reference at tolerances far below what a nearly
# singular Gram allows, so they run on problems whose Gram J Jᵀ is well conditioned by
# construction. One-hot inputs x_b = e_b: the first layer's weight block of J has the rows
# r_b δ_b ⊗ e_b (r_b the datum's residual, δ_b its back-propagated vector), whose supports are
# disjoint, so J Jᵀ ⪰ diag(r_b² ‖δ_b‖²) (the other blocks add PSD terms); the targets are moved
# away from the outputs, so no residual r_b is near zero. LeNet's rows are nearly orthogonal
# (random images of many pixels) and its log-softmax rows do not vanish. The problems are built
# from their own seed, not the suite's, so they are the same matrices on every run, and
# ``conditioned`` asserts the bound it relies on.
PROBLEM_SEED = 1
COND_MAX = 1e4


def shifted(loglik, by=3.0):
    """``loglik`` of the outputs lowered by ``by`` (the targets moved away from the outputs)."""
    return lambda out, extra: loglik(out - by, extra)


def one_hot_mlp(B, widths, loglik, extra=0):
    """A tanh MLP ``B → widths → 1`` on the one-hot inputs ``x = I_B``."""
    sizes = (B, *widths)
    layers = []
    for i, o in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(i, o), nn.Tanh()]
    model = nn.Sequential(*layers, nn.Linear(sizes[-1], 1))
    return flat_fn(model, torch.eye(B), loglik, extra=extra)


def one_hot_seq(B=7, T=5):
    """:class:`SeqModel` on ``(B, T, B)`` inputs ``x_bt = c_t e_b`` (one-hot up to a scale)."""
    x = torch.eye(B)[:, None, :] * torch.linspace(0.5, 1.5, T)[:, None]
    return flat_fn(SeqModel(d_in=B), x, shifted(regression))


CONDITIONED = {
    "mlp_tanh": lambda: one_hot_mlp(16, (50, 50), shifted(regression)),
    "mlp_rest": lambda: one_hot_mlp(12, (20,), shifted(regression_noise), extra=1),
    "lenet": lenet,
    "seq_linear": one_hot_seq,
    "small_mlp": lambda: one_hot_mlp(5, (4,), shifted(regression)),
}


def conditioned(name):
    """``(fn, z)`` of ``CONDITIONED[name]`` built under ``PROBLEM_SEED``, after checking
    ``cond(J Jᵀ) ≤ COND_MAX``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(PROBLEM_SEED)
        fn, z = CONDITIONED[name]()
    J = torch.func.jacrev(fn)(z)
    eig = torch.linalg.eigvalsh(J @ J.T)
    assert float(eig[-1]) <= COND_MAX * float(eig[0]), f"{name}: cond {float(eig[-1] / eig[0])}"
    return fn, z
