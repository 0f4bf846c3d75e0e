"""What watching costs: training rays/s with no viewer, with a viewer and no client, and with one browser
client moving its camera (over the websocket, as tests/test_viewer.py drives it); then the frames per
second the viewer renders at 800x800 from the trained model.

    python bench/viewer.py ../shared/data/lego --steps 300 --out bench/results/viewer-lego-cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import msgspec
import viser
from websockets.sync.client import connect

from recon.app.config import FitConfig
from recon.app.frames import RenderSettings, render_frame
from recon.app.trainer import Trainer
from recon.app.view_command import VIEWER_SHARE
from recon.app.viewer import Viewer
from recon.app.viser_cameras import cameras_to_viser, viser_camera_to_cameras
from recon.data.scene import load_scene


def watch(port: int, cameras, stop: threading.Event) -> None:
    """A browser tab orbiting through the training cameras' poses, 10 camera messages a second."""
    socket = connect(f"ws://127.0.0.1:{port}", subprotocols=[f"viser-v{viser.__version__}"], max_size=2**26)
    i = 0
    while not stop.is_set():
        wxyz, position, fov, _ = cameras_to_viser(cameras, i % len(cameras))
        socket.send(msgspec.msgpack.encode({
            "type": "ViewerCameraMessage", "wxyz": list(map(float, wxyz)), "position": list(map(float, position)),
            "fov": float(fov), "near": 0.01, "far": 100.0, "image_height": 800, "image_width": 800,
            "look_at": [0.0, 0.0, 0.0], "up_direction": [0.0, 0.0, 1.0]}))
        try:
            while True:
                socket.recv(timeout=0.1)
        except TimeoutError:
            pass
        i += 1
    socket.close()


def train(scene, args, mode: str) -> dict:
    cfg = FitConfig(scene=args.scene, out="", steps=args.steps, seed=0)
    trainer = Trainer(cfg, scene)
    viewer = stop = client = None
    if mode != "none":
        viewer = Viewer(trainer.pipeline, scene.splits["train"].cameras, port=18400, chunk=trainer.cfg.eval_chunk,
                        resolution=args.rows, share=args.share)
    if mode == "client":
        stop = threading.Event()
        client = threading.Thread(target=watch, args=(viewer.port, scene.splits["train"].cameras, stop), daemon=True)
        client.start()
    trainer.run([viewer] if viewer else [], gate=viewer)
    result = {"mode": mode, "steps": trainer.step, "seconds": round(trainer.progress.seconds, 2),
              "rays_per_second": round(trainer.items_seen / trainer.progress.seconds)}
    if viewer:
        result["frames"] = viewer.frames_sent
        if stop:
            stop.set()
            client.join()
        viewer.close()
    print(result, flush=True)
    return result, trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scene")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rows", type=int, default=192, help="the viewer's resting frame height while training")
    parser.add_argument("--share", type=float, default=VIEWER_SHARE)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    scene = load_scene(args.scene)
    rows, trainer = [], None
    for mode in ("none", "viewer", "client"):
        result, trainer = train(scene, args, mode)
        rows.append(result)
    cameras = scene.splits["test"].cameras
    wxyz, position, fov, _ = cameras_to_viser(cameras, 0)
    camera = viser_camera_to_cameras(wxyz, position, fov, 1.0, 800)
    render_frame(trainer.pipeline, camera, RenderSettings(), trainer.cfg.eval_chunk)  # warm-up
    started, frames = time.perf_counter(), 3
    for _ in range(frames):
        render_frame(trainer.pipeline, camera, RenderSettings(), trainer.cfg.eval_chunk)
    fps = frames / (time.perf_counter() - started)
    report = {"scene": args.scene, "steps": args.steps, "share": args.share, "training": rows,
              "frames_per_second_800": round(fps, 3), "python": sys.version.split()[0]}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(report)


if __name__ == "__main__":
    main()
