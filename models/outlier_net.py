"""Small image classifier with two outlier activation channels (the int8 drift demo)."""

import torch
from torch import Tensor, nn


class OutlierChannelNet(nn.Module):
    """Input ``image`` [N, 3, 32, 32] float32, ImageNet-normalised; output logits [N, 10].

    stem conv -> ReLU -> mix conv -> ReLU -> strided conv -> ReLU -> global pool -> linear.
    Two of the stem's 32 output channels are ~100x larger than the rest ("massive
    activations", as LLMs and ViTs grow in a few feature channels and use as biases); the
    mix conv reads them with small weights, so its output lives on the 30 normal channels.
    ModelOpt's default int8 quantizes activations per tensor: the mix conv's input gets one
    scale, set by the outliers, and the normal channels fall into one or two int8 steps.
    The mix conv kept in high precision (``nodes_to_exclude``) reads them unquantized.
    Weights: seeded random init, then the outlier channels scaled."""

    def __init__(self, channels: int = 32, classes: int = 10, outliers: int = 2,
                 outlier_gain: float = 100.0):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.mix = nn.Conv2d(channels, channels, 3, padding=1)
        self.down = nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1)
        self.head = nn.Linear(2 * channels, classes)
        with torch.no_grad():
            self.stem.weight[:outliers] *= outlier_gain
            self.stem.bias[:outliers] = outlier_gain
            self.mix.weight[:, :outliers] /= outlier_gain

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.mix(torch.relu(self.stem(x))))
        x = torch.relu(self.down(x))
        return self.head(x.mean((2, 3)))
