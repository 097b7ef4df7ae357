"""Write the drift demo's data: calib/thermal_frames.npz and calib/photo_crops_32.npz.

Run from the repo root:  .venv/bin/python calib/make_drift_calib.py
- ``thermal_frames.npz``, key ``thermal``: float32 [64, 1, 16, 16], synthetic radiometric
  thermal frames in kelvin: an ambient level of 293-301 K, a gradient of up to 2 K across the
  frame, sensor noise of 0.05 K (a typical NETD) and 1-3 warm bodies of +3-9 K.
- ``photo_crops_32.npz``, key ``image``: float32 [64, 3, 32, 32], seeded random crops of the
  two scikit-learn sample photos, resized to 32x32 and ImageNet-normalised.
Seeded, so reproducible.
"""

import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # as a script and as calib.<module>
import make_photo_calib  # noqa: E402

SEED = 0
COUNT = 64


def thermal_frames(rng: np.random.Generator, n: int, size: int = 16) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    frames = []
    for _ in range(n):
        f = rng.uniform(293, 301) + rng.uniform(-2, 2) * (xx - 0.5)
        f = f + rng.uniform(-2, 2) * (yy - 0.5)
        for _ in range(rng.integers(1, 4)):  # warm bodies: people, motors, leaks
            cy, cx = rng.uniform(0, 1, 2)
            width = rng.uniform(0.08, 0.2)
            f = f + rng.uniform(3, 9) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2)
                                                   / (2 * width ** 2))
        frames.append(f + rng.normal(0, 0.05, f.shape))
    return np.stack(frames)[:, None].astype(np.float32)


def photo_crops(rng: np.random.Generator, n: int) -> np.ndarray:
    """The drift demo's photos: 32x32 crops of 0.1-0.5x the short side, not mirrored."""
    return make_photo_calib.photo_crops(rng, n, 32, (0.1, 0.5), flip=False)


def main() -> None:
    rng = np.random.default_rng(SEED)
    for name, key, arr in (("thermal_frames.npz", "thermal", thermal_frames(rng, COUNT)),
                           ("photo_crops_32.npz", "image", photo_crops(rng, COUNT))):
        np.savez_compressed(HERE / name, **{key: arr})
        print(f"wrote {name}: {key} {arr.shape} {arr.dtype}, "
              f"{(HERE / name).stat().st_size / 2**10:.0f} KiB")


if __name__ == "__main__":
    main()
