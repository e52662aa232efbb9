"""The sampling state of :class:`~pyro_viking.AutoViking`: what lives across its calls.

:class:`SamplingState` is the one object that lives across calls: the carried kernel samples
of the stochastic alternating projections (training), the samples ``(ε, Pε)`` projected on the
training data (prediction), and what lazy projection needs (the training call's data, and
whether it changed between calls). Training draws (``k`` the carried kernel sample)

    e = √γ k + √(1−γ) η,  k ← P_t e,  z = θ̂ + σ_ker k + σ_im i,  i ~ N(0, I − P_t),

with ``i`` independent of ``k`` (``image_noise="fresh"``) or the paper's ``e − P_t e``
(``"carried"``). The carry ``k ← P_t e`` of a draw is kept only once a backward pass reaches
the draw (a training step; :class:`_PendingCarry`): a loss evaluated without one, with
gradients enabled or not, leaves the training state as it was. Prediction draws
``z = θ̂ + σ_ker Pε + σ_im (ε − Pε)`` cycle through the training-data samples.

The posteriors of :mod:`~pyro_viking.infer.autoguide.posteriors` get the state when they are
built and draw from it.
"""

from __future__ import annotations

import math
import weakref
from collections import deque
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch
from pyro.poutine.runtime import get_plates
from torch import Tensor

from pyro_viking.distributions import KernelImageNormal
from pyro_viking.linalg import KernelProjector
from pyro_viking.user_warnings import warn

__all__ = ["SamplingState"]


def _same_call(a: Tuple[tuple, dict], b: Tuple[tuple, dict]) -> bool:
    """Whether two calls carry the same data: the same tensor objects, equal plain values."""
    (args_a, kw_a), (args_b, kw_b) = a, b
    if len(args_a) != len(args_b) or kw_a.keys() != kw_b.keys():
        return False
    for x, y in zip(args_a + tuple(kw_a.values()), args_b + tuple(kw_b[k] for k in kw_a)):
        if x is y:
            continue
        if torch.is_tensor(x) or torch.is_tensor(y) or not isinstance(x, (int, float, str, bool)):
            return False
        if x != y:
            return False
    return True


class _PendingCarry:
    """The carried chain after the training draw number ``seq`` of size ``n``, committed to
    ``state`` when a backward pass reaches the draw's sample (:meth:`watch`). Until then it is
    the base of the next draws only while the sample is alive (the particles of one loss still
    being built), not after it was dropped (a loss evaluated without backward)."""

    def __init__(self, state: SamplingState, n: int, seq: int, chain: deque):
        self.state, self.n, self.seq, self.chain, self._sample = state, n, seq, chain, None

    def watch(self, sample: Tensor) -> None:
        self._sample = weakref.ref(sample)
        if sample.requires_grad:
            sample.register_hook(self._reach)

    def _reach(self, grad: Tensor) -> None:
        self.state._commit(self)

    @property
    def alive(self) -> bool:
        return self._sample is not None and self._sample() is not None


class SamplingState:
    """Carried chains, prediction samples and lazy-projection bookkeeping of one guide.

    :param gamma: memory ``γ`` of the alternating projections.
    :param image_noise: ``"fresh"`` or ``"carried"``.
    :param num_chains: carried kernel samples per draw size (sequential particles).
    """

    #: samples projected at once when the guide projects lazily for prediction
    LAZY_NUM_SAMPLES = 100
    #: draws a run may take beyond the cached samples before they count as repeating:
    #: Predictive (pyro 1.9) runs the guide twice before its ``num_samples`` draws (plate
    #: nesting, then site shapes) and drops both
    PROBE_DRAWS = 2

    def __init__(self, gamma: float, image_noise: str, num_chains: int = 1):
        if not 0.0 <= float(gamma) <= 1.0:
            raise ValueError(f"gamma must lie in [0, 1], got {gamma}")
        if image_noise not in ("fresh", "carried"):
            raise ValueError(f"image_noise must be 'fresh' or 'carried', got {image_noise!r}")
        self.gamma, self.image_noise, self.num_chains = float(gamma), image_noise, num_chains
        self.chains: Dict[int, deque] = {}  # the carried chains of training steps
        self._pending: Dict[int, _PendingCarry] = {}  # the last training draw of each size
        self._committed: Dict[int, int] = {}  # the number of the draw each chain is from
        self._draws = 0  # training draws so far
        self.last_draw: Dict[int, Tuple[Tensor, Tensor]] = {}  # by draw size
        self.last: Optional[Tuple[Tensor, Tensor]] = None  # the most recent training draw
        self.noise: Optional[Tensor] = None  # (S, D) prediction noise ε
        self.kernel: Optional[Tensor] = None  # (S, D) its kernel part on the training data
        self.counter, self.lazy, self.stale, self.sharded = 0, False, False, False
        self._data: Optional[Tuple[tuple, dict]] = None
        self._predicting: Optional[Tuple[tuple, dict]] = None  # args of the last prediction
        self._varies, self._training, self._warned = False, False, set()

    # -- training -------------------------------------------------------------------------------
    def note_training_call(self, args: tuple, kwargs: dict) -> None:
        """Record a training call (one with gradients; a loss evaluation without them does not
        count): prediction samples are now stale; a new phase (after a prediction or
        projection) starts from this call's data."""
        if not torch.is_grad_enabled():
            return
        if not self._training:
            self._training, self._data, self._varies = True, (args, kwargs), False
        elif not self._varies and not _same_call(self._data, (args, kwargs)):
            self._varies, self._data = True, None
        self.stale = self.noise is not None

    @property
    def training_data(self) -> Optional[Tuple[tuple, dict]]:
        """``(args, kwargs)`` of the training phase when every call carried the same data."""
        return None if self._varies else self._data

    def forget_training_data(self) -> None:
        """Treat this phase's data as unknown (prediction then warns instead of projecting)."""
        self._varies, self._data = True, None

    def _carried_chain(self, n: int) -> deque:
        """A copy of the chain that the next draw of size ``n`` continues: the last training
        step's, or the last draw's while its sample is alive (not reached by a backward pass)."""
        pending = self._pending.get(n)
        if pending is not None and pending.seq > self._committed.get(n, -1) and pending.alive:
            return deque(pending.chain)
        return deque(self.chains.get(n, ()))

    def _commit(self, pending: _PendingCarry) -> None:
        """A backward pass reached ``pending``'s draw: its chain is the carry (unless a later
        draw's already is: one backward pass over several particles reaches the last first)."""
        if pending.seq > self._committed.get(pending.n, -1):
            self.chains[pending.n], self._committed[pending.n] = pending.chain, pending.seq

    def training_draw(self, q: KernelImageNormal, n: int) -> Tuple[Tensor, Tensor]:
        """Kernel and image parts ``(n, D)`` of ``n`` training draws from ``q``; the new carry
        waits for :meth:`watch` of the draw's sample."""
        eta = torch.randn(n, q.event_shape[0], dtype=q.loc.dtype, device=q.loc.device)
        chain = self._carried_chain(n)
        full = len(chain) >= max(1, self.num_chains)
        # A loss evaluation without gradients (SVI.evaluate_loss) reads the carried chain:
        # evaluations repeat under a seed and leave training undisturbed.
        evaluating = not torch.is_grad_enabled()
        k_prev = (chain[0] if evaluating else chain.popleft()) if full else None
        g, proj = self.gamma, q.projector
        restart = k_prev is None or g == 0
        if (self.image_noise == "fresh" and proj.samples_image_directly
                and q.kernel_dim_source == "exact"):
            # image noise straight from the Gram's factorisation: one mv + one rmv in all
            e = eta if restart else torch.add(eta.mul_(math.sqrt(1 - g)), k_prev,
                                               alpha=math.sqrt(g))
            k, img = proj.kernel_and_image(e)
        elif restart:
            e = eta
            k, img = q.split_noise(eta)
        else:
            e = math.sqrt(g) * k_prev + math.sqrt(1 - g) * eta
            if self.image_noise == "carried":
                k, img = q.split_noise(e, probe=eta if g < 1 else None,
                                       probe_weight=math.sqrt(1 - g) if g < 1 else 1.0)
            else:
                both = proj(torch.cat([e, eta]))
                k, img = both[:n], eta - both[n:]
                q.record_probes(eta, both[n:])
        if not evaluating:
            chain.append(k.detach())
            self._draws += 1
            self._pending[n] = self._latest = _PendingCarry(self, n, self._draws, chain)
        self.last_draw[n] = self.last = (e.detach(), k.detach())
        return k, img

    def watch(self, sample: Tensor) -> None:
        """``sample`` is the last training draw's: its carry is kept once a backward pass
        reaches ``sample``."""
        latest = self.__dict__.pop("_latest", None)
        if latest is not None:
            latest.watch(sample)

    def restart_chains(self, k: Tensor) -> None:
        """Carry the kernel samples ``k`` ``(S, D)`` into the next ``S`` training draws."""
        self.chains, self._pending = {k.shape[0]: deque([k.clone()])}, {}

    # -- prediction -----------------------------------------------------------------------------
    def set_prediction_samples(self, noise: Tensor, kernel: Tensor, *, lazy: bool,
                               append: bool = False, sharded: bool = False) -> None:
        """Cache ``(ε, Pε)`` projected on the training data (``lazy``: by the guide itself;
        ``append``: more samples for the current prediction run, the count goes on;
        ``sharded``: projected collectively on every rank's shard, which no rank re-projects
        alone)."""
        if append and self.noise is not None:
            noise, kernel = torch.cat([self.noise, noise]), torch.cat([self.kernel, kernel])
        else:
            self.counter = 0
        self.noise, self.kernel = noise, kernel
        self.lazy, self.stale, self._training = lazy, False, False
        self.sharded = sharded
        self._warned.discard("stale")

    def project(self, projectors: Iterable[Callable[[], KernelProjector]], num_samples: int,
                like: Tensor, *, lazy: bool, progress: bool = False) -> Tensor:
        """Alternating projections ``k ← P_b k`` of ``num_samples`` fresh samples ``ε`` over the
        projectors of passes over the training data (each built when it is reached); caches
        ``(ε, k)`` (a lazy projection adds to current lazy samples) and returns ``k`` ``(S, D)``."""
        append = lazy and self.lazy and not self.stale and self.noise is not None
        e = torch.randn(num_samples, like.shape[-1], dtype=like.dtype, device=like.device)
        k = e.clone()
        if progress:
            from tqdm.auto import tqdm

            projectors = tqdm(list(projectors), desc="projecting on training data", unit="batch")
        for build in projectors:
            with torch.no_grad():
                k = build()(k)
        self.set_prediction_samples(e, k, lazy=lazy, append=append)
        return k

    def needs_projection(self, n: int) -> bool:
        """Whether ``n`` prediction draws call for (re)projecting on the training data: no
        samples yet, samples projected at an older θ̂, or (when the guide projected them
        itself) fewer samples than one call asks for. Later calls cycle through them, as
        through those of :meth:`~pyro_viking.AutoViking.project_training_data` (projecting
        costs about as much as predicting with that many samples). Never for samples
        projected on every rank's shard: one rank alone would project on its shard only."""
        if self.noise is not None and self.sharded:
            return False
        if self.noise is None or self.stale:
            return True
        return self.lazy and self.counter + n > self.noise.shape[0] + self.PROBE_DRAWS

    def begin_prediction(self, args: tuple, kwargs: dict) -> int:
        """A prediction call: calls on new inputs start again from the first sample (every
        input set sees the same posterior samples); a run of calls on the same inputs (e.g.
        sequential ``Predictive``) goes on through them, so its draws are distinct. Returns the
        number of draws of this call (the particle plates' sizes)."""
        if self._predicting is None or not _same_call(self._predicting, (args, kwargs)):
            self.counter = 0
        self._predicting = (args, kwargs)
        return math.prod(f.size for f in get_plates())

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warn(message)

    def prediction_samples(self) -> Tuple[Tensor, Tensor]:
        """``(ε, Pε)`` that prediction draws come from (with a warning where they are not
        projected on the current training data)."""
        self._training = False
        if self.noise is not None:
            if self.stale:
                self._warn_once("stale", "AutoViking was trained since project_training_data; "
                                "its samples are projected at an older loc. Call "
                                "guide.project_training_data(...) again.")
            return self.noise, self.kernel
        if not self.last_draw:
            raise RuntimeError(
                "AutoViking has no samples projected on the training data: call "
                "guide.project_training_data(*training_args) (or batches=...) before predicting.")
        self._warn_once("last", "AutoViking cannot re-project on the whole training set (the "
                        "data changed between training calls, or the model is not attached): "
                        "predicting with the last training step's kernel samples. Call "
                        "guide.project_training_data(batches=...) for samples projected on "
                        "the whole training set.")
        return max(self.last_draw.items())[1]

    def next_indices(self, n: int, S: int) -> Tensor:
        """Indices of the next ``n`` of ``S`` prediction samples (cycling)."""
        if self.counter + n > S + self.PROBE_DRAWS:
            draws = self.counter + n - self.PROBE_DRAWS  # Predictive's set-up runs not counted
            self._warn_once("repeat", f"{draws} draws on the same inputs but only {S} "
                            "samples projected on the training data are cached; they repeat. "
                            f"Call guide.project_training_data(num_samples={draws}).")
        idx = (torch.arange(n) + self.counter) % S
        self.counter += n  # not wrapped: a lazy pool grows when a run of draws exceeds it
        return idx

    def __getstate__(self):
        # the training data are the user's: not saved with the guide
        # draws not reached by a backward pass are not training steps: not saved
        state = {**self.__dict__, "_data": None, "_varies": True, "_predicting": None}
        state.pop("_latest", None)
        return {**state, "_pending": {}}

    def __setstate__(self, state):
        self.__dict__.update({"_pending": {}, "_committed": {}, "_draws": 0, "sharded": False,
                              **state})


