"""Models for the held-out sweep (benchmarks/heldout_zoo.yaml) that torchvision lacks: a text
classifier (int64 tokens + mask), a GRU regressor and a raw-audio Conv1d classifier, and the
calibration data for them (``python benchmarks/heldout_nets.py`` writes
artifacts-heldout/calib/*.npz; seeded)."""

from pathlib import Path

import numpy as np
from torch import nn


class TokenTransformer(nn.Module):
    """Text classifier: int64 tokens + attention mask (two inputs), 2-layer encoder."""

    def __init__(self, vocab=100, dim=32, classes=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(dim, 4, 64, batch_first=True, dropout=0.0)
        self.enc = nn.TransformerEncoder(layer, 2)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens, mask):
        h = self.enc(self.emb(tokens), src_key_padding_mask=mask == 0)
        m = mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1).clamp(min=1))


class SeqGRU(nn.Module):
    """Sensor sequence regressor: a 2-layer GRU over [batch, time, 6], last step."""

    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(6, 24, num_layers=2, batch_first=True)
        self.out = nn.Linear(24, 2)

    def forward(self, x):
        return self.out(self.gru(x)[0][:, -1])


class AudioCNN(nn.Module):
    """Keyword spotter on raw audio [batch, 1, samples]: Conv1d + BatchNorm1d + pooling."""

    def __init__(self):
        super().__init__()
        layers, c = [], 1
        for out, k, s in ((16, 80, 4), (32, 3, 1), (64, 3, 1)):
            layers += [nn.Conv1d(c, out, k, s, padding=k // 2), nn.BatchNorm1d(out), nn.ReLU(),
                       nn.MaxPool1d(4)]
            c = out
        self.body, self.head = nn.Sequential(*layers), nn.Linear(64, 12)

    def forward(self, wave):
        return self.head(self.body(wave).mean(-1))


def main(out: Path = Path("artifacts-heldout/calib")) -> None:
    out.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(0)
    np.savez(out / "text.npz", tokens=g.integers(0, 100, (16, 16)),
             mask=np.ones((16, 16), np.int64))
    np.savez(out / "seq.npz", x=g.standard_normal((16, 16, 6)).astype(np.float32))
    np.savez(out / "audio.npz", wave=(0.1 * g.standard_normal((16, 1, 4000))).astype(np.float32))


if __name__ == "__main__":
    main()
