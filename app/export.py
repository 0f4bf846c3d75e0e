"""Exports from trained fields: meshes, signed-distance volumes and point clouds, in the coordinates
of the user's input cameras (the inverse of the scene's unit transform).

Radiance fields are meshed at an opacity, 1 - exp(-sigma * voxel), so the level does not depend on
the scene's scale; space that no training view sees (outside every frustum, or behind the surface
each view renders) counts as inside, which closes the unobserved side of an object instead of
leaving a hollow shell or a second wall where the untrained density inside it happens to drop.
SDF fields are meshed at their zero level set. open3d (optional) does TSDF fusion, decimation and
the exact signed distance to a mesh.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
import trimesh
from torch import Tensor

from recon.app.evaluate import to_uint8
from recon.app.pipeline import Pipeline
from recon.app.run import UserError
from recon.data.cameras import Cameras, optical_focus
from recon.data.rays import Rays
from recon.data.scene import world_to_unit_box
from recon.renderers.mesh import COARSE_STEP, extract_isosurface, lattice_shape, remove_small_components

OPACITY_LEVEL = 0.5  # opacity of one export voxel at the surface
MIN_COMPONENT_FRACTION = 0.02  # --clean drops pieces under 2% of the largest piece's area
SEEN_BY_FRACTION = 0.25  # space counts as seen when a quarter of the training views see it (rendered depth is noisy)
VISIBILITY_LATTICE = 128  # lattice points per side for the seen-space test
VISIBILITY_IMAGE_SIDE = 160  # training views are rendered at most this many pixels wide for it
TSDF_TRUNCATION_VOXELS = 4  # --method tsdf: the truncation band, in voxels
POINT_MIN_OPACITY = 0.9  # a pixel becomes a point when its ray is at least this opaque
# The focus box needs axes spread over some angle: the least eigenvalue of I - mean(a a^T) over the unit axes a
# is 0 for parallel axes and about A^2 / 12 for an even fan of full angle A (radians): 0.01 is a fan of 20 degrees.
FOCUS_MIN_SPREAD = 0.01
SDF_SIGN_RAYS = 5  # rays whose majority parity gives the sign: robust to small holes and the box's open cuts
UNCOLOURED = 0.7  # the grey of vertices whose field has no colour
FORMATS = ("ply", "obj", "glb")
METHODS = ("marching", "tsdf")


@dataclass
class Mesh:
    vertices: np.ndarray  # [V, 3] float64, world (input camera) coordinates
    faces: np.ndarray  # [F, 3] int64, outward winding
    colors: np.ndarray  # [V, 3] uint8
    normals: np.ndarray | None = None  # [V, 3] unit, written to PLY (point clouds)

    def save(self, path: Path) -> None:
        mesh = trimesh.Trimesh(self.vertices, self.faces, vertex_colors=self.colors, vertex_normals=self.normals,
                               process=False)
        options = {"vertex_normal": True} if self.normals is not None else {}
        mesh.export(path, file_type=path.suffix[1:], **options)


def export_box(pipeline: Pipeline, to_unit: Tensor, crop: Tensor | None,
               cameras: Cameras | None = None) -> tuple[Tensor, str]:
    """Where to mesh, in the unit frame, and the rule that chose it: the crop box when given; else an SDF field's
    own box, a bounded scene's box, or for an unbounded scene's density field the cube about the training
    cameras' focus (`focus_box`; instant-ngp's inner cube cuts off objects that reach out of it, as the fox's
    head does, and the room beyond is not the object). A crop of a density field may reach as far as the scene
    box."""
    surface = pipeline.is_surface or pipeline.tracer is None
    reach = pipeline.field.aabb.cpu() if surface else pipeline.tracer.aabb.cpu()
    if crop is not None:
        crop_unit = world_to_unit_box(crop, to_unit)
        cut = torch.stack([torch.maximum(reach[0], crop_unit[0]), torch.minimum(reach[1], crop_unit[1])])
        if (cut[1] <= cut[0]).any():
            raise UserError(f"--crop {crop.flatten().tolist()}: the crop box is empty or outside the scene")
        return cut, "--crop"
    if surface:
        return reach, "the SDF field's box"
    inner = pipeline.inner_box
    if torch.equal(inner, reach):
        return reach, "the scene box"
    if cameras is None:
        return inner, "the inner box"
    focused = focus_box(cameras.to("cpu"))
    cut = None if focused is None else torch.stack([torch.maximum(reach[0], focused[0]),
                                                    torch.minimum(reach[1], focused[1])])
    if cut is None or (cut[1] <= cut[0]).any():
        return inner, "the inner box (no point that the training cameras all look at)"
    return cut, "a cube about the point the training cameras look at, as wide as their median view there"


def focus_box(cameras: Cameras) -> Tensor | None:
    """[2, 3] the cube about the cameras' focus (the point nearest their optical axes) whose half-width is their
    median half view there (distance x the narrower half field of view): where a capture's object is. None when
    the axes are near parallel (forward-facing captures), whose focus is ill-defined."""
    axes = -cameras.c2w[:, :, 2].double()
    if torch.linalg.eigvalsh(torch.eye(3, dtype=torch.float64) - axes.T @ axes / len(axes))[0] < FOCUS_MIN_SPREAD:
        return None
    centre = optical_focus(cameras.c2w)
    distance = (cameras.c2w[:, :, 3].double() - centre).norm(dim=1)
    half_view = torch.minimum(cameras.width / (2 * cameras.fx), cameras.height / (2 * cameras.fy)).double()
    half = float((distance * half_view).median())
    return torch.stack([centre - half, centre + half]).float()


def memory_needed(box: Tensor, resolution: int) -> int:
    """Bytes the extraction holds at once: the fine volume, its upsampling and masks (~16 bytes a point)."""
    _, cells = lattice_shape(box, resolution, COARSE_STEP)
    return 16 * math.prod(n + 1 for n in cells)


def memory_free(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 2**62  # unknown: do not refuse


@torch.no_grad()
def seen_space(pipeline: Pipeline, cameras: Cameras, box: Tensor, resolution: int = VISIBILITY_LATTICE,
               image_side: int = VISIBILITY_IMAGE_SIDE, views_per_chunk: int = 4) -> tuple[Tensor, float]:
    """How many views see each point of the lattice over `box` ([n+1, n+1, n+1], spacing returned): have it
    inside their image and in front of the surface they render there (plus two lattice steps, so the
    field, not this test, places the surface)."""
    device = pipeline.device
    points, spacing, cells = lattice_points(box, resolution)
    views = cameras.downscaled(max(1, math.ceil(int(cameras.width.max()) / image_side))).to(device)
    seen = torch.zeros(len(points), dtype=torch.long, device=device)
    with pipeline.baked_proposals(views):
        for start in range(0, len(views), views_per_chunk):
            chunk = views[start : start + views_per_chunk]
            surface = []
            for i in range(len(chunk)):
                out = pipeline.render_view(chunk, i)
                surface.append(torch.where(out["opacity"] > 0.5, out["depth"], torch.inf).reshape(-1))
            px, py, z = chunk.project(points)
            w, h = chunk.width[:, None], chunk.height[:, None]
            inside = (z > 0) & (px >= 0) & (px < w) & (py >= 0) & (py < h)
            pixel = torch.where(inside, py.long() * w + px.long(), 0)
            depth_there = torch.stack([s[p] for s, p in zip(surface, pixel)])
            distance = (points[None] - chunk.c2w[:, None, :, 3]).norm(dim=-1)
            seen += (inside & (distance < depth_there + 2 * spacing)).sum(0)
    return seen.view(*(n + 1 for n in cells)), spacing


def require_open3d(what: str) -> ModuleType:
    try:
        import open3d
    except (ImportError, OSError) as error:  # OSError: installed, but a system library (libusb) is missing
        raise UserError(f"{what} needs open3d: pip install 'recon[mesh]' ({error})") from None
    return open3d


def world_from_unit(to_unit: Tensor) -> np.ndarray:
    return np.linalg.inv(to_unit.double().cpu().numpy())


def unit_to_world(points: np.ndarray, to_unit: Tensor) -> np.ndarray:
    """Points [N, 3] from the unit frame to the input cameras' frame: x_world = A^-1 (x_unit - t)."""
    m = world_from_unit(to_unit)
    return points @ m[:3, :3].T + m[:3, 3]


def is_sdf(pipeline: Pipeline) -> bool:
    return "sdf" in pipeline.field.outputs


def radiance_inside_fn(pipeline: Pipeline, train_cameras: Cameras, box: Tensor, voxel: float):
    """Opacity over one voxel, with space that too few training views see counted as fully inside."""
    seen_by, spacing = seen_space(pipeline, train_cameras, box)
    seen = seen_by >= max(1, round(SEEN_BY_FRACTION * len(train_cameras)))
    seen_max = torch.tensor(seen.shape, device=seen.device) - 1

    def inside_fn(x: Tensor) -> Tensor:
        opacity = 1 - torch.exp(-pipeline.density_fn(x) * voxel)
        i, j, k = ((x - box[0]) / spacing).round().long().clamp(min=torch.zeros_like(seen_max), max=seen_max).unbind(-1)
        return torch.where(seen[i, j, k], opacity, 1.0)

    return inside_fn


@torch.no_grad()
def tsdf_surface(pipeline: Pipeline, cameras: Cameras, box: Tensor, voxel: float) -> tuple[np.ndarray, np.ndarray]:
    """Fuse the training views' rendered depth in open3d's (sparse, block-hashed) TSDF volume; mesh it inside `box`.

    Views are rendered as undistorted pinhole images about one voxel per pixel (at most full size), and
    pixels less than half opaque carry no depth.
    """
    o3d = require_open3d("--method tsdf")
    core = o3d.core
    volume = o3d.t.geometry.VoxelBlockGrid(attr_names=("tsdf", "weight"), attr_dtypes=(core.float32, core.float32),
                                           attr_channels=(1, 1), voxel_size=voxel, block_resolution=8,
                                           block_count=20000)
    extent = float((box[1] - box[0]).max())
    shrink = max(1, math.floor(int(cameras.width.max()) / (extent / voxel)))
    views = replace(cameras.downscaled(shrink), distortion=torch.zeros_like(cameras.distortion),
                    fisheye=torch.zeros_like(cameras.fisheye)).to(pipeline.device)
    opengl_to_opencv = np.diag([1.0, -1.0, -1.0, 1.0])
    far = float(np.linalg.norm(views.c2w[:, :, 3].cpu().numpy() - box.mean(0).cpu().numpy(), axis=1).max()) + extent
    with pipeline.baked_proposals(views):
        for i in range(len(views)):
            out = pipeline.render_view(views, i)
            h, w = out["depth"].shape
            along_axis = views.image_rays(i).dirs @ -views.c2w[i, :, 2]  # ray distance -> depth along the camera axis
            depth = torch.where(out["opacity"] > 0.5, out["depth"] * along_axis.view(h, w), 0.0)
            image = o3d.t.geometry.Image(core.Tensor(depth.float().cpu().numpy()[..., None]))
            # open3d puts pixel centres at integers, recon at half-integers.
            fx, fy, cx, cy = (float(getattr(views, k)[i]) for k in ("fx", "fy", "cx", "cy"))
            intrinsic = core.Tensor([[fx, 0, cx - 0.5], [0, fy, cy - 0.5], [0, 0, 1]], core.float64)
            c2w = np.vstack([views.c2w[i].double().cpu().numpy(), [0, 0, 0, 1]]) @ opengl_to_opencv
            extrinsic = core.Tensor(np.linalg.inv(c2w), core.float64)
            options = dict(depth_scale=1.0, depth_max=far, trunc_voxel_multiplier=float(TSDF_TRUNCATION_VOXELS))
            blocks = volume.compute_unique_block_coordinates(image, intrinsic, extrinsic, **options)
            volume.integrate(blocks, image, intrinsic, extrinsic, **options)
    lo, hi = box.double().cpu().numpy()
    mesh = volume.extract_triangle_mesh().to_legacy().crop(o3d.geometry.AxisAlignedBoundingBox(lo, hi))
    return np.asarray(mesh.vertices, dtype=np.float64), np.asarray(mesh.triangles, dtype=np.int64)


def simplify(vertices: np.ndarray, faces: np.ndarray, target_faces: int) -> tuple[np.ndarray, np.ndarray]:
    """Quadric decimation to about `target_faces` faces: open3d's, or fast-simplification's without open3d."""
    if len(faces) <= target_faces:
        return vertices, faces
    try:
        o3d = require_open3d("--simplify")
    except UserError as no_open3d:
        try:
            import fast_simplification
        except ImportError:
            raise UserError(f"{no_open3d} or fast-simplification") from None
        vertices, faces = fast_simplification.simplify(vertices, faces, 1 - target_faces / len(faces))
        return np.asarray(vertices, dtype=np.float64), np.asarray(faces, dtype=np.int64)
    mesh = o3d.geometry.TriangleMesh(o3d.utility.Vector3dVector(vertices), o3d.utility.Vector3iVector(faces))
    mesh = mesh.simplify_quadric_decimation(target_faces).remove_unreferenced_vertices()
    return np.asarray(mesh.vertices, dtype=np.float64), np.asarray(mesh.triangles, dtype=np.int64)


def surface(pipeline: Pipeline, train_cameras: Cameras, box: Tensor, resolution: int, level: float | None = None,
            method: str = "marching", clean: bool = True, simplify_to: int | None = None, closed: bool = True,
            chunk: int = 2**16) -> tuple[np.ndarray, np.ndarray, float]:
    """The field's surface inside `box` (unit frame): vertices [V, 3], outward faces [F, 3], and the voxel.

    level: an opacity over one voxel for radiance fields (default OPACITY_LEVEL), a distance for SDF fields
    (default 0). method "tsdf" fuses rendered depth instead (radiance fields). closed: marching caps the
    solid where the box cuts it, so the mesh is watertight (a crop of an object, a wall the box ends)."""
    need, free = memory_needed(box, resolution), memory_free(pipeline.device)
    if need > free:
        raise UserError(f"--resolution {resolution}: needs about {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free")
    voxel, _ = lattice_shape(box, resolution)
    field = pipeline.field
    was_training = field.training
    field.eval()
    if method == "tsdf":
        if is_sdf(pipeline):
            raise UserError(f"--method tsdf: field {field.name!r} is an SDF; its zero level set is meshed directly")
        vertices, faces = tsdf_surface(pipeline, train_cameras, box, voxel)
    elif is_sdf(pipeline):
        vertices, faces = extract_isosurface(lambda x: -field.sdf(x), box, resolution, -(level or 0.0), chunk=chunk,
                                             closed=closed)
    else:
        inside_fn = radiance_inside_fn(pipeline, train_cameras, box, voxel)
        vertices, faces = extract_isosurface(inside_fn, box, resolution, OPACITY_LEVEL if level is None else level,
                                             chunk=chunk, closed=closed)
    field.train(was_training)
    if clean:
        vertices, faces = remove_small_components(vertices, faces, MIN_COMPONENT_FRACTION)
    if simplify_to:
        vertices, faces = simplify(vertices, faces, simplify_to)
    return vertices, faces, voxel


@torch.no_grad()
def vertex_colors(pipeline: Pipeline, vertices: Tensor, normals: Tensor, offset: float, chunk: int) -> Tensor:
    """Colours [V, 3] in [0, 1]. SDF fields: the colour head at the vertex, where it was trained (grey for a
    field without colour). Radiance
    fields: what a short ray from just outside each vertex (along its normal) sees looking back at it,
    not the colour head at the iso-point, which sits inside the surface, untrained, and comes out dark."""
    field = pipeline.field
    was_training = field.training
    field.eval()
    if "rgb" not in field.outputs:  # a mesh's SDF: geometry only
        colors = torch.full_like(vertices, UNCOLOURED)
    elif is_sdf(pipeline):
        colors = torch.cat([field(x, -n)["rgb"].float() for x, n in zip(vertices.split(chunk), normals.split(chunk))])
    else:
        rays = Rays(vertices + offset * normals, -normals)
        out = pipeline.render_rays_chunked(rays, background=None, chunk=chunk, near=0.0)
        opacity = out["opacity"][:, None]
        colors = torch.where(opacity > 0.05, out["rgb"] / opacity.clamp(min=1e-6), 0.5)
    field.train(was_training)
    return colors.clamp(0, 1)


def extract_mesh(pipeline: Pipeline, train_cameras: Cameras, to_unit: Tensor, resolution: int = 512,
                 level: float | None = None, crop: Tensor | None = None, clean: bool = True, method: str = "marching",
                 simplify_to: int | None = None, closed: bool = True,
                 chunk: int = 2**16) -> tuple[Mesh, dict[str, Any]]:
    """The field's coloured mesh in world coordinates, and what was done (see `surface`)."""
    if method not in METHODS:
        raise UserError(f"--method {method}: unknown (known: {', '.join(METHODS)})")
    started = time.perf_counter()
    box, box_rule = export_box(pipeline, to_unit, crop, train_cameras)
    box = box.to(pipeline.device)
    vertices, faces, voxel = surface(pipeline, train_cameras, box, resolution, level, method, clean, simplify_to,
                                     closed, chunk)
    solid = trimesh.Trimesh(vertices, faces, process=False)
    normals = torch.from_numpy(np.array(solid.vertex_normals)).float()
    verts = torch.from_numpy(vertices).float().to(pipeline.device)
    colors = vertex_colors(pipeline, verts, normals.to(pipeline.device), 2 * voxel, chunk)
    if np.linalg.det(to_unit[:3, :3].double().numpy()) < 0:  # a reflection would turn the faces inside out
        faces = faces[:, ::-1]
    mesh = Mesh(unit_to_world(vertices, to_unit), np.ascontiguousarray(faces), to_uint8(colors))
    if is_sdf(pipeline):
        level_meaning, level = "signed distance (unit frame)", level or 0.0
    elif method == "tsdf":
        level_meaning, level = "TSDF zero crossing of rendered depth", None
    else:
        level_meaning, level = "opacity 1 - exp(-sigma * voxel)", OPACITY_LEVEL if level is None else level
    info = {"method": method, "resolution": resolution, "voxel_unit": voxel, "level": level,
            "level_meaning": level_meaning, "unit_box": box.tolist(), "box": box_rule,
            "world_from_unit": world_from_unit(to_unit).tolist(), "clean": clean,
            "simplify": simplify_to, "closed": closed and method == "marching",
            "watertight": bool(solid.is_watertight),
            "vertices": len(mesh.vertices), "faces": len(faces),
            "seconds": round(time.perf_counter() - started, 2)}
    return mesh, info


def lattice_points(box: Tensor, resolution: int) -> tuple[Tensor, float, list[int]]:
    """The (n+1)^3 lattice over `box`, x fastest last ([N, 3], row-major over i, j, k), its spacing and cells."""
    spacing, cells = lattice_shape(box, resolution)
    ticks = [box[0, a].item() + spacing * torch.arange(n + 1, device=box.device) for a, n in enumerate(cells)]
    return torch.stack(torch.meshgrid(*ticks, indexing="ij"), -1).reshape(-1, 3), spacing, cells


@torch.no_grad()
def signed_distance_volume(pipeline: Pipeline, train_cameras: Cameras, to_unit: Tensor, resolution: int = 256,
                           crop: Tensor | None = None, chunk: int = 2**16) -> dict[str, Any]:
    """A dense signed-distance volume in world units, negative inside, as `export sdf` writes it (.npz).

    SDF fields: the field's own distance. Radiance fields: the exact distance to the cleaned mesh that
    `export mesh` makes at the same resolution (open3d), never the raw density labelled a distance.
    """
    started = time.perf_counter()
    box, box_rule = export_box(pipeline, to_unit, crop, train_cameras)
    box = box.to(pipeline.device)
    points, spacing, cells = lattice_points(box, resolution)
    if is_sdf(pipeline):
        pipeline.field.eval()
        unit = torch.cat([pipeline.field.sdf(p).float() for p in points.split(chunk)]).cpu().numpy()
        source = f"the {pipeline.field.name} field's signed distance"
    else:
        o3d = require_open3d("export sdf of a radiance field")
        vertices, faces, _ = surface(pipeline, train_cameras, box, resolution, chunk=chunk)
        scene = o3d.t.geometry.RaycastingScene()
        scene.add_triangles(o3d.core.Tensor(vertices.astype(np.float32)), o3d.core.Tensor(faces.astype(np.uint32)))
        unit = scene.compute_signed_distance(o3d.core.Tensor(points.cpu().numpy().astype(np.float32)),
                                             nsamples=SDF_SIGN_RAYS).numpy()
        source = "distance to the cleaned mesh at the opacity level (export mesh at this resolution)"
    scale = float(np.linalg.norm(to_unit[:3, 0].double().numpy()))  # unit-frame lengths per world length
    grid_to_unit = np.eye(4)
    grid_to_unit[:3, :3] *= spacing
    grid_to_unit[:3, 3] = box[0].double().cpu().numpy()
    return {
        "sdf": (unit / scale).astype(np.float32).reshape([n + 1 for n in cells]),
        "world_from_grid": world_from_unit(to_unit) @ grid_to_unit,
        "voxel_size": np.float64(spacing / scale),
        "world_from_unit": world_from_unit(to_unit),
        "unit_box": box.double().cpu().numpy(),
        "box": np.str_(box_rule),
        "meaning": np.str_("signed distance in world units, negative inside; sdf[i, j, k] sits at "
                           "world_from_grid @ (i, j, k, 1)"),
        "source": np.str_(source),
        "seconds": np.float64(round(time.perf_counter() - started, 2)),
    }


@torch.no_grad()
def point_cloud(pipeline: Pipeline, cameras: Cameras, to_unit: Tensor, crop: Tensor | None = None,
                max_points: int = 1_000_000, image_side: int = 400, min_opacity: float = POINT_MIN_OPACITY,
                seed: int = 0) -> tuple[Mesh, dict[str, Any]]:
    """Where the training views' rays end: expected depth of pixels at least `min_opacity` opaque, inside the
    export box, with the rendered colour and the field's normal (-grad density, or grad sdf); world frame.
    Views are rendered at most `image_side` pixels wide; `max_points` are kept at random (fixed seed)."""
    started = time.perf_counter()
    box, box_rule = export_box(pipeline, to_unit, crop, cameras)
    box = box.to(pipeline.device)
    views = cameras.downscaled(max(1, math.ceil(int(cameras.width.max()) / image_side))).to(pipeline.device)
    points, colors = [], []
    with pipeline.baked_proposals(views):
        for i in range(len(views)):
            out = pipeline.render_view(views, i, background=0.0)
            opacity = out["opacity"].reshape(-1)
            rays = views.image_rays(i)
            ends = rays.origins + out["depth"].reshape(-1, 1) * rays.dirs
            keep = (opacity >= min_opacity) & ((ends >= box[0]) & (ends <= box[1])).all(-1)
            points.append(ends[keep])
            colors.append(out["rgb"].reshape(-1, 3)[keep] / opacity[keep, None])
    points, colors = torch.cat(points), torch.cat(colors)
    if len(points) > max_points:
        pick = torch.randperm(len(points), generator=torch.Generator().manual_seed(seed))[:max_points].to(points.device)
        points, colors = points[pick], colors[pick]
    pipeline.field.eval()
    output = "sdf" if is_sdf(pipeline) else "density"
    gradient = torch.cat([pipeline.field.gradient(p, output) for p in points.split(2**16)]) if len(points) else points
    normals = torch.nn.functional.normalize(gradient if output == "sdf" else -gradient, dim=-1).double().cpu().numpy()
    linear_inverse = world_from_unit(to_unit)[:3, :3]
    normals = normals @ np.linalg.inv(linear_inverse)  # normals map by the inverse transpose
    normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)
    cloud = Mesh(unit_to_world(points.double().cpu().numpy(), to_unit), np.zeros((0, 3), np.int64), to_uint8(colors),
                 normals)
    info = {"points": len(points), "views": len(views), "image_size": [int(views.width[0]), int(views.height[0])],
            "min_opacity": min_opacity, "unit_box": box.tolist(), "box": box_rule,
            "seconds": round(time.perf_counter() - started, 2)}
    return cloud, info
