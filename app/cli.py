"""The `recon` command line: fit, demo, eval, render, export, convert, process, eval-mesh.

`recon fit` takes a posed-image scene (a radiance field), an image file (the image task) or a mesh
file (its signed distance); every later command reads the run folder and knows which it was.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from recon.app.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from recon.app.config import FitConfig, add_options, argument_type, command_line_fields, option_help
from recon.app.evaluate import default_stride, metrics_document, orbit_cameras, render_cameras
from recon.app.pipeline import Pipeline
from recon.app.run import RUN_ENTRIES, RunDir, UserError, write_json
from recon.app.tasks import RadianceTask, Task, task_class
from recon.app.trainer import Trainer, TrainingDiverged, resolve_device
from recon.cuda import kernels_mode
from recon.data.checks import FINITE, FRACTION, POSITIVE, POSITIVE_INT, Number, contains
from recon.data.scene import Scene, SceneError, load_scene
from recon.data.sfm import CAMERA_MODELS, MATCHERS, VIDEO_FRAMES, SfmOptions
from recon.data.targets import ImageTarget, MeshTarget, load_input

# The built-in example: small enough to fit in a few minutes on a 2-core CPU.
DEMO_SCENE = {"resolution": 128, "n_train": 60, "n_test": 12}
DEMO_FIT = {"steps": 1000, "field_options": {"max_resolution": 512}}  # the machine preset does the rest
VIEWER_ROWS = {"cpu": 192, "gpu": 800}  # the viewer's resting frame height by machine preset
RESOLUTION = Number(int, 8, 4096)  # voxels along an export box's longest side


class ProgressBar:
    """Step, loss, PSNR (where the loss is a colour MSE) and throughput on one terminal line."""

    def __init__(self, trainer: Trainer):
        self.bar = tqdm(total=100, initial=round(trainer.progress.value * 100), unit="%", desc="training",
                        bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed}<{remaining} {postfix}")

    def on_step(self, trainer: Trainer, stats: dict[str, Any]) -> None:
        unit = trainer.task.unit
        psnr = f" psnr {stats['psnr']:.2f}" if "psnr" in stats else ""
        self.bar.set_postfix_str(f"step {stats['step']} loss {stats['loss']:.4f}{psnr} "
                                 f"{stats[f'{unit}_per_second'] / 1e3:.1f}k {unit}/s", refresh=False)
        self.bar.update(round(stats["progress"] * 100) - self.bar.n)

    def close(self) -> None:
        self.bar.close()


class LogWriter:
    def __init__(self, run: RunDir):
        self.run = run

    def on_step(self, trainer: Trainer, stats: dict[str, Any]) -> None:
        self.run.append_log({"time": time.time(), **stats})


def parse_field_options(pairs: list[str]) -> dict[str, Any]:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise UserError(f"--field-option {pair!r}: expected KEY=VALUE")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def default_run_name(scene: Path, field: str) -> Path:
    stem = scene.stem if scene.is_file() else scene.resolve().name
    return Path("runs") / f"{stem}-{field}-{time.strftime('%Y%m%d-%H%M%S')}"


Target = Scene | ImageTarget | MeshTarget


def build_trainer(cfg: FitConfig, target: Target) -> Trainer:
    try:
        return Trainer(cfg, target)
    except (TypeError, ValueError, RuntimeError) as error:  # an -o KEY the backend does not take, or a bad value
        raise UserError(f"--field {cfg.field} -o ...: {str(error).splitlines()[0]}") from None


def viewer_skipped(args: argparse.Namespace, task: Task) -> str | None:
    """Why the viewer is not started, or None: --viewer / --no-viewer, or by default on when a person
    watches (a terminal, not CI); it shows radiance fields only."""
    if not isinstance(task, RadianceTask):
        return f"it shows radiance fields; this fit is of {'an image' if task.kind == 'image' else 'a mesh'}"
    if args.viewer is not None:
        return None if args.viewer else "--no-viewer"
    if os.environ.get("CI"):
        return "CI is set; --viewer starts it"
    return None if sys.stdout.isatty() else "no terminal; --viewer starts it"


def parameter_counts(field: torch.nn.Module) -> str:
    """The field's parameters now and, for a backend that grows while training (DVGO, TensoRF), at the end
    (metrics.json's count)."""
    now = field.num_parameters()
    grown = copy.deepcopy(field)
    if not grown.grow(1.0):
        return f"{now:,} parameters"
    return f"{now:,} parameters now, {grown.num_parameters():,} once grown"


def fit(cfg: FitConfig, run: RunDir, target: Target, resume: bool, overwrite: bool = False,
        args: argparse.Namespace | None = None) -> dict[str, Any]:
    """Train (or continue) the run in `run`, then evaluate it; returns metrics.json's content. A fresh run's
    folder is made once the field is built, so bad options leave nothing behind. `args` carry the viewer's
    options (radiance runs)."""
    print(target.describe())
    trainer = build_trainer(cfg, target)
    cfg = trainer.cfg  # every option resolved, the preset's included
    if not resume:
        run.create(overwrite, Path(cfg.scene))
        cfg.scene_from_run = os.path.relpath(cfg.scene, run.path.absolute())
        cfg.save(run.config)
        run.write_json(run.scene, target.to_json())
    checkpoint = latest_checkpoint(run.checkpoints) if resume else None
    if checkpoint:
        trainer.load_state_dict(load_checkpoint(checkpoint))
        print(f"resuming {run.path} from step {trainer.step}")
    print(f"run folder: {run.path}   field: {cfg.field} ({parameter_counts(trainer.pipeline.field)})   "
          f"device: {trainer.device} (preset {cfg.preset})")

    def checkpoint_now(t: Trainer) -> Path:
        return save_checkpoint(run.checkpoints, t.step, t.state_dict())

    viewer = None
    if args is not None:
        skipped = viewer_skipped(args, trainer.task)
        if skipped:
            print(f"viewer: not started ({skipped})")
        else:
            viewer = launch_viewer(trainer.pipeline, target, run, cfg, args)
    bar = ProgressBar(trainer)
    previous_sigterm = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        trainer.run([bar, LogWriter(run)] + ([viewer] if viewer else []), on_checkpoint=checkpoint_now, gate=viewer)
        bar.close()
        checkpoint_now(trainer)
        if getattr(trainer.task, "poses", None) is not None:
            write_refined_poses(run, trainer.task)
        metrics = evaluate_run(run, trainer.task, cfg, trainer.train_summary(), stride=cfg.eval_stride)
        if viewer and args.keep_viewer:
            viewer.training_done()
            print(f"viewer still at {viewer.url} (Ctrl-C to quit)")
            wait_for_ctrl_c()
        return metrics
    except (KeyboardInterrupt, Terminated) as stop:
        bar.close()
        for signum in (signal.SIGINT, signal.SIGTERM):  # a second signal must not cut the checkpoint short
            signal.signal(signum, signal.SIG_IGN)
        path = checkpoint_now(trainer)
        what = "terminated" if isinstance(stop, Terminated) else "interrupted"
        print(f"\n{what} at step {trainer.step}: saved {path}; continue with: recon fit --resume {run.path}")
        raise SystemExit(143 if isinstance(stop, Terminated) else 130)
    except TrainingDiverged as error:
        bar.close()
        last = latest_checkpoint(run.checkpoints)
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written before it"
        raise UserError(f"{run.path}: training diverged: {error}; {kept}", exit_code=3) from None
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
        if viewer:
            viewer.close()


def write_refined_poses(run: RunDir, task: RadianceTask) -> None:
    """RUN/refined_poses.json: the training cameras as pose refinement left them, in the input's world frame
    (OpenGL camera-to-world, as transforms.json), with how far each moved."""
    cameras = task.train.cameras
    to_world = torch.linalg.inv(task.scene.to_unit.double()).to(cameras.c2w.device)
    scale = to_world[0, :3].norm()
    frames = []
    for name, given, refined in zip(task.train.names, cameras.c2w.double(), task.poses.corrected(cameras.c2w).double()):
        rotation = to_world[:3, :3] / scale @ refined[:, :3]
        centre = to_world[:3, :3] @ refined[:, 3] + to_world[:3, 3]
        turn = ((given[:, :3].T @ refined[:, :3]).trace().clamp(-1, 3) - 1) / 2
        frames.append({"file_path": name, "transform_matrix": torch.cat([torch.cat([rotation, centre[:, None]], 1),
                       torch.tensor([[0, 0, 0, 1.0]], dtype=torch.float64, device=centre.device)]).tolist(),
                       "rotated_degrees": math.degrees(math.acos(float(turn.clamp(-1, 1)))),
                       "moved": float((refined[:, 3] - given[:, 3]).norm() * scale)})
    run.write_json(run.path / "refined_poses.json", {"frames": frames})
    print(f"refined poses: {run.path / 'refined_poses.json'}")


class Terminated(Exception):
    """SIGTERM, turned into an exception so the run checkpoints on its way out (as Ctrl-C does)."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def launch_viewer(pipeline: Pipeline, scene: Scene, run: RunDir, cfg: FitConfig, args: argparse.Namespace):
    from recon.app.viewer import start_viewer

    try:
        viewer = start_viewer(pipeline, scene, run, args.host, args.port, args.viewer_share, cfg.eval_chunk,
                              resolution=VIEWER_ROWS[cfg.preset])
    except OSError as error:  # no free port: train without it
        print(f"viewer not started: {error}")
        return None
    print(f"viewer: {viewer.url}" + ("" if args.host == "127.0.0.1" else f" (serving {args.host})"))
    return viewer


def wait_for_ctrl_c() -> None:
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass


def evaluate_run(run: RunDir, task: Task, cfg: FitConfig, train: dict[str, Any], stride: int | None = None,
                 split: str = "test") -> dict[str, Any]:
    """Score the task (a radiance field: every `stride`-th view of `split`) and write metrics.json."""
    if isinstance(task, RadianceTask):
        views = len(task.scene.splits[split])
        stride = stride or default_stride(views, task.pipeline.device)
        result = task.evaluate(run.renders / split, split, stride)
        mean = result["mean"]
        summary = (f"{split}: PSNR {mean['psnr']:.2f} dB  SSIM {mean['ssim']:.4f}  over {result['views_evaluated']} "
                   f"of {views} views (every {stride})")
    else:
        result, split = task.evaluate(run.renders), None
        mean = result["mean"]
        summary = (f"image: PSNR {mean['psnr']:.2f} dB  SSIM {mean['ssim']:.4f}, {run.renders / 'reconstruction.png'}"
                   if task.kind == "image" else
                   f"held-out points: IoU {mean['iou']:.5f}  normal error {mean['normal_angle_deg']:.2f} degrees")
    if not all(math.isfinite(value) for value in mean.values() if value is not None):
        raise UserError(f"{run.path}: the evaluation gave {mean} (not finite); {run.metrics} left as it was", 3)
    metrics = metrics_document(task.kind, run.path.name, cfg.scene, task.pipeline, train, split, result)
    run.write_json(run.metrics, metrics)
    print(f"{summary}  ->  {run.metrics}")
    return metrics


def check_kernels_mode() -> None:
    """A bad RECON_KERNELS is one line and exit 2 before any work."""
    try:
        kernels_mode()
    except ValueError as error:
        raise UserError(str(error)) from None


def open_run(path: str) -> tuple[RunDir, FitConfig]:
    """A run folder and its config, with the scene found wherever the run is opened from (a note when it is
    found beside the run instead of where it was)."""
    run = RunDir(path)
    run.require()
    try:
        cfg = FitConfig.load(run.config)
    except ValueError as error:
        raise UserError(str(error)) from None
    cfg.scene, note = run.scene_path(cfg.scene, cfg.scene_from_run)
    if note:
        print(f"recon: {note}")
    return run, cfg


def load_run(path: str) -> tuple[RunDir, FitConfig, Pipeline, dict[str, Any]]:
    run, cfg = open_run(path)
    checkpoint = latest_checkpoint(run.checkpoints)
    if checkpoint is None:
        raise UserError(f"{run.checkpoints}: no checkpoint to load")
    state = load_checkpoint(checkpoint)
    device = resolve_device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():  # runs move between machines and paths
        print(f"recon: {run.path} was trained with --device {cfg.device}; no GPU here, so it runs on the CPU")
        device = torch.device("cpu")
    pipeline = Pipeline.from_state(state["pipeline"]).to(device)
    return run, cfg, pipeline, state


# ---- commands ----------------------------------------------------------------------------------

# What `fit --resume` takes: the run's length and the viewer's options; anything else would change the run.
RESUME_OPTIONS = ("steps", "max_time", "viewer", "keep_viewer", "host", "port", "viewer_share")


def cmd_fit(args: argparse.Namespace) -> None:
    if args.resume:
        return resume_fit(args)
    if args.scene is None:
        return cmd_demo(args)
    cfg = FitConfig(scene=str(Path(args.scene).expanduser().absolute()), out="")
    apply_fit_args(cfg, args)
    start_fit(cfg, args, args.out or default_run_name(Path(args.scene), cfg.field))


def start_fit(cfg: FitConfig, args: argparse.Namespace, out: str | Path) -> None:
    """A new run: its folder and its input are checked before any work, and the folder is made only once
    the field is built, so a bad option leaves nothing behind."""
    run = RunDir(out)
    cfg.out = str(run.path)
    run.check_new(args.overwrite, Path(cfg.scene))
    fit(cfg, run, load_fit_input(cfg), resume=False, overwrite=args.overwrite, args=args)


def resume_fit(args: argparse.Namespace) -> None:
    # Fit options default to None, lists to empty, flags to False: anything else was typed.
    given = [name for name, value in vars(args).items()
             if name not in RESUME_OPTIONS + ("resume", "command", "func") and value not in (None, False, [])]
    if given:
        flags = ", ".join(f"--{name.replace('_', '-')}" for name in given)
        raise UserError(f"--resume {args.resume}: {flags} would change the run; a resume takes only --steps, "
                        "--max-time and the viewer's options (start a new run with --out to change others)")
    run, cfg = open_run(args.resume)
    cfg.steps = args.steps if args.steps is not None else cfg.steps
    cfg.max_time = args.max_time if args.max_time is not None else cfg.max_time
    fit(cfg, run, load_input(cfg.scene, downscale=cfg.downscale), resume=True, args=args)


def load_fit_input(cfg: FitConfig) -> Target:
    """The fit's input; an automatic --downscale becomes the factor chosen, so config.json reloads the same images."""
    target = load_input(cfg.scene, downscale=cfg.downscale, budget=pixel_budget(resolve_device(cfg.device)))
    if isinstance(target, Scene):
        cfg.downscale = target.summary["downscale"]
    return target


def pixel_budget(device: torch.device) -> float:
    """Bytes of decoded training pixels allowed: a quarter of the machine's memory, and of the GPU's when the
    pixels will live there too."""
    budget = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 4
    if device.type == "cuda":
        budget = min(budget, torch.cuda.get_device_properties(device).total_memory / 4)
    return budget


def apply_fit_args(cfg: FitConfig, args: argparse.Namespace) -> None:
    """The options typed (each already checked by its type) onto `cfg`, then the checks across options."""
    for spec in command_line_fields():
        value = getattr(args, spec.name)
        if value is not None:
            setattr(cfg, spec.name, value)
    try:
        cfg.checked()
    except ValueError as error:
        raise UserError(str(error)) from None
    if cfg.surface_box is not None:
        if cfg.model != "sdf":
            raise UserError("--surface-box: only for --model sdf (the box an SDF field covers)")
        world_box("--surface-box", cfg.surface_box)
    cfg.field_options.update(parse_field_options(args.field_option))


def cmd_demo(args: argparse.Namespace) -> None:
    from recon.data.synthetic import make_scene

    scene_dir = Path("runs/demo-scene")
    if not (scene_dir / "transforms_train.json").exists():
        print(f"generating the example scene in {scene_dir}")
        make_scene(scene_dir, **DEMO_SCENE)
    cfg = FitConfig(scene=str(scene_dir.absolute()), out="", **copy.deepcopy(DEMO_FIT))
    apply_fit_args(cfg, args)
    start_fit(cfg, args, args.out or default_run_name(Path("demo"), cfg.field))


def load_split(cfg: FitConfig, split: str):
    scene = load_scene(cfg.scene, downscale=cfg.downscale)
    if split not in scene.splits:
        raise UserError(f"{cfg.scene}: no '{split}' split (has: {', '.join(scene.splits)})")
    return scene


def cmd_eval(args: argparse.Namespace) -> None:
    run, cfg, pipeline, state = load_run(args.run)
    target = load_split(cfg, args.split) if cfg.task == "radiance" else load_input(cfg.scene)
    task = task_class(target)(cfg, target, pipeline.device, pipeline)
    train = {"steps": state["step"], "seconds": round(state["train_seconds"], 3)}
    evaluate_run(run, task, cfg, train, stride=args.stride, split=args.split)


def cmd_view(args: argparse.Namespace) -> None:
    from recon.app.viewer import start_viewer

    run, cfg, pipeline, _ = load_run(args.run)
    require_task(cfg, "recon view", "radiance")
    scene = load_scene(cfg.scene, downscale=cfg.downscale)
    viewer = start_viewer(pipeline, scene, run, args.host, args.port, share=1.0, chunk=cfg.eval_chunk,
                          resolution=VIEWER_ROWS[cfg.preset])
    print(f"viewer: {viewer.url} (Ctrl-C to quit)")
    try:
        wait_for_ctrl_c()
    finally:
        viewer.close()


def require_task(cfg: FitConfig, command: str, *tasks: str) -> None:
    if cfg.task not in tasks:
        raise UserError(f"{cfg.out}: {command} needs a run of task {' or '.join(tasks)}; this run's task is {cfg.task}")


def path_cameras(cfg: FitConfig, path: str, frames: int, downscale: int):
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


def world_box(flag: str, given: list[float]) -> torch.Tensor:
    """[2, 3] from a flag's X0 Y0 Z0 X1 Y1 Z1 (world frame); an empty box is the user's error."""
    box = torch.tensor(given, dtype=torch.float32).view(2, 3)
    if (box[1] <= box[0]).any():
        raise UserError(f"{flag} {given}: empty box (need x0 < x1, y0 < y1, z0 < z1)")
    return box


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


def output_file(given: str | None, default: Path, overwrite: bool, protected: tuple[Path, ...] = (),
                suffixes: tuple[str, ...] = ()) -> Path:
    """Where a command writes (and its sidecars, the same path with `suffixes`), checked before the work: not a
    folder, not a file of `protected` (a run's records, the input scene's files), and an existing file the user
    named replaced only with --overwrite; recon's own default names are replaced. Its folder is made."""
    output = Path(given) if given else default
    for path in (output, *(output.with_suffix(suffix) for suffix in suffixes)):
        if path.is_dir():
            raise UserError(f"{path}: is a folder; --output names a file")
        if path.exists() and any(contains(folder, path) for folder in protected):
            raise UserError(f"{path}: belongs to the run or its input; choose another --output")
        if path.exists() and given and not overwrite:
            raise UserError(f"{path}: exists (pass --overwrite to replace it)")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"{output.parent}: cannot be created ({error.strerror or error})") from None
    return output


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
                              method=args.method, simplify_to=args.simplify)
    if not info["faces"]:  # e.g. an SDF that collapsed to one sign: an empty file would pass for a result
        level = "" if info["level"] is None else f" = {info['level']:g}"
        raise UserError(f"{run.path}: no surface inside the export box (level: {info['level_meaning']}{level}); "
                        "nothing written")
    store_crop(run, args.crop)
    mesh.save(output)
    run.write_json(output.with_suffix(".json"), {"mesh": output.name, "crop_world_box": None if crop is None else crop.tolist(), **info})
    print(f"wrote {output}: {info['vertices']:,} vertices, {info['faces']:,} faces in {info['seconds']} s")


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
    print(f"wrote {output}: {'x'.join(map(str, volume['sdf'].shape))} signed distances, voxel {volume['voxel_size']:.4g} "
          f"(world units), in {volume['seconds']} s")


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
    cameras = path_cameras(cfg, args.path, args.frames, args.downscale)
    output = export_output(run, cfg, args, f"video-{args.path}.mp4")
    frames = output.parent / f"{output.stem}-frames"
    if args.output and not args.overwrite and frames.is_dir() and any(frames.iterdir()):
        raise UserError(f"{frames}: the video's frames would go here, and it holds files (pass --overwrite)")
    render_cameras(pipeline, cameras, frames, cfg.eval_chunk, video=output, fps=args.fps, with_depth=True)
    print(f"wrote {output} ({len(cameras)} frames, colour and depth side by side; PNGs in {frames})")


def cmd_convert(args: argparse.Namespace) -> None:
    from recon.data.convert import write_transforms
    from recon.data.scene import read_capture

    source = Path(args.scene).expanduser().absolute()
    capture = read_capture(source, downscale=1)
    files = write_transforms(capture, Path(args.out))
    views = sum(len(found.frames) for found in capture.lists.values())
    print(f"{source}: {capture.convention}")
    turned = " turned so the cameras' mean up is +z" if capture.points is not None else ""
    print(f"wrote {views} views to {', '.join(str(f) for f in files)} (world frame of the input{turned})")


def cmd_process(args: argparse.Namespace) -> None:
    from recon.data.sfm import process_images, process_video

    source, scene = Path(args.source).expanduser().absolute(), Path(args.scene).expanduser().absolute()
    matcher = args.matcher or ("sequential" if args.kind == "video" else "exhaustive")
    options = SfmOptions(matcher=matcher, camera_model=args.camera_model, max_image_side=args.max_image_side)
    print(f"{source}: structure from motion with pycolmap on the CPU ({matcher} matching, {args.camera_model} camera)")
    if args.kind == "video":
        report = process_video(source, scene, args.frames, options)
    else:
        report = process_images(source, scene, options)
    seconds = sum(report[key] for key in ("prepare_s", "features_s", "matching_s", "mapping_s"))
    print(f"registered {report['registered']} of {report['images']} images ({report['registered_fraction']:.0%}), "
          f"{report['points']:,} sparse points, mean reprojection error {report['reprojection_error_px']:.2f} px, "
          f"{seconds:.0f} s")
    if len(report["models"]) > 1 and report["unregistered"]:
        print(f"note: the views fell into {len(report['models'])} unconnected models {report['models']}; kept the largest")
    if "warning" in report:
        print(f"warning: {report['warning']}")
    print(f"wrote {scene} (transforms.json, images/, colmap/sparse/0; report process.json, picture process.png); "
          f"next: recon fit {scene}")


def cmd_eval_mesh(args: argparse.Namespace) -> None:
    from recon.app.metrics import mesh_distances

    pred, truth = Path(args.pred), Path(args.gt)
    output = output_file(args.output, pred.with_suffix(".eval.json"), args.overwrite, protected=(pred, truth))
    result = mesh_distances(pred, truth, samples=args.samples, tau_fraction=args.tau)
    print(f"Chamfer {result['chamfer']:.6g}  F-score {result['fscore']:.4f} at tau {result['tau']:.4g} "
          f"({args.tau:g} of the ground truth's diagonal), {args.samples:,} samples per mesh")
    write_json(output, result)


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (its usage block runs to dozens for `fit`), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"recon: error: {self.prog}: {message} (see {self.prog} --help)\n")


def number_option(spec: Number, default: int | float, help: str) -> dict[str, Any]:
    """add_argument's keywords for a number option: its type checks the range, its help shows the default."""
    return {"type": argument_type(spec), "default": default, "help": option_help(help, f"default {default:,}", spec)}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="recon", description="Neural-field 3D reconstruction from posed images.")
    sub = parser.add_subparsers(dest="command", required=True)

    def fit_options(p: argparse.ArgumentParser, defaults: dict[str, Any] | None = None) -> None:
        add_options(p, defaults)
        p.add_argument("--field-option", "-o", action="append", default=[], metavar="KEY=VALUE",
                       help="backend option, e.g. -o levels=8 -o log2_table=17")
        p.add_argument("--out", help="run folder (default runs/<scene>-<field>-<time>)")
        p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
        viewer_options(p)
        p.add_argument("--viewer", dest="viewer", action="store_true", default=None,
                       help="start the web viewer even without a terminal")
        p.add_argument("--no-viewer", dest="viewer", action="store_false", help="do not start the web viewer")
        p.add_argument("--keep-viewer", action="store_true", help="keep the viewer up after training, until Ctrl-C")
        p.add_argument("--viewer-share", **number_option(FRACTION, 0.25, "the most of the wall time the viewer's "
                                                                        "rendering takes while training"))

    def viewer_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--host", default="127.0.0.1", help="viewer address to bind (default 127.0.0.1: this machine only)")
        p.add_argument("--port", **number_option(Number(int, 1, 65535), 8080, "viewer port (taken: the next free one)"))

    def path_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--path", default="test", choices=("test", "val", "train", "orbit"),
                       help="a split's cameras or an orbit around the training cameras (default test)")
        p.add_argument("--frames", **number_option(POSITIVE_INT, 120, "orbit frames"))
        p.add_argument("--fps", **number_option(POSITIVE_INT, 30, "video frames per second"))
        p.add_argument("--downscale", **number_option(POSITIVE_INT, 1, "render images N times smaller than the "
                                                                       "scene's"))

    def output_option(p: argparse.ArgumentParser, default: str) -> None:
        p.add_argument("--output", help=f"file to write (default {default}; an existing file outside the run is "
                                        "replaced only with --overwrite)")
        p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")

    def crop_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("--crop", type=float, nargs=6, metavar=("X0", "Y0", "Z0", "X1", "Y1", "Z1"),
                       help="world-frame box to export; stored with the run for later exports")

    p = sub.add_parser("fit", help="train a field on a posed-image scene, an image or a mesh (none: the built-in demo)")
    p.add_argument("scene", nargs="?", help="scene folder or transforms file; an image file; a mesh file (its SDF)")
    p.add_argument("--resume", metavar="RUN", help="continue a run from its latest checkpoint")
    fit_options(p)
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("demo", help="generate the built-in example scene and fit it")
    fit_options(p, DEMO_FIT)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("eval", help="render a split of a trained run and write metrics.json")
    p.add_argument("run")
    p.add_argument("--split", default="test")
    p.add_argument("--stride", **number_option(POSITIVE_INT, 1, "every k-th view"))
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("view", help="open a trained radiance run in the web viewer")
    p.add_argument("run")
    viewer_options(p)
    p.set_defaults(func=cmd_view)

    p = sub.add_parser("render", help="render test views or an orbit to PNG and MP4")
    p.add_argument("run")
    path_options(p)
    p.set_defaults(func=cmd_render)

    export = sub.add_parser("export", help="export a trained run").add_subparsers(dest="what", required=True)
    p = export.add_parser("mesh", help="marching cubes over the field, in the input cameras' coordinates")
    p.add_argument("run")
    p.add_argument("--resolution", **number_option(RESOLUTION, 512, "voxels along the box's longest side"))
    p.add_argument("--format", default="ply", help="ply, obj or glb")
    crop_option(p)
    p.add_argument("--level", type=argument_type(FINITE),
                   help="surface level: opacity over one voxel, 1 - exp(-sigma * voxel) (default 0.5); SDF fields: a distance (0)")
    p.add_argument("--method", default="marching", help="marching (the field itself) or tsdf (fused rendered depth; open3d)")
    p.add_argument("--simplify", type=argument_type(Number(int, 4)), metavar="FACES",
                   help="decimate to about this many faces (open3d or fast-simplification)")
    p.add_argument("--no-clean", dest="clean", action="store_false", help="keep small disconnected pieces")
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

    p = sub.add_parser("convert", help="write any scene layout recon reads (COLMAP, NeuS, transforms) as transforms.json")
    p.add_argument("scene")
    p.add_argument("out", help="a new folder")
    p.set_defaults(func=cmd_convert)

    process = sub.add_parser("process", help="camera poses for photos or a video (structure from motion, pycolmap)")
    kinds = process.add_subparsers(dest="kind", required=True)
    for kind, what in (("images", "a folder of photos"), ("video", "a video file")):
        p = kinds.add_parser(kind, help=f"{what} in, a posed scene folder out")
        p.add_argument("source", help=what)
        p.add_argument("scene", help="a new folder for the scene")
        if kind == "video":
            p.add_argument("--frames", **number_option(Number(int, 2), VIDEO_FRAMES,
                                                 "frames to keep, the sharpest of equal stretches"))
        p.add_argument("--matcher", choices=MATCHERS,
                       help="exhaustive: every pair (default for photos); sequential: neighbours in order (video)")
        p.add_argument("--camera-model", default="OPENCV", choices=CAMERA_MODELS, help="COLMAP camera model")
        p.add_argument("--max-image-side", **number_option(Number(int, 64), SfmOptions.max_image_side,
                                                     "features on images downscaled to this side"))
        p.set_defaults(func=cmd_process)

    p = sub.add_parser("eval-mesh", help="Chamfer distance and F-score of a mesh against a ground truth")
    p.add_argument("pred")
    p.add_argument("gt")
    p.add_argument("--samples", **number_option(POSITIVE_INT, 200_000, "surface points sampled from each mesh"))
    p.add_argument("--tau", **number_option(POSITIVE, 0.01, "F-score distance, a fraction of the ground truth's diagonal"))
    output_option(p, "PRED.eval.json")
    p.set_defaults(func=cmd_eval_mesh)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        check_kernels_mode()
        args.func(args)
    except (SceneError, UserError, CheckpointError) as error:
        print(f"recon: error: {error}", file=sys.stderr)
        raise SystemExit(getattr(error, "exit_code", 2))


if __name__ == "__main__":
    main()
