"""Benchmark: data-parallel training (`recon fit --nproc N`) against one process.

Each row is one `recon fit` of the scene, one at a time, and reports the run's rays a second (every rank's) and
its held-out PSNR. On a CPU (the default rows) the ranks share the cores: 1 rank x 2 threads against 2 ranks x 1
thread at equal wall time, the second with recon's learning rate (times sqrt(2): the square-root rule for Adam,
N ranks average N batches) and with one rank's (`--lr` divided by sqrt(2) to undo the rule). With --gpus the
rows are 1, 2, 4, ... ranks up to the machine's GPUs: at equal wall time (throughput) and at equal total rays
(each with --steps divided by its ranks: the same PSNR is the aim).

    python bench/ranks.py ../shared/data/lego --max-time 120 --out bench/results/ranks-lego-cpu.json
    python bench/ranks.py ../shared/data/lego --gpus --max-time 60 --steps 20000 --out bench/results/ranks-lego-gpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from machine import describe


def fit(scene: str, out: Path, nproc: int, threads: int, options: list[str]) -> dict:
    command = [sys.executable, "-m", "recon", "fit", scene, "--out", str(out), "--overwrite", "--no-viewer",
               "--nproc", str(nproc), *options]
    print("$", f"OMP_NUM_THREADS={threads}", " ".join(command), flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=os.environ | {"OMP_NUM_THREADS": str(threads)})
    metrics = json.loads((out / "metrics.json").read_text())
    train = metrics["train"]
    return {"ranks": nproc, "threads_per_rank": threads, "options": options, "psnr": metrics["mean"]["psnr"],
            "steps": train["steps"], "train_seconds": train["seconds"], "rays_per_second": train["rays_per_second"],
            "wall_seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("scene")
    parser.add_argument("--max-time", type=float, default=120, help="seconds of training a row (equal wall time)")
    parser.add_argument("--steps", type=int, default=20000, help="--gpus: the one-rank run's steps at equal rays")
    parser.add_argument("--gpus", action="store_true", help="1, 2, 4, ... ranks, one GPU each")
    parser.add_argument("--eval-stride", type=int, default=8)
    parser.add_argument("--runs", type=Path, default=Path("runs/ranks"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    common = ["--eval-stride", str(args.eval_stride)]
    rows = []
    if args.gpus:
        count = torch.cuda.device_count()
        for nproc in [2**k for k in range(int(math.log2(max(count, 1))) + 1)]:
            rows.append({"protocol": "equal wall time", **fit(args.scene, args.runs / f"time-{nproc}", nproc, 1,
                                                              ["--max-time", str(args.max_time), *common])})
            rows.append({"protocol": "equal total rays", **fit(args.scene, args.runs / f"rays-{nproc}", nproc, 1,
                                                               ["--steps", str(args.steps // nproc), *common])})
        device = torch.device("cuda")
    else:
        timed = ["--max-time", str(args.max_time), "--device", "cpu", *common]
        lr = 1e-2  # FitConfig's default
        rows.append(fit(args.scene, args.runs / "1x2", 1, 2, timed))
        rows.append(fit(args.scene, args.runs / "2x1", 2, 1, timed))  # the rate times sqrt(2), recon's rule
        rows.append(fit(args.scene, args.runs / "2x1-unscaled-lr", 2, 1, [*timed, "--lr", f"{lr / math.sqrt(2):.6g}"]))
        device = torch.device("cpu")
    for row in rows:
        print(json.dumps(row))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": describe(device), "date": time.strftime("%Y-%m-%d"),
                                        "scene": args.scene, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
