"""The web viewer: camera conventions against the training cameras, the frame renderer's modes and crop,
the server driven over its websocket as a browser would, and training with a viewer attached."""

import logging
import time

import msgspec
import numpy as np
import pytest
import torch
import viser
import zstandard
from test_fit import small_config
from websockets.sync.client import connect

from recon.app import viewer as viewer_module
from recon.app.evaluate import evaluate
from recon.app.frames import MODES, RenderSettings, render_frame
from recon.app.trainer import Trainer
from recon.app.viewer import REFRESH_SECONDS, ClientView, Viewer, pick_view
from recon.app.viser_cameras import cameras_to_viser, viser_camera_to_cameras
from recon.data.scene import load_scene

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


@pytest.fixture(scope="module")
def trained(tiny_scene):
    scene = load_scene(tiny_scene)
    trainer = Trainer(small_config(tiny_scene, steps=150), scene)
    trainer.run()
    return trainer.pipeline, scene


def test_a_training_camera_seen_through_viser_is_the_training_camera(tiny_scene):
    cameras = load_scene(tiny_scene).splits["train"].cameras
    for i in (0, 7, 23):
        wxyz, position, fov, aspect = cameras_to_viser(cameras, i)
        back = viser_camera_to_cameras(wxyz, position, fov, aspect, int(cameras.height[i]))
        assert (int(back.width[0]), int(back.height[0])) == (int(cameras.width[i]), int(cameras.height[i]))
        theirs, ours = cameras.image_rays(i), back.image_rays(0)
        assert torch.allclose(theirs.origins, ours.origins, atol=1e-5)
        assert torch.allclose(theirs.dirs, ours.dirs, atol=1e-5)
    # viser's camera looks down its +z (OpenCV): a camera at the origin with the identity rotation sees +z.
    forward = viser_camera_to_cameras(np.array([1.0, 0, 0, 0]), np.zeros(3), 1.0, 1.0, 5).image_rays(0).dirs[12]
    assert torch.allclose(forward, torch.tensor([0.0, 0.0, 1.0]), atol=1e-6)


def test_frames_in_every_mode_and_a_crop_that_leaves_nothing(trained, tiny_scene):
    pipeline, scene = trained
    cameras = scene.splits["test"].cameras
    wxyz, position, fov, aspect = cameras_to_viser(cameras, 0)
    camera = viser_camera_to_cameras(wxyz, position, fov, aspect * 1.5, 32)  # a wider browser window
    for mode in MODES:
        frame = render_frame(pipeline, camera, RenderSettings(mode=mode), chunk=300)
        assert frame.shape == (32, 48, 3) and frame.dtype == np.uint8, mode
    colour = render_frame(pipeline, camera, RenderSettings(), chunk=300)
    assert (colour < 200).any(axis=-1).mean() > 0.05  # the object is there
    far_away = torch.tensor([[5.0, 5.0, 5.0], [6.0, 6.0, 6.0]])
    empty = render_frame(pipeline, camera, RenderSettings(crop=far_away), chunk=300)
    assert (empty == 255).all()  # nothing inside the crop box: white
    chunks = iter([False, False, True])  # the camera moves after two of the frame's six chunks: dropped
    assert render_frame(pipeline, camera, RenderSettings(), chunk=300, stale=lambda: next(chunks)) is None
    same = viser_camera_to_cameras(wxyz, position, fov, aspect, int(cameras.height[0]))
    reference = pipeline.render_view(cameras, 0)["rgb"]
    ours = render_frame(pipeline, same, RenderSettings(), chunk=999)
    assert np.abs(ours.astype(float) - (reference.clamp(0, 1) * 255).numpy()).mean() < 2  # the training render


def unpack(data: bytes) -> bytes:
    """A viser server message's payload: a zstd frame after its length header."""
    start = data.find(ZSTD_MAGIC)
    return zstandard.ZstdDecompressor().decompressobj().decompress(data[start:]) if start >= 0 else data


class Browser:
    """A minimal viser client over its websocket: sends camera moves, counts the frames that come back."""

    def __init__(self, port: int):
        self.socket = connect(f"ws://127.0.0.1:{port}", subprotocols=[f"viser-v{viser.__version__}"],
                              max_size=2**26)

    def send(self, message: dict) -> None:
        self.socket.send(msgspec.msgpack.encode(message))

    def look(self, wxyz, position, fov: float, size: tuple[int, int] = (120, 160)) -> None:
        message = {"type": "ViewerCameraMessage", "wxyz": list(map(float, wxyz)),
                   "position": list(map(float, position)), "fov": float(fov), "near": 0.01, "far": 100.0,
                   "image_height": size[0], "image_width": size[1], "look_at": [0.0, 0.0, 0.0],
                   "up_direction": [0.0, 0.0, 1.0]}
        self.send(message)

    def frames(self, seconds: float) -> int:
        count, deadline = 0, time.time() + seconds
        while time.time() < deadline:
            try:
                data = self.socket.recv(timeout=0.2)
            except TimeoutError:
                continue
            count += isinstance(data, bytes) and b"rgb_data" in unpack(data)
        return count

    def close(self) -> None:
        self.socket.close()


def test_server_renders_for_a_browser_camera_and_survives_a_failing_frame(trained, tiny_scene, caplog, monkeypatch):
    pipeline, scene = trained
    cameras = scene.splits["train"].cameras
    viewer = Viewer(pipeline, cameras, host="127.0.0.1", port=18080, chunk=2048, resolution=32)
    browser = Browser(viewer.port)
    try:
        wxyz, position, fov, _ = cameras_to_viser(cameras, 3)
        browser.look(wxyz, position, fov)
        assert browser.frames(20) >= 1 and viewer.frames_sent >= 1
        second = Browser(viewer.port)  # a second tab has its own camera
        second.look(*cameras_to_viser(cameras, 9)[:3])
        assert second.frames(20) >= 1 and len(viewer.views) == 2
        second.close()

        monkeypatch.setattr(viewer_module, "render_frame", lambda *a, **k: 1 / 0)
        with caplog.at_level(logging.ERROR, logger="recon.viewer"):
            browser.look(wxyz, position * 1.01, fov)
            time.sleep(1.0)
        assert "frame dropped" in caplog.text and viewer.thread.is_alive()
    finally:
        browser.close()
        viewer.close()


def test_tabs_are_served_in_turn_and_a_moved_camera_first():
    """Every view needs a refresh (training moved on): the one shown longest ago goes first, so a second tab
    is not starved by the first; a camera that moves jumps the queue, at preview size, and moving cameras
    take turns."""
    now = 100.0
    first = ClientView("first", camera_time=1.0, rendered=(1.0, 64, 0, now - REFRESH_SECONDS - 0.5))
    second = ClientView("second", camera_time=2.0, rendered=(2.0, 64, 0, now - REFRESH_SECONDS - 1.0))
    assert pick_view([first, second], 64, 1, True, now) == (second, 64)
    second.rendered = (2.0, 64, 1, now)  # served; now the first's turn, though it comes first in the list
    assert pick_view([first, second], 64, 1, True, now) == (first, 64)
    first.rendered = (1.0, 64, 1, now)
    assert pick_view([first, second], 64, 1, True, now) == (None, 0)  # nothing changed since
    second.camera_time = now - 0.01  # moving: a preview, ahead of any refresh
    assert pick_view([first, second], 64, 2, True, now) == (second, 16)
    first.camera_time = now - 0.02  # both moving: the one shown longest ago first, then the other
    second.rendered = (2.0, 64, 1, now - 0.5)
    assert pick_view([first, second], 64, 2, True, now) == (second, 16)
    second.rendered = (second.camera_time, 16, 2, now)
    assert pick_view([first, second], 64, 2, True, now) == (first, 16)
    fresh = ClientView("fresh", camera_time=now)  # a new tab, never shown
    assert pick_view([first, fresh], 64, 1, True, now)[0] is fresh


def test_a_camera_move_shortens_the_rest_to_a_previews_and_a_drag_stays_paced():
    """After a frame the render thread rests (1 - share) / share times its rendering; a camera move cuts that
    rest to what the last preview's would be, and a stream of moves (a drag) cannot cut it further."""
    import threading
    from types import SimpleNamespace

    def rest(spent: float, moves_every: float | None) -> float:
        state = SimpleNamespace(share=0.01, preview_seconds=0.003, stopped=threading.Event(),
                                camera_moved=threading.Event())  # preview rest 0.3 s; this one 99 x spent
        done = threading.Event()

        def drag() -> None:
            while not done.wait(moves_every):
                state.camera_moved.set()

        if moves_every:
            threading.Thread(target=drag, daemon=True).start()
        started = time.perf_counter()
        Viewer._rest(state, started, spent)
        done.set()
        return time.perf_counter() - started

    assert 0.28 < rest(0.003, None) < 2.0  # no move: the whole rest
    assert 0.28 < rest(1.0, 0.02) < 2.0  # after a 1 s frame (a 99 s rest), a drag: the preview's 0.3 s


def test_every_tab_gets_frames_while_training(trained, tiny_scene):
    """Two tabs while training runs (simulated: the model version moves on every 50 ms), each with its own
    camera: both are served."""
    import threading

    pipeline, scene = trained
    cameras = scene.splits["train"].cameras
    viewer = Viewer(pipeline, cameras, port=18100, chunk=2048, resolution=48, share=0.25)
    viewer.stats.training = True
    ticking = True

    def train() -> None:
        while ticking:
            viewer.stats.version += 1
            time.sleep(0.05)

    threading.Thread(target=train, daemon=True).start()
    tabs = [Browser(viewer.port), Browser(viewer.port)]
    try:
        for tab, index in zip(tabs, (2, 7)):
            tab.look(*cameras_to_viser(cameras, index)[:3])
        assert all(tab.frames(20) >= 1 for tab in tabs)
    finally:
        ticking = False
        for tab in tabs:
            tab.close()
        viewer.close()


def test_a_finished_run_shows_its_summary_and_no_training_controls(trained, tmp_path):
    """`recon view`: the run's scores in the panel in place of training reports, and no pause button; a fit's
    viewer loses its pause button once training is done (--keep-viewer)."""
    import json

    from recon.app.config import FitConfig
    from recon.app.run import RunDir
    from recon.app.view_command import run_summary

    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    cfg = FitConfig(scene="scene", out=str(run.path), field="vm")
    assert run_summary(run, cfg) == f"**run** · vm · not evaluated (`recon eval {run.path}`)"
    run.metrics.write_text(json.dumps({"train": {"steps": 150, "seconds": 12.3},
                                       "mean": {"psnr": 27.456, "ssim": 0.91234}}))
    summary = run_summary(run, cfg)
    assert summary == "**run** · vm · 150 steps in 12 s · test PSNR 27.46 dB · SSIM 0.9123"
    run.metrics.write_text("{")
    assert run_summary(run, cfg) == "**run** · vm · metrics.json unreadable"

    pipeline, scene = trained
    finished = Viewer(pipeline, scene.splits["train"].cameras, port=18110, resolution=32, summary=summary)
    live = Viewer(pipeline, scene.splits["train"].cameras, port=18120, resolution=32)
    try:
        assert finished.pause_button is None and finished.stats_text.content == summary
        assert live.pause_button is not None
        live.paused.set()
        live.training_done()
        assert live.pause_button is None and not live.paused.is_set()
    finally:
        finished.close()
        live.close()


def test_training_with_a_watching_browser_reaches_the_same_floor(tiny_scene):
    scene = load_scene(tiny_scene)
    trainer = Trainer(small_config(tiny_scene), scene)
    viewer = Viewer(trainer.pipeline, scene.splits["train"].cameras, port=18090, chunk=2048, resolution=24, share=0.3)
    browser = Browser(viewer.port)
    try:
        browser.look(*cameras_to_viser(scene.splits["train"].cameras, 0)[:3])
        trainer.run([viewer], gate=viewer)
        assert viewer.frames_sent >= 2  # it kept rendering while training went on
    finally:
        browser.close()
        viewer.close()
    result = evaluate(trainer.pipeline, scene.splits["test"], stride=1, chunk=8192)
    assert result["mean"]["psnr"] > 24.0, result["mean"]  # test_fit's floor, unattended


def chromium_path() -> str | None:
    import shutil

    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(chromium_path() is None, reason="needs Debian's chromium (apt-get install chromium) and playwright")
def test_a_real_browser_shows_the_rendered_field(trained, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api", reason="needs playwright (pip install playwright)")
    pipeline, scene = trained
    viewer = Viewer(pipeline, scene.splits["train"].cameras, port=18100, chunk=4096, resolution=64)
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox", "--use-gl=swiftshader"])
            page = browser.new_page(viewport={"width": 640, "height": 480})
            page.goto(viewer.url)
            deadline = time.time() + 90
            while viewer.frames_sent < 2 and time.time() < deadline:
                page.wait_for_timeout(250)
            page.wait_for_timeout(1500)  # the frame reaches the canvas
            shot = tmp_path / "viewer.png"
            page.screenshot(path=str(shot))
            browser.close()
        assert viewer.frames_sent >= 2
        import imageio.v2 as imageio

        pixels = imageio.imread(shot)[..., :3].astype(float)
        assert pixels.std() > 10  # not a blank page: the panel, the frustums and the rendered field
    finally:
        viewer.close()


def test_the_crop_gizmo_and_the_typed_numbers_keep_crop_json_in_sync(trained, tmp_path):
    """Dragging a corner handle (viser's transform controls, driven over the websocket as the browser does) or
    typing the numbers moves the render's crop, the other controls and RUN/crop.json (world frame)."""
    import json

    from recon.app.run import RunDir
    from recon.app.viewer import start_viewer
    from recon.data.scene import world_to_unit_box

    pipeline, scene = trained
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    viewer = start_viewer(pipeline, scene, run, "127.0.0.1", 18130, share=1.0, chunk=2048, resolution=24)
    browser = Browser(viewer.port)
    aabb = pipeline.tracer.aabb.cpu()

    def stored() -> torch.Tensor:
        return world_to_unit_box(torch.tensor(json.loads((run.path / "crop.json").read_text())["world_box"]),
                                 scene.to_unit)

    def written() -> str | None:
        crop_file = run.path / "crop.json"
        return crop_file.read_text() if crop_file.exists() else None

    def drag(handle: str, position: tuple[float, float, float]) -> None:
        """Move a handle and wait for crop.json, which the viewer writes last (after the render's crop)."""
        before = written()
        browser.send({"type": "TransformControlsUpdateMessage", "name": handle, "wxyz": [1.0, 0.0, 0.0, 0.0],
                      "position": list(position), "owner": ""})
        deadline = time.time() + 10
        while written() == before and time.time() < deadline:
            time.sleep(0.05)

    try:
        browser.look(*cameras_to_viser(scene.splits["train"].cameras, 0)[:3])
        drag("/crop-max", (0.2, 0.3, 0.4))
        expected = torch.stack([aabb[0], torch.tensor([0.2, 0.3, 0.4])])
        assert torch.allclose(viewer.settings.crop, expected) and torch.allclose(stored(), expected, atol=1e-5)
        assert np.allclose(viewer.crop_high.value, (0.2, 0.3, 0.4)) and np.allclose(viewer.crop_box.position,
                                                                                     expected.mean(0))
        drag("/crop-min", (0.5, 0.5, 0.5))  # past the other corner: the box the two corners span
        expected = torch.tensor([[0.2, 0.3, 0.4], [0.5, 0.5, 0.5]])
        assert torch.allclose(stored(), expected, atol=1e-5)
        assert np.allclose(viewer.crop_handles[0].position, expected[0]) and np.allclose(viewer.crop_low.value,
                                                                                         expected[0])
        viewer.crop_low.value = (-0.1, -0.2, -0.3)  # typed
        expected = torch.tensor([[-0.1, -0.2, -0.3], [0.5, 0.5, 0.5]])
        assert torch.allclose(stored(), expected, atol=1e-5)
        assert np.allclose(viewer.crop_handles[0].position, expected[0])
        viewer.crop_high.value = (-0.5, 0.5, 0.5)  # an empty box is not taken
        assert torch.allclose(stored(), expected, atol=1e-5)
        version = viewer.settings_version
        viewer.controls["Resolution"].value = 2  # typed into the slider's box: its minimum, and a new version
        assert viewer.settings.resolution == 16 and viewer.settings_version > version
        viewer.controls["Split"].value = True
        assert viewer.settings.split_mode == "depth" and viewer.settings.crop is not None  # the crop stays
    finally:
        browser.close()
        viewer.close()


def test_a_camera_path_made_in_the_viewer_saves_loads_and_renders_a_video(trained, tmp_path):
    """Keyframes from a tab's view, saved as camera_path.json in the world frame, loaded back, rendered to an
    MP4 of seconds x fps frames whose first frame is the first keyframe's view."""
    from types import SimpleNamespace

    import imageio.v3 as iio

    from recon.app.run import RunDir
    from recon.app.viewer import start_viewer
    from recon.data.camera_paths import load_camera_path

    pipeline, scene = trained
    cameras = scene.splits["train"].cameras
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    viewer = start_viewer(pipeline, scene, run, "127.0.0.1", 18140, share=1.0, chunk=4096, resolution=24)
    panel = viewer.paths
    try:
        for i in (0, 5):
            wxyz, position, fov, aspect = cameras_to_viser(cameras, i)
            panel.add_keyframe(SimpleNamespace(wxyz=wxyz, position=position, fov=fov, aspect=aspect))
        panel.seconds.value, panel.fps.value, panel.height.value = 1.0, 4, int(cameras.height[0])
        panel.name.value = "two views"
        assert panel.save().startswith("saved") and "4 frames" in panel.status.content
        path, frames = load_camera_path(run.path / "camera_paths" / "twoviews.json")
        world = cameras.transformed(torch.linalg.inv(scene.to_unit))
        assert len(frames) == 4 and torch.allclose(frames.c2w[[0, -1]], world.c2w[[0, 5]], atol=1e-4)
        panel._edit(lambda keys: [])
        assert panel.load().startswith("loaded") and len(panel.path.keyframes) == 2
        assert panel.render_video().startswith("wrote")
        video = iio.imread(run.renders / "twoviews.mp4", index=None)
        assert video.shape == (4, int(cameras.height[0]), int(cameras.width[0]), 3)
        reference = (pipeline.render_view(cameras, 0)["rgb"].clamp(0, 1) * 255).numpy()
        assert np.abs(video[0].astype(float) - reference).mean() < 6  # the first keyframe's view (H.264)
    finally:
        viewer.close()


@pytest.mark.skipif(chromium_path() is None, reason="needs Debian's chromium (apt-get install chromium) and playwright")
def test_real_browser_tabs_while_training_both_get_frames_and_a_drag_gets_one_at_once(trained):
    """Two Chromium tabs while training runs (simulated: the model version moves on every 50 ms): both are
    served, and after a mouse drag in either (viser's orbit controls), a frame of the moved camera follows
    within seconds (bench/viewer_browser.py measures how fast on lego)."""
    playwright = pytest.importorskip("playwright.sync_api", reason="needs playwright (pip install playwright)")
    import threading

    pipeline, scene = trained
    viewer = Viewer(pipeline, scene.splits["train"].cameras, port=18160, chunk=2048, resolution=48, share=0.25)
    viewer.stats.training = True
    ticking = threading.Event()

    def train() -> None:
        while not ticking.wait(0.05):
            viewer.stats.version += 1

    threading.Thread(target=train, daemon=True).start()
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox", "--use-gl=swiftshader"])
            tabs = []
            for _ in range(2):
                known = set(viewer.views)
                page = browser.new_page(viewport={"width": 640, "height": 480})
                page.goto(viewer.url)
                deadline = time.time() + 60
                while set(viewer.views) == known and time.time() < deadline:
                    page.wait_for_timeout(50)
                tabs.append((page, viewer.views[(set(viewer.views) - known).pop()]))
            deadline = time.time() + 60
            while not all(view.rendered for _, view in tabs) and time.time() < deadline:
                time.sleep(0.1)
            assert all(view.rendered for _, view in tabs)  # both tabs served while training
            for page, view in tabs:
                moved_before = view.camera_time
                page.mouse.move(150, 240)
                page.mouse.down()
                for step in range(1, 9):
                    page.mouse.move(150 + 10 * step, 240 + 3 * step)
                    page.wait_for_timeout(25)
                page.mouse.up()
                stopped = time.perf_counter()
                deadline = stopped + 10
                shown = lambda: view.rendered[0] == view.camera_time and view.rendered[3] > stopped  # noqa: E731
                while not shown() and time.perf_counter() < deadline:
                    time.sleep(0.02)
                assert view.camera_time > moved_before  # the drag moved this tab's camera
                assert shown() and view.rendered[3] - stopped < 5.0
            browser.close()
    finally:
        ticking.set()
        viewer.close()
