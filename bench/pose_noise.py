"""Benchmark: pose refinement against known pose errors.

`perturb` writes a copy of a transforms.json scene whose every pose (training and held-out) is turned by exactly
--degrees about a random axis and moved by --move of the rig's radius (the mean distance of the cameras from
their centroid), the images linked, not copied. `errors` compares a run's refined_poses.json, and the noisy poses
it started from, with the clean scene's (or with another run's refined poses: where refinement from the clean
poses settles), after the rigid alignment that refined poses are only defined up to:
rotation and position errors, and the view error (how far points about the object move in each camera's view).
`fit-before` is `recon fit` with pose refinement as it was before BARF's coarse-to-fine and the exponential pose
schedule (all levels open, the field's step schedule), for the comparison.

    python bench/pose_noise.py perturb ../shared/data/fox /tmp/fox-noisy --degrees 1.5
    recon fit /tmp/fox-noisy --downscale 4 --max-time 240 --eval-stride 3 --no-viewer --refine-poses --out runs/a
    python bench/pose_noise.py fit-before /tmp/fox-noisy ... --refine-poses --out runs/b
    python bench/pose_noise.py errors runs/a ../shared/data/fox
    python bench/pose_noise.py errors runs/a runs/clean-refined   # against another run's refined poses
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from recon.data.cameras import optical_focus, perturb_poses, pose_errors, rigid_alignment, transform_poses


def transforms_files(scene: Path) -> list[Path]:
    files = sorted(scene.glob("transforms*.json"))
    if not files:
        raise SystemExit(f"{scene}: no transforms*.json")
    return files


def perturb(source: Path, target: Path, degrees: float, move: float, seed: int) -> None:
    target.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    for file in transforms_files(source):
        meta = json.loads(file.read_text())
        poses = torch.tensor([f["transform_matrix"] for f in meta["frames"]], dtype=torch.float64)[:, :3]
        centres = poses[:, :, 3]
        radius = float((centres - centres.mean(0)).norm(dim=1).mean())
        noisy = perturb_poses(poses, degrees, move * radius, generator)
        for frame, pose in zip(meta["frames"], noisy):
            frame["transform_matrix"] = pose.tolist() + [[0.0, 0.0, 0.0, 1.0]]
        meta["pose_noise"] = {"degrees": degrees, "move": move * radius, "seed": seed, "source": str(file)}
        (target / file.name).write_text(json.dumps(meta, indent=1))
    for entry in source.iterdir():  # images and anything else the loader reads, linked
        if not entry.name.startswith("transforms") and not (target / entry.name).exists():
            (target / entry.name).symlink_to(entry.resolve())
    print(f"{target}: every pose turned {degrees} degrees and moved {move} of the rig radius")


def poses_by_name(frames: list[dict]) -> dict[str, torch.Tensor]:
    return {Path(f["file_path"]).stem: torch.tensor(f["transform_matrix"], dtype=torch.float64)[:3] for f in frames}


def view_errors(estimated: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Per camera, the mean angle (degrees) between where points about the rig's focus appear from the estimated
    camera (rigidly aligned to the truth) and from the true one: the error a render sees, which rotation and
    position errors alone overstate when a turn and a shift of the camera nearly cancel on the object."""
    aligned = transform_poses(estimated, rigid_alignment(estimated, truth, scale=True))
    centre = optical_focus(truth)
    radius = 0.25 * float((truth[:, :, 3] - centre).norm(dim=1).mean())
    points = centre + radius * torch.nn.functional.normalize(
        torch.randn(256, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64), dim=1)

    def seen(poses: torch.Tensor) -> torch.Tensor:  # unit directions in each camera's frame [N, P, 3]
        local = (points[None] - poses[:, None, :, 3]) @ poses[:, :, :3]
        return torch.nn.functional.normalize(local, dim=2)

    cosine = (seen(aligned) * seen(truth)).sum(2).clamp(-1, 1)
    return torch.rad2deg(torch.arccos(cosine)).mean(1)


def errors(run: Path, reference: Path) -> dict:
    config = json.loads((run / "config.json").read_text())
    given, truth = {}, {}
    for file in transforms_files(Path(config["scene"])):
        given |= poses_by_name(json.loads(file.read_text())["frames"])
    # A run as the reference: its refined poses, where refinement from another start settles.
    refined_reference = reference / "refined_poses.json"
    for file in [refined_reference] if refined_reference.exists() else transforms_files(reference):
        truth |= poses_by_name(json.loads(file.read_text())["frames"])
    refined_file = run / "refined_poses.json"  # absent when the run kept its poses
    refined = poses_by_name(json.loads(refined_file.read_text())["frames"]) if refined_file.exists() else None
    names = sorted(refined or given)
    truth_poses = torch.stack([truth[n] for n in names])
    radius = float((truth_poses[:, :, 3] - truth_poses[:, :, 3].mean(0)).norm(dim=1).mean())
    result = {"run": str(run), "cameras": len(names), "rig_radius": radius}
    for label, poses in (("given", given), ("refined", refined or given)):
        turn, moved = pose_errors(torch.stack([poses[n] for n in names]), truth_poses)
        view = view_errors(torch.stack([poses[n] for n in names]), truth_poses)
        result[label] = {"rotation_degrees": float(turn.mean()), "rotation_degrees_median": float(turn.median()),
                         "rotation_degrees_max": float(turn.max()),
                         "position_of_radius": float(moved.mean()) / radius, "view_degrees": float(view.mean()),
                         "view_degrees_max": float(view.max())}
    metrics = run / "metrics.json"
    if metrics.exists():
        document = json.loads(metrics.read_text())
        result["test"] = {**document["mean"], "poses": document["eval"].get("poses")}
    print(json.dumps(result, indent=1))
    return result


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "fit-before":
        import recon.app.tasks as tasks
        from recon.app.cli import main as recon_main
        from recon.app.schedules import SCHEDULES, learning_rate_factor

        tasks.POSE_LEVELS_FIRST = 1.0
        SCHEDULES["exponential"] = learning_rate_factor
        sys.exit(recon_main(["fit", *sys.argv[2:]]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("perturb")
    p.add_argument("source", type=Path)
    p.add_argument("target", type=Path)
    p.add_argument("--degrees", type=float, default=1.5)
    p.add_argument("--move", type=float, default=0.01, help="of the rig's radius")
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("errors")
    p.add_argument("run", type=Path)
    p.add_argument("reference", type=Path, help="the clean scene, or a run whose refined poses are the reference")
    p.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.command == "perturb":
        perturb(args.source, args.target, args.degrees, args.move, args.seed)
    else:
        result = errors(args.run, args.reference)
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
