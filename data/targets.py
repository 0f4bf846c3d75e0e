"""Inputs of the coordinate tasks: an image to fit, and a mesh whose signed distance to fit.

- `load_image`: an image file as float RGB in [0, 1], with its box in pixel units (pixel centres at +0.5).
- `load_mesh`: a triangle mesh moved into the unit frame (its bounding box centred, its longest half-side
  MESH_HALF_EXTENT), the similarity recorded so exports go back to the mesh's own coordinates.
- `sdf_samples`: torch-ngp's SDF training points (which NeuRBF's SDF code reads): half on the surface
  (distance 0), three eighths on it perturbed by N(0, 0.01²), an eighth uniform in the box.
- `signed_distance`: exact distance to the mesh, with a sign that survives holes: open3d's RaycastingScene
  (the majority parity of SIGN_RAYS rays) when it is installed; otherwise a chunked torch brute force, its
  sign from the generalized winding number (also the reference the open3d path is tested against).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .loaders import SceneError, _downscale, read_image
from .scene import Scene, load_scene

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".exr", ".webp", ".bmp", ".tif", ".tiff")
MESH_SUFFIXES = (".obj", ".ply", ".off", ".stl", ".glb", ".gltf")
MESH_HALF_EXTENT = 0.9  # the mesh's longest half-side in the unit box [-1, 1]^3
SURFACE_NOISE = 0.01  # torch-ngp's perturbation of near-surface samples, unit-frame lengths
SIGN_RAYS = 5  # open3d: rays whose majority parity gives the sign
BRUTE_FORCE_LIMIT = 2e10  # point x face pairs the torch fallback takes on before it asks for open3d


@dataclass
class ImageTarget:
    path: Path
    pixels: Tensor  # [H, W, 3] float32 in [0, 1]
    grey: bool = False  # one channel (or three equal ones): fitted as one, the field's colour averaged

    @property
    def height(self) -> int:
        return self.pixels.shape[0]

    @property
    def width(self) -> int:
        return self.pixels.shape[1]

    @property
    def box(self) -> Tensor:
        """[2, 2]: the image in pixel units, (x, y) = (column, row)."""
        return torch.tensor([[0.0, 0.0], [float(self.width), float(self.height)]])

    def pixel_centres(self) -> Tensor:
        """[H * W, 2] (x, y) of every pixel centre, row-major like `pixels.view(-1, 3)`."""
        y, x = torch.meshgrid(torch.arange(self.height), torch.arange(self.width), indexing="ij")
        return torch.stack([x, y], -1).view(-1, 2).float() + 0.5

    def describe(self) -> str:
        grey = "; greyscale: fitted as one channel" if self.grey else ""
        return f"{self.path}: image {self.width}x{self.height}, {self.width * self.height:,} pixels{grey}"

    def to_json(self) -> dict:
        return {"source": str(self.path), "width": self.width, "height": self.height, "aabb": self.box.tolist()}


def load_input(path: str | Path, downscale: int = 1, budget: float | None = None) -> Scene | ImageTarget | MeshTarget:
    """What `recon fit` was pointed at: an image file, a mesh file, or a posed-image scene (any layout
    load_scene reads; `budget`: bytes of pixels for an automatic downscale). Raises SceneError."""
    suffix = Path(path).suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return load_image(path, downscale)
    if suffix in MESH_SUFFIXES:
        return load_mesh(path)
    return load_scene(path, downscale=downscale, budget=budget)


def load_image(path: str | Path, downscale: int = 1) -> ImageTarget:
    """RGB in [0, 1] (8- or 16-bit; greyscale expanded; an alpha channel composited on white), `downscale`
    times smaller (n x n blocks averaged)."""
    path = Path(path)
    if not path.is_file():
        raise SceneError(path, "no such image file")
    image = read_image(path)
    if downscale > min(image.shape[:2]):
        raise SceneError(path, f"--downscale {downscale} is larger than the image ({image.shape[1]}x{image.shape[0]})")
    if downscale > 1:
        image = _downscale(image, downscale)
    pixels = torch.from_numpy(image.astype(np.float32) / (65535 if image.dtype == np.uint16 else 255))
    if pixels.shape[2] == 4:
        pixels = pixels[..., :3] * pixels[..., 3:] + (1 - pixels[..., 3:])
    if min(pixels.shape[:2]) < 2:
        raise SceneError(path, f"image of {pixels.shape[1]}x{pixels.shape[0]} pixels is too small to fit")
    grey = bool((pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all())
    return ImageTarget(path, pixels.contiguous(), grey)


@dataclass
class MeshTarget:
    path: Path
    vertices: Tensor  # [V, 3] float32, unit frame
    faces: Tensor  # [F, 3] int64
    to_unit: Tensor  # [4, 4] float32: the mesh's coordinates -> unit frame

    @property
    def box(self) -> Tensor:
        return torch.tensor([[-1.0] * 3, [1.0] * 3])

    def describe(self) -> str:
        return (f"{self.path}: mesh of {len(self.vertices):,} vertices and {len(self.faces):,} faces, "
                "scaled into [-1, 1]^3")

    def to_json(self) -> dict:
        return {"source": str(self.path), "to_unit": self.to_unit.tolist(), "aabb": self.box.tolist(),
                "vertices": len(self.vertices), "faces": len(self.faces)}


def load_mesh(path: str | Path) -> MeshTarget:
    import trimesh

    path = Path(path)
    if not path.is_file():
        raise SceneError(path, "no such mesh file")
    try:
        mesh = trimesh.load(path, force="mesh", process=False)
    except Exception as e:  # any parser failure means the same thing: the file is unusable
        raise SceneError(path, f"unreadable mesh ({type(e).__name__}: {e})") from None
    vertices, faces = np.asarray(getattr(mesh, "vertices", [])), np.asarray(getattr(mesh, "faces", []))
    if len(faces) == 0 or vertices.ndim != 2:
        raise SceneError(path, "no triangles in the file (a point cloud or an empty mesh?)")
    if not np.isfinite(vertices).all():
        raise SceneError(path, "non-finite vertex coordinates")
    lo, hi = vertices.min(0), vertices.max(0)
    if (hi - lo).max() <= 0:
        raise SceneError(path, "all vertices coincide")
    scale = 2 * MESH_HALF_EXTENT / (hi - lo).max()
    to_unit = np.eye(4)
    to_unit[:3, :3] *= scale
    to_unit[:3, 3] = -scale * (lo + hi) / 2
    unit = vertices * scale + to_unit[:3, 3]
    return MeshTarget(path, torch.from_numpy(unit).float(), torch.from_numpy(faces.astype(np.int64)),
                      torch.from_numpy(to_unit).float())


def sample_surface(vertices: Tensor, faces: Tensor, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """n points [n, 3] on the surface, area-weighted, and their faces' unit normals [n, 3]."""
    a, b, c = vertices[faces].unbind(1)
    cross = torch.linalg.cross(b - a, c - a)
    area = cross.norm(dim=-1)
    face = torch.multinomial(area, n, replacement=True, generator=generator)
    r = torch.rand(n, 2, generator=generator)
    flip = r.sum(-1) > 1  # fold the square onto the triangle: uniform barycentric coordinates
    r = torch.where(flip[:, None], 1 - r, r)
    points = a[face] + r[:, :1] * (b - a)[face] + r[:, 1:] * (c - a)[face]
    return points, cross[face] / area[face, None].clamp(min=1e-30)


def sdf_samples(mesh: MeshTarget, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Training points [n, 3] and their signed distances [n] (torch-ngp's mix, see the module docstring)."""
    on, near = n // 2, n * 3 // 8
    surface, _ = sample_surface(mesh.vertices, mesh.faces, on + near, generator)
    surface[on:] += SURFACE_NOISE * torch.randn(near, 3, generator=generator)
    uniform = torch.rand(n - on - near, 3, generator=generator) * 2 - 1
    points = torch.cat([surface, uniform])
    distance = torch.zeros(n)
    distance[on:] = signed_distance(mesh.vertices, mesh.faces, points[on:])
    return points, distance


def signed_distance(vertices: Tensor, faces: Tensor, points: Tensor, chunk: int = 2**22) -> Tensor:
    """Signed distance [N] from points [N, 3] to the mesh, negative inside."""
    if not open3d_available():
        return signed_distance_reference(vertices, faces, points, chunk)
    import open3d as o3d

    scene = o3d.t.geometry.RaycastingScene()
    scene.add_triangles(o3d.core.Tensor(vertices.numpy().astype(np.float32)),
                        o3d.core.Tensor(faces.numpy().astype(np.uint32)))
    query = o3d.core.Tensor(points.numpy().astype(np.float32))
    return torch.from_numpy(scene.compute_signed_distance(query, nsamples=SIGN_RAYS).numpy())


def inside_mesh(vertices: Tensor, faces: Tensor, points: Tensor) -> Tensor:
    """Which points [N] are inside the mesh, by the sign `signed_distance` gives; without open3d by the
    winding number alone, skipping the brute-force distance that a sign does not need (2.5x faster)."""
    if not open3d_available():
        return winding_number(vertices, faces, points) > 0.5
    return signed_distance(vertices, faces, points) < 0


@functools.cache
def open3d_available() -> bool:
    try:
        import open3d  # noqa: F401
    except (ImportError, OSError):  # OSError: installed, but a system library (libusb) is missing
        return False
    return True


def signed_distance_reference(vertices: Tensor, faces: Tensor, points: Tensor, chunk: int = 2**22) -> Tensor:
    """Brute-force signed distance: the closest triangle's distance, inside where the winding number > 1/2."""
    distance = unsigned_distance(vertices, faces, points, chunk)
    return torch.where(winding_number(vertices, faces, points, chunk) > 0.5, -distance, distance)


def _pairs_per_chunk(n_faces: int, chunk: int, what: str, n_points: int) -> int:
    if n_points * n_faces > BRUTE_FORCE_LIMIT:
        raise SceneError(what, f"{n_points:,} points x {n_faces:,} faces is too many without open3d "
                               "(pip install 'recon[mesh]')")
    return max(1, chunk // max(n_faces, 1))


def winding_number(vertices: Tensor, faces: Tensor, points: Tensor, chunk: int = 2**22) -> Tensor:
    """Generalized winding number [N] (Jacobson et al. 2013): the triangles' signed solid angles at each point
    over 4 pi (Van Oosterom & Strackee), 1 inside a closed mesh, 0 outside, and a smooth vote across holes."""
    tri = vertices[faces].double()  # [F, 3 corners, 3]
    out = []
    for part in points.double().split(_pairs_per_chunk(len(faces), chunk, "winding number", len(points))):
        a, b, c = (tri[None, :, i] - part[:, None] for i in range(3))  # [P, F, 3]
        la, lb, lc = a.norm(dim=-1), b.norm(dim=-1), c.norm(dim=-1)
        det = (a * torch.linalg.cross(b, c)).sum(-1)
        denominator = la * lb * lc + (a * b).sum(-1) * lc + (b * c).sum(-1) * la + (c * a).sum(-1) * lb
        out.append((2 * torch.atan2(det, denominator)).sum(-1) / (4 * math.pi))
    return torch.cat(out).float() if out else points.new_zeros(0)


def unsigned_distance(vertices: Tensor, faces: Tensor, points: Tensor, chunk: int = 2**22) -> Tensor:
    """Distance [N] from each point to its closest triangle, by brute force (the open3d twin's reference)."""
    tri = vertices[faces].double()
    a, b, c = tri.unbind(1)
    normal = torch.nn.functional.normalize(torch.linalg.cross(b - a, c - a), dim=-1)
    out = []
    for part in points.double().split(_pairs_per_chunk(len(faces), chunk, "distance", len(points))):
        p = part[:, None]  # [P, 1, 3]
        # Inside the triangle's prism: the distance to its plane; otherwise to the nearest edge.
        plane = ((p - a) * normal).sum(-1)
        projected = p - plane[..., None] * normal
        edges = [(a, b), (b, c), (c, a)]
        inside = torch.stack([(torch.linalg.cross((q - s).expand_as(projected), projected - s) * normal).sum(-1) >= 0
                              for s, q in edges]).all(0)
        edge = torch.stack([_segment_distance(p, s, q) for s, q in edges]).amin(0)
        out.append(torch.where(inside, plane.abs(), edge).amin(-1))
    return torch.cat(out).float() if out else points.new_zeros(0)


def _segment_distance(p: Tensor, s: Tensor, q: Tensor) -> Tensor:
    d = q - s
    t = (((p - s) * d).sum(-1) / (d * d).sum(-1).clamp(min=1e-30)).clamp(0, 1)
    return (p - s - t[..., None] * d).norm(dim=-1)
