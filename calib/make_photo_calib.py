"""Write calib/photo_crops_224.npz: ImageNet-normalized 224x224 RGB crops of the sklearn photos.

Run from the repo root:  .venv/bin/python calib/make_photo_calib.py
Key ``image``: float16 [16, 3, 224, 224] (NCHW), used to calibrate torchvision's resnet18.
Each crop: a random square of 0.5-1.0x the photo's short side at a random position, resized to
224 with PIL (bicubic), flipped horizontally with probability 0.5. Seeded, so reproducible.
"""

from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_sample_images

OUT = Path(__file__).resolve().parent / "photo_crops_224.npz"
SEED = 0
COUNT = 16  # 16 x 3 x 224 x 224 float16 = 4.6 MiB raw (about 2.1 MiB compressed) < 5 MiB
SIZE = 224
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
MAX_BYTES = 5 * 1024 * 1024


def photo_crops(rng: np.random.Generator, n: int, size: int, scale: tuple[float, float],
                flip: bool) -> np.ndarray:
    """n ImageNet-normalised NCHW float32 crops of the two sklearn photos: a random square of
    ``scale`` x the photo's short side at a random position, resized to ``size`` (bicubic),
    mirrored with probability 0.5 where ``flip``."""
    photos = [Image.fromarray(a) for a in load_sample_images().images]  # china, flower
    crops = []
    for i in range(n):
        img = photos[i % len(photos)]
        w, h = img.size
        side = int(rng.uniform(*scale) * min(w, h))
        left, top = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        crop = img.crop((left, top, left + side, top + side))
        crop = crop.resize((size, size), Image.Resampling.BICUBIC)
        if flip and rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x = (np.asarray(crop, np.float32) / 255.0 - MEAN) / STD  # HWC, normalized
        crops.append(x.transpose(2, 0, 1))  # -> CHW
    return np.stack(crops).astype(np.float32)


def main() -> None:
    rng = np.random.default_rng(SEED)
    image = photo_crops(rng, COUNT, SIZE, (0.5, 1.0), flip=True).astype(np.float16)
    np.savez_compressed(OUT, image=image)
    size = OUT.stat().st_size
    print(f"wrote {OUT.name}: image {image.shape} {image.dtype}, {size / 2**20:.2f} MiB")
    if size >= MAX_BYTES:
        raise SystemExit(f"{OUT.name} is {size} bytes, over the 5 MiB budget: lower COUNT")


if __name__ == "__main__":
    main()
