"""`recon process`: structure from motion on photos and videos of a synthetic capture rendered by the
independent sphere tracer from known cameras; the recovered poses must match the true ones."""

import json
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
from scipy.ndimage import uniform_filter
from scipy.spatial.transform import Rotation

from recon.data.scene import load_scene
from recon.data.sfm import pose_errors, sharpness
from recon.data.synthetic import make_capture

VIEWS = 20
# Tolerances after the similarity alignment, as a rotation angle and a fraction of the cameras' extent:
# SfM on these 256-pixel photos does ~0.1 deg and 0.1%; on the same views through H.264, ~0.4 deg.
MAX_ROTATION_DEG = {"photos": 0.5, "video": 1.0}
MAX_CENTRE_FRACTION = {"photos": 0.005, "video": 0.01}


def recon(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "recon.app.cli", *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def capture(tmp_path_factory) -> Path:
    return make_capture(tmp_path_factory.mktemp("capture"), n_views=VIEWS, resolution=256)


def true_poses(capture: Path, transforms: Path, name_of=lambda file: file) -> tuple[np.ndarray, np.ndarray]:
    """(recovered, true) c2w [N, 3, 4] for the frames of a processed scene's transforms.json."""
    truth = json.loads((capture / "cameras.json").read_text())["poses"]
    frames = json.loads(transforms.read_text())["frames"]
    recovered = np.array([frame["transform_matrix"] for frame in frames])[:, :3]
    return recovered, np.array([truth[name_of(Path(frame["file_path"]).name)] for frame in frames])[:, :3]


def test_pose_errors_are_zero_for_a_similar_copy_and_see_a_turned_camera():
    rng = np.random.default_rng(0)
    poses = np.concatenate([Rotation.random(6, random_state=1).as_matrix(), rng.normal(size=(6, 3, 1))], axis=2)
    turn, shift = Rotation.random(random_state=2).as_matrix(), rng.normal(size=3)
    copy = np.concatenate([turn @ poses[:, :, :3], (2.5 * poses[:, :, 3] @ turn.T + shift)[..., None]], axis=2)
    errors = pose_errors(copy, poses)
    assert errors["rotation_deg"]["max"] < 1e-6 and errors["centre_fraction"]["max"] < 1e-9
    assert errors["scale"] == pytest.approx(1 / 2.5)
    copy[0, :, :3] = copy[0, :, :3] @ Rotation.from_euler("x", 3, degrees=True).as_matrix()
    assert pose_errors(copy, poses)["rotation_deg"]["max"] == pytest.approx(3, abs=1e-6)


def test_process_images_registers_every_view_at_the_true_poses(capture, tmp_path):
    scene = tmp_path / "scene"
    result = recon("process", "images", str(capture / "photos"), str(scene))
    assert result.returncode == 0, result.stderr
    assert f"registered {VIEWS} of {VIEWS} images (100%)" in result.stdout and "warning" not in result.stdout
    report = json.loads((scene / "process.json").read_text())
    assert report["registered"] == VIEWS and report["unregistered"] == [] and report["reprojection_error_px"] < 1

    errors = pose_errors(*true_poses(capture, scene / "transforms.json"))
    assert errors["rotation_deg"]["max"] < MAX_ROTATION_DEG["photos"], errors
    assert errors["centre_fraction"]["max"] < MAX_CENTRE_FRACTION["photos"], errors
    focal = json.loads((capture / "cameras.json").read_text())["focal"]
    assert report["cameras"]["1"]["params"][0] == pytest.approx(focal, rel=0.01)

    # recon fit reads the folder: the transforms.json (with the box around the sparse points kept)
    # rather than the COLMAP model beside it, which gives the same unit frame.
    from_transforms = load_scene(scene)
    assert "instant-ngp" in from_transforms.summary["bounds"]["rule"]
    assert sum(from_transforms.summary["views"].values()) == VIEWS
    (scene / "transforms.json").unlink()
    from_model = load_scene(scene)
    assert from_model.aabb_scale == from_transforms.aabb_scale
    got = from_transforms.splits["train"].cameras.c2w
    np.testing.assert_allclose(got.numpy(), from_model.splits["train"].cameras.c2w.numpy(), atol=1e-4)
    assert iio.imread(scene / "process.png").shape[2] == 3


def test_process_video_keeps_the_sharp_frames_and_registers_them(capture, tmp_path):
    """Each view appears twice in the clip, blurred then sharp: one frame per pair must be the sharp one."""
    frames = []
    for file in sorted((capture / "photos").glob("*.png")):
        image = iio.imread(file)
        frames += [uniform_filter(image, size=(5, 5, 1)), image]
    assert sharpness(frames[0]) < sharpness(frames[1]) / 2
    clip = tmp_path / "clip.mp4"
    iio.imwrite(clip, np.stack(frames), fps=8)

    scene = tmp_path / "scene"
    result = recon("process", "video", str(clip), str(scene), "--frames", str(VIEWS))
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in (scene / "images").iterdir())
    assert names == [f"frame_{2 * i + 1:05d}.png" for i in range(VIEWS)]
    assert f"registered {VIEWS} of {VIEWS}" in result.stdout

    def view_name(frame: str) -> str:
        return f"view_{int(frame[6:11]) // 2:03d}.png"

    errors = pose_errors(*true_poses(capture, scene / "transforms.json", view_name))
    assert errors["rotation_deg"]["max"] < MAX_ROTATION_DEG["video"], errors
    assert errors["centre_fraction"]["max"] < MAX_CENTRE_FRACTION["video"], errors


def test_poor_registration_warns_with_advice(capture, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for file in sorted((capture / "photos").glob("*.png"))[:12]:
        (photos / file.name).write_bytes(file.read_bytes())
    rng = np.random.default_rng(0)
    for i in range(6):  # unrelated pictures: features, but nothing they share with the capture
        iio.imwrite(photos / f"noise_{i}.png", uniform_filter(rng.integers(0, 255, (256, 256, 3), np.uint8), (3, 3, 1)))
    result = recon("process", "images", str(photos), str(tmp_path / "scene"))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "scene" / "process.json").read_text())
    assert report["registered"] == 12 and report["unregistered"] == [f"noise_{i}.png" for i in range(6)]
    assert "warning: only 12 of 18 images registered" in result.stdout and "exhaustive" in result.stdout


def flat_photos(d: Path) -> Path:
    d.mkdir()
    for i in range(3):
        iio.imwrite(d / f"{i}.png", np.full((64, 64, 3), 128, np.uint8))
    return d


def one_photo(d: Path) -> Path:
    d.mkdir()
    iio.imwrite(d / "only.png", np.zeros((16, 16, 3), np.uint8))
    return d


def broken_photo(d: Path) -> Path:
    flat_photos(d)
    (d / "1.png").write_bytes(b"not a png")
    return d


def garbage_video(d: Path) -> Path:
    d.mkdir()
    (d / "clip.mp4").write_bytes(b"\0" * 1000)
    return d / "clip.mp4"


@pytest.mark.parametrize("kind, make_bad, expected", [
    ("images", lambda d: d, "no such folder"),
    ("images", lambda d: (d.mkdir(), d)[1], "found 0"),
    ("images", one_photo, "found 1"),
    ("images", broken_photo, "1.png: unreadable image"),
    ("images", flat_photos, "registered no images"),
    ("video", garbage_video, "unreadable video"),
    ("video", lambda d: d / "missing.mp4", "no such video"),
])
def test_bad_input_is_one_line_exit_2_and_leaves_no_scene(tmp_path, kind, make_bad, expected):
    source = make_bad(tmp_path / "input")
    result = recon("process", kind, str(source), str(tmp_path / "scene"))
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "scene").exists()


def test_process_refuses_a_folder_that_holds_something(capture, tmp_path):
    scene = tmp_path / "scene"
    scene.mkdir()
    (scene / "keep.txt").write_text("mine")
    result = recon("process", "images", str(capture / "photos"), str(scene))
    assert result.returncode == 2 and "not empty" in result.stderr
    assert [p.name for p in scene.iterdir()] == ["keep.txt"]


def test_fit_on_bare_photos_names_recon_process(capture, tmp_path):
    result = recon("fit", str(capture / "photos"), "--out", str(tmp_path / "run"), "--no-viewer")
    assert result.returncode == 2 and "recon process images" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
