"""`recon export mesh|sdf|pointcloud|video`: a trained run's surface, signed distances, point cloud or video,
written under RUN/export (or to --output), inside the run's crop box."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from recon.app.cli_shared import load_run, number_option, output_file, output_option, require_task, world_box
from recon.app.config import FitConfig, argument_type
from recon.app.evaluate import render_cameras
from recon.app.render_command import path_cameras, path_options
from recon.app.run import RUN_ENTRIES, RunDir, UserError
from recon.data.checks import FINITE, FRACTION, POSITIVE_INT, Number
from recon.data.scene import load_scene

RESOLUTION = Number(int, 8, 4096)  # voxels along an export box's longest side


def crop_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--crop", type=float, nargs=6, metavar=("X0", "Y0", "Z0", "X1", "Y1", "Z1"),
                   help="world-frame box to export; stored with the run for later exports")


def export_crop(run: RunDir, given: list[float] | None) -> torch.Tensor | None:
    """The run's crop box (world frame): --crop when given (then stored for later exports), else the stored one."""
    crop_file = run.path / "crop.json"
    if given is not None:
        return world_box("--crop", given)
    if crop_file.exists():
        return torch.tensor(json.loads(crop_file.read_text())["world_box"])
    return None


def store_crop(run: RunDir, given: list[float] | None) -> None:
    """Called once the export accepted the box (it is inside the scene)."""
    if given is not None:
        run.write_json(run.path / "crop.json", {"world_box": torch.tensor(given).view(2, 3).tolist(),
                                                "frame": "input cameras (world)"})


def export_output(run: RunDir, cfg: FitConfig, args: argparse.Namespace, default_name: str,
                  suffixes: tuple[str, ...] = ()) -> Path:
    """An export's file: RUN/export/NAME unless --output names one; never the run's records or the scene's files."""
    records = tuple(run.path / name for name in RUN_ENTRIES if name not in ("export", "renders"))
    return output_file(args.output, run.path / "export" / default_name, args.overwrite,
                       records + (Path(cfg.scene),), suffixes)


def run_frame(run: RunDir, cfg: FitConfig, command: str) -> tuple[Any, torch.Tensor]:
    """The training cameras (None for a mesh's SDF) and the world -> unit transform a 3D export needs."""
    require_task(cfg, command, "radiance", "mesh-sdf")
    if cfg.task == "mesh-sdf":
        return None, torch.tensor(json.loads(run.scene.read_text())["to_unit"])
    scene = load_scene(cfg.scene, downscale=cfg.downscale)
    return scene.splits["train"].cameras, scene.to_unit


def cmd_export_mesh(args: argparse.Namespace) -> None:
    from recon.app.export import FORMATS, extract_mesh

    if args.format not in FORMATS:
        raise UserError(f"--format {args.format}: unknown mesh format (known: {', '.join(FORMATS)})")
    run, cfg, pipeline, _ = load_run(args.run)
    suffix = "" if args.method == "marching" else f"-{args.method}"
    output = export_output(run, cfg, args, f"mesh-{args.resolution}{suffix}.{args.format}", suffixes=(".json",))
    crop = export_crop(run, args.crop)
    cameras, to_unit = run_frame(run, cfg, "export mesh")
    mesh, info = extract_mesh(pipeline, cameras, to_unit, args.resolution, args.level, crop, clean=args.clean,
                              method=args.method, simplify_to=args.simplify, closed=args.closed)
    if not info["faces"]:  # e.g. an SDF that collapsed to one sign: an empty file would pass for a result
        level = "" if info["level"] is None else f" = {info['level']:g}"
        raise UserError(f"{run.path}: no surface inside the export box (level: {info['level_meaning']}{level}); "
                        "nothing written")
    store_crop(run, args.crop)
    mesh.save(output)
    run.write_json(output.with_suffix(".json"), {"mesh": output.name,
                                                 "crop_world_box": None if crop is None else crop.tolist(), **info})
    print(f"wrote {output}: {info['vertices']:,} vertices, {info['faces']:,} faces in {info['seconds']} s; box: "
          f"{info['box']}")


def cmd_export_sdf(args: argparse.Namespace) -> None:
    import numpy as np

    from recon.app.export import signed_distance_volume

    run, cfg, pipeline, _ = load_run(args.run)
    output = export_output(run, cfg, args, f"sdf-{args.resolution}.npz")
    crop = export_crop(run, args.crop)
    cameras, to_unit = run_frame(run, cfg, "export sdf")
    volume = signed_distance_volume(pipeline, cameras, to_unit, args.resolution, crop)
    store_crop(run, args.crop)
    np.savez_compressed(output, **volume)
    print(f"wrote {output}: {'x'.join(map(str, volume['sdf'].shape))} signed distances, "
          f"voxel {volume['voxel_size']:.4g} (world units), in {volume['seconds']} s")


def cmd_export_pointcloud(args: argparse.Namespace) -> None:
    from recon.app.export import point_cloud

    run, cfg, pipeline, _ = load_run(args.run)
    require_task(cfg, "export pointcloud", "radiance")
    output = export_output(run, cfg, args, "pointcloud.ply", suffixes=(".json",))
    crop = export_crop(run, args.crop)
    scene = load_scene(cfg.scene, downscale=cfg.downscale)
    cloud, info = point_cloud(pipeline, scene.splits["train"].cameras, scene.to_unit, crop, args.points,
                              args.image_side, args.min_opacity)
    store_crop(run, args.crop)
    cloud.save(output)
    run.write_json(output.with_suffix(".json"), {"pointcloud": output.name, **info})
    print(f"wrote {output}: {info['points']:,} points from {info['views']} views in {info['seconds']} s")


def cmd_export_video(args: argparse.Namespace) -> None:
    run, cfg, pipeline, _ = load_run(args.run)
    path = path_cameras(cfg, args)
    output = export_output(run, cfg, args, f"video-{path.name}.mp4")
    frames = output.parent / f"{output.stem}-frames"
    if args.output and not args.overwrite and frames.is_dir() and any(frames.iterdir()):
        raise UserError(f"{frames}: the video's frames would go here, and it holds files (pass --overwrite)")
    render_cameras(pipeline, path.cameras, frames, cfg.eval_chunk, video=output, fps=path.fps, with_depth=True)
    print(f"wrote {output} ({len(path.cameras)} frames, colour and depth side by side; PNGs in {frames})")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    export = sub.add_parser("export", help="export a trained run").add_subparsers(dest="what", required=True)
    p = export.add_parser("mesh", help="marching cubes over the field, in the input cameras' coordinates")
    p.add_argument("run")
    p.add_argument("--resolution", **number_option(RESOLUTION, 512, "voxels along the box's longest side"))
    p.add_argument("--format", default="ply", help="ply, obj or glb")
    crop_option(p)
    p.add_argument("--level", type=argument_type(FINITE),
                   help="surface level: opacity over one voxel, 1 - exp(-sigma * voxel) (default 0.5); "
                        "SDF fields: a distance (0)")
    p.add_argument("--method", default="marching",
                   help="marching (the field itself) or tsdf (fused rendered depth; open3d)")
    p.add_argument("--simplify", type=argument_type(Number(int, 4)), metavar="FACES",
                   help="decimate to about this many faces (open3d or fast-simplification)")
    p.add_argument("--no-clean", dest="clean", action="store_false", help="keep small disconnected pieces")
    p.add_argument("--open", dest="closed", action="store_false",
                   help="leave the surface open where the box cuts it (default: capped there, a watertight mesh)")
    output_option(p, "RUN/export/mesh-RESOLUTION.FORMAT")
    p.set_defaults(func=cmd_export_mesh)

    p = export.add_parser("sdf", help="dense signed-distance volume (.npz, world units, negative inside)")
    p.add_argument("run")
    p.add_argument("--resolution", **number_option(RESOLUTION, 256, "voxels along the box's longest side"))
    crop_option(p)
    output_option(p, "RUN/export/sdf-RESOLUTION.npz")
    p.set_defaults(func=cmd_export_sdf)

    p = export.add_parser("pointcloud", help="where the training views' rays end, with colours and normals (PLY)")
    p.add_argument("run")
    p.add_argument("--points", **number_option(POSITIVE_INT, 1_000_000, "keep at most this many (random, fixed seed)"))
    p.add_argument("--image-side", **number_option(Number(int, 8), 400, "render the training views at most this wide"))
    p.add_argument("--min-opacity", **number_option(FRACTION, 0.9, "pixels less opaque make no point"))
    crop_option(p)
    output_option(p, "RUN/export/pointcloud.ply")
    p.set_defaults(func=cmd_export_pointcloud)

    p = export.add_parser("video", help="colour and depth side by side along a path, as MP4")
    p.add_argument("run")
    path_options(p)
    output_option(p, "RUN/export/video-PATH.mp4")
    p.set_defaults(func=cmd_export_video)
