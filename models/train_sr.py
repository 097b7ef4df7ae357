"""Train TinySR for 2x upscaling on luma crops of scikit-learn's sample photos.

Run from the repo root:  .venv/bin/python -m models.train_sr
Writes models/tiny_sr.safetensors and calib/sr_calib.npz (key ``lowres``, [32, 1, 64, 64]).

Low-res input = 2x average-pooled crop, target = the crop. Columns [0, 448) of each photo
are used for training; the remaining right-hand strip is held out for calibration/evaluation.
"""

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from sklearn.datasets import load_sample_images

from models.sr_net import TinySR

ROOT = Path(__file__).resolve().parent.parent
SEED = 0
SPLIT_COL = 448  # training region: columns [0, SPLIT_COL); held out: the rest
STEPS = 800
BATCH = 32
CROP = 48  # high-res training crop (low-res 24x24)
N_CALIB = 32
CALIB_HR = 128  # high-res calibration crop (low-res 64x64)


def luma_images() -> list[torch.Tensor]:
    """The two sample photos (china, flower) as luma [1, 1, H, W] in [0, 1] (BT.601)."""
    out = []
    for img in load_sample_images().images:
        y = img.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32) / 255.0
        out.append(torch.from_numpy(y)[None, None])
    return out


def random_crops(imgs: list[torch.Tensor], n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """n random size x size crops, drawn evenly from imgs -> [n, 1, size, size]."""
    crops = []
    for i in range(n):
        img = imgs[i % len(imgs)]
        h, w = img.shape[-2:]
        top = int(torch.randint(0, h - size + 1, (1,), generator=gen))
        left = int(torch.randint(0, w - size + 1, (1,), generator=gen))
        crops.append(img[..., top : top + size, left : left + size])
    return torch.cat(crops)


def downscale(hr: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(hr, 2)


def mse_report(model: TinySR, hr: torch.Tensor) -> dict[str, float]:
    """MSE vs hr of TinySR and of plain nearest/bilinear/bicubic upsampling of downscale(hr)."""
    lr = downscale(hr)
    with torch.no_grad():
        preds = {
            "tiny_sr": model(lr).clamp(0, 1),
            "nearest": F.interpolate(lr, scale_factor=2, mode="nearest"),
            "bilinear": F.interpolate(lr, scale_factor=2, mode="bilinear"),
            "bicubic": F.interpolate(lr, scale_factor=2, mode="bicubic").clamp(0, 1),
        }
    return {k: F.mse_loss(v, hr).item() for k, v in preds.items()}


def main() -> None:
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    imgs = luma_images()
    train = [im[..., :SPLIT_COL] for im in imgs]
    # Also train at half scale so the net sees the detail level of already-downscaled inputs.
    train += [downscale(im) for im in train]
    held_out = [im[..., SPLIT_COL:] for im in imgs]

    model = TinySR()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, STEPS)
    for step in range(STEPS):
        hr = random_crops(train, BATCH, CROP, gen)
        hr = torch.where(torch.rand(BATCH, 1, 1, 1, generator=gen) < 0.5, hr, hr.flip(-1))
        loss = F.mse_loss(model(downscale(hr)), hr)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 100 == 0:
            print(f"step {step + 1}: train mse {loss.item():.6f}")

    model.eval()
    # Own generator: the calibration crops do not depend on the training schedule.
    calib_hr = random_crops(held_out, N_CALIB, CALIB_HR, torch.Generator().manual_seed(SEED + 1))
    lowres = downscale(calib_hr)
    print(
        "held-out MSE, 64->128 (calib crops):",
        {k: f"{v:.6f}" for k, v in mse_report(model, calib_hr).items()},
    )
    print(
        "held-out MSE, 32->64 (calib lowres as target, as in tests/test_zoo.py):",
        {k: f"{v:.6f}" for k, v in mse_report(model, lowres).items()},
    )

    (ROOT / "calib").mkdir(exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, ROOT / "models" / "tiny_sr.safetensors")
    np.savez_compressed(ROOT / "calib" / "sr_calib.npz", lowres=lowres.numpy().astype(np.float32))


if __name__ == "__main__":
    main()
