"""Benchmark: `recon distill` against training the same backend from the photos for the same time.

Trains (or reuses) a hash-grid teacher, then for each student backend runs `recon distill TEACHER --field F
--max-time S` and `recon fit SCENE --field F --max-time S`, one command at a time, and tabulates the held-out
PSNR of each (every `--eval-stride`-th test view; a student is scored at its teacher's stride) with the teacher's.
With `--model sdf` the teacher is a NeuS SDF, and each run's mesh (`recon export mesh --resolution R`) is scored
against the teacher's mesh (Chamfer, F-score) and, given `--ground-truth`, against the truth.

    python bench/distill.py ../shared/data/lego --teacher-time 600 --student-time 120 --fields vm voxel \
        --runs runs/distill --out bench/results/distill-lego.json
    python bench/distill.py runs/armadillo-scene --model sdf --ground-truth runs/armadillo-scene/mesh.ply \
        --fields neurbf voxel --runs runs/distill-sdf --out bench/results/distill-armadillo-sdf.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import torch
from machine import describe

from recon.app.metrics import mesh_distances


def run(command: list[str]) -> float:
    print("$", " ".join(command), flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def scores(folder: Path) -> dict:
    metrics = json.loads((folder / "metrics.json").read_text())
    return {"psnr": metrics["mean"]["psnr"], "ssim": metrics["mean"]["ssim"], "steps": metrics["train"]["steps"]}


def mesh_scores(folder: Path, resolution: int, references: dict[str, Path]) -> dict:
    """Chamfer and F-score of the run's exported mesh against each reference mesh."""
    run(["recon", "export", "mesh", str(folder), "--resolution", str(resolution)])
    mesh = folder / "export" / f"mesh-{resolution}.ply"
    return {f"to {name}": {key: distances[key] for key in ("chamfer", "fscore")}
            for name, gt in references.items() if (distances := mesh_distances(mesh, gt))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("scene")
    parser.add_argument("--teacher-time", type=float, default=600)
    parser.add_argument("--student-time", type=float, default=120)
    parser.add_argument("--fields", nargs="+", default=["vm", "voxel"])
    parser.add_argument("--eval-stride", type=int, default=10)
    parser.add_argument("--runs", default="runs/distill")
    parser.add_argument("--model", choices=["radiance", "sdf"], default="radiance")
    parser.add_argument("--ground-truth", type=Path, help="a mesh the SDF runs' meshes are scored against")
    parser.add_argument("--mesh-resolution", type=int, default=256)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    runs = Path(args.runs)
    common = ["--no-viewer", "--eval-stride", str(args.eval_stride), "--model", args.model]
    teacher = runs / "teacher-hashgrid"
    if not (teacher / "metrics.json").exists():
        run(["recon", "fit", args.scene, "--max-time", str(args.teacher_time), "--out", str(teacher), "--overwrite",
             *common])
    folders = {"teacher hashgrid": teacher}
    for field in args.fields:
        student, scratch = runs / f"distilled-{field}", runs / f"scratch-{field}"
        run(["recon", "distill", str(teacher), "--field", field, "--max-time", str(args.student_time),
             "--out", str(student), "--overwrite", "--no-viewer"])
        run(["recon", "fit", args.scene, "--field", field, "--max-time", str(args.student_time),
             "--out", str(scratch), "--overwrite", *common])
        folders[f"distilled {field}"], folders[f"from photos {field}"] = student, scratch
    rows = {name: scores(folder) for name, folder in folders.items()}
    if args.model == "sdf":  # the teacher's mesh first: the others are scored against it
        references = {"teacher": teacher / "export" / f"mesh-{args.mesh_resolution}.ply"}
        references |= {"truth": args.ground_truth} if args.ground_truth else {}
        for name, folder in folders.items():
            rows[name] |= mesh_scores(folder, args.mesh_resolution, references)
    result = {"machine": describe(torch.device("cpu")), "date": time.strftime("%Y-%m-%d"), "scene": args.scene,
              "model": args.model, "teacher_time": args.teacher_time, "student_time": args.student_time, "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    for name, row in rows.items():
        meshes = "  ".join(f"{key} Chamfer {value['chamfer']:.4f} F {value['fscore']:.3f}"
                           for key, value in row.items() if key.startswith("to "))
        print(f"{name:24s} {row['psnr']:6.2f} dB  SSIM {row['ssim']:.4f}  {row['steps']} steps  {meshes}")


if __name__ == "__main__":
    main()
