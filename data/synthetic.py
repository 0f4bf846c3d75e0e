"""The built-in example scene: a procedural, textured object rendered by its own sphere tracer.

The images come from a numpy sphere tracer over an analytic SDF, independent of recon's
renderers, so an axis or pose convention that recon gets wrong cannot cancel out between
generating and fitting. Shading is baked (view-independent), so a radiance field can
represent the images exactly and PSNR measures learning alone.

Output follows the Blender / NeRF-synthetic layout: `transforms_{train,test}.json` with
OpenGL camera-to-world poses (x right, y up, looking down -z; world up +z), RGBA PNGs with
straight (non-premultiplied) alpha, plus `mesh.ply` (ground-truth surface with albedo
vertex colours) and `scene_info.json` (the analytic scene, for tests to recompute things).
Pixel (u, v) samples the ray through its centre (u + 0.5, v + 0.5), as Blender does.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import imageio.v3 as iio
import mcubes
import numpy as np
import numpy.typing as npt
import trimesh

Array = npt.NDArray[np.float64]
Color = tuple[float, float, float]

GENERATOR_VERSION = 1
CAMERA_ANGLE_X = 0.6911112070083618  # the NeRF-synthetic lego value
ELEVATION_DEG = (-10.0, 80.0)  # upper hemisphere plus a little below the equator
MESH_CELL = 2 / 256  # marching-cubes cell: a 256^3 grid over [-1, 1]^3, run over the object's box only
SUPERSAMPLE = 2  # rays per pixel side: anti-aliased silhouettes give fractional alpha

# Baked Lambertian shading: albedo * (AMBIENT + (1 - AMBIENT) * max(0, n . LIGHT)) stays <= albedo.
LIGHT = np.array([0.5, -0.4, 0.75]) / np.linalg.norm([0.5, -0.4, 0.75])
AMBIENT = 0.35

# The photo capture for structure from motion (make_capture): speckled objects on a speckled ground
# disk, cameras on an orbit whose elevation swings twice per turn, as a hand-held walk around.
NOISE_PERIOD = 32
NOISE_TABLE = np.random.default_rng(7).random((NOISE_PERIOD,) * 3)
SPECKLE_FREQUENCIES = (5.0, 9.0, 17.0)  # lattice cells per world unit
SPECKLE_CONTRAST = 4.0
GROUND_Z, GROUND_RADIUS, GROUND_TINT = -0.52, 2.6, (0.75, 0.65, 0.5)
BACKDROP = 0.5  # grey beyond the ground
ORBIT_ELEVATION_DEG = (32.0, 18.0)  # mean and swing

# Sphere tracing: stop at SDF < EPS; a lower bound on the distance makes every step safe.
EPS = 1e-4
MAX_STEPS = 128
NORMAL_STEP = 5e-4


def _norm(v: Array) -> Array:
    """Row norms of [P, 3]; einsum is several times faster than np.linalg.norm here (hot loop)."""
    return np.sqrt(np.einsum("ij,ij->i", v, v))


@dataclass(frozen=True)
class Sphere:
    """A sphere with a latitude/longitude checker."""

    center: Color
    radius: float
    colors: tuple[Color, Color]
    cells: tuple[int, int]  # (longitude, latitude) cell counts

    def sdf(self, p: Array) -> Array:
        return _norm(p - self.center) - self.radius

    def albedo(self, p: Array) -> Array:
        q = p - self.center
        lon = np.arctan2(q[:, 1], q[:, 0]) + np.pi
        lat = np.arcsin(np.clip(q[:, 2] / np.maximum(_norm(q), 1e-12), -1, 1)) + np.pi / 2
        cell = np.floor(lon * self.cells[0] / (2 * np.pi)) + np.floor(lat * self.cells[1] / np.pi)
        return np.where((cell % 2 == 0)[:, None], self.colors[0], self.colors[1])

    def bounds(self) -> tuple[Array, Array]:
        return np.subtract(self.center, self.radius), np.add(self.center, self.radius)


@dataclass(frozen=True)
class RoundedBox:
    """An axis-aligned box with rounded edges and diagonal stripes."""

    center: Color
    half_size: Color
    rounding: float
    colors: tuple[Color, Color]
    stripe_width: float  # measured along (1, 1, 1), so stripes run diagonally over every face

    def sdf(self, p: Array) -> Array:
        q = np.abs(p - self.center) - (np.asarray(self.half_size) - self.rounding)
        inside = np.minimum(functools.reduce(np.maximum, q.T), 0)
        return _norm(np.maximum(q, 0)) + inside - self.rounding

    def albedo(self, p: Array) -> Array:
        s = (p - self.center).sum(axis=-1) / np.sqrt(3)
        return np.where((np.floor(s / self.stripe_width) % 2 == 0)[:, None], self.colors[0], self.colors[1])

    def bounds(self) -> tuple[Array, Array]:
        return np.subtract(self.center, self.half_size), np.add(self.center, self.half_size)


@dataclass(frozen=True)
class Torus:
    """A torus lying flat (axis +z) whose colour cycles smoothly through the hues around the ring."""

    center: Color
    major_radius: float
    minor_radius: float

    def sdf(self, p: Array) -> Array:
        q = p - self.center
        return np.hypot(np.hypot(q[:, 0], q[:, 1]) - self.major_radius, q[:, 2]) - self.minor_radius

    def albedo(self, p: Array) -> Array:
        q = p - self.center
        phi = np.arctan2(q[:, 1], q[:, 0])
        # Three cosines 120 degrees apart: a hue wheel with every channel in [0.1, 0.9].
        return 0.5 + 0.4 * np.cos(phi[:, None] - np.array([0.0, 2.0, 4.0]) * np.pi / 3)

    def bounds(self) -> tuple[Array, Array]:
        extent = np.array([1.0, 1.0, 0.0]) * self.major_radius + self.minor_radius
        return np.subtract(self.center, extent), np.add(self.center, extent)


Shape = Sphere | RoundedBox | Torus

# A striped block with a checkered ball sunk slightly into its top (one solid), and a
# separate ring on the same ground plane z = -0.52. Everything lies within 0.95 of the
# origin, so at distance 3 the object stays inside the lego field of view from any side.
SHAPES: tuple[Shape, ...] = (
    Sphere(center=(0.2, -0.2, 0.24), radius=0.35, colors=((0.9, 0.2, 0.15), (0.95, 0.93, 0.85)), cells=(12, 6)),
    RoundedBox(
        center=(0.2, -0.2, -0.3),
        half_size=(0.28, 0.28, 0.22),
        rounding=0.05,
        colors=((0.15, 0.35, 0.85), (0.95, 0.8, 0.15)),
        stripe_width=0.06,
    ),
    Torus(center=(-0.38, 0.32, -0.44), major_radius=0.25, minor_radius=0.08),
)


def scene_sdf(points: Array) -> Array:
    """Signed distance [P] (negative inside) of the union of SHAPES at points [P, 3]."""
    return functools.reduce(np.minimum, (shape.sdf(points) for shape in SHAPES))


def scene_albedo(points: Array) -> Array:
    """Albedo [P, 3] in [0, 1] at points [P, 3], taken from the shape nearest to each point."""
    nearest = np.argmin([shape.sdf(points) for shape in SHAPES], axis=0)
    albedo = np.zeros((len(points), 3))
    for i, shape in enumerate(SHAPES):
        mask = nearest == i
        albedo[mask] = shape.albedo(points[mask])
    return albedo


def scene_bounds() -> tuple[Array, Array]:
    """The object's axis-aligned world bounds (min, max)."""
    lows, highs = zip(*(shape.bounds() for shape in SHAPES))
    return np.min(lows, axis=0), np.max(highs, axis=0)


def shade(points: Array, normals: Array, speckled: bool = False) -> Array:
    """Baked colour [P, 3]: albedo (times the speckle) times ambient plus diffuse light, view-independent."""
    diffuse = np.clip(normals @ LIGHT, 0, None)
    albedo = scene_albedo(points) * (speckle(points)[:, None] if speckled else 1)
    return albedo * (AMBIENT + (1 - AMBIENT) * diffuse)[:, None]


def speckle(points: Array) -> Array:
    """A solid texture [P] in [0.08, 1]: three octaves of value noise, contrast-stretched. Stripes and
    checkers repeat, and SIFT needs features that do not: photographs for structure from motion get this."""
    noise = sum(_value_noise(points * frequency) for frequency in SPECKLE_FREQUENCIES) / len(SPECKLE_FREQUENCIES)
    return np.clip(0.5 + SPECKLE_CONTRAST * (noise - 0.5), 0.08, 1.0)


def _value_noise(x: Array) -> Array:
    """Smoothstep-interpolated random values on the integer lattice (a fixed, periodic table)."""
    cell = np.floor(x).astype(np.int64)
    t = x - cell
    t = t * t * (3 - 2 * t)
    out = np.zeros(len(x))
    for corner in np.ndindex(2, 2, 2):
        weight = np.prod(np.where(corner, t, 1 - t), axis=1)
        index = (cell + corner) % NOISE_PERIOD
        out += weight * NOISE_TABLE[index[:, 0], index[:, 1], index[:, 2]]
    return out


def _normals(points: Array) -> Array:
    """Unit SDF gradients [P, 3] by central differences."""
    offsets = np.concatenate([np.eye(3), -np.eye(3)]) * NORMAL_STEP
    d = scene_sdf((points[None] + offsets[:, None]).reshape(-1, 3)).reshape(6, -1)
    grad = (d[:3] - d[3:]).T
    return grad / np.maximum(np.linalg.norm(grad, axis=-1, keepdims=True), 1e-12)


def _sphere_trace(origin: Array, dirs: Array) -> tuple[npt.NDArray[np.bool_], Array]:
    """March rays [R, 3] from origin by the SDF value; returns hit mask [R] and hit points [R, 3].

    Marching runs only inside the object's box (slab test), which skips the approach from
    the camera and every ray that misses the box.
    """
    lo, hi = scene_bounds()
    with np.errstate(divide="ignore"):
        t_lo, t_hi = (lo - 1e-2 - origin) / dirs, (hi + 1e-2 - origin) / dirs
    # Row-wise reduces over 3 columns: functools.reduce beats numpy's axis=1 reduce ~6x here.
    t = np.maximum(functools.reduce(np.maximum, np.minimum(t_lo, t_hi).T), 0)
    t_far = functools.reduce(np.minimum, np.maximum(t_lo, t_hi).T)
    hit = np.zeros(len(dirs), dtype=bool)
    active = np.flatnonzero(t < t_far)
    for _ in range(MAX_STEPS):
        d = scene_sdf(origin + t[active, None] * dirs[active])
        hit[active[d < EPS]] = True
        t[active] += d
        # Only unfinished rays march on: most converge or leave within a few steps.
        active = active[(d >= EPS) & (t[active] < t_far[active])]
        if not len(active):
            break
    return hit, origin + t[:, None] * dirs


def render_view(c2w: Array, width: int, height: int, focal: float, supersample: int = SUPERSAMPLE,
                speckled: bool = False) -> Array:
    """Render RGBA [H, W, 4] in [0, 1] (straight alpha = coverage) from an OpenGL c2w pose.

    Each pixel averages supersample x supersample stratified rays; its colour is the mean
    over covered sub-rays, so compositing on a background reproduces the supersampled image.
    """
    c2w, s = np.asarray(c2w, dtype=np.float64), supersample
    dirs = _pixel_dirs(c2w, width, height, focal, s)
    hit, points = _sphere_trace(c2w[:3, 3], dirs)

    rgb = np.zeros_like(dirs)
    rgb[hit] = shade(points[hit], _normals(points[hit]), speckled)
    alpha = hit.reshape(height, s, width, s).mean(axis=(1, 3))
    premultiplied = rgb.reshape(height, s, width, s, 3).mean(axis=(1, 3))
    color = np.divide(premultiplied, alpha[..., None], out=np.zeros_like(premultiplied), where=alpha[..., None] > 0)
    return np.concatenate([np.clip(color, 0, 1), alpha[..., None]], axis=-1)


def _pixel_dirs(c2w: Array, width: int, height: int, focal: float, supersample: int = 1) -> Array:
    """Unit world directions [H*s * W*s, 3] of stratified rays through each pixel (centres at +0.5)."""
    s = supersample
    u, v = np.meshgrid((np.arange(width * s) + 0.5) / s, (np.arange(height * s) + 0.5) / s)
    cam_dirs = np.stack([(u - width / 2) / focal, -(v - height / 2) / focal, -np.ones_like(u)], -1).reshape(-1, 3)
    dirs = cam_dirs @ c2w[:3, :3].T
    return dirs / np.linalg.norm(dirs, axis=-1, keepdims=True)


def look_at_origin(eye: Array) -> Array:
    """OpenGL camera-to-world [4, 4] at eye looking at the origin, with world up +z."""
    back = eye / np.linalg.norm(eye)
    right = np.cross([0.0, 0.0, 1.0], back)
    right /= np.linalg.norm(right)
    c2w = np.eye(4)
    c2w[:3, :3] = np.stack([right, np.cross(back, right), back], axis=1)
    c2w[:3, 3] = eye
    return c2w


def _on_sphere(z: Array, azimuth: Array, radius: float) -> Array:
    """Points at heights z (unit sphere) and azimuths, scaled to radius."""
    ring = np.sqrt(1 - z**2)
    return radius * np.stack([ring * np.cos(azimuth), ring * np.sin(azimuth), z], axis=-1)


def camera_positions(n_train: int, n_test: int, radius: float, seed: int) -> tuple[Array, Array]:
    """Train eyes on a Fibonacci spiral, test eyes uniformly random, both over the elevation band.

    Uniform height z on the sphere is uniform in area, so both sets cover the band evenly.
    """
    rng = np.random.default_rng(seed)
    z_lo, z_hi = np.sin(np.radians(ELEVATION_DEG))
    golden_angle = np.pi * (3 - np.sqrt(5))
    i = np.arange(n_train)
    train = _on_sphere(z_lo + (z_hi - z_lo) * (i + 0.5) / n_train, i * golden_angle + rng.uniform(0, 2 * np.pi), radius)
    test = _on_sphere(rng.uniform(z_lo, z_hi, n_test), rng.uniform(0, 2 * np.pi, n_test), radius)
    return train, test


def extract_mesh(cell: float = MESH_CELL) -> trimesh.Trimesh:
    """Marching cubes of scene_sdf over the object's padded box; faces outward, albedo vertex colours."""
    lo, hi = scene_bounds()
    lo, hi = lo - 2 * cell, hi + 2 * cell  # keep the surface off the grid border, so it closes
    axes = [a + cell * np.arange(int(np.ceil((b - a) / cell)) + 1) for a, b in zip(lo, hi)]
    slabs = [
        scene_sdf(np.stack(np.meshgrid(axes[0][i : i + 16], axes[1], axes[2], indexing="ij"), -1).reshape(-1, 3))
        for i in range(0, len(axes[0]), 16)
    ]
    volume = np.concatenate(slabs).reshape([len(a) for a in axes])
    vertices, faces = mcubes.marching_cubes(volume, 0.0)
    vertices = lo + vertices * cell
    colors = np.round(scene_albedo(vertices) * 255).astype(np.uint8)
    # PyMCubes winds faces towards negative values, i.e. inward for an inside-negative SDF.
    return trimesh.Trimesh(vertices, faces[:, ::-1], vertex_colors=colors, process=False)


def make_capture(out_dir: str | Path, n_views: int = 24, resolution: int = 256, supersample: int = 1,
                 radius: float = 3.0) -> Path:
    """Photos without poses, for structure from motion: out_dir/photos/view_NNN.png along an orbit
    (in order, so they also make a video), and out_dir/cameras.json with the true OpenGL camera-to-world
    poses and focal length, which recon never reads."""
    out_dir = Path(out_dir)
    (out_dir / "photos").mkdir(parents=True, exist_ok=True)
    focal = 0.5 * resolution / np.tan(0.5 * CAMERA_ANGLE_X)
    azimuth = np.linspace(0, 2 * np.pi, n_views, endpoint=False)
    mean, swing = ORBIT_ELEVATION_DEG
    elevation = np.radians(mean + swing * np.sin(2 * azimuth))
    eyes = radius * np.stack([np.cos(elevation) * np.cos(azimuth), np.cos(elevation) * np.sin(azimuth),
                              np.sin(elevation)], axis=-1)
    poses = {}
    for i, eye in enumerate(eyes):
        c2w = look_at_origin(eye)
        rgba = render_view(c2w, resolution, resolution, focal, supersample, speckled=True)
        # The objects stand on the ground and every camera is above it, so the ground never hides them.
        rgb = rgba[..., :3] * rgba[..., 3:] + _ground(c2w, resolution, focal) * (1 - rgba[..., 3:])
        name = f"view_{i:03d}.png"
        iio.imwrite(out_dir / "photos" / name, _to_png(rgb))
        poses[name] = c2w.tolist()
    (out_dir / "cameras.json").write_text(json.dumps({"focal": focal, "resolution": resolution, "poses": poses}))
    return out_dir


def _ground(c2w: Array, resolution: int, focal: float) -> Array:
    """RGB [H, W, 3] of the speckled ground disk z = GROUND_Z through each pixel centre; grey elsewhere."""
    dirs = _pixel_dirs(c2w, resolution, resolution, focal)
    down = np.minimum(dirs[:, 2], -1e-9)  # rays going up never meet the ground
    t = (GROUND_Z - c2w[2, 3]) / down
    points = c2w[:3, 3] + t[:, None] * dirs
    on = (dirs[:, 2] < 0) & (np.hypot(points[:, 0], points[:, 1]) < GROUND_RADIUS)
    rgb = np.full_like(dirs, BACKDROP)
    rgb[on] = speckle(points[on])[:, None] * GROUND_TINT
    return rgb.reshape(resolution, resolution, 3)


def _to_png(rgba: Array) -> npt.NDArray[np.uint8]:
    return np.round(np.clip(rgba, 0, 1) * 255).astype(np.uint8)


def _write_split(out_dir: Path, split: str, eyes: Array, resolution: int, focal: float) -> None:
    (out_dir / split).mkdir(parents=True, exist_ok=True)
    frames = []
    for i, eye in enumerate(eyes):
        c2w = look_at_origin(eye)
        iio.imwrite(out_dir / split / f"r_{i}.png", _to_png(render_view(c2w, resolution, resolution, focal)))
        frames.append({"file_path": f"./{split}/r_{i}", "transform_matrix": c2w.tolist()})
    transforms = {"camera_angle_x": CAMERA_ANGLE_X, "frames": frames}
    (out_dir / f"transforms_{split}.json").write_text(json.dumps(transforms, indent=2))


def make_scene(
    out_dir: str | Path,
    resolution: int = 128,
    n_train: int = 60,
    n_test: int = 12,
    seed: int = 0,
    radius: float = 3.0,
) -> Path:
    """Write the example scene (images, poses, ground-truth mesh, scene_info.json) into out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    focal = 0.5 * resolution / np.tan(0.5 * CAMERA_ANGLE_X)
    train, test = camera_positions(n_train, n_test, radius, seed)
    _write_split(out_dir, "train", train, resolution, focal)
    _write_split(out_dir, "test", test, resolution, focal)

    mesh = extract_mesh()
    mesh.export(out_dir / "mesh.ply")
    lo, hi = scene_bounds()
    info = {
        "generator": "recon.data.synthetic",
        "version": GENERATOR_VERSION,
        "shapes": [{"type": type(shape).__name__, **asdict(shape)} for shape in SHAPES],
        "bounds": [lo.tolist(), hi.tolist()],
        "light": {"direction": LIGHT.tolist(), "ambient": AMBIENT},
        "shading": "albedo * (ambient + (1 - ambient) * max(0, normal . direction))",
        "cameras": {"radius": radius, "elevation_deg": list(ELEVATION_DEG), "seed": seed},
        "pixels": {"center_offset": 0.5, "supersample": SUPERSAMPLE, "alpha": "straight"},
        "mesh": {"cell_size": MESH_CELL, "vertex_colors": "albedo"},
    }
    (out_dir / "scene_info.json").write_text(json.dumps(info, indent=2))
    return out_dir
