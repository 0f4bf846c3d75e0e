"""Camera paths: keyframes interpolated through their poses, nerfstudio's camera_path.json both ways, the
viewer's home view, and the normals the viewer shades density fields with."""

import json
import math

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation
from test_app_units import cameras_at

from recon.app.frames import depth_normals
from recon.data.camera_paths import CameraPath, Keyframe, Ring, home_pose, load_camera_path, look_at


def keyframes(azimuths_deg, fovs):
    eyes = [torch.tensor([4 * math.cos(math.radians(a)), 4 * math.sin(math.radians(a)), 1.0]) for a in azimuths_deg]
    return [Keyframe(look_at(eye, torch.zeros(3), torch.tensor([0.0, 0, 1])), fov) for eye, fov in zip(eyes, fovs)]


@pytest.mark.parametrize("is_cycle", [False, True])
def test_a_path_passes_through_its_keyframes_smoothly(is_cycle):
    keys = keyframes([0, 40, 80, 120], [50, 50, 40, 60])
    path = CameraPath(keys, seconds=3.0, fps=10, is_cycle=is_cycle)
    c2w, fov = path.poses()
    assert len(c2w) == path.frame_count == 30
    # Keyframes are evenly spaced in time: frame i sits at keyframe time i * (K - 1) / (F - 1) (K: with the loop's
    # return to the first).
    spacing = (len(keys) if is_cycle else len(keys) - 1) / (30 if is_cycle else 29)
    for k, key in enumerate(keys):
        frame = k / spacing
        if abs(frame - round(frame)) < 1e-6:
            assert torch.allclose(c2w[round(frame)], key.c2w, atol=1e-5) and abs(fov[round(frame)] - key.fov) < 1e-4
    if not is_cycle:
        assert torch.allclose(c2w[-1], keys[-1].c2w, atol=1e-5)
    # Rotations stay rotations, and the camera's speed changes smoothly (in the loop too: 120 degrees back in
    # the time of 40): no step differs from the next by more than a third of the largest.
    rotations = c2w[:, :, :3]
    assert torch.allclose(rotations @ rotations.transpose(1, 2), torch.eye(3).expand(30, 3, 3), atol=1e-5)
    steps = (c2w[1:, :, 3] - c2w[:-1, :, 3]).norm(dim=-1)
    turns = Rotation.from_matrix(rotations[1:].double().numpy() @ rotations[:-1].double().numpy().transpose(0, 2, 1))
    for speed in (steps.numpy(), turns.magnitude()):
        assert np.abs(np.diff(speed)).max() < speed.max() / 3


def test_camera_path_json_round_trips_and_reads_nerfstudio_files(tmp_path):
    path = CameraPath(keyframes([0, 60, 90], [45, 50, 55]), seconds=2.0, fps=12, height=90, width=160)
    path.save(tmp_path / "path.json")
    again, cameras = load_camera_path(tmp_path / "path.json")
    assert (again.seconds, again.fps, again.height, again.width, again.is_cycle) == (2.0, 12, 90, 160, False)
    assert torch.allclose(again.poses()[0], path.poses()[0], atol=1e-5)  # the keyframes came back
    assert len(cameras) == 24 and torch.allclose(cameras.c2w, path.poses()[0], atol=1e-5)
    assert int(cameras.width[0]) == 160 and int(cameras.height[0]) == 90
    # The vertical fov in degrees, as three.js and nerfstudio define it: tan(fov / 2) = (H / 2) / f.
    assert math.isclose(float(cameras.fy[0]), 45 / math.tan(math.radians(45) / 2), rel_tol=1e-5)

    # nerfstudio's file: frames only (its keyframes are three.js matrices recon does not read).
    doc = json.loads((tmp_path / "path.json").read_text())
    kept = ("camera_type", "render_height", "render_width", "camera_path", "fps", "seconds")
    theirs = {key: doc[key] for key in kept}
    theirs["keyframes"] = [{"matrix": "[1,0,0,0]", "fov": 50, "aspect": 1.0}]
    (tmp_path / "ns.json").write_text(json.dumps(theirs))
    loaded, frames = load_camera_path(tmp_path / "ns.json")
    assert loaded.keyframes == [] and torch.allclose(frames.c2w, cameras.c2w)


@pytest.mark.parametrize("doc, names", [
    ("{", "not a readable JSON file"),
    ({"render_height": 10, "render_width": 10}, "no 'camera_path'"),
    ({"render_height": 10, "render_width": 10, "camera_path": [{"camera_to_world": [1, 2], "fov": 50}]},
     "camera_path[0]: camera_to_world"),
    ({"render_height": 10, "render_width": 10, "camera_path": [{"camera_to_world": [0] * 16, "fov": 500}]},
     "camera_path[0]: fov"),
    ({"render_height": "tall", "render_width": 10, "camera_path": [{"camera_to_world": [0] * 16, "fov": 5}]},
     "render_height"),
    ({"camera_type": "equirectangular", "render_height": 10, "render_width": 10,
      "camera_path": [{"camera_to_world": [0] * 16, "fov": 5}]}, "only perspective"),
])
def test_a_bad_camera_path_file_is_named_with_what_is_wrong(tmp_path, doc, names):
    file = tmp_path / "bad.json"
    file.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    with pytest.raises(ValueError) as error:
        load_camera_path(file)
    assert str(file) in str(error.value) and names in str(error.value)


@pytest.mark.parametrize("captured", [np.arange(0, 360, 30), np.linspace(-60, 50, 12)])
def test_the_home_view_stands_behind_and_above_the_cameras_looking_at_their_target(captured):
    cameras = cameras_at(captured)
    ring, home = Ring.of(cameras), home_pose(cameras)
    offset = home[:, 3] - ring.target
    assert torch.allclose(torch.nn.functional.normalize(-home[:, 2], dim=0), -offset / offset.norm(), atol=1e-5)
    assert offset.norm() > cameras.c2w[:, :, 3].norm(dim=-1).max()  # farther out than every camera
    assert offset @ ring.up > ring.height  # and higher
    if np.ptp(captured) < 180:  # forward-facing: behind the middle of the arc, not behind camera 0
        azimuth = math.degrees(math.atan2(offset[1], offset[0]))
        assert abs(azimuth - (captured.min() + captured.max()) / 2) < 5


def test_depth_normals_of_a_plane_and_a_sphere():
    # A camera at the origin looking down -z at the plane z = -2 tilted about x, then at a unit sphere.
    h = w = 64
    py, px = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    dirs = torch.nn.functional.normalize(torch.stack([(px - 32) / 40, -(py - 32) / 40, -torch.ones(h, w)], -1), dim=-1)
    normal = torch.nn.functional.normalize(torch.tensor([0.0, 0.4, 1.0]), dim=0)
    depth = (-2 * normal[2]) / (dirs @ normal)  # plane n.x = -2 n_z
    ours = depth_normals(dirs * depth[..., None], dirs)
    assert torch.allclose(ours, normal.expand(h, w, 3), atol=1e-4)
    centre = torch.tensor([0.0, 0.0, -3.0])
    b = dirs @ centre
    hit = b**2 - (centre @ centre - 1) > 0
    depth = torch.where(hit, b - (b**2 - (centre @ centre - 1)).clamp(min=0).sqrt(), torch.zeros(()))
    points = dirs * depth[..., None]
    truth = torch.nn.functional.normalize(points - centre, dim=-1)
    inside = hit.clone()
    inside[1:-1, 1:-1] &= hit[:-2, 1:-1] & hit[2:, 1:-1] & hit[1:-1, :-2] & hit[1:-1, 2:]
    inside[[0, -1]] = False
    inside[:, [0, -1]] = False
    error = torch.rad2deg(torch.acos((depth_normals(points, dirs, hit.float()) * truth).sum(-1).clamp(-1, 1)))[inside]
    assert error.median() < 1.0 and error.quantile(0.95) < 5.0
