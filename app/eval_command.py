"""`recon eval`: a trained run scored again; `evaluate_run` also ends every `recon fit`."""

from __future__ import annotations

import argparse
import math
from typing import Any

from recon.app.cli_shared import load_run, load_split, number_option
from recon.app.config import FitConfig
from recon.app.distributed import from_main, world
from recon.app.evaluate import default_stride, metrics_document
from recon.app.run import RunDir, UserError
from recon.app.tasks import RadianceTask, Task, task_class
from recon.data.checks import POSITIVE_INT
from recon.data.targets import load_input


def evaluate_run(run: RunDir, task: Task, cfg: FitConfig, train: dict[str, Any], stride: int | None = None,
                 split: str = "test", align_poses: bool | None = None) -> dict[str, Any]:
    """Score the task (a radiance field: every `stride`-th view of `split`, `align_poses` as
    RadianceTask.evaluate) and write metrics.json. In a distributed run the ranks share the radiance field's
    views, rank 0 writes, and every rank returns the metrics."""
    main = world().main
    if isinstance(task, RadianceTask):
        views = len(task.scene.splits[split])
        stride = stride or default_stride(views, task.pipeline.device)
        result = task.evaluate(run.renders / split, split, stride, align_poses)
    else:
        result, split = task.evaluate(run.renders) if main else None, None
    outcome = written_metrics(run, task, cfg, train, split, result) if main else None
    outcome = from_main(outcome)
    if isinstance(outcome, UserError):
        raise outcome
    return outcome


def written_metrics(run: RunDir, task: Task, cfg: FitConfig, train: dict[str, Any], split: str | None,
                    result: dict[str, Any]) -> dict[str, Any] | UserError:
    """metrics.json written and returned, with its one-line summary printed; a UserError if a score is not
    finite (the file left as it was)."""
    mean = result["mean"]
    if split is not None:
        aligned = ", poses aligned to the photos" if result["poses"] != "as given" else ""
        summary = (f"{split}: PSNR {mean['psnr']:.2f} dB  SSIM {mean['ssim']:.4f}  over {result['views_evaluated']} "
                   f"of {result['split_views']} views (every {result['stride']}{aligned})")
    elif task.kind == "image":
        summary = f"image: PSNR {mean['psnr']:.2f} dB  SSIM {mean['ssim']:.4f}, {run.renders / 'reconstruction.png'}"
    else:
        summary = f"held-out points: IoU {mean['iou']:.5f}  normal error {mean['normal_angle_deg']:.2f} degrees"
    if not all(math.isfinite(value) for value in mean.values() if value is not None):
        return UserError(f"{run.path}: the evaluation gave {mean} (not finite); {run.metrics} left as it was", 3)
    metrics = metrics_document(task.kind, run.path.name, cfg.scene, task.pipeline, train, split, result)
    run.write_json(run.metrics, metrics)
    print(f"{summary}  ->  {run.metrics}")
    return metrics


def cmd_eval(args: argparse.Namespace) -> None:
    run, cfg, pipeline, state = load_run(args.run)
    target = load_split(cfg, args.split) if cfg.task == "radiance" else load_input(cfg.scene)
    task = task_class(target)(cfg, target, pipeline.device, pipeline)
    train = {"steps": state["step"], "seconds": round(state["train_seconds"], 3)}
    evaluate_run(run, task, cfg, train, stride=args.stride, split=args.split, align_poses=args.align_poses)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="render a split of a trained run and write metrics.json")
    p.add_argument("run")
    p.add_argument("--split", default="test")
    p.add_argument("--stride", **number_option(POSITIVE_INT, 1, "every k-th view"))
    p.add_argument("--align-poses", action=argparse.BooleanOptionalAction, default=None,
                   help="score each view from the pose that best renders its photo, the field frozen (default: when "
                        "the run refined its training poses)")
    p.set_defaults(func=cmd_eval)
