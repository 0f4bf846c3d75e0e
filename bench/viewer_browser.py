"""The viewer as a user meets it while lego trains: real Chromium tabs (playwright, software WebGL) drag the
camera with the mouse, and the server logs when each frame leaves for each tab.

    python bench/viewer_browser.py ../shared/data/lego --steps 1200 --out bench/results/viewer-browser.json

Three trainings of --steps each: no viewer; the viewer with one tab dragging every --every seconds (the
latency after each drag: the first frame, then the first full-resolution frame; and training's rays/s against
no viewer); the viewer with three tabs dragging in turn (each tab's first frame after its own drag). A frame's
time is when the server hands it to the websocket (localhost: the browser shows it a few ms later). Each run
also reports the CPU cores this process and Chromium used, and the viewer's own rendering as a share of the
wall time: on one machine the browser's software WebGL competes with training for the same cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from datetime import date
from pathlib import Path

import viser._scene_api
from playwright.sync_api import sync_playwright

from recon.app.config import FitConfig
from recon.app.trainer import Trainer
from recon.app.view_command import VIEWER_SHARE
from recon.app.viewer import Viewer
from recon.data.scene import load_scene

SENT: list[tuple[float, int, int]] = []  # (time, id of the tab's scene API, rows) of every frame sent


def cpu_seconds(is_ours: bool) -> float:
    """User + system CPU seconds of this process, or of every Chromium process."""
    if is_ours:
        times = os.times()
        return times.user + times.system
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            command = (stat.parent / "cmdline").read_bytes()
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if b"chromium" in command:
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat)
    return total / os.sysconf("SC_CLK_TCK")


def log_frames() -> None:
    original = viser._scene_api.SceneApi.set_background_image

    def logged(self, image, *args, **kwargs):
        if image is not None:
            SENT.append((time.perf_counter(), id(self), int(image.shape[0])))
        return original(self, image, *args, **kwargs)

    viser._scene_api.SceneApi.set_background_image = logged


def drag(page) -> float:
    """A mouse drag across the middle of the view (orbiting the camera): 12 moves over about 0.3 s. Returns
    when the mouse stopped."""
    page.mouse.move(200, 300)  # left of the panel
    page.mouse.down()
    for step in range(1, 13):
        page.mouse.move(200 + 8 * step, 300 + 2 * step)
        page.wait_for_timeout(25)
    stopped = time.perf_counter()
    page.mouse.up()
    return stopped


def after(scene_id: int, since: float, full_rows: int | None = None, wait: float = 10.0) -> float | None:
    """Seconds from `since` to the first frame sent to that tab after it (of full_rows, if given)."""
    deadline = time.perf_counter() + wait
    while time.perf_counter() < deadline:
        for sent, target, rows in list(SENT):
            if target == scene_id and sent > since and (full_rows is None or rows >= full_rows):
                return sent - since
        time.sleep(0.02)
    return None


def drive(viewer: Viewer, tabs: int, every: float, done: threading.Event, rows: int, out: dict) -> None:
    """Open `tabs` Chromium tabs and drag in each in turn, every `every` seconds, until `done`."""
    latencies = {"first_frame": [], "full_frame": [], "per_tab_first_frame": []}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--use-gl=swiftshader"])
        pages, scene_ids = [], []
        for _ in range(tabs):
            known = set(viewer.views)
            page = browser.new_page(viewport={"width": 800, "height": 600})
            page.goto(viewer.url)
            while set(viewer.views) == known:
                page.wait_for_timeout(50)
            client_id = (set(viewer.views) - known).pop()
            pages.append(page)
            scene_ids.append(id(viewer.views[client_id].client.scene))
        for page, scene_id in zip(pages, scene_ids):  # everything loaded and shown once
            after(scene_id, 0.0, wait=60)
        while not done.is_set():
            stops = [drag(page) for page in pages]
            for scene_id, stopped in zip(scene_ids, stops):
                if tabs == 1:
                    latencies["first_frame"].append(after(scene_id, stopped))
                    latencies["full_frame"].append(after(scene_id, stopped, rows))
                else:
                    latencies["per_tab_first_frame"].append(after(scene_id, stopped))
            done.wait(every)
        browser.close()
    out.update({key: value for key, value in latencies.items() if value})


def summary(values: list[float | None]) -> dict:
    got = [v for v in values if v is not None]
    return {"drags": len(values), "missed": len(values) - len(got), "median_s": round(statistics.median(got), 3),
            "max_s": round(max(got), 3)} if got else {"drags": len(values), "missed": len(values)}


def train(scene, args, tabs: int) -> dict:
    trainer = Trainer(FitConfig(scene=args.scene, out="", steps=args.steps, seed=0), scene)
    viewer = thread = None
    done, latencies = threading.Event(), {}
    if tabs:
        viewer = Viewer(trainer.pipeline, scene.splits["train"].cameras, port=18600, chunk=trainer.cfg.eval_chunk,
                        resolution=args.rows, share=args.share)
        thread = threading.Thread(target=drive, args=(viewer, tabs, args.every, done, args.rows, latencies))
        thread.start()
        while not SENT:  # training starts once the browser shows the first frame
            time.sleep(0.1)
    ours, browser, started = cpu_seconds(True), cpu_seconds(False), time.perf_counter()
    trainer.run([viewer] if viewer else [], gate=viewer)
    wall = time.perf_counter() - started
    result = {"tabs": tabs, "steps": trainer.step, "seconds": round(trainer.progress.seconds, 2),
              "rays_per_second": round(trainer.items_seen / trainer.progress.seconds),
              "recon_cores": round((cpu_seconds(True) - ours) / wall, 2),
              "chromium_cores": round((cpu_seconds(False) - browser) / wall, 2)}
    if viewer:
        result["viewer_render_share"] = round(viewer.render_seconds / wall, 3)
        done.set()
        thread.join()
        result["frames"] = viewer.frames_sent
        result.update({key: summary(values) for key, values in latencies.items()})
        viewer.close()
    SENT.clear()
    print(result, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scene")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--rows", type=int, default=192, help="the viewer's resting frame height")
    parser.add_argument("--share", type=float, default=VIEWER_SHARE)
    parser.add_argument("--every", type=float, default=4.0, help="seconds between drags")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    log_frames()
    scene = load_scene(args.scene)
    train(scene, args, 0)  # warm-up: the first training in a process is slower
    runs = [train(scene, args, tabs) for tabs in (0, 1, 3)]
    report = {"scene": args.scene, "steps": args.steps, "share": args.share, "rows": args.rows, "every": args.every,
              "date": date.today().isoformat(), "python": sys.version.split()[0], "runs": runs,
              "training_with_one_tab": round(runs[1]["rays_per_second"] / runs[0]["rays_per_second"], 3)}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
