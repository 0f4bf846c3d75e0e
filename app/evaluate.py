"""Evaluation and rendering of a trained pipeline: test-split metrics, PNGs and orbit videos."""

from __future__ import annotations

import math
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import imageio.v2 as imageio
import numpy as np
import torch
from tqdm import tqdm

from recon import __version__
from recon.app.metrics import PROTOCOL, Lpips, ground_truth_on_white, psnr, ssim
from recon.app.pipeline import Pipeline
from recon.data.cameras import Cameras
from recon.data.scene import Split

METRICS_SCHEMA = "recon.metrics/1"
CPU_EVAL_VIEWS = 25


def default_stride(n_views: int, device: torch.device) -> int:
    """Every view on a GPU; on a CPU at most CPU_EVAL_VIEWS evenly spaced views."""
    return 1 if device.type == "cuda" else max(1, math.ceil(n_views / CPU_EVAL_VIEWS))


def to_uint8(image: torch.Tensor) -> np.ndarray:
    return (image.clamp(0, 1) * 255 + 0.5).to(torch.uint8).cpu().numpy()


def evaluate(pipeline: Pipeline, split: Split, stride: int, chunk: int, out_dir: Path | None = None) -> dict[str, Any]:
    """Render every `stride`-th view of `split` on white and score it against the ground truth."""
    started = time.perf_counter()
    lpips = Lpips()
    views = []
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    for i in tqdm(range(0, len(split), stride), desc="evaluating", unit="view", leave=False):
        pred = pipeline.render_view(split.cameras, i, chunk)["rgb"].cpu()
        gt = ground_truth_on_white(split.image(i))
        views.append({"index": i, "name": split.names[i], "psnr": psnr(pred, gt), "ssim": ssim(pred, gt), "lpips": lpips(pred, gt)})
        if out_dir:
            imageio.imwrite(out_dir / f"{i:04d}.png", to_uint8(pred))
    mean = {k: float(np.mean([v[k] for v in views])) for k in ("psnr", "ssim")}
    mean["lpips"] = float(np.mean([v["lpips"] for v in views])) if lpips.model else None
    return {
        "split_views": len(split),
        "stride": stride,
        "views_evaluated": len(views),
        "seconds": round(time.perf_counter() - started, 3),
        "protocol": PROTOCOL,
        "lpips": "alex" if lpips.model else lpips.reason,
        "mean": mean,
        "views": views,
    }


def metrics_document(task: str, run_name: str, scene: str, pipeline: Pipeline, train: dict[str, Any],
                     split: str, evaluation: dict[str, Any]) -> dict[str, Any]:
    """The metrics.json schema shared by every task (documented in the README)."""
    return {
        "schema": METRICS_SCHEMA,
        "task": task,
        "run": run_name,
        "scene": scene,
        "field": pipeline.field.name,
        "parameters": pipeline.field.num_parameters(),
        "device": str(pipeline.device),
        "train": train,
        "eval": {"split": split, **{k: v for k, v in evaluation.items() if k not in ("mean", "views")}},
        "mean": evaluation["mean"],
        "views": evaluation["views"],
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "recon_version": __version__,
    }


def orbit_cameras(reference: Cameras, frames: int) -> Cameras:
    """A circle of cameras around the training cameras' centre of attention, at their mean height."""
    centres = reference.c2w[:, :, 3]
    up = reference.c2w[:, :, 1].mean(0)
    up = up / up.norm()
    # The point closest to every optical axis (least squares) is what the cameras look at.
    forward = -reference.c2w[:, :, 2]
    projector = torch.eye(3) - forward[:, :, None] * forward[:, None, :]
    target = torch.linalg.lstsq(projector.sum(0), (projector @ centres[:, :, None]).sum(0)).solution[:, 0]
    offsets = centres - target
    height = (offsets @ up).mean()
    radius = (offsets - (offsets @ up)[:, None] * up).norm(dim=1).mean()
    side = torch.linalg.svd(torch.eye(3) - up[:, None] * up[None]).U[:, 0]
    side2 = torch.linalg.cross(up, side)
    c2w = []
    for k in range(frames):
        angle = 2 * math.pi * k / frames
        position = target + up * height + radius * (math.cos(angle) * side + math.sin(angle) * side2)
        back = (position - target) / (position - target).norm()  # OpenGL cameras look down -z
        right = torch.linalg.cross(up, back)
        right = right / right.norm()
        c2w.append(torch.stack([right, torch.linalg.cross(back, right), back, position], dim=1))
    first = reference[[0] * frames]
    return Cameras(c2w=torch.stack(c2w), fx=first.fx, fy=first.fy, cx=first.cx, cy=first.cy, width=first.width,
                   height=first.height, distortion=torch.zeros_like(first.distortion), fisheye=torch.zeros_like(first.fisheye))


def render_cameras(pipeline: Pipeline, cameras: Cameras, out_dir: Path, chunk: int, video: Path | None, fps: int = 30) -> list[Path]:
    """Render each camera to out_dir/NNNN.png and, if asked, all of them to an MP4."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths, frames = [], []
    for i in tqdm(range(len(cameras)), desc="rendering", unit="view"):
        frame = to_uint8(pipeline.render_view(cameras, i, chunk)["rgb"])
        paths.append(out_dir / f"{i:04d}.png")
        imageio.imwrite(paths[-1], frame)
        frames.append(frame[: frame.shape[0] // 2 * 2, : frame.shape[1] // 2 * 2])  # H.264 4:2:0 needs even sizes
    if video:
        imageio.mimwrite(video, frames, fps=fps, macro_block_size=1)
        paths.append(video)
    return paths
