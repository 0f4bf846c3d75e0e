"""The viewer's camera-path panel: keyframes taken from a tab's view, the path drawn in the scene and
previewed in that tab, saved and loaded as nerfstudio's camera_path.json (RUN/camera_paths/NAME.json) and
rendered to RUN/renders/NAME.mp4 while training goes on (a chunk at a time, under the training lock)."""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from pathlib import Path
from typing import Any

import imageio.v2 as imageio
import torch

from recon.app.frames import RenderSettings, render_frame
from recon.app.viser_cameras import pose_to_viser, viser_camera_to_cameras
from recon.data.camera_paths import CameraPath, Keyframe, load_camera_path
from recon.data.cameras import transform_poses

log = logging.getLogger("recon.viewer")

PATH_COLOUR = (230, 60, 160)


class CameraPathPanel:
    """Builds the "Camera path" folder of `viewer`'s GUI. Keyframes are kept in the world frame (`to_unit`
    maps it to the viewer's unit frame); files go under `output_dir` (None: no save, load or video)."""

    def __init__(self, viewer: Any, to_unit: torch.Tensor, output_dir: Path | None):
        self.viewer, self.output_dir = viewer, output_dir
        self.to_unit = to_unit.float()
        self.to_world = torch.linalg.inv(self.to_unit.double()).float()
        self.path = CameraPath()
        self.drawn: list[Any] = []  # the path's scene nodes
        self.lock = threading.Lock()  # the keyframes: GUI callbacks run on viser's thread pool
        gui = viewer.server.gui
        with gui.add_folder("Camera path", expand_by_default=False):
            self.status = gui.add_markdown("no keyframes")
            add = gui.add_button("Add keyframe", hint="the current view of this tab")
            undo = gui.add_button("Remove last keyframe")
            clear = gui.add_button("Clear")
            self.seconds = gui.add_number("Seconds", self.path.seconds, min=0.1, max=3600.0, step=0.1)
            self.fps = gui.add_number("Frames / second", self.path.fps, min=1, max=120, step=1)
            self.height = gui.add_number("Video height", self.path.height, min=16, max=4320, step=2)
            self.loop = gui.add_checkbox("Loop", self.path.is_cycle)
            preview = gui.add_button("Preview", hint="play the path in this tab")
            self.name = gui.add_text("Name", "path")
            if output_dir is not None:
                save = gui.add_button("Save path", hint="RUN/camera_paths/NAME.json")
                load = gui.add_button("Load path")
                video = gui.add_button("Render video", hint="RUN/renders/NAME.mp4")
                save.on_click(lambda _: self._report(self.save))
                load.on_click(lambda _: self._report(self.load))
                video.on_click(lambda _: threading.Thread(target=self._report, args=(self.render_video,),
                                                          daemon=True).start())
        add.on_click(lambda event: self.add_keyframe(event.client.camera))
        undo.on_click(lambda _: self._edit(lambda keys: keys[:-1]))
        clear.on_click(lambda _: self._edit(lambda keys: []))
        for control in (self.seconds, self.fps, self.height, self.loop):
            control.on_update(lambda _: self._edit(lambda keys: keys))
        preview.on_click(lambda event: threading.Thread(target=self.preview, args=(event.client,), daemon=True).start())

    # ---- the path ------------------------------------------------------------------------

    def add_keyframe(self, camera: Any) -> None:
        """A keyframe at a tab's camera (viser's `client.camera`)."""
        unit = viser_camera_to_cameras(camera.wxyz, camera.position, camera.fov, camera.aspect, 2).c2w
        c2w = transform_poses(unit, self.to_world)[0]
        self._edit(lambda keys: keys + [Keyframe(c2w, math.degrees(camera.fov), float(camera.aspect))])

    def _edit(self, change: Any) -> None:
        """Apply `change` (keyframes -> keyframes) and the panel's numbers to the path, then redraw it."""
        with self.lock:
            keys = change(list(self.path.keyframes))
            aspect = keys[0].aspect if keys else 4 / 3
            height = int(self.height.value) // 2 * 2  # even: the video codec's macroblocks
            self.path = CameraPath(keys, float(self.seconds.value), int(self.fps.value), height,
                                   max(2, round(height * aspect / 2) * 2), bool(self.loop.value))
        self._draw()

    def _draw(self) -> None:
        scene, path = self.viewer.server.scene, self.path
        for node in self.drawn:
            node.remove()
        self.drawn = []
        count = len(path.keyframes)
        self.status.content = (f"{count} keyframe{'s' * (count != 1)} · {path.frame_count} frames at "
                               f"{path.width}×{path.height}" if count else "no keyframes")
        if not count:
            return
        c2w = transform_poses(path.poses()[0], self.to_unit)
        for i, key in enumerate(path.keyframes):
            unit = transform_poses(key.c2w[None], self.to_unit)[0]
            wxyz, position = pose_to_viser(unit)
            self.drawn.append(scene.add_camera_frustum(f"/camera-path/key-{i:03d}", fov=math.radians(key.fov),
                                                       aspect=key.aspect, scale=0.05, color=PATH_COLOUR, wxyz=wxyz,
                                                       position=position))
        if len(c2w) > 1:
            self.drawn.append(scene.add_spline_catmull_rom("/camera-path/line", points=c2w[:, :, 3].numpy(),
                                                           color=PATH_COLOUR, thickness=2.0, thickness_units="screen"))

    # ---- using it ------------------------------------------------------------------------

    def preview(self, client: Any) -> None:
        """Play the path in one tab at its frame rate (the viewer renders previews as the camera moves)."""
        path = self.path
        if not path.keyframes:
            return
        c2w, fov = path.poses()
        for pose, angle in zip(transform_poses(c2w, self.to_unit), fov.tolist()):
            if self.viewer.stopped.is_set():
                return
            wxyz, position = pose_to_viser(pose)
            with client.atomic():
                client.camera.wxyz, client.camera.position = wxyz, position
                client.camera.fov = math.radians(angle)
            time.sleep(1 / path.fps)

    def _file(self, folder: str, suffix: str) -> Path:
        name = "".join(c for c in self.name.value.strip() if c.isalnum() or c in "-_.") or "path"
        return self.output_dir / folder / f"{name}{suffix}"

    def save(self) -> str:
        if not self.path.keyframes:
            return "add a keyframe first"
        target = self._file("camera_paths", ".json")
        self.path.save(target)
        return f"saved {target}"

    def load(self) -> str:
        source = self._file("camera_paths", ".json")
        path, cameras = load_camera_path(source)
        if not path.keyframes:  # a path from another tool: its frames are the keyframes, one per frame time
            fov = torch.rad2deg(2 * torch.atan(cameras.height / 2 / cameras.fy)).tolist()
            path.keyframes = [Keyframe(c2w, angle, path.width / path.height) for c2w, angle in zip(cameras.c2w, fov)]
        self.seconds.value, self.fps.value, self.loop.value = path.seconds, path.fps, path.is_cycle
        self.height.value = path.height
        self._edit(lambda _: path.keyframes)
        return f"loaded {source}"

    def render_video(self) -> str:
        """Render the path to RUN/renders/NAME.mp4 (and save it beside, as RUN/camera_paths/NAME.json)."""
        path = dataclasses.replace(self.path, keyframes=list(self.path.keyframes))
        if not path.keyframes:
            return "add a keyframe first"
        self.save()
        target = self._file("renders", ".mp4")
        target.parent.mkdir(parents=True, exist_ok=True)
        cameras = path.cameras().transformed(self.to_unit)
        settings = RenderSettings(crop=self.viewer.settings.crop, max_samples=self.viewer.settings.max_samples)
        with imageio.get_writer(target, format="FFMPEG", fps=path.fps, macro_block_size=1) as writer:
            for i in range(len(cameras)):
                frame = render_frame(self.viewer.pipeline, cameras[i], settings, self.viewer.chunk, self.viewer.lock,
                                     stale=self.viewer.stopped.is_set)
                if frame is None:
                    return "the viewer closed before the video was done"
                writer.append_data(frame)
                self.status.content = f"rendering {target.name}: frame {i + 1} of {len(cameras)}"
        return f"wrote {target}"

    def _report(self, action: Any) -> None:
        """Run a save/load/render action and show its outcome (or its error, in one line) in the panel."""
        try:
            self.status.content = action()
        except Exception as error:  # a bad file or a full disk must not take the viewer down
            log.exception("viewer: camera path action failed")
            self.status.content = f"failed: {error}"
