"""The live web viewer (viser): watch a radiance field train from the browser, or browse a trained run.

The scene is shown in the unit frame the field lives in. Each browser tab (client) has its own camera;
one render thread serves them all, progressively: a small frame while the camera moves, the full
resolution once it rests, a refresh when training has moved on. Tabs are served in turn (`pick_view`): a
camera that moved goes first, then the view shown longest ago, so no tab starves another. Rendering shares
the field with the training step through one lock, taken per chunk of rays, so a step never waits longer
than a chunk; while training runs the thread rests after each frame so that its rendering (not its waits for
the lock) takes at most `share` of the wall time; a camera move shortens the rest to a preview's and drops
any frame the move made stale. A frame that fails is logged and dropped; it never stops training.
"""

from __future__ import annotations

import logging
import math
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import viser

from recon.app.evaluate import COLORMAPS, to_uint8
from recon.app.frames import MODES, RenderSettings, render_frame
from recon.app.pipeline import Pipeline
from recon.app.viewer_paths import CameraPathPanel
from recon.app.viser_cameras import cameras_to_viser, pose_to_viser, viser_camera_to_cameras
from recon.data.camera_paths import home_pose
from recon.data.cameras import Cameras
from recon.data.scene import world_to_unit_box

log = logging.getLogger("recon.viewer")

MOVING_SECONDS = 0.15  # a camera updated this recently is moving: preview resolution
PREVIEW_DIVISOR = 4
REFRESH_SECONDS = 2.0  # while training, a resting view is re-rendered this often
MIN_ROWS = 16  # the resolution slider's minimum, also for a value typed into its box
THUMBNAIL_SIDE = 96
CROP_COLOUR = (255, 150, 0)


def free_port(host: str, port: int, tries: int = 20) -> int:
    """`port`, or the next one free on `host`."""
    for candidate in range(port, port + tries):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, candidate))
            except OSError:
                continue
            return candidate
    raise OSError(f"no free port on {host} in {port}..{port + tries - 1}")


@dataclass
class ClientView:
    client: Any
    camera_time: float = 0.0  # when the browser camera last moved
    rendered: tuple = ()  # (camera time, rows, model version, wall time) of the frame on screen


def pick_view(views: list[ClientView], resolution: int, version: int, training: bool,
              now: float) -> tuple[ClientView | None, int]:
    """The view to render next and its rows, or (None, 0) when none needs a frame. A view needs one when its
    camera moved, when it rests on a preview, or when the model or the settings changed (while training: at
    most every REFRESH_SECONDS). A moved camera goes first (previews answer the hand on the mouse), then a view
    that waits for a refresh; within each, the view whose frame is oldest (never shown: first), so tabs are
    served in turn, also while several cameras move at once."""
    moved, waiting = [], []
    for view in views:
        moving = now - view.camera_time < MOVING_SECONDS
        rows = max(16, resolution // PREVIEW_DIVISOR) if moving else resolution
        if not view.rendered:
            moved.append((-math.inf, view, rows))
            continue
        shown_camera, shown_rows, shown_version, shown_at = view.rendered
        if shown_camera != view.camera_time:
            moved.append((shown_at, view, rows))
        elif not moving and (shown_rows < rows or (shown_version != version
                                                   and (not training or now - shown_at > REFRESH_SECONDS))):
            waiting.append((shown_at, view, rows))
    for jobs in (moved, waiting):
        if jobs:
            _, view, rows = min(jobs, key=lambda job: job[0])
            return view, rows
    return None, 0


class WaitTimer:
    """A lock's context manager that counts the seconds spent waiting to acquire it (`waited`), so the
    viewer's share is reckoned on its own work, not on the training step it waits behind."""

    def __init__(self, lock: Any):
        self.lock, self.waited = lock, 0.0

    def __enter__(self) -> None:
        started = time.perf_counter()
        self.lock.acquire()
        self.waited += time.perf_counter() - started

    def __exit__(self, *exc: Any) -> None:
        self.lock.release()


@dataclass
class Stats:
    text: str = "a trained run"  # replaced by the training's reports
    version: int = 0  # bumped by every training report: resting views refresh
    training: bool = False


class Viewer:
    """A viser server for one pipeline. `train_cameras` / `thumbnails` draw the training views;
    `on_export` (optional) makes a mesh for the "export mesh" button and returns it in the unit frame;
    `on_crop` (optional) stores the crop box whenever it is typed or dragged. Camera paths are kept in the
    world frame `to_unit` maps to the unit frame, and saved and rendered into `output_dir` (None: not saved).
    `summary` (markdown) shows a finished run: its text in place of the training's reports, and no training
    controls."""

    def __init__(self, pipeline: Pipeline, train_cameras: Cameras | None = None,
                 thumbnails: list[np.ndarray] | None = None,
                 host: str = "127.0.0.1", port: int = 8080, share: float = 1.0, chunk: int = 8192,
                 resolution: int = 256, on_export: Callable[[torch.Tensor | None], Any] | None = None,
                 on_crop: Callable[[torch.Tensor], None] | None = None, crop: torch.Tensor | None = None,
                 summary: str | None = None, to_unit: torch.Tensor | None = None, output_dir: Path | None = None):
        self.pipeline, self.share, self.chunk = pipeline, share, chunk
        self.lock = threading.RLock()
        self.settings = RenderSettings(resolution=resolution, crop=crop)
        self.settings_version = 0  # bumped by every change of the settings: a frame in flight is dropped
        self.stats = Stats() if summary is None else Stats(text=summary)
        self.paused = threading.Event()
        self.stopped = threading.Event()
        self.camera_moved = threading.Event()  # shortens the render thread's rest
        self.preview_seconds = 0.0  # what the last preview frame took to render
        self.views: dict[int, ClientView] = {}
        self.frames_sent = 0
        self.render_seconds = 0.0  # the render thread's own work (not its waits for the lock), all frames
        self.port = free_port(host, port)
        self.server = viser.ViserServer(host=host, port=self.port, verbose=False)
        self.url = f"http://{host}:{self.port}"
        self._on_export, self._on_crop = on_export, on_crop
        self.mesh = None  # the exported mesh's scene node
        self.controls: dict[str, Any] = {}  # the render settings' GUI controls, by label
        self._build_scene(train_cameras, thumbnails)
        self._build_gui(trains=summary is None, thumbnails=thumbnails)
        self.paths = CameraPathPanel(self, torch.eye(4) if to_unit is None else to_unit, output_dir)
        self.server.on_client_connect(self._connect)
        self.server.on_client_disconnect(lambda client: self.views.pop(client.client_id, None))
        self.thread = threading.Thread(target=self._render_loop, name="recon-viewer", daemon=True)
        self.thread.start()

    # ---- what the browser shows ------------------------------------------------------------

    def _build_scene(self, cameras: Cameras | None, thumbnails: list[np.ndarray] | None) -> None:
        scene = self.server.scene
        aabb = self.pipeline.tracer.aabb.cpu()
        self.scene_box = scene.add_box("/scene-box", color=(90, 90, 90), dimensions=tuple((aabb[1] - aabb[0]).tolist()),
                                       wireframe=True, position=tuple(aabb.mean(0).tolist()))
        crop = aabb if self.settings.crop is None else self.settings.crop
        self.crop_box = scene.add_box("/crop-box", color=CROP_COLOUR, dimensions=tuple((crop[1] - crop[0]).tolist()),
                                      wireframe=True, position=tuple(crop.mean(0).tolist()))
        # One translation gizmo per corner: dragging either reshapes the box (rotations would leave it
        # axis-aligned no more).
        handle_scale = 0.2 * float((aabb[1] - aabb[0]).max())
        self.crop_handles = [scene.add_transform_controls(f"/crop-{name}", scale=handle_scale, disable_rotations=True,
                                                         position=tuple(corner.tolist()))
                             for name, corner in (("min", crop[0]), ("max", crop[1]))]
        for handle in self.crop_handles:
            handle.on_update(lambda _: self._crop_dragged())
        self.frustums: list[Any] = []
        self.home = None
        if cameras is None:
            return
        up = cameras.c2w[:, :, 1].mean(0)
        scene.set_up_direction(tuple((up / up.norm()).tolist()))
        centres = cameras.c2w[:, :, 3]
        spread = float((centres - centres.mean(0)).norm(dim=-1).mean())
        self.home = pose_to_viser(home_pose(cameras))  # behind and above the cameras: the model, not a photo
        for i in range(len(cameras)):
            wxyz, position, fov, aspect = cameras_to_viser(cameras, i)
            frustum = scene.add_camera_frustum(f"/train/{i:04d}", fov=fov, aspect=aspect, scale=0.04 * spread,
                                               thickness=1.5, thickness_units="screen",
                                               image=None if thumbnails is None else thumbnails[i], wxyz=wxyz,
                                               position=position)
            frustum.on_click(lambda event, wxyz=wxyz, position=position: self._jump(event.client, wxyz, position))
            self.frustums.append(frustum)

    @staticmethod
    def _jump(client: Any, wxyz: np.ndarray, position: np.ndarray) -> None:
        with client.atomic():
            client.camera.wxyz, client.camera.position = wxyz, position

    def _build_gui(self, trains: bool, thumbnails: list[np.ndarray] | None) -> None:
        gui = self.server.gui
        self.stats_text = gui.add_markdown(self.stats.text)
        self.pause_button = self._pause_control(gui) if trains else None
        self._render_controls(gui)
        self._crop_controls(gui)
        self._scene_controls(gui, thumbnails)

    def _pause_control(self, gui: Any) -> Any:
        pause = gui.add_button("Pause training")

        @pause.on_click
        def _(_: Any) -> None:
            if self.paused.is_set():
                self.paused.clear()
                pause.label = "Pause training"
            else:
                self.paused.set()
                pause.label = "Resume training"

        return pause

    def _render_controls(self, gui: Any) -> None:
        """The render settings' controls, kept by label in `self.controls`."""
        controls = self.controls
        controls["Render"] = gui.add_dropdown("Render", MODES, initial_value=self.settings.mode)
        controls["Resolution"] = gui.add_slider("Resolution", MIN_ROWS, 1024, 8, self.settings.resolution)
        controls["Max samples / ray"] = gui.add_slider("Max samples / ray", 16, 1024, 16, self.settings.max_samples)
        with gui.add_folder("Depth", expand_by_default=False):
            controls["Colour map"] = gui.add_dropdown("Colour map", tuple(COLORMAPS),
                                                      initial_value=self.settings.colormap)
            controls["Automatic range"] = gui.add_checkbox("Automatic range", True,
                                                           hint="each frame's 2nd to 98th percentile")
            controls["Near / far"] = gui.add_vector2("Near / far (unit frame)", (0.0, 2.0), step=0.01)
        with gui.add_folder("Split view", expand_by_default=False):
            controls["Split"] = gui.add_checkbox("Split", False)
            controls["Right side"] = gui.add_dropdown("Right side", MODES, initial_value="depth")
            controls["Divider"] = gui.add_slider("Divider", 0.0, 1.0, 0.01, self.settings.split)

        def changed(_: Any) -> None:
            near, far = controls["Near / far"].value
            automatic = controls["Automatic range"].value
            self._set(mode=controls["Render"].value,
                      resolution=max(MIN_ROWS, int(controls["Resolution"].value)),  # a typed 2 is not 2 rows
                      max_samples=max(16, int(controls["Max samples / ray"].value)),
                      colormap=controls["Colour map"].value,
                      depth_range=None if automatic or far <= near else (float(near), float(far)),
                      split_mode=controls["Right side"].value if controls["Split"].value else None,
                      split=float(controls["Divider"].value))

        for control in controls.values():
            control.on_update(changed)

    def _crop_controls(self, gui: Any) -> None:
        aabb = self.pipeline.tracer.aabb.cpu()
        box = aabb if self.settings.crop is None else self.settings.crop
        with gui.add_folder("Crop box (unit frame)"):
            self.crop_low = gui.add_vector3("Min", tuple(box[0].tolist()), step=0.01)
            self.crop_high = gui.add_vector3("Max", tuple(box[1].tolist()), step=0.01)
            reset = gui.add_button("Reset to the scene box")
        for control in (self.crop_low, self.crop_high):
            control.on_update(lambda _: self.set_crop(torch.tensor([self.crop_low.value, self.crop_high.value],
                                                                   dtype=torch.float32)))
        reset.on_click(lambda _: self.set_crop(aabb.clone()))
        if self._on_export:
            export = gui.add_button("Export mesh")
            export.on_click(lambda _: threading.Thread(target=self._export, daemon=True).start())

    def _crop_dragged(self) -> None:
        """A corner handle moved: the box the two handles span (either may pass the other)."""
        corners = torch.tensor(np.stack([handle.position for handle in self.crop_handles]), dtype=torch.float32)
        self.set_crop(torch.stack([corners.min(0).values, corners.max(0).values]))

    def set_crop(self, box: torch.Tensor) -> None:
        """Crop to `box` [2, 3] (unit frame; min, max: an empty box is ignored, as while the numbers are typed),
        from the typed numbers or a dragged handle: the render, the drawn box, the handles, the numbers and
        `on_crop` (crop.json) follow."""
        if not (box[1] > box[0]).all() or (self.settings.crop is not None and torch.equal(box, self.settings.crop)):
            return
        self._set(crop=box)
        self.crop_box.position = tuple(box.mean(0).tolist())
        self.crop_box.dimensions = tuple((box[1] - box[0]).tolist())
        for handle, corner in zip(self.crop_handles, box):
            handle.position = tuple(corner.tolist())
        self.crop_low.value, self.crop_high.value = tuple(box[0].tolist()), tuple(box[1].tolist())
        if self._on_crop:
            self._on_crop(box)

    def _scene_controls(self, gui: Any, thumbnails: list[np.ndarray] | None) -> None:
        with gui.add_folder("Scene", expand_by_default=False):
            home = gui.add_button("Home view")
            toggles = {"Training cameras": lambda: self.frustums, "Scene box": lambda: [self.scene_box],
                       "Crop box": lambda: [self.crop_box, *self.crop_handles],
                       "Exported mesh": lambda: [self.mesh] if self.mesh is not None else []}
            shown = {label: gui.add_checkbox(label, True) for label in toggles}
            for label, checkbox in shown.items():
                nodes = toggles[label]
                checkbox.on_update(lambda _, checkbox=checkbox, nodes=nodes: self._show(nodes(), checkbox.value))
            self.show_mesh = shown["Exported mesh"]
            if thumbnails is not None:
                photos = gui.add_checkbox("Thumbnails", True)

                @photos.on_update
                def _(_: Any) -> None:
                    for frustum, image in zip(self.frustums, thumbnails):
                        frustum.image = image if photos.value else None

        home.on_click(lambda event: self.home is not None and self._jump(event.client, *self.home))

    @staticmethod
    def _show(nodes: list[Any], visible: bool) -> None:
        for node in nodes:
            node.visible = visible

    def _set(self, **changes: Any) -> None:
        for key, value in changes.items():
            setattr(self.settings, key, value)
        self.settings_version += 1  # a frame in flight is dropped
        self.stats.version += 1  # every view re-renders

    def _export(self) -> None:
        try:
            mesh = self._on_export(self.settings.crop)
            self.mesh = self.server.scene.add_mesh_trimesh("/export/mesh", mesh, visible=self.show_mesh.value)
        except Exception:  # an export that fails must not take the viewer down
            log.exception("viewer: mesh export failed")

    def _connect(self, client: Any) -> None:
        view = ClientView(client, camera_time=time.perf_counter())
        self.views[client.client_id] = view
        if self.home is not None:
            self._jump(client, *self.home)

        @client.camera.on_update
        def _(_: Any) -> None:
            view.camera_time = time.perf_counter()
            self.camera_moved.set()

    # ---- the training side -----------------------------------------------------------------

    def on_step(self, trainer: Any, stats: dict[str, Any]) -> None:
        unit = trainer.task.unit
        psnr = f" · PSNR {stats['psnr']:.2f} dB" if "psnr" in stats else ""
        self.stats.text = (f"**step {stats['step']}** · loss {stats['loss']:.5f}{psnr} · "
                           f"{stats[f'{unit}_per_second'] / 1e3:.1f}k {unit}/s · {stats['train_seconds']:.0f} s")
        self.stats.version += 1
        self.stats.training = True
        self.stats_text.content = self.stats.text

    def wait_while_paused(self) -> None:
        while self.paused.is_set() and not self.stopped.is_set():
            time.sleep(0.05)

    def training_done(self) -> None:
        self.stats.training = False
        self.stats_text.content = self.stats.text + " · done"
        if self.pause_button is not None:  # nothing left to pause (--keep-viewer)
            self.pause_button.remove()
            self.pause_button = None
        self.paused.clear()

    # ---- rendering -------------------------------------------------------------------------

    def _render_loop(self) -> None:
        while not self.stopped.is_set():
            self.camera_moved.clear()
            view, rows = pick_view(list(self.views.values()), self.settings.resolution, self.stats.version,
                                   self.stats.training, time.perf_counter())
            if view is None:
                self.camera_moved.wait(0.01)
                continue
            started, timer = time.perf_counter(), WaitTimer(self.lock)
            camera_time, version, settings_version = view.camera_time, self.stats.version, self.settings_version
            try:
                cam = view.client.camera
                camera = viser_camera_to_cameras(cam.wxyz, cam.position, cam.fov, cam.aspect, rows)
                # A full frame the camera moved away from is dropped; a preview is cheap and still shows
                # roughly where the camera is, so it goes out (a camera that never rests still gets frames).
                frame = render_frame(self.pipeline, camera, self.settings, self.chunk, timer,
                                     stale=lambda: ((rows >= self.settings.resolution
                                                     and view.camera_time != camera_time)
                                                    or self.stopped.is_set()
                                                    or self.settings_version != settings_version))
                if frame is not None:
                    view.client.scene.set_background_image(frame, format="jpeg", jpeg_quality=85)
                    view.rendered = (camera_time, rows, version, time.perf_counter())
                    self.frames_sent += 1
            except Exception:  # a view that fails to render is dropped; training goes on
                log.exception("viewer: frame dropped")
                view.rendered = (camera_time, rows, version, time.perf_counter())
            ended = time.perf_counter()
            spent = ended - started - timer.waited  # rendering, not waiting behind a step
            self.render_seconds += spent
            if rows < self.settings.resolution:
                self.preview_seconds = spent
            if self.stats.training and not self.paused.is_set():
                self._rest(ended, spent)

    def _rest(self, ended: float, spent: float) -> None:
        """Rest after a frame that took `spent` seconds so that rendering keeps its share of the time; a camera
        move shortens the rest to what a preview's would be (so a drag after a full frame is answered within
        a preview's rest, and a drag's previews are still paced at the share)."""
        ratio = (1 - self.share) / self.share
        until = ended + spent * ratio
        while not self.stopped.is_set() and (left := until - time.perf_counter()) > 0:
            if self.camera_moved.wait(left):
                self.camera_moved.clear()
                until = min(until, ended + self.preview_seconds * ratio)

    def close(self) -> None:
        self.stopped.set()
        self.camera_moved.set()
        self.thread.join(timeout=5)
        self.server.stop()


def thumbnails(split: Any, side: int = THUMBNAIL_SIDE) -> list[np.ndarray]:
    """Each view's image, its longest side `side` pixels, as uint8 RGB (alpha composited on white)."""
    out = []
    for i in range(len(split)):
        image = split.image(i)
        if image.shape[2] == 4:
            image = image[..., :3] * image[..., 3:] + (1 - image[..., 3:])
        scale = side / max(image.shape[:2])
        size = [max(1, round(n * scale)) for n in image.shape[:2]]
        small = torch.nn.functional.interpolate(image.permute(2, 0, 1)[None], size=size, mode="area")[0]
        out.append(to_uint8(small.permute(1, 2, 0)))
    return out


def start_viewer(pipeline: Pipeline, scene: Any, run: Any, host: str, port: int, share: float, chunk: int,
                 resolution: int, export_resolution: int = 256, summary: str | None = None) -> Viewer:
    """The viewer for a radiance run: its training views, its crop box kept in sync with RUN/crop.json (which
    every export uses), a mesh export into RUN/export that is then shown in the scene, and camera paths saved
    in RUN/camera_paths and rendered into RUN/renders."""
    import json

    import trimesh

    from recon.app.export import extract_mesh, world_from_unit

    cameras, to_unit = scene.splits["train"].cameras, scene.to_unit
    crop_file = run.path / "crop.json"
    crop = (world_to_unit_box(torch.tensor(json.loads(crop_file.read_text())["world_box"]), to_unit)
            if crop_file.exists() else None)
    viewer: Viewer

    def unit_to_world_box(box: torch.Tensor) -> torch.Tensor:
        return world_to_unit_box(box, torch.from_numpy(world_from_unit(to_unit)).float())

    def save_crop(box: torch.Tensor) -> None:
        run.write_json(crop_file, {"world_box": unit_to_world_box(box).tolist(), "frame": "input cameras (world)"})

    def export(box: torch.Tensor | None) -> trimesh.Trimesh:
        with viewer.lock:  # training waits while the mesh is made
            mesh, info = extract_mesh(pipeline, cameras, to_unit, export_resolution,
                                      crop=None if box is None else unit_to_world_box(box))
        path = run.path / "export" / f"mesh-viewer-{export_resolution}.ply"
        path.parent.mkdir(parents=True, exist_ok=True)
        mesh.save(path)
        m = to_unit.double().numpy()
        return trimesh.Trimesh(mesh.vertices @ m[:3, :3].T + m[:3, 3], mesh.faces, vertex_colors=mesh.colors,
                               process=False)

    viewer = Viewer(pipeline, cameras, thumbnails(scene.splits["train"]), host=host, port=port, share=share,
                    chunk=chunk, resolution=resolution, on_export=export, on_crop=save_crop, crop=crop,
                    summary=summary, to_unit=to_unit, output_dir=run.path)
    return viewer
