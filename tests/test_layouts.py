"""Scene layouts beyond transforms.json: COLMAP models and NeuS cameras, written here from the
synthetic scene's true cameras, must give the same world-frame rays as the transforms.json."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pycolmap
import pytest
import torch
import trimesh

from recon.data.cameras import Cameras
from recon.data.colmap import MODELS, _intrinsics
from recon.data.loaders import SceneError
from recon.data.scene import load_scene

FLIP = np.diag([1.0, -1.0, -1.0])  # OpenGL <-> OpenCV camera axes


def true_views(scene: Path) -> list[dict]:
    """Every view of the synthetic scene: name, RGBA image, OpenGL c2w [4, 4], focal."""
    views = []
    for split in ("train", "test"):
        doc = json.loads((scene / f"transforms_{split}.json").read_text())
        for frame in doc["frames"]:
            image = iio.imread(scene / f"{frame['file_path']}.png")
            focal = 0.5 * image.shape[1] / np.tan(0.5 * doc["camera_angle_x"])
            views.append({"name": f"{split}_{Path(frame['file_path']).name}.png", "image": image,
                          "c2w": np.array(frame["transform_matrix"]), "focal": focal})
    return views


def world_rays(scene, split: str, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Camera i's pixel rays mapped back to the user's world frame."""
    rays = scene.splits[split].cameras.image_rays(i)
    m = torch.linalg.inv(scene.to_unit.double())
    origins = rays.origins.double() @ m[:3, :3].T + m[:3, 3]
    return origins, torch.nn.functional.normalize(rays.dirs.double() @ m[:3, :3].T, dim=-1)


def assert_same_rays(scene, reference, atol=1e-4):
    for split in ("train", "test"):
        names = [Path(n).name for n in scene.splits[split].names]
        for i, name in enumerate(names):
            split_ref, j = next((s, k) for s in ("train", "test")
                                for k, n in enumerate(reference.splits[s].names) if f"{s}_{Path(n).name}" == name)
            for got, want in zip(world_rays(scene, split, i), world_rays(reference, split_ref, j)):
                torch.testing.assert_close(got, want, atol=atol, rtol=0)


def write_colmap_text(scene: Path, out: Path, points: int = 500) -> Path:
    """The legacy 3-file text model (as COLMAP writes it) and RGB images under out/."""
    model, images = out / "sparse" / "0", out / "images"
    model.mkdir(parents=True)
    images.mkdir()
    views = true_views(scene)
    h, w = views[0]["image"].shape[:2]
    cameras = [f"1 SIMPLE_PINHOLE {w} {h} {views[0]['focal']} {w / 2} {h / 2}"]
    lines = []
    for i, view in enumerate(views, start=1):
        rgba = view["image"] / 255.0
        iio.imwrite(images / view["name"],
                    (255 * (rgba[..., :3] * rgba[..., 3:] + 1 - rgba[..., 3:])).round().astype(np.uint8))
        c2w_cv = view["c2w"][:3, :3] @ FLIP
        w2c_rot, centre = c2w_cv.T, view["c2w"][:3, 3]
        x, y, z, qw = pycolmap.Rotation3d(w2c_rot).quat  # Eigen's (x, y, z, w)
        t = -w2c_rot @ centre
        lines += [f"{i} {qw} {x} {y} {z} {t[0]} {t[1]} {t[2]} 1 {view['name']}", ""]
    surface = trimesh.sample.sample_surface(trimesh.load(scene / "mesh.ply"), points, seed=0)[0]
    rows = [f"{k + 1} {p[0]} {p[1]} {p[2]} 128 128 128 0.5" for k, p in enumerate(surface)]
    (model / "cameras.txt").write_text("\n".join(cameras) + "\n")
    (model / "images.txt").write_text("\n".join(lines) + "\n")
    (model / "points3D.txt").write_text("\n".join(rows) + "\n")
    return out


def write_neus(scene: Path, out: Path, scale: float = 0.8, shift=(0.1, -0.2, 0.05)) -> Path:
    """cameras_sphere.npz (projections at a negative arbitrary scale), image/ and mask/."""
    (out / "image").mkdir(parents=True)
    (out / "mask").mkdir()
    arrays = {}
    for i, view in enumerate(true_views(scene)):
        iio.imwrite(out / "image" / f"{i:03d}.png", view["image"][..., :3])
        iio.imwrite(out / "mask" / f"{i:03d}.png", np.repeat(view["image"][..., 3:], 3, axis=2))
        h, w = view["image"].shape[:2]
        k = np.array([[view["focal"], 0, w / 2 - 0.5], [0, view["focal"], h / 2 - 0.5], [0, 0, 1]])  # IDR pixel centres
        c2w_cv = view["c2w"][:3, :3] @ FLIP
        w2c = np.concatenate([c2w_cv.T, -c2w_cv.T @ view["c2w"][:3, 3:]], axis=1)
        arrays[f"world_mat_{i}"] = np.concatenate([-2.5 * k @ w2c, [[0, 0, 0, 1]]])
        scale_mat = np.eye(4)
        scale_mat[:3, :3] *= scale
        scale_mat[:3, 3] = shift
        arrays[f"scale_mat_{i}"] = scale_mat
    np.savez(out / "cameras_sphere.npz", **arrays)
    return out


@pytest.fixture(scope="module")
def reference(tiny_scene):
    return load_scene(tiny_scene)


@pytest.fixture(scope="module")
def colmap_scene(tiny_scene, tmp_path_factory):
    return write_colmap_text(tiny_scene, tmp_path_factory.mktemp("colmap"))


def test_colmap_text_model_gives_the_true_rays_and_a_box_around_the_object(colmap_scene, reference, tiny_scene):
    scene = load_scene(colmap_scene)
    assert "COLMAP text model" in scene.summary["convention"]
    assert len(scene.splits["train"]) + len(scene.splits["test"]) == 44
    assert_same_rays(scene, reference)
    # Reoriented: the synthetic world's up (+z) stays up in the unit frame.
    up = scene.to_unit[:3, :3].double() @ torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    assert torch.rad2deg(torch.arccos(up[2] / up.norm())) < 5
    # The object fills the central box; cameras 3 object radii away make it unbounded.
    vertices = torch.tensor(trimesh.load(tiny_scene / "mesh.ply").vertices, dtype=torch.float64)
    unit = vertices @ scene.to_unit[:3, :3].double().T + scene.to_unit[:3, 3].double()
    assert unit.abs().max() < 1.2 and unit.abs().max(0).values.max() > 0.8
    assert scene.unbounded and (scene.aabb[0] < -1).all()


def colmap_binary(colmap_scene: Path, d: Path) -> Path:
    """The text model rewritten by pycolmap as binary: the 5-file layout with rigs and frames."""
    shutil.copytree(colmap_scene / "images", d / "images")
    (d / "sparse" / "0").mkdir(parents=True)
    pycolmap.Reconstruction(str(colmap_scene / "sparse" / "0")).write_binary(str(d / "sparse" / "0"))
    return d


def test_colmap_binary_five_file_model_equals_the_text_one(colmap_scene, tmp_path):
    binary = colmap_binary(colmap_scene, tmp_path / "binary")
    assert (binary / "sparse" / "0" / "rigs.bin").is_file()
    text, binary_scene = load_scene(colmap_scene), load_scene(binary)
    assert "COLMAP binary model" in binary_scene.summary["convention"]
    torch.testing.assert_close(binary_scene.to_unit, text.to_unit)
    torch.testing.assert_close(binary_scene.splits["train"].cameras.c2w, text.splits["train"].cameras.c2w)


@pytest.mark.parametrize("model", sorted(MODELS))
def test_colmap_camera_models_project_as_colmap_does(model):
    focals, slots, _ = MODELS[model]
    params = [300.0, 310.0][:focals] + [64.3, 47.8] + [0.05, -0.02, 0.004, 0.003][: len(slots)]
    colmap_camera = pycolmap.Camera(model=model, width=128, height=96, params=params)
    size, (fx, fy, cx, cy), distortion, fisheye = _intrinsics(Path("cameras.txt"), colmap_camera)
    ours = Cameras(c2w=torch.eye(3, 4, dtype=torch.float64)[None],  # the world is the OpenGL camera frame
                   **{k: torch.tensor([v], dtype=torch.float64) for k, v in dict(fx=fx, fy=fy, cx=cx, cy=cy).items()},
                   width=torch.tensor([size[0]]), height=torch.tensor([size[1]]),
                   distortion=torch.tensor([distortion], dtype=torch.float64), fisheye=torch.tensor([fisheye]))
    points = np.random.default_rng(0).uniform([-0.2, -0.15, 0.8], [0.2, 0.15, 1.5], (64, 3))  # OpenCV camera frame
    px, py, _ = ours.project(torch.tensor(points * [1, -1, -1]))  # the same points in the OpenGL frame
    expected = colmap_camera.img_from_cam(points)
    np.testing.assert_allclose(torch.stack([px[0], py[0]], 1).numpy(), expected, atol=1e-6)


def test_neus_cameras_and_masks(tiny_scene, reference, tmp_path):
    scene = load_scene(write_neus(tiny_scene, tmp_path / "neus"))
    assert "NeuS/IDR" in scene.summary["convention"] and not scene.unbounded
    expected = np.linalg.inv(np.diag([0.8, 0.8, 0.8, 1.0])
                             + np.pad(np.array([[0.1], [-0.2], [0.05]]), ((0, 1), (3, 0))))
    np.testing.assert_allclose(scene.to_unit.numpy(), expected, atol=1e-6)
    views = true_views(tiny_scene)
    for split in ("train", "test"):
        for i, name in enumerate(scene.splits[split].names):
            view = views[int(Path(name).stem)]
            ref_split = view["name"].split("_")[0]
            j = next(k for k, n in enumerate(reference.splits[ref_split].names)
                     if view["name"] == f"{ref_split}_{Path(n).name}")
            for got, want in zip(world_rays(scene, split, i), world_rays(reference, ref_split, j)):
                torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
            alpha = scene.splits[split].image(i)[..., 3]
            np.testing.assert_allclose(alpha.numpy(), view["image"][..., 3] / 255, atol=1e-6)


def recon(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "recon.app.cli", *args], capture_output=True, text=True)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def resized_image(colmap_scene: Path, d: Path) -> Path:
    shutil.copytree(colmap_scene, d / "s")
    first = sorted((d / "s" / "images").iterdir())[0]
    iio.imwrite(first, np.zeros((10, 12, 3), np.uint8))
    return d / "s"


def single_image(colmap_scene: Path, d: Path) -> Path:
    shutil.copytree(colmap_scene, d / "s")
    for image in sorted((d / "s" / "images").iterdir())[1:]:
        image.unlink()
    return d / "s"


def not_an_image(colmap_scene: Path, d: Path) -> Path:
    shutil.copytree(colmap_scene, d / "s")
    sorted((d / "s" / "images").iterdir())[0].write_text("not a picture")
    return d / "s"


@pytest.mark.parametrize("make_bad, expected", [
    (lambda c, d: d, "no scene found"),
    (lambda c, d: (iio.imwrite(d / "a.png", np.zeros((4, 4, 3), np.uint8)), d)[1], "images without camera poses"),
    (lambda c, d: (lambda s: (truncate(s / "sparse" / "0" / "images.bin"), s)[1])(colmap_binary(c, d)), "truncated"),
    (lambda c, d: (lambda s: (truncate(s / "sparse" / "0" / "cameras.bin"), s)[1])(colmap_binary(c, d)), "truncated"),
    (resized_image, "but its COLMAP camera says 48x48"),
    (single_image, "only 1 of 44 frames have an image; 2 needed"),
    (not_an_image, "unreadable image"),
], ids=["unknown layout", "bare images", "truncated images.bin", "truncated cameras.bin", "mismatched size",
        "single image", "not an image"])
def test_bad_layouts_are_one_line_exit_2(colmap_scene, tmp_path, make_bad, expected):
    bad = make_bad(colmap_scene, tmp_path)
    with pytest.raises(SceneError) as error:
        load_scene(bad)
    assert expected in str(error.value) and "\n" not in str(error.value)
    result = recon("fit", str(bad), "--out", str(tmp_path / "run"), "--no-viewer")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("layout", ["colmap", "neus"])
def test_convert_writes_a_transforms_scene_with_the_same_rays(layout, colmap_scene, tiny_scene, tmp_path):
    source = colmap_scene if layout == "colmap" else write_neus(tiny_scene, tmp_path / "neus")
    result = recon("convert", str(source), str(tmp_path / "converted"))
    assert result.returncode == 0, result.stderr
    original, converted = load_scene(source), load_scene(tmp_path / "converted")
    assert "transforms" in converted.summary["convention"]
    # The layout's box travels as instant-ngp keys, so recon fits the result in the same unit frame.
    assert "instant-ngp" in converted.summary["bounds"]["rule"]
    torch.testing.assert_close(converted.aabb, torch.tensor([[-1.0] * 3, [1.0] * 3]) * converted.aabb_scale)
    assert converted.aabb_scale == original.aabb_scale
    for split in ("train", "test"):
        assert len(converted.splits[split]) == len(original.splits[split])
        for i in range(len(original.splits[split])):
            got, want = converted.splits[split].cameras.image_rays(i), original.splits[split].cameras.image_rays(i)
            torch.testing.assert_close(got.origins, want.origins, atol=1e-4, rtol=0)
            torch.testing.assert_close(got.dirs, want.dirs, atol=1e-4, rtol=0)
            torch.testing.assert_close(converted.splits[split].image(i), original.splits[split].image(i))
    again = recon("convert", str(source), str(tmp_path / "converted"))
    assert again.returncode == 2 and "not empty" in again.stderr


def test_exif_orientation_is_ignored_as_colmap_ignores_it(tmp_path):
    """COLMAP registers the stored pixels, not the EXIF-rotated picture, so recon reads them the same way."""
    from PIL import Image

    from recon.data.loaders import read_image

    pixels = np.random.default_rng(0).integers(0, 255, (12, 20, 3), dtype=np.uint8)
    picture = Image.fromarray(pixels)
    exif = picture.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    picture.save(tmp_path / "photo.png", exif=exif)
    assert Image.open(tmp_path / "photo.png").getexif()[0x0112] == 6
    np.testing.assert_array_equal(read_image(tmp_path / "photo.png"), pixels)


def write_llff(out: Path, c2w_opengl: np.ndarray, focal: float, size: tuple[int, int], folders: tuple[int, ...],
               bounds: tuple[float, float] = (2.0, 6.0)) -> Path:
    """poses_bounds.npy as LLFF's imgs2poses writes it (rotation columns down, right, back; a fifth column of
    full-size height, width, focal; near and far) and images_N/ folders of plain images of the sizes it implies."""
    n = len(c2w_opengl)
    to_llff = np.array([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # right, up, back -> down, right, back
    rows = []
    for pose in c2w_opengl:
        matrix = np.concatenate([pose[:3, :3] @ to_llff, pose[:3, 3:4], [[size[1]], [size[0]], [focal]]], axis=1)
        rows.append(np.concatenate([matrix.reshape(-1), bounds]))
    out.mkdir(parents=True)
    np.save(out / "poses_bounds.npy", np.array(rows))
    for factor in folders:
        folder = out / ("images" if factor == 1 else f"images_{factor}")
        folder.mkdir()
        for i in range(n):
            image = np.full((size[1] // factor, size[0] // factor, 3), 40 * (i % 6), np.uint8)
            iio.imwrite(folder / f"image{i:03d}.png", image)
    return out


def original_llff_c2w(table: np.ndarray) -> np.ndarray:
    """The original NeRF loader's step (load_llff.py): poses [3, 5, N] become [right, up, back] by taking
    column 1, minus column 0 and column 2, before its rescaling and recentring."""
    poses = table[:, :-2].reshape([-1, 3, 5]).transpose([1, 2, 0])
    poses = np.concatenate([poses[:, 1:2, :], -poses[:, 0:1, :], poses[:, 2:, :]], 1)
    return poses[:, :4, :].transpose([2, 0, 1])


def test_llff_poses_follow_the_original_loader_and_images_n_follows_downscale(tmp_path):
    """A forward-facing grid of 9 cameras looking down -z at a scene 2 to 6 units away: the poses are the
    original loader's, images_N is read for --downscale N (its focal the full one over N), every 8th image is
    held out, and the box covers the frusta between the bounds with every camera inside."""
    from geometry import look_at

    eyes = [(x, y, 0.0) for y in (-0.5, 0.0, 0.5) for x in (-0.6, 0.0, 0.6)]
    c2w = np.stack([look_at(np.array(eye), target=np.array([0.0, 0.0, -4.0]), up=np.array([0.0, 1.0, 0.0]))
                    for eye in eyes])
    folder = write_llff(tmp_path / "ff", c2w, focal=40.0, size=(48, 32), folders=(1, 2))
    table = np.load(folder / "poses_bounds.npy")
    np.testing.assert_allclose(original_llff_c2w(table)[:, :, :3], c2w[:, :3, :3], atol=1e-12)

    scene = load_scene(folder, downscale=2)
    assert "LLFF" in scene.summary["convention"] and "images_2/" in scene.summary["convention"]
    assert scene.summary["views"] == {"train": 7, "test": 2}  # images 0 and 8 held out
    train = scene.splits["train"]
    assert Path(train.names[0]).parent.name == "images_2" and int(train.cameras.width[0]) == 24
    assert float(train.cameras.fx[0]) == pytest.approx(20.0) and float(train.cameras.cx[0]) == 12.0
    world = train.cameras.transformed(torch.linalg.inv(scene.to_unit))
    kept = [i for i in range(9) if i % 8]
    np.testing.assert_allclose(world.c2w.numpy(), original_llff_c2w(table)[kept][:, :3, :4], atol=1e-5)
    assert "near and far bounds" in scene.summary["bounds"]["rule"]
    centre = torch.tensor([0.0, 0.0, -4.0, 1.0]) @ scene.to_unit.T  # the middle of the bounds, in the box
    assert ((centre[:3] > scene.aabb[0]) & (centre[:3] < scene.aabb[1])).all()
    positions = train.cameras.c2w[:, :, 3]
    assert ((positions > scene.aabb[0]) & (positions < scene.aabb[1])).all()
    # NeRF's near plane, 0.75 x the nearest bound, where the proposal sampler's steps even in disparity start
    assert scene.forward_facing and "disparity" in scene.describe()
    assert scene.near == pytest.approx(0.75 * table[:, 15].min() * float(scene.to_unit[0, :3].norm()), rel=1e-5)

    shrunk = load_scene(folder, downscale=4)  # no images_4/: images/ read and shrunk
    assert int(shrunk.splits["train"].cameras.width[0]) == 12 and "images/" in shrunk.summary["convention"]
    shutil.rmtree(folder / "images")
    with pytest.raises(SceneError, match="no images_4/ .* this capture has --downscale 2"):
        load_scene(folder, downscale=4)
    (folder / "images_2" / "image003.png").unlink()
    with pytest.raises(SceneError, match="8 images for the 9 poses"):
        load_scene(folder, downscale=2)
