"""Benchmark: where the time of a training step goes, and the throughput of training and rendering.

Trains `--warmup` steps (so the occupancy grid has pruned as in a real run), then profiles
`--steps` more with torch.profiler, using the phase labels the trainer and renderer put on
their work (record_function), and times the render of one full test view.

    python bench/profile_step.py ../shared/data/lego --warmup 200 --steps 64 [--render-side 800] [--preset cpu] \
        [--downscale N] [-o levels=8 ...] [--set sampler=proposal ...]

RECON_KERNELS=off profiles the torch twins on a GPU (the baseline of the kernels' end-to-end speed-up).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from machine import describe
from torch.profiler import ProfilerActivity, profile

from recon.app.config import FitConfig
from recon.app.fit_command import parse_field_options
from recon.app.trainer import Trainer
from recon.cuda import kernels_mode
from recon.data.scene import load_scene

# "sample": marching the occupancy grid, or the proposal levels ("interlevel": their loss).
PHASES = ("occupancy_update", "sample_rays", "sample", "field", "composite", "interlevel", "backward", "optimizer")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("scene")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--steps", type=int, default=64, help="profiled steps (a multiple of the occupancy period)")
    parser.add_argument("--run-steps", type=int, default=5000, help="the run's length, which sets its schedules")
    parser.add_argument("--preset", help="cpu or gpu (default: by device)")
    parser.add_argument("--downscale", type=int, default=1, help="divide the images' resolution by N")
    parser.add_argument("-o", "--field-option", action="append", default=[])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="FitConfig override")
    parser.add_argument("--render-side", type=int,
                        help="time the test view rendered this many pixels wide (default: its own)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    scene = load_scene(args.scene, args.downscale)
    overrides = parse_field_options(args.set)
    cfg = FitConfig(scene=args.scene, out="", steps=args.run_steps, preset=args.preset,
                    field_options=parse_field_options(args.field_option), **overrides)
    trainer = Trainer(cfg, scene)
    cfg = trainer.cfg  # with the preset applied
    trainer.run(stop_at=args.warmup)
    cuda = trainer.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    rays0, samples0 = trainer.items_seen, trainer.samples_seen
    with profile(activities=activities) as prof:
        started = time.perf_counter()
        trainer.run(stop_at=args.warmup + args.steps)
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - started
    rays, samples = trainer.items_seen - rays0, trainer.samples_seen - samples0

    attr = "device_time_total" if cuda else "cpu_time_total"
    totals = {e.key: getattr(e, attr) / 1e6 for e in prof.key_averages() if e.key in PHASES}
    step_ms = wall / args.steps * 1e3
    print(f"{trainer.device}, {torch.get_num_threads()} threads; {args.steps} steps after {args.warmup}; "
          f"{rays / args.steps:.0f} rays and {samples / args.steps:.0f} samples per step")
    print("| phase | ms per step | share |")
    print("|---|---|---|")
    rows = {}
    for phase in PHASES:
        ms = totals.get(phase, 0.0) / args.steps * 1e3
        rows[phase] = round(ms, 2)
        print(f"| {phase} | {ms:.1f} | {ms / step_ms:.0%} |")
    print(f"| **step (wall, profiled)** | {step_ms:.1f} | |")
    print(f"rays/s {rays / wall:.0f}, samples/s {samples / wall:.0f}")

    test = scene.splits["test"].cameras
    if args.render_side:
        test = test.downscaled(float(test.width[0]) / args.render_side)
    trainer.pipeline.render_view(test, 0, chunk=cfg.eval_chunk)  # warm caches
    started = time.perf_counter()
    trainer.pipeline.render_view(test, 0, chunk=cfg.eval_chunk)
    if cuda:
        torch.cuda.synchronize()
    render_s = time.perf_counter() - started
    size = f"{int(test.width[0])}x{int(test.height[0])}"
    print(f"render of one {size} test view: {render_s:.3f} s")

    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "scene": args.scene, "config": cfg.to_json(), "device": str(trainer.device),
            "machine": describe(trainer.device),
            "date": time.strftime("%Y-%m-%d"), "kernels": kernels_mode(), "warmup_steps": args.warmup,
            "profiled_steps": args.steps,
            "ms_per_step": round(step_ms, 2), "phases_ms": rows, "rays_per_step": rays / args.steps,
            "samples_per_step": samples / args.steps, "rays_per_second": rays / wall,
            "samples_per_second": samples / wall, "render_seconds": render_s, "render_size": size}, indent=2) + "\n")


if __name__ == "__main__":
    main()
