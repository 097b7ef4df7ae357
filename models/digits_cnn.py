"""Small CNN classifier for scikit-learn's 8x8 digits."""

from torch import Tensor, nn


class DigitsCNN(nn.Module):
    """Input [N, 1, 8, 8] float32 (pixel / 16, in [0, 1]); output logits [N, 10].

    Only Conv2d, BatchNorm2d, ReLU, MaxPool2d, Flatten and Linear: all export cleanly to
    ONNX opset 17 (BatchNorm folds into the convolutions in eval mode).
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
            nn.Conv2d(32, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 4x4 -> 2x2
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64 * 2 * 2, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))
