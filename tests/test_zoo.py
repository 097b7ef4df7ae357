"""The shipped demo zoo: weights and calibration/evaluation data under models/ and calib/."""

import importlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from engineforge import modelio
from engineforge.settings import QuantizeSettings
from safetensors.torch import load_file

from models.digits_cnn import DigitsCNN
from models.sr_net import TinySR

ROOT = Path(__file__).resolve().parent.parent
# The demo config (config.yaml): what each model reads, and which file it reads it from.
DEMO = yaml.safe_load((ROOT / "config.yaml").read_text())["models"]
SHIPPED = sorted((m[role]["path"], name, role) for name, m in DEMO.items()
                 for role in ("checkpoint", "calibration", "evaluation")
                 if m.get(role, {}).get("path"))

# file, key -> (shape with None for a free dim, dtype)
LAYOUT = {
    ("calib/digits_calib.npz", "image"): ((64, 1, 8, 8), np.float32),
    ("calib/digits_eval.npz", "image"): ((None, 1, 8, 8), np.float32),
    ("calib/digits_eval.npz", "labels"): ((None,), np.int64),
    ("calib/sr_calib.npz", "lowres"): ((32, 1, 64, 64), np.float32),
    ("calib/photo_crops_224.npz", "image"): ((None, 3, 224, 224), np.float16),
    ("calib/photo_crops_32.npz", "image"): ((64, 3, 32, 32), np.float32),
    ("calib/thermal_frames.npz", "thermal"): ((64, 1, 16, 16), np.float32),
}


def npz(rel: str) -> dict[str, np.ndarray]:
    with np.load(ROOT / rel) as f:
        return dict(f)


def test_the_demo_config_reads_exactly_the_shipped_files():
    """Every weights/data file config.yaml names is one this module checks, and back."""
    assert [rel for rel, _, _ in SHIPPED] == sorted(
        ["models/digits_cnn.safetensors", "models/tiny_sr.safetensors", *{f for f, _ in LAYOUT}])


@pytest.mark.parametrize(("rel", "model", "role"),
                         [s for s in SHIPPED if s[2] == "checkpoint"])
def test_shipped_weights_are_exactly_the_state_dict_of_their_arch(rel, model, role):
    """Weights only (safetensors), one tensor per entry of the declared arch's state_dict,
    of its shape and dtype, nothing more, every value finite."""
    ckpt = DEMO[model][role]
    module, attr = ckpt["arch"].split(":")
    want = getattr(importlib.import_module(module), attr)(**ckpt.get("arch_kwargs", {}))
    got = load_file(ROOT / rel)
    assert {k: (tuple(v.shape), v.dtype) for k, v in got.items()} == {
        k: (tuple(v.shape), v.dtype) for k, v in want.state_dict().items()}
    assert all(torch.isfinite(v).all() for v in got.values() if v.is_floating_point())


@pytest.mark.parametrize(("rel", "model", "role"),
                         [s for s in SHIPPED if s[2] != "checkpoint"])
def test_shipped_data_holds_exactly_one_array_per_input(rel, model, role):
    """Exactly the arrays the model's section reads (one per input; evaluation: and the
    labels), accepted by the stages' own check, with enough samples for int8 calibration."""
    m = DEMO[model]
    labels = modelio.labels_key(m) if role == "evaluation" else None
    with np.load(ROOT / rel, allow_pickle=False) as f:
        assert sorted(f.files) == sorted([*m["inputs"], *([labels] if labels else [])])
    first = next(iter(m["profiles"].values()))
    data = modelio.load_data(ROOT / rel, m["inputs"], model=model, section=role,
                             labels=labels, profile=first if role == "evaluation" else None)
    assert sorted(data) == sorted(f.files)
    if role == "calibration":
        calib_size = m.get("precision", {}).get("int8", {}).get(
            "calib_size", QuantizeSettings().calib_size)
        assert all(len(arr) >= calib_size for arr in data.values()), calib_size


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
