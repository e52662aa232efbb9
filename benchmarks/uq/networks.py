"""The benchmark's networks: a tanh MLP (digits, the regression tasks), a 1-D CNN (MNIST-1D) and a
small residual CNN with batch norm (``digits_resnet``).

The first two are plain ``nn.Sequential`` stacks of ``Linear`` / ``Conv1d`` layers and
elementwise activations, so every method (MAP, IVON, Laplace's last layer, the Pyro guides
through ``PyroModule``, VIKING through ``BayesianNetwork``) runs them unchanged. The residual CNN
has batch norms in training mode: every method predicts with them in eval mode (running
statistics), and VIKING's fit handles them as ``batch_norm_fit.py`` says.
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


class ResidualBlock(nn.Module):
    """The basic residual block of ResNet: conv 3×3 (stride ``stride``) → batch norm → ReLU →
    conv 3×3 → batch norm, plus the shortcut (the identity, or a strided 1×1 convolution and a
    batch norm where the shape changes), then ReLU. Convolutions without bias (the batch norm's
    shift is the bias), as in torchvision's ``BasicBlock``."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(c_out))
        self.relu = nn.ReLU()

    def forward(self, x):
        h = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class SmallResNet(nn.Sequential):
    """A residual CNN with batch norm for ``side × side`` one-channel images given as rows of
    ``side²`` pixels: the structure of the VIKING paper's ``ResNet_small`` (a conv-BN-ReLU stem,
    basic residual blocks, global average pooling, a linear head) scaled down for a CPU:
    stem 1→C, a block at C, a strided block C→2C (1×1 shortcut), ``AdaptiveAvgPool2d(1)``,
    ``Linear(2C, n_out)``. Built in training mode: its batch norms normalise with the minibatch's
    statistics in training, as PyTorch trains a ResNet."""

    def __init__(self, n_out: int, channels: int = 16, side: int = 8):
        c = channels
        super().__init__(
            nn.Unflatten(1, (1, side, side)),
            nn.Conv2d(1, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
            ResidualBlock(c, c), ResidualBlock(c, 2 * c, stride=2),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * c, n_out))
