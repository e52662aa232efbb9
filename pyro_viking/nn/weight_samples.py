"""Running a network on a leading batch of weight samples.

Vectorised particles (``(K, 1, *shape)`` latents over a data plate at dim −1) and
``Predictive(parallel=True)`` (``(S, *shape)``) hand the network a batch of weight samples.
:class:`WeightSampleRunner` evaluates it one of two ways (``weight_samples``):

* ``"vmap"``: one ``torch.vmap``ped call over the samples; a network without a batching rule
  (``nn.GRU``, ``nn.LSTM``) falls back to the loop, for good;
* ``"loop"``: one call per sample, the outputs stacked;
* ``"auto"``: vmap, except on CPU where the loop runs when, with gradients, one sample has more
  than :data:`LOOP_GRAD_WEIGHTS` latent weights, or one sample's ``nn.Linear`` and convolution
  outputs on inputs of this shape exceed :data:`LOOP_OUTPUT_ELEMENTS` elements (counted by one
  probe call per input shape).

Why a loop can win: vmap batches the samples' matmuls and convolutions (grouped ones, slow on
CPU) over activations K times one sample's, which stop fitting in cache, and its backward
transposes each sample's weight gradient into place (a copy of K·D numbers). The crossovers
behind the two limits were measured on CPU: ``benchmarks/README.md``, section "Weight samples:
vmap or loop".
"""

from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch
from torch import Tensor, nn

__all__ = ["LOOP_GRAD_WEIGHTS", "LOOP_OUTPUT_ELEMENTS", "WEIGHT_SAMPLES", "WeightSampleRunner",
           "has_tied_tensors"]

WEIGHT_SAMPLES = ("auto", "vmap", "loop")
#: ``weight_samples="auto"`` on CPU: weight samples run in a loop when one sample's
#: ``nn.Linear`` and convolution outputs together exceed this many elements (read at call time)
LOOP_OUTPUT_ELEMENTS = 100_000
#: ``weight_samples="auto"`` on CPU: with gradients, weight samples also run in a loop when one
#: sample has more latent weights than this (read at call time)
LOOP_GRAD_WEIGHTS = 100_000

#: the network on inputs fixed by the caller, for one weight sample (name → tensor ``shape``)
SampleCall = Callable[[Dict[str, Tensor]], Tensor]


def has_tied_tensors(net: nn.Module) -> bool:
    """Whether one tensor of ``net`` is a parameter or buffer under two names (tied weights)."""
    named = [*net.named_parameters(remove_duplicate=False),
             *net.named_buffers(remove_duplicate=False)]
    return len({id(t) for _, t in named}) < len(named)


class WeightSampleRunner:
    """How one network runs on batches of weight samples, and what it has learnt about that:
    whether vmap works on it, and the ``"auto"`` choice per input shape.

    :param net: the network (its ``nn.Linear`` and convolution layers are probed by ``"auto"``).
    :param mode: one of :data:`WEIGHT_SAMPLES`; ``ValueError`` otherwise.
    """

    #: whether a parameter or buffer of the network is held under two names (weight tying):
    #: only then must a ``functional_call`` untie them, a walk over the whole network (a runner
    #: unpickled from before this attribute existed unties, as it did)
    tied = True

    def __init__(self, net: nn.Module, mode: str = "auto") -> None:
        if mode not in WEIGHT_SAMPLES:
            raise ValueError(f"weight_samples must be one of {WEIGHT_SAMPLES}, got {mode!r}")
        self.mode = mode
        # vmap until it fails on the network (e.g. nn.GRU has no batching rule)
        self.vmappable = mode != "loop"
        self.layers = [m for m in net.modules()
                       if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
        self.tied = has_tied_tensors(net)
        self.vmap_for_shape: Dict[Tuple[int, ...], bool] = {}  # "auto": choice per input shape

    def run(self, latent: Dict[str, Tensor], shapes: Dict[str, torch.Size], x: Tensor,
            call: SampleCall, probe: SampleCall) -> Tensor:
        """The network on ``x`` ``(B, ...)`` for the latent values ``latent`` (name → tensor
        ``(*batch, *shapes[name])``, batch shapes broadcasting): ``call(latent)`` when
        unbatched, else ``(*batch', B, ...)`` with ``batch'`` the broadcast batch without a
        trailing 1 (the data plate's dim). ``probe`` is the plain network (not linearised),
        which ``"auto"`` runs once per input shape to count layer outputs."""
        if all(v.dim() == len(shapes[n]) for n, v in latent.items()):
            return call(latent)  # unbatched (a training step): no shapes to broadcast
        batch = torch.broadcast_shapes(*(v.shape[:v.dim() - len(shapes[n])]
                                         for n, v in latent.items()))
        if not batch:
            return call(latent)
        flat = {n: v.expand(batch + shapes[n]).reshape((-1,) + shapes[n])
                for n, v in latent.items()}
        out = self.map_samples(flat, x, call, probe)
        out_batch = batch[:-1] if batch[-1] == 1 else batch
        return out.reshape(out_batch + out.shape[1:])

    def map_samples(self, flat: Dict[str, Tensor], x: Tensor, call: SampleCall,
                    probe: SampleCall) -> Tensor:
        """``(S, B, ...)``: ``call`` for each of the ``S`` weight samples ``flat`` (name →
        ``(S, *shape)``), through ``torch.vmap`` or a loop over the samples."""
        if self.vmappable and self.use_vmap(flat, x, probe):
            try:
                return torch.vmap(call, randomness="different")(flat)
            except (RuntimeError, NotImplementedError) as e:
                if "atching rule" not in str(e) and "vmap" not in str(e):
                    raise
                self.vmappable = False  # e.g. nn.GRU/LSTM: no batching rule; loop from now on
        # unbind, not v[i]: one stack in the backward where each index would allocate and
        # zero a full (S, ...) gradient per sample and parameter
        per_sample = zip(*(v.unbind(0) for v in flat.values()))
        return torch.stack([call(dict(zip(flat, values))) for values in per_sample])

    def use_vmap(self, flat: Dict[str, Tensor], x: Tensor, probe: SampleCall) -> bool:
        """The ``"auto"`` rule (``True`` for ``"vmap"`` and off CPU): vmap unless gradients
        flow to more than :data:`LOOP_GRAD_WEIGHTS` weights per sample, or one sample's
        ``nn.Linear`` and convolution outputs on inputs of ``x``'s shape exceed
        :data:`LOOP_OUTPUT_ELEMENTS` (one ``probe`` call without gradients per shape)."""
        if self.mode != "auto" or x.device.type != "cpu":
            return True
        if torch.is_grad_enabled() and any(v.requires_grad for v in flat.values()) \
                and sum(v[0].numel() for v in flat.values()) > LOOP_GRAD_WEIGHTS:
            return False
        if not self.layers:
            return True
        key = tuple(x.shape)
        if key not in self.vmap_for_shape:
            self.vmap_for_shape[key] = self._layer_outputs(flat, probe) <= LOOP_OUTPUT_ELEMENTS
        return self.vmap_for_shape[key]

    def _layer_outputs(self, flat: Dict[str, Tensor], probe: SampleCall) -> int:
        """Elements of the layers' outputs in one ``probe`` call on the first sample."""
        count = [0]

        def add(module, inputs, output):
            count[0] += output.numel()

        hooks = [m.register_forward_hook(add) for m in self.layers]
        try:
            with torch.no_grad():
                probe({n: v[0] for n, v in flat.items()})
        finally:
            for h in hooks:
                h.remove()
        return count[0]
