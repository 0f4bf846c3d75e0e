"""`recon fit` and `recon demo`: a new run (or a resumed one) trained, its viewer, Ctrl-C and SIGTERM
checkpointing on the way out, and the evaluation at the end.

`recon fit` takes a posed-image scene (a radiance field), an image file (the image task) or a mesh file (its
signed distance); every later command reads the run folder and knows which it was.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from recon.app.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from recon.app.cli_shared import number_option, open_run, world_box
from recon.app.config import FitConfig, add_options, argument_type, command_line_fields, flag_of
from recon.app.distill import METHOD, check_teacher, student_lr
from recon.app.distributed import World, barrier, first_error, from_main, leave, world
from recon.app.eval_command import evaluate_run
from recon.app.pipeline import Pipeline
from recon.app.run import RunDir, UserError
from recon.app.tasks import RadianceTask, Task
from recon.app.trainer import Stopped, Trainer, TrainingDiverged, resolve_device
from recon.app.view_command import VIEWER_ROWS, VIEWER_SHARE, viewer_options, wait_for_ctrl_c
from recon.data.cameras import pose_errors
from recon.data.checks import FRACTION, POSITIVE_INT, Number, contains
from recon.data.scene import Scene
from recon.data.targets import ImageTarget, MeshTarget, load_input
from recon.fields import Field

# The built-in example: small enough to fit in a few minutes on a 2-core CPU.
DEMO_SCENE = {"resolution": 128, "n_train": 60, "n_test": 12}
DEMO_FIT = {"steps": 1000, "field_options": {"max_resolution": 512}}  # the machine preset does the rest
# What `fit --resume` takes: the run's length and the viewer's options; anything else would change the run.
SCENE_LIST_SUFFIX = ".txt"  # `recon fit scenes.txt`: one scene a line, one of them a run (array_index)
RANK_SAID_WHY = (2, 3, 4, 130, 143)  # exit codes of a rank that printed its own one-line reason
RESUME_OPTIONS = ("steps", "max_time", "viewer", "keep_viewer", "host", "port", "viewer_share", "nproc", "argv")


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
    except CheckpointError:
        raise  # a distillation's teacher checkpoint: its own one-line error, not a backend option's
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


def sampler_summary(trainer: Trainer) -> str:
    """How the rays of a radiance fit are sampled, as config.json records it ("" for other tasks)."""
    cfg = trainer.cfg
    if not isinstance(trainer.task, RadianceTask):
        return ""
    near_scale = trainer.task.near_scale
    scaling = "" if near_scale is None else f", gradients scaled within {near_scale:.3g} of the cameras"
    if cfg.sampler == "occupancy":
        return "   sampler: occupancy grid" + scaling
    counts = " + ".join(str(n) for n in cfg.proposal_samples)
    return f"   sampler: proposal ({counts} proposal, {cfg.field_samples} field samples per ray)" + scaling


def parameter_counts(field: Field) -> str:
    """The field's parameters now and, for a backend that grows while training (DVGO, TensoRF), at the end
    (metrics.json's count)."""
    now = field.num_parameters()
    if not field.grows:
        return f"{now:,} parameters"
    grown = copy.deepcopy(field)
    grown.grow(1.0)
    return f"{now:,} parameters now, {grown.num_parameters():,} once grown"


def fit(cfg: FitConfig, run: RunDir, target: Target, resume: bool, overwrite: bool = False,
        args: argparse.Namespace | None = None) -> dict[str, Any]:
    """Train (or continue) the run in `run`, then evaluate it; returns metrics.json's content. A fresh run's
    folder is made once the field is built, so bad options leave nothing behind. `args` carry the viewer's
    options (radiance runs)."""
    print(target.describe())
    trainer = build_trainer(cfg, target)
    cfg = trainer.cfg  # every option resolved, the preset's included
    ranks = trainer.world
    if not resume and ranks.main:  # only rank 0 writes the run folder
        run.create(overwrite, Path(cfg.scene))
        cfg.scene_from_run = os.path.relpath(cfg.scene, run.path.absolute())
        cfg.save(run.config)
        run.write_json(run.scene, target.to_json())
    checkpoint = latest_checkpoint(run.checkpoints) if resume else None
    if checkpoint:
        trainer.load_state_dict(load_checkpoint(checkpoint))
        print(f"resuming {run.path} from step {trainer.step}")
    print(f"run folder: {run.path}   field: {cfg.field} ({parameter_counts(trainer.pipeline.field)})   "
          f"device: {trainer.device} (preset {cfg.preset})" + sampler_summary(trainer) + ranks_summary(trainer))

    def checkpoint_now(t: Trainer) -> Path | None:
        return save_checkpoint(run.checkpoints, t.step, t.state_dict()) if ranks.main else None

    viewer = None
    if args is not None and ranks.main:  # rank 0 serves the viewer, rendering with its replica
        skipped = viewer_skipped(args, trainer.task)
        if skipped:
            print(f"viewer: not started ({skipped})")
        else:
            viewer = launch_viewer(trainer.pipeline, target, run, cfg, args)
    bar = ProgressBar(trainer) if ranks.main else None
    observers = [bar, LogWriter(run)] + ([viewer] if viewer else []) if ranks.main else []
    previous = {signum: signal.signal(signum, stop_handler(trainer, ranks))
                for signum in ((signal.SIGTERM, signal.SIGINT) if ranks.distributed else (signal.SIGTERM,))}
    try:
        trainer.run(observers, on_checkpoint=checkpoint_now, gate=viewer)
        if bar:
            bar.close()
        checkpoint_now(trainer)
        if getattr(trainer.task, "poses", None) is not None and ranks.main:
            write_refined_poses(run, trainer.task)
        metrics = evaluate_run(run, trainer.task, cfg, trainer.train_summary(), stride=cfg.eval_stride)
        if viewer and args.keep_viewer:
            viewer.training_done()
            print(f"viewer still at {viewer.url} (Ctrl-C to quit)")
            wait_for_ctrl_c()
        return metrics
    except (KeyboardInterrupt, Terminated, Stopped) as stop:
        if bar:
            bar.close()
        for signum in (signal.SIGINT, signal.SIGTERM):  # a second signal must not cut the checkpoint short
            signal.signal(signum, signal.SIG_IGN)
        path = checkpoint_now(trainer)
        leave()  # together: no rank leaves (which ends the others under torchrun) before the checkpoint is written
        terminated = isinstance(stop, Terminated) or getattr(stop, "signum", None) == signal.SIGTERM
        what = "terminated" if terminated else "interrupted"
        print(f"\n{what} at step {trainer.step}: saved {path}; continue with: recon fit --resume {run.path}")
        raise SystemExit(143 if terminated else 130)
    except TrainingDiverged as error:
        if bar:
            bar.close()
        last = latest_checkpoint(run.checkpoints)
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written before it"
        raise UserError(f"{run.path}: training diverged: {error}; {kept}", exit_code=3) from None
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if viewer:
            viewer.close()


def write_refined_poses(run: RunDir, task: RadianceTask) -> None:
    """RUN/refined_poses.json: the training cameras as pose refinement left them, in the input's world frame
    (OpenGL camera-to-world, as transforms.json), with how far each moved."""
    cameras = task.train.cameras
    to_world = torch.linalg.inv(task.scene.to_unit.double()).to(cameras.c2w.device)
    scale = to_world[0, :3].norm()
    frames = []
    refined_poses = task.poses.corrected(cameras.c2w).double()
    turned, moved = pose_errors(refined_poses, cameras.c2w, rigid=False)
    for name, refined, turn, move in zip(task.train.names, refined_poses, turned.tolist(), moved.tolist()):
        rotation = to_world[:3, :3] / scale @ refined[:, :3]
        centre = to_world[:3, :3] @ refined[:, 3] + to_world[:3, 3]
        frames.append({"file_path": name, "transform_matrix": torch.cat([torch.cat([rotation, centre[:, None]], 1),
                       torch.tensor([[0, 0, 0, 1.0]], dtype=torch.float64, device=centre.device)]).tolist(),
                       "rotated_degrees": turn, "moved": move * float(scale)})
    run.write_json(run.path / "refined_poses.json", {"frames": frames})
    print(f"refined poses: {run.path / 'refined_poses.json'}")


class Terminated(Exception):
    """SIGTERM, turned into an exception so the run checkpoints on its way out (as Ctrl-C does)."""


def stop_handler(trainer: Trainer, ranks: World):
    """SIGTERM (and, distributed, Ctrl-C): one process stops where it is; the ranks of a distributed run note it,
    agree on it with the step (Trainer._agree) and stop together after it."""
    def handle(signum, frame) -> None:
        if not ranks.distributed:
            raise Terminated()
        trainer.stop_signal = trainer.stop_signal or signum
    return handle


def ranks_summary(trainer: Trainer) -> str:
    """How many ray batches a step holds and where ("" for one batch in one process)."""
    batches, ranks = trainer.batches_per_step, trainer.world.size
    if batches == 1 and ranks == 1:
        return ""
    where = f"on {ranks} ranks" if ranks > 1 else "in one process"
    return f"   {batches} ray batches a step {where}, their gradients averaged"


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


def cmd_fit(args: argparse.Namespace) -> None:
    if args.resume:
        return resume_fit(args)
    if args.scene is None:
        return cmd_demo(args)
    scene, out = Path(args.scene).expanduser(), args.out
    if scene.suffix.lower() == SCENE_LIST_SUFFIX:
        scene = scene_from_list(scene, array_index(args))
        out = out and Path(out) / scene.name  # a list's --out holds one run a scene
    elif args.scene_index is not None:
        raise UserError(f"--scene-index: picks a scene of a list ({SCENE_LIST_SUFFIX} file); {args.scene} is one scene")
    cfg = FitConfig(scene=str(scene.absolute()), out="")
    apply_fit_args(cfg, args)
    start_fit(cfg, args, out or default_run_name(scene, cfg.field))


def array_index(args: argparse.Namespace) -> int | None:
    """--scene-index, else a scheduler array's task id (Slurm's SLURM_ARRAY_TASK_ID), else None."""
    if args.scene_index is not None:
        return args.scene_index
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    if task is None:
        return None
    if not task.isdigit():
        raise UserError(f"SLURM_ARRAY_TASK_ID={task!r}: not a task index")
    return int(task)


def scene_from_list(path: Path, index: int | None) -> Path:
    """Scene `index` (from 0) of a list: a text file of scene paths, one a line (relative ones from the file's
    folder; blank lines and # comments skipped). One task of a scheduler array fits one scene."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: cannot be read as a list of scenes ({getattr(error, 'strerror', None) or error})")
    scenes = [path.parent / line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not scenes:
        raise UserError(f"{path}: lists no scene")
    if index is None:
        raise UserError(f"{path}: a list of {len(scenes)} scenes: pick one with --scene-index I (0 to "
                        f"{len(scenes) - 1}) or run it as a Slurm array (SLURM_ARRAY_TASK_ID)")
    if index >= len(scenes):
        raise UserError(f"{path}: lists {len(scenes)} scenes (0 to {len(scenes) - 1}); there is no scene {index}")
    return scenes[index]


def start_fit(cfg: FitConfig, args: argparse.Namespace, out: str | Path) -> dict[str, Any]:
    """A new run: its folder and its input are checked before any work, and the folder is made only once
    the field is built, so a bad option leaves nothing behind. Returns metrics.json's content. With --nproc
    the run starts on that many ranks (`launch_ranks`)."""
    run = RunDir(from_main(str(out)))  # a default name holds the time: rank 0's names the run
    cfg.out = str(run.path)
    refusal = None
    if world().main:  # the others would see the folder rank 0 makes
        try:
            run.check_new(args.overwrite, Path(cfg.scene))
        except UserError as error:
            refusal = str(error)
    refusal = first_error(refusal)
    if refusal:
        raise UserError(refusal)
    launch_ranks(args, run.path)
    return fit(cfg, run, load_fit_input(cfg), resume=False, overwrite=args.overwrite, args=args)


def launch_ranks(args: argparse.Namespace, out: Path) -> None:
    """`--nproc N` (N > 1) outside a distributed run: torchrun's launcher runs this same command on N ranks of
    this machine and this process ends with their exit code (a rank's failure said in one line); otherwise
    nothing."""
    if not getattr(args, "nproc", None) or args.nproc == 1 or world().distributed:
        return
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    logging.getLogger("torch.distributed").setLevel(logging.CRITICAL)  # the ranks print their own errors
    # torchrun's one thread per rank fits GPUs; on a CPU the ranks share the cores.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))
    command = without_option(args.argv, "--nproc")
    if not getattr(args, "resume", None):
        command += ["--out", str(out)]  # a default name holds the time: named here, once
    try:
        run(get_args_parser().parse_args(["--standalone", f"--nproc-per-node={args.nproc}", "-m", "recon",
                                          *command]))
    except SignalException as stop:  # SIGTERM or Ctrl-C: the ranks have checkpointed and said so
        raise SystemExit(128 + stop.sigval) from None
    except ChildFailedError as error:
        rank, failure = error.get_first_failure()
        code = failure.exitcode
        if code not in RANK_SAID_WHY:
            how = f"signal {failure.signal_name()}" if code < 0 else f"exit code {code}"
            last = latest_checkpoint(RunDir(out).checkpoints)
            print(f"recon: error: rank {rank} of {args.nproc} ended ({how}) and the others were stopped; "
                  + (f"the last checkpoint is {last}" if last else "no checkpoint was written"), file=sys.stderr)
            code = 4
        raise SystemExit(code) from None
    raise SystemExit(0)


def without_option(argv: list[str], flag: str) -> list[str]:
    """`argv` less `flag` and its value (`flag V` or `flag=V`)."""
    kept, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token == flag:
            skip = True
        elif not token.startswith(flag + "="):
            kept.append(token)
    return kept


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
    launch_ranks(args, run.path)
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
    if not (scene_dir / "transforms_train.json").exists() and world().main:
        print(f"generating the example scene in {scene_dir}")
        make_scene(scene_dir, **DEMO_SCENE)
    barrier()  # the other ranks read it once it is whole
    cfg = FitConfig(scene=str(scene_dir.absolute()), out="", **copy.deepcopy(DEMO_FIT))
    apply_fit_args(cfg, args)
    start_fit(cfg, args, args.out or default_run_name(Path("demo"), cfg.field))


def fit_options(p: argparse.ArgumentParser, defaults: dict[str, Any] | None = None) -> None:
    """`fit`'s and `demo`'s options: FitConfig's, the run folder's and the viewer's."""
    add_options(p, defaults)
    run_options(p)


def run_options(p: argparse.ArgumentParser) -> None:
    """The backend's options, the new run folder's and the viewer's (`fit`, `demo`, `distill`)."""
    p.add_argument("--field-option", "-o", action="append", default=[], metavar="KEY=VALUE",
                   help="backend option, e.g. -o levels=8 -o log2_table=17")
    p.add_argument("--out", help="run folder (default runs/<scene>-<field>-<time>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    p.add_argument("--nproc", type=argument_type(POSITIVE_INT), metavar="N",
                   help="train on N processes of this machine, one GPU each where there are GPUs (torchrun's "
                        "launcher; see the README's \"More than one GPU\" for several machines)")
    viewer_options(p)
    p.add_argument("--viewer", dest="viewer", action="store_true", default=None,
                   help="start the web viewer even without a terminal")
    p.add_argument("--no-viewer", dest="viewer", action="store_false", help="do not start the web viewer")
    p.add_argument("--keep-viewer", action="store_true", help="keep the viewer up after training, until Ctrl-C")
    p.add_argument("--viewer-share", **number_option(FRACTION, VIEWER_SHARE, "the most of the wall time the "
                                                     "viewer's rendering takes while training"))


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fit", help="train a field on a posed-image scene, an image or a mesh (none: the built-in demo)")
    p.add_argument("scene", nargs="?", help="scene folder or transforms file; an image file; a mesh file (its SDF); "
                                          f"a list of scenes ({SCENE_LIST_SUFFIX}, see --scene-index)")
    p.add_argument("--resume", metavar="RUN", help="continue a run from its latest checkpoint")
    p.add_argument("--scene-index", type=argument_type(Number(int, 0)), metavar="I",
                   help=f"with a list of scenes (a {SCENE_LIST_SUFFIX} file, one a line): fit scene I (from 0; default "
                        "SLURM_ARRAY_TASK_ID, one scene a task of an array); --out is then the runs' parent folder")
    fit_options(p)
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("demo", help="generate the built-in example scene and fit it")
    fit_options(p, DEMO_FIT)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("distill", help="teach a trained run's field to another backend (progressive volume "
                                       "distillation); writes a new run")
    p.add_argument("run", help="the teacher: a run fitted to posed images (a radiance field or an SDF)")
    fields = {spec.name: spec for spec in command_line_fields()}
    p.add_argument("--finetune-steps", type=argument_type(POSITIVE_INT), metavar="N",
                   help="then train N steps more on the photos (metrics.json keeps the distilled scores too)")
    defaults = {"steps": " (default 20000)", "lr": " (default: twice the teacher's; an SDF's: the teacher's)"}
    for name in ("field", "params", "steps", "max_time", "lr", "seed"):
        keywords = dict(fields[name].metadata["argparse"])
        keywords.pop("flag", None)
        p.add_argument(flag_of(fields[name]), dest=name, required=name == "field",
                       type=keywords.pop("type", argument_type(fields[name].metadata["check"])),
                       help=fields[name].metadata["help"] + defaults.get(name, ""),
                       **keywords)
    run_options(p)
    p.set_defaults(func=cmd_distill)


def cmd_distill(args: argparse.Namespace) -> None:
    """A new run whose field (--field) learns the teacher run's (app.distill); config.json records both."""
    teacher_run, teacher_cfg = open_run(args.run)
    check_teacher(teacher_cfg, args.run)  # before anything is made; the task loads the teacher's weights
    cfg = dataclasses.replace(
        teacher_cfg, field=args.field, field_options=parse_field_options(args.field_option), params=args.params,
        steps=args.steps or FitConfig.steps, max_time=args.max_time, lr=args.lr or student_lr(teacher_cfg),
        seed=args.seed or 0, quantize=0.0, cam=None,
        gradient_scaling=False,  # a photometric loss's remedy; the student learns from the teacher
        scene_from_run=None, out="", distilled_from={"run": str(teacher_run.path.absolute()), "method": METHOD})
    out = Path(args.out or default_run_name(Path(f"{teacher_run.path.name}-to"), cfg.field))
    if contains(out, teacher_run.path):
        raise UserError(f"{out}: holds the teacher run {teacher_run.path}; choose another run folder")
    metrics = start_fit(cfg, args, out)
    if args.finetune_steps:
        finetune(out, args.finetune_steps, metrics, args)


def finetune(out: Path, steps: int, distilled: dict[str, Any], args: argparse.Namespace) -> None:
    """The distilled run goes on `steps` steps on the photos (app.distill); config.json records where, and the
    scores it had before (`distilled`, its metrics.json)."""
    run, cfg = open_run(str(out))
    done = distilled["train"]["steps"]
    cfg.distilled_from["finetune"] = {"from_step": done, "steps": steps, "distilled": distilled["mean"]}
    cfg.steps, cfg.max_time = done + steps, None
    if world().main:
        cfg.save(run.config)
    print(f"fine-tuning on the photos: steps {done} to {done + steps}")
    fit(cfg, run, load_input(cfg.scene, downscale=cfg.downscale), resume=True, args=args)
