"""The shipped demo zoo: weights and calibration/evaluation data under models/ and calib/."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from models.digits_cnn import DigitsCNN
from models.sr_net import TinySR

ROOT = Path(__file__).resolve().parent.parent

# file, key -> (shape with None for a free dim, dtype)
LAYOUT = {
    ("calib/digits_calib.npz", "image"): ((64, 1, 8, 8), np.float32),
    ("calib/digits_eval.npz", "image"): ((None, 1, 8, 8), np.float32),
    ("calib/digits_eval.npz", "labels"): ((None,), np.int64),
    ("calib/sr_calib.npz", "lowres"): ((32, 1, 64, 64), np.float32),
    ("calib/photo_crops_224.npz", "image"): ((None, 3, 224, 224), np.float16),
}


def npz(rel: str) -> dict[str, np.ndarray]:
    with np.load(ROOT / rel) as f:
        return dict(f)


@pytest.mark.parametrize(
    "rel",
    [
        "models/digits_cnn.safetensors",
        "models/tiny_sr.safetensors",
        *sorted({f for f, _ in LAYOUT}),
    ],
)
def test_shipped_file_exists(rel):
    assert (ROOT / rel).is_file(), rel


@pytest.mark.parametrize(("rel", "key"), list(LAYOUT))
def test_npz_layout(rel, key):
    shape, dtype = LAYOUT[(rel, key)]
    arr = npz(rel)[key]
    assert arr.dtype == dtype
    assert arr.ndim == len(shape)
    assert all(want is None or got == want for got, want in zip(arr.shape, shape)), arr.shape
    assert np.isfinite(arr).all()


def test_digits_eval_matches_images():
    d = npz("calib/digits_eval.npz")
    assert len(d["image"]) == len(d["labels"]) >= 400  # 25% of 1797
    assert set(np.unique(d["labels"])) == set(range(10))  # stratified: every class
    for rel in ("calib/digits_calib.npz", "calib/digits_eval.npz"):
        img = npz(rel)["image"]
        assert img.min() >= 0.0 and img.max() <= 1.0  # pixel / 16


def test_digits_cnn_accuracy():
    model = DigitsCNN()
    model.load_state_dict(load_file(ROOT / "models/digits_cnn.safetensors"), strict=True)
    model.eval()
    d = npz("calib/digits_eval.npz")
    with torch.no_grad():
        pred = model(torch.from_numpy(d["image"])).argmax(1).numpy()
    assert (pred == d["labels"]).mean() >= 0.9


@pytest.fixture(scope="module")
def tiny_sr() -> TinySR:
    model = TinySR()
    model.load_state_dict(load_file(ROOT / "models/tiny_sr.safetensors"), strict=True)
    return model.eval()


@pytest.mark.parametrize(("h", "w"), [(32, 48), (64, 64)])
def test_tiny_sr_dynamic_shape(tiny_sr, h, w):
    with torch.no_grad():
        out = tiny_sr(torch.rand(2, 1, h, w, generator=torch.Generator().manual_seed(0)))
    assert out.shape == (2, 1, 2 * h, 2 * w)
    assert torch.isfinite(out).all()


def test_tiny_sr_beats_nearest(tiny_sr):
    # Held-out crops: downscale the shipped 64x64 low-res crops once more and upscale them back.
    target = torch.from_numpy(npz("calib/sr_calib.npz")["lowres"])
    lr = F.avg_pool2d(target, 2)
    with torch.no_grad():
        sr_mse = F.mse_loss(tiny_sr(lr).clamp(0, 1), target).item()
    nearest_mse = F.mse_loss(F.interpolate(lr, scale_factor=2, mode="nearest"), target).item()
    assert sr_mse < 0.95 * nearest_mse, (sr_mse, nearest_mse)


def test_photo_crops():
    path = ROOT / "calib/photo_crops_224.npz"
    assert path.stat().st_size < 5 * 1024 * 1024
    img = npz("calib/photo_crops_224.npz")["image"].astype(np.float32)
    assert 12 <= len(img) <= 16
    assert np.abs(img.mean()) < 1.5 and 0.3 < img.std() < 3.0  # ImageNet-normalized
    # The consumer: torchvision resnet18 with seeded random weights (nothing downloaded).
    from torchvision.models import resnet18

    torch.manual_seed(0)
    with torch.no_grad():
        logits = resnet18().eval()(torch.from_numpy(img[:2]))
    assert logits.shape == (2, 1000) and torch.isfinite(logits).all()
