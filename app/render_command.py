"""`recon render`: a trained run's test views or an orbit as PNGs and an MP4; the camera paths `export video`
shares."""

from __future__ import annotations

import argparse

import torch

from recon.app.cli_shared import load_run, load_split, number_option, require_task
from recon.app.config import FitConfig
from recon.app.evaluate import orbit_cameras, render_cameras
from recon.app.run import UserError
from recon.data.cameras import Cameras
from recon.data.checks import POSITIVE_INT


def path_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--path", default="test", choices=("test", "val", "train", "orbit"),
                   help="a split's cameras or an orbit around the training cameras (default test)")
    p.add_argument("--frames", **number_option(POSITIVE_INT, 120, "orbit frames"))
    p.add_argument("--fps", **number_option(POSITIVE_INT, 30, "video frames per second"))
    p.add_argument("--downscale", **number_option(POSITIVE_INT, 1, "render images N times smaller than the scene's"))


def path_cameras(cfg: FitConfig, path: str, frames: int, downscale: int) -> Cameras:
    """The cameras of a render path: a split's, or an orbit around the training cameras."""
    require_task(cfg, "rendering a camera path", "radiance")
    scene = load_split(cfg, "train" if path == "orbit" else path)
    cameras = orbit_cameras(scene.splits["train"].cameras, frames) if path == "orbit" else scene.splits[path].cameras
    smallest = int(torch.minimum(cameras.width, cameras.height).min())
    if downscale > smallest:
        raise UserError(f"--downscale {downscale}: larger than the images ({smallest} pixels on their shortest side)")
    return cameras.downscaled(downscale)


def cmd_render(args: argparse.Namespace) -> None:
    run, cfg, pipeline, _ = load_run(args.run)
    cameras = path_cameras(cfg, args.path, args.frames, args.downscale)
    out = run.renders / f"{args.path}-render"
    paths = render_cameras(pipeline, cameras, out, cfg.eval_chunk, video=run.renders / f"{args.path}.mp4", fps=args.fps)
    print(f"wrote {len(paths) - 1} frames to {out} and {paths[-1]}")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("render", help="render test views or an orbit to PNG and MP4")
    p.add_argument("run")
    path_options(p)
    p.set_defaults(func=cmd_render)
