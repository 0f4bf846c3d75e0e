"""Structure from motion from scratch: time, registration rate and pose error against known poses.

    python bench/process.py synthetic --views 24 --resolution 256 --out bench/results/process-synthetic.json
    python bench/process.py ../shared/data/fox --scene runs/fox-sfm --out bench/results/process-fox.json

`synthetic` renders data/synthetic.make_capture and compares with its true cameras; a folder with a
transforms.json and images/ (the fox) is processed from its images alone and compared with the shipped
poses, frame by frame name, after the best similarity (data/sfm.pose_errors).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from recon.data.sfm import pose_errors
from recon.data.synthetic import make_capture


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="'synthetic', or a folder with transforms.json and images/")
    parser.add_argument("--views", type=int, default=24)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--scene", help="where to write the processed scene (default: a temporary folder)")
    parser.add_argument("--out", required=True, help="results JSON")
    args, extra = parser.parse_known_args()  # the rest goes to recon process (e.g. --matcher sequential)

    work = Path(tempfile.mkdtemp(prefix="bench-process-"))
    if args.source == "synthetic":
        capture = make_capture(work / "capture", n_views=args.views, resolution=args.resolution)
        photos = capture / "photos"
        truth = {name: np.array(c2w)[:3]
                 for name, c2w in json.loads((capture / "cameras.json").read_text())["poses"].items()}
    else:
        photos = Path(args.source) / "images"
        frames = json.loads((Path(args.source) / "transforms.json").read_text())["frames"]
        truth = {Path(f["file_path"]).name: np.array(f["transform_matrix"])[:3] for f in frames}
    scene = Path(args.scene) if args.scene else work / "scene"

    started = time.perf_counter()
    command = [sys.executable, "-m", "recon.app.cli", "process", "images", str(photos), str(scene),
               *extra]
    subprocess.run(command, check=True)
    seconds = time.perf_counter() - started

    report = json.loads((scene / "process.json").read_text())
    recovered = {Path(f["file_path"]).name: np.array(f["transform_matrix"])[:3]
                 for f in json.loads((scene / "transforms.json").read_text())["frames"]}
    common = sorted(set(recovered) & set(truth))
    errors = pose_errors(np.stack([recovered[n] for n in common]), np.stack([truth[n] for n in common]))
    result = {
        "source": args.source, "command": " ".join(command[2:]), "wall_s": round(seconds, 1),
        "images": report["images"], "registered": report["registered"],
        "registered_fraction": report["registered_fraction"], "points": report["points"],
        "reprojection_error_px": report["reprojection_error_px"], "pose_errors": errors,
        "stages_s": {k: round(report[k], 2) for k in ("prepare_s", "features_s", "matching_s", "mapping_s")},
        "cameras": report["cameras"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("wall_s", "registered", "images", "pose_errors")}, indent=2))


if __name__ == "__main__":
    main()
