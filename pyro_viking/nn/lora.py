"""Low-rank adapters (LoRA) on a frozen trained network, for VIKING on the adapters only.

:func:`add_lora` copies a network, freezes every parameter of the copy and replaces chosen
``nn.Linear`` layers by :class:`LoRALinear`:

    y = W₀ x + b₀ + (α / r) · B A x,     A ∈ R^{r×in}, B ∈ R^{out×r},

``W₀, b₀`` the trained, frozen layer; ``A`` and ``B`` two bias-free ``nn.Linear`` layers
(``lora_a``, ``lora_b``), ``B = 0`` at the start (the copy computes what the network did).
Built with ``latent=LORA_LATENT`` (and frozen base weights, constants of the model), a
:class:`~pyro_viking.BayesianNetwork` has the adapters as its only latents
(``Σ r·(in + out)`` numbers per adapted layer); the adapters are layers the layer-Gram backend
records, so the projection uses the Jacobian w.r.t. ``(A, B)`` only::

    lora_net = add_lora(net, ["layer.linear1", "layer.linear2", "head"], rank=4)
    bnn = BayesianNetwork(lora_net, "classification", latent=LORA_LATENT, batch_size=64)

Layers inside ``nn.MultiheadAttention`` cannot be adapted this way: its projections are applied
inside ``F.multi_head_attention_forward``, not as modules.
"""

from __future__ import annotations

import copy
import math
from fnmatch import fnmatchcase
from typing import List, Optional, Sequence, Union

from torch import Tensor, nn

__all__ = ["LORA_LATENT", "LoRALinear", "add_lora", "lora_size"]

#: the latent rule (``BayesianNetwork(latent=LORA_LATENT)``) selecting every adapter matrix
LORA_LATENT = "*lora_[ab].weight"


class LoRALinear(nn.Module):
    """``base(x) + (alpha / rank) · lora_b(lora_a(x))`` (module docstring): ``lora_a`` starts
    as ``nn.Linear``'s initialisation, ``lora_b`` at zero; ``alpha`` defaults to ``rank``
    (scaling 1)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: Optional[float] = None):
        super().__init__()
        if int(rank) < 1:
            raise ValueError(f"rank must be a positive integer, got {rank}")
        w = base.weight
        self.base = base
        self.lora_a = nn.Linear(base.in_features, int(rank), bias=False, device=w.device,
                                dtype=w.dtype)
        self.lora_b = nn.Linear(int(rank), base.out_features, bias=False, device=w.device,
                                dtype=w.dtype)
        nn.init.zeros_(self.lora_b.weight)
        self.scaling = float(rank if alpha is None else alpha) / int(rank)

    def forward(self, x: Tensor) -> Tensor:
        """``(…, in) -> (…, out)``."""
        return self.base(x) + self.scaling * self.lora_b(self.lora_a(x))


def _adaptable(net: nn.Module) -> List[str]:
    """Names of the ``nn.Linear`` modules called as modules (not inside an attention)."""
    inside = {f"{n}.{c}" if n else c for n, m in net.named_modules()
              if isinstance(m, nn.MultiheadAttention) for c, _ in m.named_modules() if c}
    return [n for n, m in net.named_modules() if isinstance(m, nn.Linear) and n
            and n not in inside]


def add_lora(net: nn.Module, targets: Union[str, type, Sequence[Union[str, type]]], *,
             rank: int = 4, alpha: Optional[float] = None) -> nn.Module:
    """A copy of ``net`` with every parameter frozen (``requires_grad=False``) and the
    ``nn.Linear`` layers named by ``targets`` (names, globs such as ``"layers.*.linear1"``, or
    ``nn.Linear`` for all) replaced by :class:`LoRALinear` adapters of rank ``rank``; ``net``
    itself is not changed. ``ValueError`` when a target selects no adaptable layer."""
    adapted = copy.deepcopy(net)
    for p in adapted.parameters():
        p.requires_grad_(False)
    names = _adaptable(adapted)
    chosen: List[str] = []
    for t in targets if isinstance(targets, (list, tuple)) else [targets]:
        hits = [n for n in names if (isinstance(t, type) and isinstance(
            adapted.get_submodule(n), t)) or (isinstance(t, str) and (n == t or fnmatchcase(
                n, t)))]
        if not hits:
            raise ValueError(
                f"LoRA target {t!r} selects no nn.Linear called as a module; those of the "
                f"network are {names} (the projections of nn.MultiheadAttention are applied "
                "inside F.multi_head_attention_forward and cannot be adapted)")
        chosen += [n for n in hits if n not in chosen]
    for n in chosen:
        parent, _, leaf = n.rpartition(".")
        owner = adapted.get_submodule(parent) if parent else adapted
        setattr(owner, leaf, LoRALinear(getattr(owner, leaf), rank, alpha))
    return adapted


def lora_size(net: nn.Module) -> int:
    """Number of adapter parameters of ``net``: ``Σ r·(in + out)`` over its adapters."""
    return sum(math.prod(p.shape) for n, p in net.named_parameters()
               if fnmatchcase(n, LORA_LATENT))
