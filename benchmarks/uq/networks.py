"""The benchmark's networks: a tanh MLP (digits, the regression tasks) and a 1-D CNN (MNIST-1D).

Both are plain ``nn.Sequential`` stacks of ``Linear`` / ``Conv1d`` layers and elementwise
activations, so every method (MAP, IVON, Laplace's last layer, the Pyro guides through
``PyroModule``, VIKING through ``BayesianNetwork``) runs them unchanged.
"""

from __future__ import annotations

import torch.nn as nn


class MLP(nn.Sequential):
    """Fully connected tanh network ``n_in → hidden… → n_out``; the last layer is ``Linear``."""

    def __init__(self, n_in: int, hidden: tuple, n_out: int):
        layers, width = [], n_in
        for h in hidden:
            layers += [nn.Linear(width, h), nn.Tanh()]
            width = h
        layers.append(nn.Linear(width, n_out))
        super().__init__(*layers)


def _conv_length(length: int, kernel: int, stride: int, padding: int) -> int:
    return (length + 2 * padding - kernel) // stride + 1


class CNN1d(nn.Sequential):
    """The MNIST-1D authors' CNN (``ConvBase`` of the mnist1d repository's
    ``notebooks/models.py``) at ``channels`` channels: input ``(N, length)`` → three stride-2
    convolutions (1→C, kernel 5; C→C, kernel 3; C→C, kernel 3; padding 1; ReLU after each)
    → flatten → ``Linear(C · L₃, n_out)``, where L₃ is the length after the three convolutions
    (5 for ``length = 40``). D = 6C² + 8C + (C·L₃ + 1)·n_out."""

    def __init__(self, n_out: int, channels: int = 32, length: int = 40):
        layers, width, size = [nn.Unflatten(1, (1, length))], 1, length
        for kernel in (5, 3, 3):
            layers += [nn.Conv1d(width, channels, kernel, stride=2, padding=1), nn.ReLU()]
            width, size = channels, _conv_length(size, kernel, 2, 1)
        layers += [nn.Flatten(), nn.Linear(channels * size, n_out)]
        super().__init__(*layers)
