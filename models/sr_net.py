"""Tiny ESPCN-style 2x super-resolution net for single-channel (luma) images."""

import torch
from torch import Tensor, nn


class TinySR(nn.Module):
    """Input ``lowres`` [N, 1, H, W] float32 in [0, 1]; output [N, 1, 2H, 2W].

    Fully convolutional (H and W are free). The last convolution predicts a residual in
    sub-pixel layout, which is added to the input repeated 4x across channels; PixelShuffle
    then turns that base into nearest-neighbour upsampling, so an all-zero residual equals
    nearest upsampling and training only has to learn the detail on top. Ops: Conv2d, Tanh,
    Concat, Add, PixelShuffle (ONNX DepthToSpace) - all clean at opset 17.
    """

    def __init__(self, channels: int = 32, scale: int = 2) -> None:
        super().__init__()
        self.scale = scale
        self.body = nn.Sequential(
            nn.Conv2d(1, channels, 5, padding=2),
            nn.Tanh(),
            nn.Conv2d(channels, channels // 2, 3, padding=1),
            nn.Tanh(),
            nn.Conv2d(channels // 2, scale * scale, 3, padding=1),
        )
        nn.init.zeros_(self.body[-1].weight)  # start exactly at nearest-neighbour upsampling
        nn.init.zeros_(self.body[-1].bias)
        self.shuffle = nn.PixelShuffle(scale)

    def forward(self, lowres: Tensor) -> Tensor:
        base = torch.cat([lowres] * (self.scale * self.scale), dim=1)
        return self.shuffle(base + self.body(lowres))
