"""Every backend on one input at one parameter budget, with and without quantized coordinates.

Runs `recon fit INPUT --field NAME [--params BUDGET] ...` for each backend (and each --quantize value),
reads each run's metrics.json, and writes one JSON file plus the Markdown rows of BENCHMARKS.md's table.

    python bench/backends.py ../shared/data/meshes/armadillo.obj --params 1000000 --steps 1500 \
        --out bench/results/backends-armadillo.json [more recon fit options, e.g. --downscale 2]

With `--ground-truth MESH` each run is also meshed (`recon export mesh --resolution 256`) and scored
against MESH (`recon eval-mesh`: Chamfer, F-score), as for surfaces fitted from posed images:

    python bench/backends.py runs/armadillo-scene --ground-truth runs/armadillo-scene/mesh.ply \
        --max-time 600 --out bench/results/surface-armadillo.json --model sdf
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

BACKENDS = ("hashgrid", "voxel", "triplane", "vm", "pe")


def run_one(args: argparse.Namespace, field: str, quantize: float) -> dict:
    name = f"{Path(args.input).stem}-{field}-q{quantize:g}{'-' + args.label if args.label else ''}"
    run = Path(args.runs) / name
    command = [sys.executable, "-m", "recon.app.cli", "fit", args.input, "--field", field,
               "--quantize", str(quantize), "--out", str(run), "--overwrite", "--no-viewer", *args.extra]
    command += ["--params", str(args.params)] if args.params else []
    command += ["--steps", str(args.steps)] if args.steps else []
    command += ["--max-time", str(args.max_time)] if args.max_time else []
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        print(result.stderr[-2000:], file=sys.stderr)
        return {"field": field, "quantize": quantize, "error": result.stderr.strip().splitlines()[-1:]}
    metrics = json.loads((run / "metrics.json").read_text())
    config = json.loads((run / "config.json").read_text())
    row = {"field": field, "quantize": quantize, "label": args.label, "parameters": metrics["parameters"],
           "field_options": config["field_options"], "train": metrics["train"], "mean": metrics["mean"],
           "wall_seconds": round(time.perf_counter() - started, 1), "command": " ".join(command[2:])}
    if args.ground_truth:
        row["mesh"] = score_mesh(run, args.ground_truth)
    return row


def score_mesh(run: Path, ground_truth: str, resolution: int = 256) -> dict:
    """Export the run's mesh and score it against the ground truth (recon eval-mesh's JSON)."""
    mesh, scores = run / "export" / f"mesh-{resolution}.ply", run / "mesh-eval.json"
    cli = [sys.executable, "-m", "recon.app.cli"]
    started = time.perf_counter()
    export = subprocess.run([*cli, "export", "mesh", str(run), "--resolution", str(resolution)], capture_output=True,
                            text=True)
    if export.returncode != 0:  # e.g. no surface: the row says so and the other runs go on
        return {"error": export.stderr.strip().splitlines()[-1:]}
    export_seconds = round(time.perf_counter() - started, 1)
    subprocess.run([*cli, "eval-mesh", str(mesh), ground_truth, "--output", str(scores)], check=True,
                   capture_output=True)
    return {**json.loads(scores.read_text()), "resolution": resolution, "export_seconds": export_seconds}


def markdown_row(row: dict) -> str:
    field = f"{row['field']} {row['label']}" if row.get("label") else row["field"]
    if "error" in row:
        return f"| `{field}` | {row['quantize']:g} | failed: {row['error']} |"
    mean, train = row["mean"], row["train"]
    scores = (f"{mean['iou']:.5f} | {mean['normal_angle_deg']:.2f}" if "iou" in mean
              else f"{mean['psnr']:.2f} | {mean['ssim']:.4f}")
    if "mesh" in row:
        mesh = row["mesh"]
        scores += " | no mesh | " if "error" in mesh else f" | {mesh['chamfer']:.4f} | {mesh['fscore']:.3f}"
    return (f"| `{field}` | {row['quantize']:g} | {row['parameters'] / 1e6:.3f} M | {train['steps']} | "
            f"{train['seconds']:.0f} | {scores} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", help="an image, a mesh or a posed-image scene")
    parser.add_argument("--params", type=int, help="the parameter budget (default: each backend at its own size)")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--max-time", type=float)
    parser.add_argument("--quantize", type=float, nargs="+", default=[0.0, 2e-4])
    parser.add_argument("--fields", nargs="+", default=list(BACKENDS))
    parser.add_argument("--runs", default="runs/bench", help="where the run folders go")
    parser.add_argument("--label", default="", help="names a variant (e.g. cam) in run folders and rows")
    parser.add_argument("--ground-truth", help="a mesh to score each run's exported mesh against")
    parser.add_argument("--out", required=True, help="JSON results file")
    args, args.extra = parser.parse_known_args()  # anything else goes to recon fit as it is
    rows = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else []
    key = lambda r: (r["field"], r["quantize"], r.get("label", ""))  # noqa: E731
    done = {key(r) for r in rows if "error" not in r}
    for field in args.fields:
        for quantize in args.quantize:
            if (field, quantize, args.label) in done:
                continue
            row = run_one(args, field, quantize)
            rows = [r for r in rows if key(r) != key(row)] + [row]
            Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
            print(markdown_row(row), flush=True)


if __name__ == "__main__":
    main()
