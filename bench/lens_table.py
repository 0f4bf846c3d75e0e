"""What undoing lens distortion costs a training batch: Newton's method per sampled ray (Cameras.rays) against
the lens table read (Split.sample), on a real capture's training split.

    python bench/lens_table.py ../shared/data/fox --downscale 4 --rays 4096
"""

from __future__ import annotations

import argparse
import time

import torch

from recon.data.scene import load_scene


def best_of(fn, repeats: int = 20) -> float:
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scene")
    parser.add_argument("--downscale", type=int, default=4)
    parser.add_argument("--rays", type=int, default=4096)
    args = parser.parse_args()
    split = load_scene(args.scene, downscale=args.downscale).splits["train"]
    cameras = split.cameras
    started = time.perf_counter()
    table = split.lens
    built = time.perf_counter() - started
    generator = torch.Generator().manual_seed(0)
    index = torch.randint(len(split.pixels), (args.rays,), generator=generator)
    cam = torch.searchsorted(split.offsets, index, right=True) - 1
    local = index - split.offsets[cam]
    px, py = (local % cameras.width[cam]).float() + 0.5, (local // cameras.width[cam]).float() + 0.5
    newton = best_of(lambda: cameras.rays(cam, px, py))
    lookup = best_of(lambda: cameras.rays_along(cam, table.lookup(cam, local)))
    whole = best_of(lambda: split.sample(args.rays, generator))
    gap = (cameras.rays(cam, px, py).dirs - cameras.rays_along(cam, table.lookup(cam, local)).dirs).abs().max()
    print(f"{args.scene} at 1/{args.downscale}: {len(split)} views, {int(table.lens_of.max()) + 1} lens(es), "
          f"table of {len(table.directions):,} directions built in {built:.2f} s")
    print(f"{args.rays} rays: Newton {newton * 1e3:.2f} ms, table {lookup * 1e3:.2f} ms "
          f"(whole Split.sample {whole * 1e3:.2f} ms); largest direction difference {gap:.1e}")


if __name__ == "__main__":
    main()
