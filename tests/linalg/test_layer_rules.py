"""The layer-Gram rules of norms' affine maps, embeddings and multi-head attention
(``pyro_viking.linalg.layer_rules``, ``layer_rules_attention``): exact against ``jacrev``
(float64; ``test_layer_gram.py`` runs every problem of ``PROBLEMS`` through the same contract),
computed by the rules and not by forward-mode rest columns, on a subset of the parameters, with
several rows per datum, and refused (so that the automatic choice falls back) where no exact
rule applies."""

import pytest
import torch
from layer_problems import (
    PROBLEMS,
    Attention,
    Tokens,
    TransformerClassifier,
    classification,
    flat_fn,
)
from test_layer_gram import check_bilinear, check_operator
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from pyro_viking.linalg.layer_gram import (
    LayerGramJacobian,
    LayerGramNotApplicable,
    select_jacobian_backend,
)
from pyro_viking.linalg.per_example import PerExampleJacobian

pytestmark = pytest.mark.float64_only

NEW = ["norms", "embedding", "attention_self", "attention_cross_seq_first",
       "attention_cross_packed", "attention_no_bias", "transformer", "transformer_norm_first"]


@pytest.mark.parametrize("name", NEW)
def test_rules_cover_every_column(name):
    """Every parameter is a recorded layer's: no forward-mode rest column."""
    fn, z = PROBLEMS[name]()
    op = LayerGramJacobian(fn, z)
    assert op.rest_columns.numel() == 0 and op.check_error < 1e-12


@pytest.mark.parametrize("keep_graph", [True, False], ids=["build-graph", "re-run"])
@pytest.mark.parametrize("name", ["norms", "embedding", "attention_cross_seq_first",
                                  "transformer"])
def test_rules_bilinear_gradient(name, keep_graph):
    """Against autograd through the dense Jacobian (the reference differentiates the module's
    own attention twice: the math kernel of ``scaled_dot_product_attention`` has that
    derivative, the fused CPU kernel has not)."""
    fn, z = PROBLEMS[name]()
    with sdpa_kernel(SDPBackend.MATH):
        check_bilinear(lambda f, x: LayerGramJacobian(f, x, keep_graph=keep_graph), fn, z)


def test_sequence_linear_layers_are_ghosts_or_blocks_by_size():
    """A linear map on (B, T, in) is kept as a ghost over the B·T positions when (B·T)² ≤
    B·out·in (the transformer's in-projection and first feed-forward layer here), else as a
    materialised block (its out-projection); ``test_layer_gram.py`` checks both against jacrev."""
    fn, z = PROBLEMS["transformer"]()
    op = LayerGramJacobian(fn, z)
    sequence = [g for g in op._ghosts if g.A.dim() == 3]
    assert [tuple(g.G.shape) for g in sequence] == [(6, 4, 24), (6, 4, 12), (6, 4, 8)]
    assert any(b.J.shape == (6, 8 * 8) for b in op._blocks)  # out_proj: 6·16 > 64


def test_embedding_block_holds_only_the_tokens_of_the_batch():
    """Unused rows of the table are zero columns of J (written as zeros by ``rmv``), and the
    block is ``(B, U·E)`` for the U distinct tokens; repeated tokens and the padding row (no
    gradient) included."""
    fn, z = PROBLEMS["embedding"]()
    op = LayerGramJacobian(fn, z)
    J = torch.func.jacrev(fn)(z)
    tok = op._blocks[0]
    assert tok.span == slice(0, 12 * 4) and tok.cols.numel() < 12 * 4
    assert torch.all(J[:, 9 * 4:12 * 4] == 0) and torch.all(J[:, :4] == 0)  # unused; padding
    U = torch.randn(2, J.shape[0])
    out = op.rmv(U)
    torch.testing.assert_close(out, U @ J, atol=1e-12, rtol=0)


@pytest.mark.parametrize("latent", [
    ["layer.self_attn.in_proj_weight"],
    ["layer.self_attn.out_proj.weight", "layer.self_attn.out_proj.bias", "norm.weight"],
    ["layer.self_attn.in_proj_bias", "layer.norm1.bias", "pos.weight", "head.weight"],
], ids=["in_proj", "out_proj+norm", "biases+pos+head"])
def test_rules_on_a_subset_of_the_parameters(latent):
    """z holds some parameters of a transformer, the others are constants: the Jacobian is
    w.r.t. those in z only, still without rest columns."""
    torch.manual_seed(0)
    fn, z = flat_fn(TransformerClassifier(), torch.randn(6, 4, 3), classification,
                    latent=latent)
    op = LayerGramJacobian(fn, z)
    assert op.rest_columns.numel() == 0
    check_operator(op, fn, z)


@pytest.mark.parametrize("name", ["embedding", "transformer"])
def test_rules_with_several_rows_per_datum(name):
    """The log-softmax outputs of every class as rows, datum-major (the Fisher/output
    Jacobian's layout): ``rows_per_datum`` inferred."""
    model, x = {"embedding": lambda: (Tokens(12), torch.randint(0, 9, (5, 5))),
                "transformer": lambda: (TransformerClassifier(), torch.randn(5, 4, 3))}[name]()
    fn, z = flat_fn(model, x, lambda out, _: out.log_softmax(-1).reshape(-1))
    op = LayerGramJacobian(fn, z, rows_per_datum=None)
    assert op.rows_per_datum == 3 and op.rest_columns.numel() == 0
    check_operator(op, fn, z)


# --------------------------------------------------------------------------- refusals
def _refused(model, x, match):
    fn, z = flat_fn(model, x, classification)
    with pytest.raises(LayerGramNotApplicable, match=match):
        LayerGramJacobian(fn, z)
    assert isinstance(select_jacobian_backend(fn, z), PerExampleJacobian)  # the fallback


def test_attention_options_without_a_rule_are_refused():
    x = torch.randn(5, 4, 6)
    model = Attention()
    model.attn = nn.MultiheadAttention(6, 2, batch_first=True, add_bias_kv=True)
    _refused(model, x, "add_bias_kv")
    model = Attention()
    model.attn = nn.MultiheadAttention(6, 2, batch_first=True, dropout=0.5).train()
    _refused(model, x, "dropout")


def test_attention_hint_that_does_not_match_its_mask_is_refused():
    """``is_causal=True`` with a mask that is not causal: the module ignores the mask, the
    recomputation does not; the comparison with the module's output catches it."""

    class Hinted(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.head = nn.MultiheadAttention(6, 2, batch_first=True), nn.Linear(6, 3)

        def forward(self, x):
            mask = torch.ones(4, 4, dtype=torch.bool).triu(2)
            out, _ = self.attn(x, x, x, attn_mask=mask, is_causal=True, need_weights=False)
            return self.head(out.mean(1))

    _refused(Hinted(), torch.randn(5, 4, 6), "differs from the module's output")


def test_embedding_options_without_a_rule_are_refused():
    model = Tokens(12)
    model.tok = nn.Embedding(12, 4, max_norm=1.0)
    _refused(model, torch.randint(0, 12, (5, 5)), "max_norm")


def test_positions_without_a_data_dimension_are_refused():
    """A positional embedding looked up at ``arange(T)`` (no data dimension, broadcast over
    the batch) has no per-datum output gradient: refused, the fallback is used."""

    class Broadcast(Tokens):
        def forward(self, t):
            h = torch.tanh(self.mix(self.tok(t) + self.pos(torch.arange(t.shape[1]))))
            return self.head(h.mean(1))

    _refused(Broadcast(12), torch.randint(0, 12, (6, 5)), "leading data dimension")


def test_rest_columns_through_attention_fall_back():
    """A class token (a parameter outside every layer) whose path crosses the CPU attention
    kernel, which has no forward mode: the rest columns cannot be computed, the layer-Gram
    Jacobian is refused and the per-example one is exact."""

    class Token(TransformerClassifier):
        def __init__(self):
            super().__init__()
            self.cls = nn.Parameter(torch.randn(1, 1, 8))

        def forward(self, x):
            h = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.inp(x)], 1)
            return self.head(self.norm(self.layer(h))[:, 0])

    fn, z = flat_fn(Token(), torch.randn(5, 4, 3), classification, latent=["cls", "head.weight"])
    with pytest.raises(LayerGramNotApplicable, match="forward mode"):
        LayerGramJacobian(fn, z)
    op = select_jacobian_backend(fn, z)
    assert isinstance(op, PerExampleJacobian)
    torch.testing.assert_close(op.to_dense(), torch.func.jacrev(fn)(z), atol=1e-10, rtol=0)


def test_transformer_selects_the_layer_gram_backend():
    fn, z = PROBLEMS["transformer"]()
    assert isinstance(select_jacobian_backend(fn, z), LayerGramJacobian)
