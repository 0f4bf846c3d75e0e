"""Renderer throughput, the torch twins against recon's kernels (and nerfacc where it imports): marching plus
compositing, forward and backward, on identical rays and an identical occupancy grid from a trained run.

    python bench/kernels.py RUN [--rays 65536] [--repeats 20] --out bench/results/kernels-GPU.json

On a CPU only the twins run (and the CPU build of the kernels, for reference); the figures that matter come
from a GPU. The field is replaced by a fixed random density and colour per sample, so only the renderer is timed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from recon.app.cli import load_run
from recon.cuda import extension
from recon.renderers import composite, march


def timed(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up (and the kernels' build)
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--rays", type=int, default=65536)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    run, cfg, pipeline, _ = load_run(args.run)
    device = pipeline.device
    from recon.data.scene import load_scene

    train = load_scene(cfg.scene, downscale=cfg.downscale).splits["train"].to(device)
    rays = train.sample(args.rays, torch.Generator(device=device).manual_seed(0)).rays
    t = pipeline.tracer
    results = {}
    kernels = {"torch": None, "recon-cuda": extension("cuda") if device.type == "cuda" else None}
    if device.type == "cpu":
        kernels["recon-cpu-build"] = extension("cpu")
    for name, ext in kernels.items():
        if name != "torch" and ext is None:
            continue

        def step() -> None:
            samples = march(rays, pipeline.grid, t.aabb, t.step_size, t.cone_angle, t.near, kernels=ext)
            g = torch.Generator(device=device).manual_seed(1)
            tau = torch.rand(len(samples), device=device, generator=g).requires_grad_()
            rgb = torch.rand(len(samples), 3, device=device, generator=g).requires_grad_()
            out = composite(rgb, tau, samples, torch.ones(3, device=device))
            out["rgb"].sum().backward()

        seconds = timed(step, args.repeats, device)
        samples = len(march(rays, pipeline.grid, t.aabb, t.step_size, t.cone_angle, t.near, kernels=ext))
        results[name] = {"seconds_per_batch": seconds, "rays_per_second": args.rays / seconds,
                         "samples_per_second": samples / seconds, "samples": samples}
        print(name, results[name], flush=True)
    report = {"run": args.run, "device": str(device), "rays": args.rays, "results": results,
              "note": "compositing dispatches to the CUDA kernel for GPU tensors whenever it built; the torch row "
                      "on a GPU therefore marches with the twin and composites with the kernel",
              "torch": torch.__version__}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
