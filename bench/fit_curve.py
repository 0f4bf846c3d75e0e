"""Benchmark: mean test PSNR against training time for one scene.

Trains with a time cap and, at given marks of training time, pauses the clock to score
evenly spaced test views (evaluation time is not training time). Prints a Markdown table
row per mark and writes the whole curve as JSON.

    python bench/fit_curve.py ../shared/data/lego --max-time 600 --marks 60 120 300 600 \
        --eval-views 10 --out bench/results/lego-cpu.json [--preset cpu] [--set KEY=VALUE] [-o levels=8 ...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from machine import describe

from recon.app.config import FitConfig
from recon.app.evaluate import evaluate
from recon.app.fit_command import parse_field_options
from recon.app.trainer import Trainer
from recon.data.scene import load_scene


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("scene")
    parser.add_argument("--max-time", type=float, required=True)
    parser.add_argument("--marks", type=float, nargs="+", required=True, help="training seconds at which to evaluate")
    parser.add_argument("--eval-views", type=int, default=10)
    parser.add_argument("--downscale", type=int, default=1)
    parser.add_argument("--preset", help="cpu or gpu (default: by device)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="FitConfig override")
    parser.add_argument("-o", "--field-option", action="append", default=[])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    started = time.perf_counter()
    scene = load_scene(args.scene, downscale=args.downscale)
    load_seconds = time.perf_counter() - started
    cfg = FitConfig(scene=args.scene, out="", steps=None, max_time=args.max_time, downscale=args.downscale,
                    preset=args.preset, field_options=parse_field_options(args.field_option),
                    **parse_field_options(args.set))
    trainer = Trainer(cfg, scene)
    cfg = trainer.cfg  # the preset applied
    test = scene.splits["test"]
    stride = max(1, len(test) // args.eval_views)
    rows = []
    print("| train s | steps | rays/s | test PSNR | SSIM | eval s |")
    print("|---|---|---|---|---|---|")
    for mark in args.marks:
        while not trainer.progress.done and trainer.progress.seconds < mark:
            # run() stops on `stop_at`; a few steps at a time keeps the mark accurate
            trainer.run(stop_at=trainer.step + 10)
        result = evaluate(trainer.pipeline, test, stride, cfg.eval_chunk)
        row = {"train_seconds": round(trainer.progress.seconds, 1), "steps": trainer.step,
               "rays_per_second": round(trainer.items_seen / trainer.progress.seconds),
               "samples_per_second": round(trainer.samples_seen / trainer.progress.seconds),
               "psnr": round(result["mean"]["psnr"], 3), "ssim": round(result["mean"]["ssim"], 4),
               "eval_seconds": result["seconds"], "views": result["views_evaluated"]}
        rows.append(row)
        print(f"| {row['train_seconds']} | {row['steps']} | {row['rays_per_second']} | {row['psnr']} | "
              f"{row['ssim']} | {row['eval_seconds']} |", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "scene": args.scene, "config": cfg.to_json(), "load_seconds": round(load_seconds, 2),
        "parameters": trainer.pipeline.field.num_parameters(), "device": str(trainer.device),
        "machine": describe(trainer.device),
        "date": time.strftime("%Y-%m-%d"), "eval_stride": stride, "curve": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
