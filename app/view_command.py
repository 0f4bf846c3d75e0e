"""`recon view`: a trained radiance run in the web viewer; and what `recon fit`'s viewer shares with it."""

from __future__ import annotations

import argparse
import json
import time

from recon.app.cli_shared import load_run, number_option, require_task
from recon.app.config import FitConfig
from recon.app.run import RunDir
from recon.data.checks import Number
from recon.data.scene import load_scene

VIEWER_ROWS = {"cpu": 192, "gpu": 800}  # the viewer's resting frame height by machine preset
# The viewer's rendering's share of the wall time while training (--viewer-share). Its lock hand-offs and image
# encoding cost training about as much again: at 0.15 lego trains at 73% of its rays/s with a client dragging
# its camera (BENCHMARKS.md), what 0.25 cost while waits behind a step still counted as rendering.
VIEWER_SHARE = 0.15


def viewer_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1",
                   help="viewer address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", **number_option(Number(int, 1, 65535), 8080, "viewer port (taken: the next free one)"))


def wait_for_ctrl_c() -> None:
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass


def run_summary(run: RunDir, cfg: FitConfig) -> str:
    """A finished run in a line of markdown: its field, training and test scores (from metrics.json)."""
    head = f"**{run.path.name}** · {cfg.field}"
    try:
        metrics = json.loads(run.metrics.read_text())
        train, mean = metrics["train"], metrics["mean"]
        return (f"{head} · {train['steps']} steps in {train['seconds']:.0f} s · test PSNR {mean['psnr']:.2f} dB · "
                f"SSIM {mean['ssim']:.4f}")
    except FileNotFoundError:
        return f"{head} · not evaluated (`recon eval {run.path}`)"
    except (OSError, ValueError, KeyError, TypeError):
        return f"{head} · metrics.json unreadable"


def cmd_view(args: argparse.Namespace) -> None:
    from recon.app.viewer import start_viewer

    run, cfg, pipeline, _ = load_run(args.run)
    require_task(cfg, "recon view", "radiance")
    scene = load_scene(cfg.scene, downscale=cfg.downscale)
    with pipeline.baked_proposals():  # nothing trains here, and every frame queries them
        viewer = start_viewer(pipeline, scene, run, args.host, args.port, share=1.0, chunk=cfg.eval_chunk,
                              resolution=VIEWER_ROWS[cfg.preset], summary=run_summary(run, cfg))
        print(f"viewer: {viewer.url} (Ctrl-C to quit)")
        try:
            wait_for_ctrl_c()
        finally:
            viewer.close()


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("view", help="open a trained radiance run in the web viewer")
    p.add_argument("run")
    viewer_options(p)
    p.set_defaults(func=cmd_view)
