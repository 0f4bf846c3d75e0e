"""Evaluation and rendering of a trained pipeline: test-split metrics, PNGs and orbit videos."""

from __future__ import annotations

import colorsys
import math
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import imageio.v2 as imageio
import numpy as np
import torch
from tqdm import tqdm

from recon import __version__
from recon.app.distributed import gather_to_main, world
from recon.app.metrics import PROTOCOL, Lpips, ground_truth_on_white, psnr, ssim
from recon.app.pipeline import Pipeline
from recon.data.cameras import Cameras, PoseCorrection, pose_errors
from recon.data.rays import Rays
from recon.data.scene import Split

METRICS_SCHEMA = "recon.metrics/1"
CPU_EVAL_VIEWS = 25
# Test-time pose alignment (BARF's): Adam steps of random pixels per view; 2e-3 rad a step crosses 2 degrees in
# under 20 steps and the decay settles it.
ALIGN_STEPS, ALIGN_RAYS, ALIGN_LR = 100, 2048, 2e-3


def default_stride(n_views: int, device: torch.device) -> int:
    """Every view on a GPU; on a CPU at most CPU_EVAL_VIEWS evenly spaced views."""
    return 1 if device.type == "cuda" else max(1, math.ceil(n_views / CPU_EVAL_VIEWS))


def to_uint8(image: torch.Tensor) -> np.ndarray:
    return (image.clamp(0, 1) * 255 + 0.5).to(torch.uint8).cpu().numpy()


def evaluate(pipeline: Pipeline, split: Split, stride: int, chunk: int, out_dir: Path | None = None,
             align_poses: bool = False) -> dict[str, Any] | None:
    """Render every `stride`-th view of `split` on white and score it against the ground truth (the ranks of a
    distributed run take turns; rank 0 gets the scores, the others None); `align_poses`:
    each view from the pose that best renders its photo with the field frozen (`align_pose`), as a run that
    refined its training poses needs: its scene may have moved as a whole, and test poses carry the capture's
    errors too."""
    started = time.perf_counter()
    lpips = Lpips()
    views = []
    if out_dir and world().main:
        out_dir.mkdir(parents=True, exist_ok=True)
    cameras = replace(split.cameras, c2w=split.cameras.c2w.clone())  # an aligned view's pose replaces its own

    def score(i: int) -> tuple[dict[str, Any], np.ndarray]:
        gt = ground_truth_on_white(split.image(i))
        shift = {}
        if align_poses:
            aligned = align_pose(pipeline, split.cameras, i, gt, torch.Generator().manual_seed(i))
            cameras.c2w[i] = aligned.to(cameras.c2w)
            turn, moved = pose_errors(cameras.c2w[i : i + 1], split.cameras.c2w[i : i + 1], rigid=False)
            shift = {"pose_turned_degrees": float(turn), "pose_moved": float(moved)}
        pred = pipeline.render_view(cameras, i, chunk)["rgb"].cpu()
        return ({"index": i, "name": split.names[i], "psnr": psnr(pred, gt), "ssim": ssim(pred, gt),
                 "lpips": lpips(pred, gt), **shift}, to_uint8(pred))

    indices = list(range(0, len(split), stride))
    with pipeline.baked_proposals(cameras[::stride]):
        for view, image in in_turns(score, indices, "evaluating"):
            views.append(view)
            if out_dir:
                imageio.imwrite(out_dir / f"{view['index']:04d}.png", image)
    if not world().main:
        return None
    mean = {k: float(np.mean([v[k] for v in views])) for k in ("psnr", "ssim")}
    mean["lpips"] = float(np.mean([v["lpips"] for v in views])) if lpips.model else None
    return {
        "split_views": len(split),
        "stride": stride,
        "views_evaluated": len(views),
        "seconds": round(time.perf_counter() - started, 3),
        "protocol": PROTOCOL,
        "poses": (f"aligned: each view's pose refined on its own photo with the field frozen ({ALIGN_STEPS} Adam "
                  f"steps of {ALIGN_RAYS} random pixels, BARF's test-time pose optimisation); the views record how far"
                  " their poses moved" if align_poses else "as given"),
        "lpips": "alex" if lpips.model else lpips.reason,
        "mean": mean,
        "views": views,
    }


def in_turns(work: Callable[[int], Any], items: list[int], desc: str) -> Iterator[Any]:
    """`work` on each of `items`, the ranks of a distributed run taking turns (rank r does the r-th of each
    round), and the results on rank 0, in order (elsewhere: nothing). One process does them all."""
    ranks = world()
    with tqdm(total=len(items), desc=desc, unit="view", leave=False, disable=not ranks.main) as bar:
        for first in range(0, len(items), ranks.size):
            mine = first + ranks.rank
            results = gather_to_main(work(items[mine]) if mine < len(items) else None)
            bar.update(min(ranks.size, len(items) - first))
            yield from (result for result in results or [] if result is not None)


def align_pose(pipeline: Pipeline, cameras: Cameras, index: int, image: torch.Tensor,
               generator: torch.Generator) -> torch.Tensor:
    """[3, 4] the pose of camera `index` that best renders `image` [H, W, 3] (on white) with the pipeline frozen: an
    SE(3) correction (the training's PoseCorrection) learnt by Adam on random pixels, its learning rate decaying
    exponentially from ALIGN_LR to a hundredth."""
    device = pipeline.device
    correction = PoseCorrection(1).to(device)
    optimizer = torch.optim.Adam(correction.parameters(), lr=ALIGN_LR)
    rays, target = cameras.image_rays(index).to(device), image.reshape(-1, 3).to(device)
    c2w, white = cameras.c2w[index : index + 1].to(device), torch.ones(3, device=device)
    cam = torch.zeros(ALIGN_RAYS, dtype=torch.long, device=device)
    was_training = pipeline.field.training
    pipeline.field.eval()
    with pipeline.frozen():
        for step in range(ALIGN_STEPS):
            for group in optimizer.param_groups:
                group["lr"] = ALIGN_LR * 0.01 ** (step / ALIGN_STEPS)
            pick = torch.randint(len(target), (ALIGN_RAYS,), generator=generator).to(device)
            out = pipeline.render(correction(Rays(rays.origins[pick], rays.dirs[pick]), cam, c2w), white,
                                  train_proposals=False)
            rgb = out["rgb"] if pipeline.appearance is None else pipeline.appearance(out["rgb"], out["opacity"], white)
            loss = torch.nn.functional.mse_loss(rgb, target[pick])
            optimizer.zero_grad(set_to_none=True)
            if loss.requires_grad:  # else no sample met anything along these rays
                loss.backward()
                optimizer.step()
    pipeline.field.train(was_training)
    return correction.corrected(c2w)[0]


def metrics_document(task: str, run_name: str, scene: str, pipeline: Pipeline, train: dict[str, Any],
                     split: str | None, evaluation: dict[str, Any]) -> dict[str, Any]:
    """The metrics.json schema shared by every task (documented in the README); `views` and the split
    are a radiance field's (None for the other tasks)."""
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
        "views": evaluation.get("views"),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "recon_version": __version__,
    }


VIRIDIS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]]) / 255
# Depth colour maps, far to near: viridis, grey (dark far, light near, short of the white background) and a
# rainbow (hue from violet far to red near: the most distinct steps, as turbo gives).
COLORMAPS = {
    "viridis": VIRIDIS,
    "grey": np.array([[0.08] * 3, [0.85] * 3]),
    "rainbow": np.array([colorsys.hsv_to_rgb(hue, 1.0, 0.95) for hue in np.linspace(0.78, 0.0, 8)]),
}


def colorize_depth(depth: np.ndarray, opacity: np.ndarray, near: float, far: float,
                   colors: np.ndarray = VIRIDIS) -> np.ndarray:
    """Depth [H, W] as RGB [H, W, 3] in [0, 1], interpolating `colors` (far to near: near is the last), faded
    to white where nothing was hit."""
    x = np.clip((far - depth) / max(far - near, 1e-9), 0, 1) * (len(colors) - 1)
    anchors = np.arange(len(colors))
    rgb = np.stack([np.interp(x, anchors, colors[:, c]) for c in range(3)], -1)
    return rgb * opacity[..., None] + (1 - opacity[..., None])


def render_cameras(pipeline: Pipeline, cameras: Cameras, out_dir: Path, chunk: int, video: Path | None, fps: int = 30,
                   with_depth: bool = False) -> list[Path]:
    """Render each camera to out_dir/NNNN.png (colour, or colour and depth side by side) and, if asked,
    all of them to an MP4, frame by frame. Depth colours span the first frame's 2nd to 98th percentile. The
    ranks of a distributed run take turns rendering, rank 0 writes (the others return no paths)."""
    main = world().main
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    writer = imageio.get_writer(video, format="FFMPEG", fps=fps, macro_block_size=1) if video and main else None
    paths, depth_range = [], None

    def render(i: int) -> dict[str, np.ndarray]:
        return {k: v.cpu().numpy() for k, v in pipeline.render_view(cameras, i, chunk).items()}

    with pipeline.baked_proposals(cameras):
        for i, out in enumerate(in_turns(render, list(range(len(cameras))), "rendering")):
            image = out["rgb"]
            if with_depth:
                if depth_range is None:
                    hit = out["depth"][out["opacity"] > 0.5]
                    depth_range = np.percentile(hit, [2, 98]) if len(hit) else (0.0, 1.0)
                image = np.concatenate([image, colorize_depth(out["depth"], out["opacity"], *depth_range)], axis=1)
            frame = to_uint8(torch.from_numpy(image))
            paths.append(out_dir / f"{i:04d}.png")
            imageio.imwrite(paths[-1], frame)
            if writer:
                # H.264 4:2:0 needs even sizes
                writer.append_data(frame[: frame.shape[0] // 2 * 2, : frame.shape[1] // 2 * 2])
    if writer:
        writer.close()
        paths.append(video)
    return paths
