"""Train DigitsCNN on scikit-learn's digits; write weights plus calibration/evaluation data.

Run from the repo root:  .venv/bin/python -m models.train_digits
Writes models/digits_cnn.safetensors, calib/digits_calib.npz, calib/digits_eval.npz.
"""

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from models.digits_cnn import DigitsCNN

ROOT = Path(__file__).resolve().parent.parent
SEED = 0
EPOCHS = 30
BATCH = 64
N_CALIB = 64


def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Stratified 75/25 split; images as float32 [N, 1, 8, 8] scaled to [0, 1]."""
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = digits.target.astype(np.int64)
    return train_test_split(x, y, test_size=0.25, stratify=y, random_state=SEED)


@torch.no_grad()
def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    model.eval()
    pred = model(torch.from_numpy(x)).argmax(1).numpy()
    return float((pred == y).mean())


def main() -> None:
    torch.manual_seed(SEED)
    x_tr, x_te, y_tr, y_te = load_split()
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, EPOCHS)
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    gen = torch.Generator().manual_seed(SEED)
    for epoch in range(EPOCHS):
        model.train()
        perm = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), BATCH):
            idx = perm[i : i + BATCH]
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        if (epoch + 1) % 10 == 0:
            print(
                f"epoch {epoch + 1}: loss {loss.item():.4f} "
                f"test acc {accuracy(model, x_te, y_te):.4f}"
            )

    acc = accuracy(model, x_te, y_te)
    print(f"test accuracy: {acc:.4f} ({len(y_te)} held-out samples)")

    (ROOT / "calib").mkdir(exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, ROOT / "models" / "digits_cnn.safetensors")
    # Calibration: a seeded choice of training samples; evaluation: the whole held-out split.
    pick = np.random.default_rng(SEED).choice(len(x_tr), N_CALIB, replace=False)
    np.savez_compressed(ROOT / "calib" / "digits_calib.npz", image=x_tr[pick])
    np.savez_compressed(ROOT / "calib" / "digits_eval.npz", image=x_te, labels=y_te)


if __name__ == "__main__":
    main()
