"""Renderer throughput: marching plus compositing, forward and backward, on identical rays and an identical
occupancy grid, for recon's torch twins, recon's kernels and (on a GPU, where it imports and builds) nerfacc.

    python bench/kernels.py SCENE|RUN [--warmup 500] [--rays 65536] [--repeats 20] --out bench/results/kernels-GPU.json

The occupancy grid comes from RUN, or from `--warmup` training steps on SCENE. The field is replaced by a fixed
random optical depth and colour per sample, so only the renderer is timed. On a CPU the kernels' row is their
CPU build (the tests' oracle); the figures that matter come from a GPU. nerfacc marches with its own
traversal (voxel by voxel), so its sample count is given beside its time; its compositing is also checked
against recon's on recon's samples (`nerfacc_parity`: the largest colour difference). Then NeuRBF's
nearest-kernel lookup, the twin against the kernel (and scipy's KD-tree on a CPU), as many points as rays.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from pathlib import Path
from typing import Callable
from unittest import mock

import torch
from machine import describe

from recon.app.cli_shared import load_run
from recon.app.config import FitConfig
from recon.app.trainer import Trainer
from recon.data.scene import load_scene
from recon.fields.rbf import NearestKernels
from recon.renderers import composite, march, ray_aabb
from recon.renderers.compositing import finish, integrate


def timed(fn: Callable[[], None], repeats: int, device: torch.device) -> float:
    fn()  # warm-up (and the kernels' build)
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeats


def using_kernels(mode: str) -> contextlib.AbstractContextManager:
    """RECON_KERNELS for the duration: "off" (the twins), "auto" (CUDA on a GPU) or "cpu" (the CPU build)."""
    return mock.patch.dict(os.environ, {"RECON_KERNELS": mode})


def pipeline_and_scene(source: str, warmup: int):
    if (Path(source) / "config.json").exists():
        _, cfg, pipeline, _ = load_run(source)
        return pipeline, load_scene(cfg.scene, downscale=cfg.downscale)
    scene = load_scene(source)
    trainer = Trainer(FitConfig(scene=source, out="", steps=max(warmup, 1) * 10), scene)
    trainer.run(stop_at=warmup)  # the grid pruned as a tenth of the way into a run
    return trainer.pipeline, scene


def random_field(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(1)
    tau = torch.rand(n, device=device, generator=g) * 0.2
    return tau.requires_grad_(), torch.rand(n, 3, device=device, generator=g).requires_grad_()


def nerfacc_path(pipeline, rays, t_start: torch.Tensor,
                 t_far: torch.Tensor) -> tuple[Callable[[], int] | None, str | float]:
    """nerfacc's step and the parity of its compositing with recon's on recon's samples, or None and the reason."""
    try:
        import nerfacc

        grid, t, device = pipeline.grid, pipeline.tracer, rays.origins.device
        estimator = nerfacc.OccGridEstimator(grid.aabb.reshape(-1).tolist(), grid.resolution, grid.levels).to(device)
        res = grid.resolution
        estimator.binaries.copy_(grid.occupied.view(grid.levels, res, res, res))  # both [level, x, y, z]
        white = torch.ones(3, device=device)

        def render(ray_indices, t_starts, t_ends, tau, rgb):
            field = lambda t0, t1, idx: (rgb, tau / (t1 - t0))  # noqa: E731
            return nerfacc.rendering(t_starts, t_ends, ray_indices, n_rays=len(rays), rgb_sigma_fn=field,
                                     render_bkgd=white)[0]

        def step() -> int:
            ray_indices, t_starts, t_ends = estimator.sampling(
                rays.origins, rays.dirs, t_min=t_start, t_max=t_far, near_plane=t.near, render_step_size=t.step_size,
                cone_angle=t.cone_angle)
            tau, rgb = random_field(len(t_starts), device)
            render(ray_indices, t_starts, t_ends, tau, rgb).sum().backward()
            return len(t_starts)

        samples = march(rays, grid, t.aabb, t.step_size, t.cone_angle, t.near)
        tau, rgb = random_field(len(samples), device)
        ours = finish(integrate(rgb, tau, samples, stop_eps=0.0), white)["rgb"]  # nerfacc's rendering never stops early
        return step, float((ours - render(samples.ray_idx, samples.t0, samples.t1, tau, rgb)).abs().max())
    except Exception as error:  # no nerfacc, or its JIT build failed: recorded, the other rows still run
        detail = str(error).strip().splitlines()
        return None, f"nerfacc unavailable: {type(error).__name__}: {detail[-1] if detail else ''}"


def nearest_rows(points: int, kernels: int, repeats: int, device: torch.device, kernel_mode: str) -> dict:
    """NeuRBF's lookup of the 5 nearest of `kernels` centres (half uniform, half clustered as k-means leaves
    them; lego's NeuRBF at 2 M has 11,878) for `points` points: the twin's candidate lists, the kernel's,
    and on a CPU scipy's KD-tree."""
    g = torch.Generator().manual_seed(0)
    centres = torch.cat([torch.rand(kernels // 2, 3, generator=g),
                         0.5 + 0.05 * torch.randn(kernels - kernels // 2, 3, generator=g)]).clamp(0, 1).to(device)
    x = torch.rand(points, 3, generator=g).to(device)
    rows = {}
    for name, mode, method in [("torch", "off", "grid"), ("kernel", kernel_mode, "grid")] + \
            ([("kd-tree", "off", "tree")] if device.type == "cpu" else []):
        with using_kernels(mode):
            index = NearestKernels(centres, 5, method)
            seconds = timed(lambda: index.query(x), repeats, device)
        rows[name] = {"seconds": seconds, "points_per_second": points / seconds}
        print("nearest", name, rows[name], flush=True)
    return {"points": points, "kernels": kernels, "neighbours": 5, "results": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="a run folder, or a scene to train --warmup steps on")
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--rays", type=int, default=65536)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--nearest-kernels", type=int, default=11878, help="NeuRBF centres for the lookup's timing")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    pipeline, scene = pipeline_and_scene(args.source, args.warmup)
    device = pipeline.device
    train = scene.splits["train"].to(device)
    rays = train.sample(args.rays, torch.Generator(device=device).manual_seed(0)).rays
    t = pipeline.tracer
    t_near, t_far = ray_aabb(rays.origins, rays.dirs, t.aabb)
    white = torch.ones(3, device=device)

    def recon_step() -> int:
        samples = march(rays, pipeline.grid, t.aabb, t.step_size, t.cone_angle, t.near)
        tau, rgb = random_field(len(samples), device)
        composite(rgb, tau, samples, white)["rgb"].sum().backward()
        return len(samples)

    kernel_mode, kernel_row = ("auto", "recon-cuda") if device.type == "cuda" else ("cpu", "recon-cpu-build")
    paths: dict[str, tuple[str, Callable[[], int]]] = {"torch": ("off", recon_step),
                                                       kernel_row: (kernel_mode, recon_step)}
    notes: dict[str, str | float] = {}
    if device.type == "cuda":  # nerfacc is never imported on a CPU: it would try to compile there
        step, outcome = nerfacc_path(pipeline, rays, t_near.clamp(min=t.near), t_far)
        notes["nerfacc_parity" if step else "nerfacc"] = outcome
        if step:
            paths["nerfacc"] = ("off", step)  # recon's kernels play no part in it
    results = {}
    for name, (mode, step) in paths.items():
        with using_kernels(mode):
            seconds = timed(step, args.repeats, device)
            samples = step()
        results[name] = {"seconds_per_batch": seconds, "rays_per_second": args.rays / seconds,
                         "samples_per_second": samples / seconds, "samples": samples,
                         "speedup_over_torch": results["torch"]["seconds_per_batch"] / seconds if results else 1.0}
        print(name, results[name], flush=True)
    if "nerfacc" in results:
        notes["recon_over_nerfacc"] = results["nerfacc"]["seconds_per_batch"] / results[kernel_row]["seconds_per_batch"]
    nearest = nearest_rows(args.rays, args.nearest_kernels, max(1, args.repeats // 4), device, kernel_mode)
    report = {"source": args.source, "device": str(device),
              "machine": describe(device),
              "date": time.strftime("%Y-%m-%d"), "rays": args.rays, "occupancy": pipeline.grid.occupancy_fraction,
              "results": results, "notes": notes, "nearest_kernels": nearest}
    print(json.dumps(notes), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
