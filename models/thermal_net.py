"""Hot-spot detector for radiometric thermal frames in kelvin (the fp16 drift demo)."""

import torch
from torch import Tensor, nn


class ThermalHotspotNet(nn.Module):
    """Input ``thermal`` [N, 1, 16, 16] float32 in kelvin, as radiometric thermal cameras
    report it (~293-310 K, sensor noise ~0.05 K); outputs a hot-spot score map [N, 1, 16, 16]
    and each frame's peak temperature [N, 1] in kelvin.

    The model standardises its input with its training set's statistics, ``(x - mean) /
    std`` (buffers, as exported models usually carry their preprocessing), then three
    convolutions score it. In fp16 that first subtraction is where the signal goes: fp16
    holds 11 significant bits, so between 256 and 512 its values are 0.25 K apart. The
    stored mean (297.38 K) becomes 297.5 K, a 0.12 K bias on every pixel (all that ONNX
    Runtime's CPU provider shows: it has no fp16 Sub kernel and subtracts in fp32), and a
    backend that subtracts in fp16 rounds the readings themselves to 0.25 K steps too. Every
    value stays below 512, so AutoCast's magnitude rule (``data_max``) keeps the node in
    fp16. Kept in fp32 (``nodes_to_exclude``), the subtraction reads the fp32 input and the
    fp32 mean, and its output (about +-3) loses nothing in fp16. The peak temperature
    (a ReduceMax of the raw frame) stays exact. Weights: seeded random init (the drift, not
    the task, is the point)."""

    def __init__(self, mean_k: float = 297.38, std_k: float = 2.9, channels: int = 16):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean_k))
        self.register_buffer("std", torch.tensor(std_k))
        self.body = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
            nn.Conv2d(channels, 1, 3, padding=1),
        )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.body((x - self.mean) / self.std), x.amax((2, 3))
