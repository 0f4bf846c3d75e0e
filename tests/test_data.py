"""Scene loading: conventions, splits, images, bounds and errors, on tiny scenes written to tmp_path."""

import json
import math
import struct
import zlib
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from geometry import look_at

from recon.data.convert import write_transforms
from recon.data.scene import SceneError, load_scene, read_capture

SHARED = Path("/work/shared/data")


def ring(n, radius=3.0, height=1.0):
    """n cameras around the origin looking at it, alternately above and below."""
    return [
        look_at((radius * math.cos(a), radius * math.sin(a), height * (-1) ** i))
        for i, a in enumerate(np.linspace(0, 2 * math.pi, n, endpoint=False))
    ]


def rgba(w=16, h=12, value=200):
    return np.full((h, w, 4), value, np.uint8)


def write_frames(folder, poses, images=None, sub="img", with_ext=True, missing=()):
    """Write the images (skipping indices in `missing`) and return their transforms frames."""
    (folder / sub).mkdir(parents=True, exist_ok=True)
    frames = []
    for i, pose in enumerate(poses):
        if i not in missing:
            iio.imwrite(folder / sub / f"v{i}.png", rgba() if images is None else images[i])
        path = f"./{sub}/v{i}" + (".png" if with_ext else "")
        frames.append({"file_path": path, "transform_matrix": pose.tolist()})
    return frames


def write_json(path, doc):
    path.write_text(json.dumps(doc, indent=1))
    return path


def lone_scene(folder, n=10, doc=None, **kwargs):
    """A lone transforms.json with camera_angle_x (plus `doc` keys) and n ring views."""
    folder.mkdir(parents=True, exist_ok=True)
    frames = write_frames(folder, ring(n), **kwargs)
    return write_json(folder / "transforms.json", {"camera_angle_x": 0.8, **(doc or {}), "frames": frames})


def write_png16(path, image):
    """A 16-bit PNG by hand (imageio's Pillow cannot write 16-bit colour)."""
    h, w, c = image.shape
    rows = b"".join(b"\x00" + image[j].astype(">u2").tobytes() for j in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, {3: 2, 4: 6}[c], 0, 0, 0)
    chunks = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunks)


def test_blender_split_files_with_extensionless_paths(tmp_path):
    counts = {"train": 5, "val": 2, "test": 3}
    images = [rgba(value=10 * i) for i in range(5)]
    for split, n in counts.items():
        frames = write_frames(tmp_path, ring(n), images[:n], sub=split, with_ext=False)
        write_json(tmp_path / f"transforms_{split}.json", {"camera_angle_x": 0.8, "frames": frames})
    scene = load_scene(tmp_path)
    assert {k: len(v) for k, v in scene.splits.items()} == counts
    train = scene.splits["train"]
    assert train.names[3] == str(tmp_path / "train" / "v3.png")
    assert train.pixels.dtype == torch.uint8 and train.pixels.shape == (5 * 16 * 12, 4) and train.has_alpha
    assert train.offsets.tolist() == [i * 192 for i in range(6)]
    assert torch.allclose(train.image(3), torch.full((12, 16, 4), 30 / 255))
    assert torch.allclose(train.cameras.fx, torch.full((5,), 8 / math.tan(0.4)))
    assert train.cameras.cx.tolist() == [8.0] * 5 and train.cameras.cy.tolist() == [6.0] * 5
    assert scene.summary["views"] == counts
    # A transforms file names the same scene.
    again = load_scene(tmp_path / "transforms_val.json")
    assert again.splits["train"].names == train.names and torch.equal(again.to_unit, scene.to_unit)


def test_lone_file_holds_out_every_8th_frame(tmp_path):
    path = lone_scene(tmp_path, n=17, doc={"fl_x": 20.0})  # fl_x wins over camera_angle_x
    scene = load_scene(path)
    assert [Path(n).name for n in scene.splits["test"].names] == ["v0.png", "v8.png", "v16.png"]
    assert len(scene.splits["train"]) == 14 and "val" not in scene.splits
    cams = scene.splits["train"].cameras
    assert cams.fx.tolist() == [20.0] * 14 and cams.fy.tolist() == [20.0] * 14  # fl_y defaults to fl_x
    assert cams.width.tolist() == [16] * 14 and cams.height.tolist() == [12] * 14  # from the images
    assert "every 8th" in scene.summary["convention"]


def test_per_frame_cameras_and_sampling(tmp_path):
    """Cameras may differ in size; sample() returns the colour of the pixel its ray goes through."""
    sizes = [(16, 12), (10, 14), (20, 8), (16, 12), (12, 12)]
    images = []
    for c, (w, h) in enumerate(sizes):
        j, i = np.mgrid[:h, :w]
        images.append(np.stack([i, j, np.full_like(i, c), np.full_like(i, 255)], -1).astype(np.uint8))
    frames = write_frames(tmp_path, ring(5), images)
    for frame, (w, h) in zip(frames, sizes):
        frame |= {"w": w, "h": h, "fl_x": 2.0 * w}  # per-frame intrinsics override the top level
    write_json(tmp_path / "transforms.json", {"fl_x": 1.0, "aabb_scale": 1, "frames": frames})
    train = load_scene(tmp_path).splits["train"]
    assert train.cameras.width.tolist() == [10, 20, 16, 12] and train.cameras.fx.tolist() == [20.0, 40.0, 32.0, 24.0]
    assert [tuple(train.image(k).shape) for k in range(4)] == [(14, 10, 4), (8, 20, 4), (12, 16, 4), (12, 12, 4)]

    batch = train.sample(500, torch.Generator().manual_seed(0))
    rays, colour, cam = batch.rays, batch.colours, batch.cameras
    i, j, view = (colour[:, :3] * 255).round().long().unbind(1)
    assert torch.equal(cam, view - 1)  # view 0 is the held-out test image
    expected = train.cameras.rays(cam, i + 0.5, j + 0.5)
    assert torch.allclose(rays.dirs, expected.dirs) and torch.allclose(rays.origins, expected.origins)
    assert len(set(cam.tolist())) == 4  # every image is sampled


def test_parent_paths_are_resolved_and_reported(tmp_path):
    frames = write_frames(tmp_path, ring(4), sub="shared", with_ext=False)
    for f in frames:
        f["file_path"] = "../" + f["file_path"][2:]
    (tmp_path / "scene").mkdir()
    write_json(tmp_path / "scene" / "transforms.json", {"camera_angle_x": 0.8, "frames": frames})
    scene = load_scene(tmp_path / "scene")
    assert scene.splits["test"].names == [str(tmp_path / "shared" / "v0.png")]
    assert scene.summary["parent_paths"][0] == str(tmp_path / "shared" / "v0.png")
    assert "'..'" in scene.describe()


def test_missing_images_are_skipped_with_one_line(tmp_path):
    scene = load_scene(lone_scene(tmp_path, n=12, missing=(2, 5, 6)))
    assert len(scene.splits["train"]) + len(scene.splits["test"]) == 9
    assert [s["images"] for s in scene.summary["skipped"]] == [[str(tmp_path / "img" / f"v{i}.png") for i in (2, 5, 6)]]
    lines = [line for line in scene.describe().splitlines() if "skipped" in line]
    assert len(lines) == 1 and "3 of 12" in lines[0]


def test_ngp_bounds_arithmetic(tmp_path):
    scale, offset, aabb_scale = 0.5, [0.1, 0.2, 0.3], 2
    scene = load_scene(lone_scene(tmp_path, n=6, doc={"scale": scale, "offset": offset, "aabb_scale": aabb_scale}))
    expected = np.eye(4)
    expected[:3, :3] *= 2 * scale
    expected[:3, 3] = [-0.8, -0.6, -0.4]  # 2 * offset - 1
    assert np.allclose(scene.to_unit.numpy(), expected, atol=1e-7)
    assert scene.aabb.tolist() == [[-2.0] * 3, [2.0] * 3]
    assert scene.unbounded and scene.near == 0.2 and scene.cone_angle == 1 / 256
    # instant-ngp's own steps: p * scale + offset, then its axis cycle (x, y, z) <- (y, z, x);
    # its [0, 1]^3 cube maps to [-1, 1]^3 once the cycle is undone.
    pose = ring(6)[1]
    rv = pose[:3, 3] * scale + np.array(offset)
    ngp = np.array([rv[1], rv[2], rv[0]])
    unit = 2 * np.array([ngp[2], ngp[0], ngp[1]]) - 1
    assert np.allclose(scene.splits["train"].cameras.c2w[0, :, 3].numpy(), unit, atol=1e-6)
    world = np.array(scene.summary["bounds"]["world_box"])
    assert np.allclose(world, [[-2 - (-0.8), -2 - (-0.6), -2 - (-0.4)], [2.8, 2.6, 2.4]], atol=1e-6)


def test_ngp_defaults_and_near_plane(tmp_path):
    # Lego-like: cameras at radius 4 and only aabb_scale 1 -> scale 0.33, offset 0.5: a +-1/0.66 world box.
    (tmp_path / "far").mkdir()
    frames = write_frames(tmp_path / "far", [look_at((4 * math.cos(a), 4 * math.sin(a), 0.5)) for a in range(4)])
    write_json(tmp_path / "far" / "transforms.json", {"camera_angle_x": 0.8, "aabb_scale": 1, "frames": frames})
    scene = load_scene(tmp_path / "far")
    assert np.allclose(scene.summary["bounds"]["world_box"], [[-1 / 0.66] * 3, [1 / 0.66] * 3], atol=1e-5)
    assert not scene.unbounded and scene.near == 0.0 and scene.cone_angle == 0.0
    # Cameras inside the box need a near plane.
    scene = load_scene(lone_scene(tmp_path / "near", n=4, doc={"aabb_scale": 1}))  # radius ~3.2 * 0.66 > 1: outside
    assert scene.near == 0.0
    scene = load_scene(lone_scene(tmp_path / "inside", n=4, doc={"scale": 0.1}))
    assert scene.near == 0.2 and not scene.unbounded


def sphere_views(centre, radius, poses, size=48, angle=0.9, samples=4):
    """RGBA images of a white sphere, alpha = pixel coverage (supersampled), by numpy ray casting."""
    f = 0.5 * size / math.tan(angle / 2)
    sub = (np.arange(size * samples) + 0.5) / samples  # sub-pixel sample positions
    x, y = np.meshgrid((sub - size / 2) / f, -(sub - size / 2) / f)  # OpenGL camera: y up, looking down -z
    images = []
    for pose in poses:
        d = np.stack([x, y, -np.ones_like(x)], -1) @ pose[:3, :3].T
        d /= np.linalg.norm(d, axis=-1, keepdims=True)
        v = centre - pose[:3, 3]
        t = d @ v
        hit = (t > 0) & (np.linalg.norm(v - t[..., None] * d, axis=-1) < radius)
        cover = hit.reshape(size, samples, size, samples).mean(axis=(1, 3))
        image = np.full((size, size, 4), 255, np.uint8)
        image[..., 3] = np.round(cover * 255)
        images.append(image)
    return images


def test_frustum_and_visual_hull_bounds(tmp_path):
    centre, radius = np.array([0.3, -0.2, 0.1]), 0.5
    poses = [look_at((3 * math.cos(a) * math.cos(e), 3 * math.sin(a) * math.cos(e), 3 * math.sin(e)))
             for a, e in zip(np.linspace(0, 2 * math.pi, 16, endpoint=False), [0.5, -0.5, 0.1, 1.0] * 4)]
    images = sphere_views(centre, radius, poses)
    boxes = {}
    for kind, ims in {"hull": images, "frustum": [im[..., :3] for im in images]}.items():
        for split in ("train", "test"):
            frames = write_frames(tmp_path / kind, poses, ims, sub=split)
            write_json(tmp_path / kind / f"transforms_{split}.json", {"camera_angle_x": 0.9, "frames": frames})
        scene = load_scene(tmp_path / kind)
        box = np.array(scene.summary["bounds"]["world_box"])
        # The true object lies inside, in world units and in the unit frame.
        assert (box[0] < centre - radius).all() and (box[1] > centre + radius).all(), (kind, box)
        m = scene.to_unit.numpy()
        assert np.allclose(box @ m[:3, :3].T + m[:3, 3], scene.aabb.numpy(), atol=1e-5)
        assert scene.aabb.abs().max() == pytest.approx(1.0) and scene.near == 0.0
        assert kind in scene.summary["bounds"]["rule"].replace("visual ", "").replace(" intersection", "")
        boxes[kind] = box
    hull, frustum = boxes["hull"], boxes["frustum"]
    assert (hull[0] >= frustum[0]).all() and (hull[1] <= frustum[1]).all()
    assert np.prod(hull[1] - hull[0]) < 0.5 * np.prod(frustum[1] - frustum[0])
    # Tight: within the voxels' footprints (a voxel is carved only when all of it is seen empty: here about a
    # 48-pixel image's pixel), one voxel of dilation and the margin.
    assert (hull[1] - hull[0] < 2 * radius + 0.55).all()


def test_16_bit_and_greyscale_images(tmp_path):
    deep = (np.random.default_rng(0).random((12, 16, 4)) * 65535).astype(np.uint16)
    images = [None, deep, np.full((12, 16), 100, np.uint8)]
    (tmp_path / "img").mkdir()
    frames = write_frames(tmp_path, ring(3), [rgba()] * 3)
    write_png16(tmp_path / "img" / "v1.png", deep)
    iio.imwrite(tmp_path / "img" / "v2.png", images[2])
    write_json(tmp_path / "transforms.json", {"camera_angle_x": 0.8, "aabb_scale": 1, "frames": frames})
    train = load_scene(tmp_path).splits["train"]
    assert train.pixels.dtype == torch.float16 and train.has_alpha  # one layout for the whole scene
    assert torch.allclose(train.image(0), torch.from_numpy(deep / 65535).float(), atol=1e-3)
    grey = train.image(1)  # greyscale becomes RGB, with an opaque alpha
    assert torch.allclose(grey[..., :3], torch.full((12, 16, 3), 100 / 255), atol=1e-3) and (grey[..., 3] == 1).all()
    half = load_scene(tmp_path, downscale=2).splits["train"].image(0)  # 16-bit area averaging
    alpha = deep[..., 3].reshape(6, 2, 8, 2).mean(axis=(1, 3)) / 65535
    assert torch.allclose(half[..., 3], torch.from_numpy(alpha).float(), atol=1e-3)


def test_downscale_averages_and_scales_intrinsics(tmp_path):
    image = np.zeros((7, 9, 4), np.uint8)  # odd sizes: the last row and column are cropped
    image[:2, :2] = [[[200, 100, 0, 255], [0, 0, 0, 0]], [[100, 50, 0, 255], [0, 0, 0, 0]]]
    path = lone_scene(tmp_path, n=3, images=[image] * 3, doc={"fl_x": 10.0, "cx": 4.0, "cy": 3.0, "aabb_scale": 1})
    scene = load_scene(path, downscale=2)
    train = scene.splits["train"]
    cams = train.cameras
    assert (cams.width[0].item(), cams.height[0].item()) == (4, 3)
    assert (cams.fx[0].item(), cams.cx[0].item(), cams.cy[0].item()) == (5.0, 2.0, 1.5)
    # Colour averaged over the opaque pixels only; alpha averaged over all four.
    assert train.pixels[0].tolist() == [150, 75, 0, 128]
    assert scene.summary["downscale"] == 2 and scene.summary["image_sizes"] == {"4x3": 3}


def test_loss_masks_and_depth_maps(tmp_path):
    """nerfstudio's mask_path keeps masked pixels out of every batch; depth_file_path (16-bit PNG in mm, or
    .npy times depth_unit_scale_factor) becomes distances along the rays in the unit frame."""
    poses = ring(4)
    frames = write_frames(tmp_path, poses)
    (tmp_path / "masks").mkdir()
    for i, frame in enumerate(frames):
        mask = np.full((12, 16), 255, np.uint8)
        mask[:, : 4 * (i + 1) - 1] = 0  # the left columns are out of the loss
        iio.imwrite(tmp_path / "masks" / f"m{i}.png", mask)
        frame["mask_path"] = f"masks/m{i}.png"
    write_png16(tmp_path / "d0.png", np.full((12, 16, 3), 2500, np.uint16))  # 2.5 m as millimetres
    np.save(tmp_path / "d1.npy", np.full((12, 16), 3000.0))
    frames[0]["depth_file_path"], frames[1]["depth_file_path"] = "d0.png", "d1.npy"
    write_json(tmp_path / "transforms_train.json", {"camera_angle_x": 0.8, "aabb_scale": 1, "frames": frames[:3]})
    write_json(tmp_path / "transforms_test.json", {"camera_angle_x": 0.8, "aabb_scale": 1, "frames": frames[3:]})
    scene = load_scene(tmp_path)
    train = scene.splits["train"]
    assert scene.summary["loss_masks"] == 4 and scene.summary["depth_maps"] == 2
    assert len(train.usable) == sum(12 * (16 - (4 * (i + 1) - 1)) for i in range(3))
    batch = train.sample(4000, torch.Generator().manual_seed(0))
    assert set(batch.cameras.tolist()) == {0, 1, 2}
    for cam in range(3):  # no sampled ray goes through a masked pixel
        picked = batch.rays.dirs[batch.cameras == cam]
        forward = -train.cameras.c2w[cam, :, 2]
        local_x = picked @ train.cameras.c2w[cam, :, 0] / (picked @ forward)
        px = local_x * train.cameras.fx[cam] + train.cameras.cx[cam]
        assert (px > 4 * (cam + 1) - 1).all()
    scale = float(scene.to_unit[0, :3].norm())
    z = (batch.rays.dirs * -train.cameras.c2w[batch.cameras, :, 2]).sum(-1) * batch.depths  # back to z-depth
    expected = torch.tensor([2.5, 3.0, 0.0])[batch.cameras] * scale
    torch.testing.assert_close(z, expected, atol=1e-5, rtol=1e-5)
    # recon convert keeps both.
    write_transforms(read_capture(tmp_path, 1), tmp_path / "converted")
    converted = load_scene(tmp_path / "converted").splits["train"]
    assert torch.equal(converted.usable, train.usable)
    torch.testing.assert_close(converted.depth, train.depth)


def test_automatic_downscale_fits_the_pixel_budget(tmp_path):
    """downscale 0: the smallest factor whose decoded pixels fit the budget, chosen from the files' headers,
    and said so."""
    lone_scene(tmp_path, n=10)  # ten 16x12 RGBA images: 7680 bytes of pixels
    assert load_scene(tmp_path, downscale=0, budget=10_000).summary["downscale"] == 1
    scene = load_scene(tmp_path, downscale=0, budget=2_000)
    assert scene.summary["downscale"] == 2 and scene.splits["train"].cameras.width.tolist() == [8] * 8
    assert "automatic: 10 images need" in scene.describe()


def bad_scene(tmp_path, case):
    """Write a scene with one defect; return (path to load, name the message must contain)."""
    frames = write_frames(tmp_path, ring(3))
    doc = {"camera_angle_x": 0.8, "frames": frames}
    name = "transforms.json"
    if case == "missing folder":
        return tmp_path / "nowhere", "nowhere"
    if case == "no transforms":
        (tmp_path / "empty").mkdir()
        return tmp_path / "empty", "empty"
    if case == "malformed json":
        (tmp_path / name).write_text('{"frames": [\n  {"file_path": "a",,}]}')
        return tmp_path, name
    if case == "no test split":
        write_json(tmp_path / "transforms_train.json", doc)
        return tmp_path, "transforms_test.json"
    if case == "no frames":
        doc["frames"] = []
    elif case == "one usable frame":
        for i in (1, 2):
            (tmp_path / "img" / f"v{i}.png").unlink()
    elif case == "non-finite pose":
        frames[1]["transform_matrix"][0][3] = float("nan")
    elif case == "not orthonormal":
        frames[1]["transform_matrix"][0][0] *= 1.01
    elif case == "reflection":
        frames[1]["transform_matrix"] = (np.array(frames[1]["transform_matrix"]) @ np.diag([-1, 1, 1, 1])).tolist()
    elif case == "unreadable image":
        (tmp_path / "img" / "v1.png").write_bytes(b"not an image")
        name = "v1.png"
    elif case == "size mismatch":
        frames[2] |= {"w": 20, "h": 12}
        name = "v2.png"
    elif case == "missing mask":
        frames[1]["mask_path"] = "masks/none.png"
        name = "none.png"
    elif case == "mask size":
        iio.imwrite(tmp_path / "m.png", np.zeros((5, 5), np.uint8))
        frames[1]["mask_path"] = "m.png"
        name = "m.png"
    write_json(tmp_path / "transforms.json", doc)
    return tmp_path, name


BAD = ["missing folder", "no transforms", "malformed json", "no test split", "no frames", "one usable frame",
       "non-finite pose", "not orthonormal", "reflection", "unreadable image", "size mismatch", "missing mask",
       "mask size"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_raises_one_line_scene_error(tmp_path, case):
    path, name = bad_scene(tmp_path, case)
    with pytest.raises(SceneError) as info:
        load_scene(path)
    message = str(info.value)
    assert "\n" not in message and name in message, message
    if case == "malformed json":
        assert "line 2, column" in message


def test_json_and_describe(tmp_path):
    scene = load_scene(lone_scene(tmp_path, n=9, missing=(4,)))
    stored = json.loads(json.dumps(scene.to_json()))
    assert set(stored) == {"source", "summary", "to_unit", "aabb", "aabb_scale", "near", "forward_facing", "cone_angle",
                           "splits"}
    assert stored["splits"]["test"] == scene.splits["test"].names and np.allclose(stored["to_unit"], scene.to_unit)
    text = scene.describe()
    assert "visual hull" in text and "bounded" in text and "skipped 1 of 9" in text
    assert len(text.splitlines()) < 10


@pytest.mark.skipif(not SHARED.is_dir(), reason="needs /work/shared/data (lego, fox)")
def test_shared_lego_and_fox():
    lego = load_scene(SHARED / "lego", downscale=8)
    assert {k: len(v) for k, v in lego.splits.items()} == {"train": 100, "val": 100, "test": 200}
    assert not lego.unbounded and lego.splits["train"].has_alpha
    fox = load_scene(SHARED / "fox", downscale=8)
    assert len(fox.splits["train"]) + len(fox.splits["test"]) == 50 and len(fox.splits["test"]) == 7
    assert fox.summary["skipped"][0]["listed"] == 67 and len(fox.summary["skipped"][0]["images"]) == 17
    assert fox.unbounded and fox.aabb_scale == 4 and fox.cone_angle == 1 / 256


def test_visual_hull_seed_keeps_every_cell_the_surface_crosses(tiny_scene):
    from recon.data.scene import visual_hull
    from recon.data.synthetic import scene_sdf
    from recon.renderers import OccupancyGrid

    scene = load_scene(tiny_scene)
    grid = OccupancyGrid(scene.aabb, resolution=32)
    centres, half_diagonals = grid.cell_centres()
    _, opaque = visual_hull(scene.splits["train"], centres, half_diagonals)
    # Signed distances from the generator's own closed form, in world units.
    to_world = torch.linalg.inv(scene.to_unit.double())
    world = (centres.double() @ to_world[:3, :3].T + to_world[:3, 3]).numpy()
    sdf = torch.from_numpy(scene_sdf(world))
    reach = half_diagonals.double() * to_world[0, :3].norm()  # a cell's half-diagonal in world units
    crossed = sdf.abs() < reach  # the surface may pass through these cells
    assert crossed.sum() > 100 and opaque[crossed].all()
    assert opaque.float().mean() < 0.5  # and most of the box is carved away
    assert not opaque[sdf > 4 * reach].all()


def test_the_automatic_box_keeps_a_part_thinner_than_a_voxel(tmp_path):
    """A sphere with a thin rod (0.04 across, far under the first carving pass's voxels) reaching out along
    +x: the alpha hull carves a voxel only when its whole footprint is seen empty, so the box keeps the rod's
    tip (carving by voxel centres cut it off)."""
    centre, radius, tip = np.array([0.0, 0.0, 0.0]), 0.4, np.array([1.1, 0.0, 0.0])
    poses = [look_at((3 * math.cos(a) * math.cos(e), 3 * math.sin(a) * math.cos(e), 3 * math.sin(e)))
             for a, e in zip(np.linspace(0, 2 * math.pi, 16, endpoint=False), [0.5, -0.5, 0.1, 1.0] * 4)]
    rod = np.linspace(centre, tip, 240)  # points along the rod's axis, 0.005 apart (under its radius)
    size, samples, f = 96, 2, 0.5 * 96 / math.tan(0.45)
    sub = (np.arange(size * samples) + 0.5) / samples
    x, y = np.meshgrid((sub - size / 2) / f, -(sub - size / 2) / f)
    images = []
    for pose in poses:
        d = np.stack([x, y, -np.ones_like(x)], -1).reshape(-1, 3) @ pose[:3, :3].T
        d /= np.linalg.norm(d, axis=-1, keepdims=True)
        v = rod - pose[:3, 3]  # [P, 3]
        along = d @ v.T  # [pixels, P]
        across = np.sqrt(np.maximum((v * v).sum(1) - along**2, 0))
        hit = (across < np.where(np.arange(len(rod)) == 0, radius, 0.02)).any(1)  # rod (and the sphere at its root)
        image = np.full((size, size, 4), 255, np.uint8)
        image[..., 3] = np.round(hit.reshape(size, samples, size, samples).mean(axis=(1, 3)) * 255)
        images.append(image)
    for split in ("train", "test"):
        frames = write_frames(tmp_path, poses, images, sub=split)
        write_json(tmp_path / f"transforms_{split}.json", {"camera_angle_x": 0.9, "frames": frames})
    scene = load_scene(tmp_path)
    box = np.array(scene.summary["bounds"]["world_box"])
    assert "visual hull" in scene.summary["bounds"]["rule"]
    assert box[1][0] > tip[0] and (box[0] < centre - radius).all()
    assert box[1][1] < radius + 0.35  # still a hull: not the frustums' box
