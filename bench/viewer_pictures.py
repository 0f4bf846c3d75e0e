"""The README's viewer pictures: `recon view RUN` in headless Chromium (playwright, software WebGL).

    python bench/viewer_pictures.py RUN --out docs

viewer.jpg: a new tab's home view with the panel. viewer-split.jpg: the training cameras hidden, colour left
of the divider and the normals right, a camera path of four orbit keyframes drawn.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from types import SimpleNamespace

import imageio.v2 as imageio
from playwright.sync_api import sync_playwright

from recon.app.cli_shared import load_run, load_split
from recon.app.view_command import run_summary
from recon.app.viewer import start_viewer
from recon.app.viser_cameras import cameras_to_viser
from recon.data.camera_paths import orbit_cameras


def settle(viewer, page, frames: int = 2) -> None:
    """Until `frames` more frames went out, then a moment for the browser to draw them."""
    target, deadline = viewer.frames_sent + frames, time.time() + 90
    while viewer.frames_sent < target and time.time() < deadline:
        page.wait_for_timeout(250)
    page.wait_for_timeout(2500)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--out", default="docs")
    args = parser.parse_args()
    run, cfg, pipeline, _ = load_run(args.run)
    scene = load_split(cfg, "train")
    viewer = start_viewer(pipeline, scene, run, "127.0.0.1", 18500, share=1.0, chunk=8192, resolution=384,
                          summary=run_summary(run, cfg))
    out = Path(args.out)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium",
                                        args=["--no-sandbox", "--use-gl=swiftshader"])
            page = browser.new_page(viewport={"width": 1100, "height": 680})
            page.goto(viewer.url)
            settle(viewer, page)
            page.get_by_text("Software WebGL rendering detected").evaluate(  # the notice a GPU-less browser gets
                "e => (e.closest('[role=alert]') || e.parentElement.parentElement).remove()")
            page.get_by_text("Scene", exact=True).click()
            page.wait_for_timeout(800)
            page.screenshot(path=str(out / "viewer.png"))
            viewer._show(viewer.frustums, False)
            orbit = orbit_cameras(scene.splits["train"].cameras, 4)
            for i in range(4):
                wxyz, position, fov, aspect = cameras_to_viser(orbit, i)
                viewer.paths.add_keyframe(SimpleNamespace(wxyz=wxyz, position=position, fov=fov, aspect=aspect))
            page.get_by_text("Scene", exact=True).click()
            page.get_by_text("Split view", exact=True).click()
            page.get_by_text("Camera path", exact=True).click()
            controls = viewer.controls
            controls["Split"].value, controls["Right side"].value, controls["Divider"].value = True, "normals", 0.52
            settle(viewer, page)
            page.screenshot(path=str(out / "viewer-split.png"))
            browser.close()
    finally:
        viewer.close()
    for name in ("viewer", "viewer-split"):
        png = out / f"{name}.png"
        imageio.imwrite(out / f"{name}.jpg", imageio.imread(png)[..., :3], quality=88)
        png.unlink()
        print(f"wrote {out / name}.jpg")


if __name__ == "__main__":
    main()
