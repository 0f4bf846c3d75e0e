"""`recon render`: a trained run's test views, an orbit or a camera_path.json as PNGs and an MP4; the camera
paths `export video` shares."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from recon.app.cli_shared import load_run, load_split, number_option, require_task
from recon.app.config import FitConfig
from recon.app.evaluate import render_cameras
from recon.app.run import UserError
from recon.data.camera_paths import load_camera_path, orbit_cameras
from recon.data.cameras import Cameras
from recon.data.checks import POSITIVE_INT


def path_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--path", default="test", choices=("test", "val", "train", "orbit"),
                   help="a split's cameras or an orbit around the training cameras (default test)")
    p.add_argument("--frames", **number_option(POSITIVE_INT, 120, "orbit frames"))
    p.add_argument("--camera-path", metavar="FILE",
                   help="a camera_path.json (the viewer's or nerfstudio's, poses in the input cameras' frame): its "
                        "frames at its size and frame rate, in place of --path")
    p.add_argument("--fps", **number_option(POSITIVE_INT, 30, "video frames per second (a --camera-path's own "
                                                              "rate wins)"))
    p.add_argument("--downscale", **number_option(POSITIVE_INT, 1, "render images N times smaller than the scene's"))


@dataclass
class RenderPath:
    name: str  # for the files written: the split, "orbit" or the camera path file's stem
    cameras: Cameras  # unit frame
    fps: int


def path_cameras(cfg: FitConfig, args: argparse.Namespace) -> RenderPath:
    """The cameras of a render path: a split's, an orbit around the training cameras or a camera path file's."""
    require_task(cfg, "rendering a camera path", "radiance")
    if args.camera_path:
        try:
            camera_path, cameras = load_camera_path(Path(args.camera_path))
        except ValueError as error:
            raise UserError(str(error)) from None
        scene = load_split(cfg, "train")
        path = RenderPath(Path(args.camera_path).stem, cameras.transformed(scene.to_unit), camera_path.fps)
    else:
        scene = load_split(cfg, "train" if args.path == "orbit" else args.path)
        train = scene.splits["train"].cameras
        cameras = orbit_cameras(train, args.frames) if args.path == "orbit" else scene.splits[args.path].cameras
        path = RenderPath(args.path, cameras, args.fps)
    smallest = int(torch.minimum(path.cameras.width, path.cameras.height).min())
    if args.downscale > smallest:
        raise UserError(f"--downscale {args.downscale}: larger than the images ({smallest} pixels on their "
                        "shortest side)")
    path.cameras = path.cameras.downscaled(args.downscale)
    return path


def cmd_render(args: argparse.Namespace) -> None:
    run, cfg, pipeline, _ = load_run(args.run)
    path = path_cameras(cfg, args)
    out = run.renders / f"{path.name}-render"
    paths = render_cameras(pipeline, path.cameras, out, cfg.eval_chunk, video=run.renders / f"{path.name}.mp4",
                           fps=path.fps)
    if paths:  # rank 0's (the other ranks of a distributed render write nothing)
        print(f"wrote {len(paths) - 1} frames to {out} and {paths[-1]}")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("render", help="render test views, an orbit or a camera path to PNG and MP4")
    p.add_argument("run")
    path_options(p)
    p.set_defaults(func=cmd_render)
