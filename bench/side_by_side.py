"""Pictures for BENCHMARKS.md: images of one size side by side in one JPEG (e.g. a photo and two runs' renders).

    python bench/side_by_side.py PHOTO RUN_A/renders/test/0000.png RUN_B/renders/test/0000.png --out OUT.jpg \
        [--height 270]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch
import torch.nn.functional as F


def resized(image: np.ndarray, height: int) -> np.ndarray:
    pixels = torch.from_numpy(image[..., :3]).permute(2, 0, 1)[None].float()
    width = round(image.shape[1] * height / image.shape[0])
    out = F.interpolate(pixels, size=(height, width), mode="area" if height < image.shape[0] else "bilinear")
    return out[0].permute(1, 2, 0).clamp(0, 255).round().byte().numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--height", type=int, default=270)
    args = parser.parse_args()
    gap = np.full((args.height, 4, 3), 255, np.uint8)
    row = [part for path in args.images for part in (resized(iio.imread(path), args.height), gap)][:-1]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(args.out, np.concatenate(row, 1), quality=90)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
