"""Renderer tests against closed forms: ray-box intersection, constant-density cubes, transmittance, step rules."""

from __future__ import annotations

import io
import math

import pytest
import torch

from recon.cuda.twins import render_weights
from recon.data.rays import Rays
from recon.renderers import (
    OccupancyGrid,
    Samples,
    composite,
    distortion,
    march,
    ray_aabb,
    render_chunked,
    render_rays,
)
from recon.renderers.packing import ray_starts

UNIT = torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]])
STEP = math.sqrt(3) * 2 / 1024  # instant-ngp's step: the box diagonal / 1024


def unit(v) -> torch.Tensor:
    v = torch.as_tensor(v, dtype=torch.float32)
    return v / v.norm(dim=-1, keepdim=True)


def box_density(lo: float, hi: float, sigma: float):
    """sigma inside the cube [lo, hi]^3, 0 elsewhere."""
    return lambda x: sigma * ((x > lo) & (x < hi)).all(-1).float()


def constant_field(density_fn, color):
    return lambda x, d, dt: {"tau": density_fn(x) * dt, "rgb": torch.as_tensor(color).expand(len(x), 3)}


# --- ray_aabb -----------------------------------------------------------------------------------


def test_ray_aabb_hits_misses_parallel_and_inside():
    origins = torch.tensor([
        [-3.0, 0.2, -0.4],  # along +x through the box: enters at 2, leaves at 4
        [-3.0, 2.0, 0.0],  # along +x, passes above: miss
        [-3.0, 1.0, 0.0],  # along +x in the face plane y = 1 (0/0 in the slab test): grazes, 2..4
        [0.0, 0.0, 0.0],  # inside, along the diagonal: -sqrt(3)..sqrt(3)
        [0.5, -3.0, 0.5],  # along +y: 2..4
        [3.0, 0.0, 0.0],  # along +x, box behind: t_far < 0
        [-2.0, -2.0, 0.0],  # along (1, 1, 0): enters at sqrt(2), leaves at 3 sqrt(2)
    ])
    dirs = unit([[1, 0, 0], [1, 0, 0], [1, 0, 0], [1, 1, 1], [0, 1, 0], [1, 0, 0], [1, 1, 0]])
    t_near, t_far = ray_aabb(origins, dirs, UNIT)
    r3, r2 = math.sqrt(3), math.sqrt(2)
    for i, (near, far) in {0: (2, 4), 2: (2, 4), 3: (-r3, r3), 4: (2, 4), 6: (r2, 3 * r2)}.items():
        assert t_near[i].item() == pytest.approx(near, abs=1e-6) and t_far[i].item() == pytest.approx(far, abs=1e-6), i
    assert t_far[1] <= t_near[1]
    assert t_far[5] < 0
    assert not (t_near.isnan() | t_far.isnan()).any()


# --- constant-density slab: closed forms --------------------------------------------------------


def test_constant_density_cube_matches_closed_form():
    sigma, color, background = 3.0, torch.tensor([1.0, 0.5, 0.25]), torch.tensor([0.2, 0.4, 0.9])
    density_fn = box_density(-0.5, 0.5, sigma)  # the cube [-0.5, 0.5]^3 inside the unit box
    r2, r3 = math.sqrt(2), math.sqrt(3)
    # (origin, direction, crossing length L, distance t_in at which the ray enters the cube)
    cases = [
        ([-3.0, 0.1, -0.2], [1, 0, 0], 1.0, 2.5),
        ([0.3, -3.0, 0.0], [0, 1, 0], 1.0, 2.5),
        ([-3.0, -3.0, 0.2], [1, 1, 0], r2, 2.5 * r2),
        ([-2.0, -2.0, -2.0], [1, 1, 1], r3, 1.5 * r3),
        ([-3.0, 0.8, 0.0], [1, 0, 0], 0.0, 0.0),  # crosses the box but misses the cube
    ]
    rays = Rays(torch.tensor([c[0] for c in cases]), unit([c[1] for c in cases]))
    length = torch.tensor([c[2] for c in cases])
    t_in = torch.tensor([c[3] for c in cases])

    grid = OccupancyGrid(UNIT, 32)  # fresh: everything occupied
    log_sigma = torch.tensor(math.log(sigma), requires_grad=True)  # to check d(opacity)/d(sigma) too

    def field_fn(x, d, dt):
        return {"tau": density_fn(x) / sigma * log_sigma.exp() * dt, "rgb": color.expand(len(x), 3)}

    out = render_rays(rays, field_fn, march(rays, grid, UNIT, STEP), background=background)

    opacity = 1 - torch.exp(-sigma * length)
    tol = sigma * STEP  # the sampled length is within one step of L, and d(opacity)/dL <= sigma
    assert torch.allclose(out["opacity"], opacity, atol=tol)
    assert torch.allclose(out["rgb"], color * opacity[:, None] + background * (1 - opacity[:, None]), atol=tol)
    # Expected depth given the ray ends in the cube: t_in + 1/sigma - L exp(-sigma L) / (1 - exp(-sigma L)).
    hit = length > 0
    depth = t_in + 1 / sigma - length * torch.exp(-sigma * length) / opacity
    assert torch.allclose(out["depth"][hit], depth[hit], atol=STEP)
    assert out["depth"][~hit].item() == 0.0

    # d(opacity)/d(sigma) = L exp(-sigma L), through the field output
    (grad,) = torch.autograd.grad(out["opacity"][0], log_sigma)
    assert grad.item() / sigma == pytest.approx(math.exp(-sigma), abs=2 * tol)

    # transmittance before each sample: exp(-sigma * (the part of the cube before it))
    samples = march(rays, grid, UNIT, STEP)
    tau = density_fn(samples.positions(rays)) * samples.dt
    _, transmittance = render_weights(tau, samples.ray_idx, samples.starts)
    depth_in_cube = (samples.t0 - t_in[samples.ray_idx]).clamp(min=0).minimum(length[samples.ray_idx])
    assert torch.allclose(transmittance, torch.exp(-sigma * depth_in_cube), atol=tol)


def test_samples_cover_the_box_exactly_without_jitter():
    rays = Rays(torch.tensor([[-3.0, 0.1, 0.2], [0.1, 0.2, 0.3]]), unit([[1, 0.2, 0.1], [0.3, -1, 0.4]]))
    samples = march(rays, OccupancyGrid(UNIT, 16), UNIT, STEP)
    t_near, t_far = ray_aabb(rays.origins, rays.dirs, UNIT)
    for r in range(2):
        s = samples.ray_idx == r
        t0, t1 = samples.t0[s], samples.t1[s]
        assert t0[0].item() == pytest.approx(max(t_near[r].item(), 0.0), abs=1e-6)
        assert t1[-1].item() == pytest.approx(t_far[r].item(), abs=1e-6)
        assert torch.allclose(t1[:-1], t0[1:], atol=1e-5)
        assert torch.allclose(samples.dt[s][:-1], torch.full_like(t0[:-1], STEP), atol=1e-5)


def test_empty_scene_renders_background():
    background = torch.tensor([0.3, 0.6, 0.1])
    zero = box_density(0.0, 0.0, 0.0)
    origins = torch.tensor([[-3.0, 0.1, 0.0], [0.0, 0.0, 0.0], [-3.0, 3.0, 0.0]])
    rays = Rays(origins, unit([[1, 0, 0], [0, 0, 1], [1, 0, 0]]))
    full = OccupancyGrid(UNIT, 16)
    empty = OccupancyGrid(UNIT, 16)
    empty.update(zero, warmup=True)
    assert empty.occupancy_fraction == 0.0
    for grid in (full, empty):
        out = render_rays(rays, constant_field(zero, [1.0, 0.0, 0.0]), march(rays, grid, UNIT, STEP),
                          background=background)
        assert (out["n_samples"] > 0) == (grid is full)
        assert torch.equal(out["opacity"], torch.zeros(3))
        assert torch.equal(out["depth"], torch.zeros(3))
        assert torch.equal(out["rgb"], background.expand(3, 3))


# --- render_weights against a per-ray loop --------------------------------------------------------


def reference_weights(tau: torch.Tensor, counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    weights, transmittance, i = [], [], 0
    for n in counts:
        t = torch.ones((), dtype=tau.dtype)
        for _ in range(n):
            transmittance.append(t)
            weights.append(t * (1 - torch.exp(-tau[i])))
            t = t * torch.exp(-tau[i])
            i += 1
    return torch.stack(weights), torch.stack(transmittance)


def test_render_weights_matches_per_ray_loop():
    g = torch.Generator().manual_seed(0)
    counts = torch.randint(0, 12, (60,), generator=g)
    counts[[0, 7, 59]] = 0  # empty rays, at both ends too
    ray_idx = torch.repeat_interleave(torch.arange(60), counts)
    n = len(ray_idx)
    tau = torch.rand(n, generator=g, dtype=torch.float64) * torch.randn(n, generator=g, dtype=torch.float64).exp()
    upstream_w, upstream_t = torch.randn(2, n, generator=g, dtype=torch.float64)

    tau_ref = tau.clone().requires_grad_(True)
    w_ref, t_ref = reference_weights(tau_ref, counts.tolist())
    (grad_ref,) = torch.autograd.grad((w_ref * upstream_w + t_ref * upstream_t).sum(), tau_ref)

    tau32 = tau.float().requires_grad_(True)
    w, t = render_weights(tau32, ray_idx, ray_starts(ray_idx, 60))
    assert w.dtype == t.dtype == torch.float32
    assert torch.allclose(w.double(), w_ref.detach(), atol=1e-6)
    assert torch.allclose(t.double(), t_ref.detach(), atol=1e-6)
    (grad,) = torch.autograd.grad((w * upstream_w.float() + t * upstream_t.float()).sum(), tau32)
    assert torch.allclose(grad.double(), grad_ref, atol=1e-5)


def test_render_weights_gradcheck():
    ray_idx = torch.tensor([0, 0, 0, 2, 3, 3])  # ray 1 is empty
    tau = torch.rand(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: render_weights(x, ray_idx, ray_starts(ray_idx, 4)), (tau,))


def test_distortion_loss_matches_the_double_sum():
    g = torch.Generator().manual_seed(1)
    counts = torch.randint(0, 9, (40,), generator=g)
    counts[[0, 39]] = 0
    ray_idx = torch.repeat_interleave(torch.arange(40), counts)
    widths = torch.rand(len(ray_idx), generator=g, dtype=torch.float64) * 0.1
    ends = torch.cat([torch.cumsum(widths[ray_idx == r] + 0.02, 0) for r in range(40)])  # gaps between intervals
    samples = Samples(ray_idx, (ends - widths), ends, 40)
    weights = torch.rand(len(ray_idx), generator=g, dtype=torch.float64, requires_grad=True)
    expected = []
    for r in range(40):
        on = ray_idx == r
        w, m, d = weights[on], 0.5 * (samples.t0[on] + samples.t1[on]), widths[on]
        expected.append((w[:, None] * w[None] * (m[:, None] - m[None]).abs()).sum() + (w.square() * d).sum() / 3)
    expected = torch.stack(expected)
    got = distortion(weights, samples)
    torch.testing.assert_close(got, expected)
    upstream = torch.randn(40, generator=g, dtype=torch.float64)
    torch.testing.assert_close(torch.autograd.grad((got * upstream).sum(), weights)[0],
                               torch.autograd.grad((expected * upstream).sum(), weights)[0])


# --- early ray termination ----------------------------------------------------------------------


def test_early_termination_prunes_behind_an_opaque_wall():
    wall = lambda x: 200.0 * ((x[:, 0] + 0.5).abs() < 0.1).float()  # tau = 40 across the wall
    behind = lambda x: 2.0 * (x[:, 0] > 0.5).float()  # some (green) density behind it
    density_fn = lambda x: wall(x) + behind(x)
    red, green = torch.tensor([1.0, 0, 0]), torch.tensor([0.0, 1, 0])
    field_fn = lambda x, d, dt: {"tau": density_fn(x) * dt, "rgb": torch.where(x[:, :1] > 0.5, green, red)}
    g = torch.Generator().manual_seed(1)
    origins = torch.cat([torch.full((20, 1), -3.0), torch.rand(20, 2, generator=g) - 0.5], 1)
    lateral = 0.2 * torch.rand(20, 2, generator=g) - 0.1  # every ray enters the box through x = -1
    rays = Rays(origins, unit(torch.cat([torch.ones(20, 1), lateral], 1)))
    grid = OccupancyGrid(UNIT, 32)

    bg = torch.tensor([0.0, 0.0, 1.0])
    full = render_rays(rays, field_fn, march(rays, grid, UNIT, STEP), background=bg)
    # Rendering in rounds front to back stops each ray within a round (8 samples) of turning opaque.
    evaluated = []
    counting_fn = lambda x, d, dt: (evaluated.append(x[:, 0]), field_fn(x, d, dt))[1]
    chunked = render_chunked(rays, counting_fn, lambda part: march(part, grid, UNIT, STEP), background=bg, chunk=7,
                             early_stop_eps=1e-4)
    x = torch.cat(evaluated)
    assert len(x) < full["n_samples"] / 3
    marched = march(rays, grid, UNIT, STEP).positions(rays)[:, 0]
    assert (x < -0.6).sum() == (marched < -0.6).sum()  # everything before the wall is evaluated
    # nothing past the depth where tau > 200 * (0.06 - STEP) > -log 1e-4, plus one round
    assert (x < -0.6 + 0.06 + 8 * STEP).all()
    for key in ("rgb", "opacity"):
        assert torch.allclose(chunked[key], full[key], atol=1e-4)
    assert torch.allclose(chunked["depth"], full["depth"], atol=1e-4 * 5)  # weights lost <= 1e-4, at t < 5


def test_composite_per_ray_background():
    rays = Rays(torch.tensor([[-3.0, 0.0, 0.0], [-3.0, 3.0, 0.0]]), unit([[1, 0, 0], [1, 0, 0]]))
    samples = march(rays, OccupancyGrid(UNIT, 8), UNIT, STEP)
    background = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    out = composite(torch.zeros(len(samples), 3), torch.zeros(len(samples)), samples, background)
    assert torch.equal(out["rgb"], background)


# --- occupancy grid ----------------------------------------------------------------------------


def cell_boxes(res: int, box: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower and upper corners [res^3, 3] of a level's cells, in the grid's [x, y, z] (z fastest) order."""
    i = torch.stack(torch.meshgrid(*[torch.arange(res)] * 3, indexing="ij"), -1).reshape(-1, 3)
    size = (box[1] - box[0]) / res
    return box[0] + i * size, box[0] + (i + 1) * size


def test_occupancy_update_finds_a_small_sphere_and_march_skips_empty_space():
    centre, radius, res = torch.tensor([0.3, -0.2, 0.1]), 0.3, 32
    density_fn = lambda x: 10.0 * ((x - centre).norm(dim=-1) < radius).float()
    grid = OccupancyGrid(UNIT, res)
    g = torch.Generator().manual_seed(0)
    grid.update(density_fn, warmup=True, generator=g)

    lo, hi = cell_boxes(res, UNIT)
    nearest = torch.maximum(lo, torch.minimum(centre, hi))  # the cell's point closest to the centre
    farthest = torch.where(centre - lo > hi - centre, lo, hi)
    touches = (nearest - centre).norm(dim=-1) < radius
    inside = (farthest - centre).norm(dim=-1) < radius
    occupied = grid.occupied[0]
    # One jittered sample per cell: cells inside the sphere are surely found, cells it merely touches may be
    # missed until a later update samples them, and nothing else turns on.
    assert occupied[inside].all() and not occupied[~touches].any()
    assert occupied.sum() > 0.5 * touches.sum()
    assert grid.occupancy_fraction < 0.03

    for _ in range(3):  # partial updates keep what the warmup found
        grid.update(density_fn, warmup=False, generator=g)
        assert grid.occupied[0][inside].all() and not grid.occupied[0][~touches].any()

    origins = unit(torch.randn(256, 3, generator=g)) * 3
    rays = Rays(origins, unit(0.5 * torch.randn(256, 3, generator=g) - origins))
    samples = march(rays, grid, UNIT, STEP)
    dense = march(rays, OccupancyGrid(UNIT, res), UNIT, STEP)
    cell_diagonal = 2 * math.sqrt(3) / res
    assert (samples.positions(rays) - centre).norm(dim=-1).max() < radius + cell_diagonal
    assert len(samples) < len(dense) / 10
    # every ray through the sphere's core still gets samples there
    miss_distance = torch.linalg.cross(centre - origins, rays.dirs).norm(dim=-1)
    assert torch.isin(torch.nonzero(miss_distance < radius / 2).squeeze(1), samples.ray_idx).all()


def test_occupancy_update_rule():
    grid = OccupancyGrid(UNIT, 4, levels=2, step_size=0.01)
    sigma_dt = 5.0 * 0.01 * torch.tensor([[1.0], [2.0]])  # dt doubles per level
    grid.update(lambda x: torch.full((len(x),), 5.0), warmup=True)
    assert torch.allclose(grid.values, sigma_dt.expand(2, 64)) and grid.occupied.all()
    grid.update(lambda x: torch.zeros(len(x)), warmup=True, decay=0.5)  # max(decay * old, new)
    assert torch.allclose(grid.values, 0.5 * sigma_dt.expand(2, 64))
    # occupied: value >= min(threshold, mean value)
    grid.update(lambda x: 0.5 * (x[:, 0] > 0).float(), warmup=True, decay=0.0, threshold=1.0)
    assert torch.equal(grid.occupied, grid.values > grid.values.mean())
    assert grid.occupancy_fraction == 0.5
    # A uniform field (no cell above the mean) keeps every cell it has density in; an empty one none.
    uniform = OccupancyGrid(UNIT, 4, levels=1, step_size=0.01)
    uniform.update(lambda x: torch.full((len(x),), 1e-3), warmup=True)
    assert uniform.occupied.all()
    uniform.update(lambda x: torch.zeros(len(x)), warmup=True, decay=0.0)
    assert not uniform.occupied.any()


def test_multilevel_query_uses_the_finest_level_containing_the_point():
    grid = OccupancyGrid(UNIT, 8, levels=3)  # level boxes: half-widths 1, 2, 4
    axis = unit(torch.tensor([[1.0, 0.3, -0.2], [-0.1, -1.0, 0.4], [0.2, 0.2, 1.0]]))
    radii = torch.tensor([0.2, 0.95, 1.05, 1.9, 2.1, 3.9, 4.1])
    level_of = torch.tensor([0, 0, 1, 1, 2, 2, 3])  # 3: outside every level
    x = (radii[:, None, None] * axis / axis.abs().amax(-1, keepdim=True)).reshape(-1, 3)  # max-norm = radius
    expected_level = level_of.repeat_interleave(3)
    for level in range(3):
        grid.occupied.fill_(False)
        grid.occupied[level] = True
        assert torch.equal(grid.query(x), expected_level == level)

    # and the right cell within the level: one cell on at level 1 (cells of size 0.5 from -2)
    grid.occupied.fill_(False)
    grid.occupied[1, (6 * 8 + 3) * 8 + 4] = True
    cell_centre = torch.tensor([-2 + 6.5 * 0.5, -2 + 3.5 * 0.5, -2 + 4.5 * 0.5])
    offsets = torch.tensor([[0, 0, 0], [0.2, -0.2, 0.2], [0.3, 0, 0], [0, -0.3, 0], [0, 0, 0.3]])
    assert grid.query(cell_centre + offsets).tolist() == [True, True, False, False, False]


def test_occupied_points_fill_the_occupied_cells_and_nothing_else():
    grid = OccupancyGrid(UNIT, 8, levels=2)
    grid.occupied.fill_(False)
    on = torch.tensor([[0, 5], [0, 300], [1, 17]])  # two cells of level 0 and one of level 1
    grid.occupied[on[:, 0], on[:, 1]] = True
    points = grid.occupied_points(3000, torch.Generator().manual_seed(0))
    assert points.shape == (3000, 3) and grid.query(points).all()
    # each cell drawn about as often, and the points uniform in it: a level-1 cell is 8 times the volume
    centres, half_diagonals = grid.cell_centres()
    flat = on[:, 0] * 8**3 + on[:, 1]
    nearest = torch.cdist(points, centres[flat]).argmin(-1)
    assert torch.bincount(nearest, minlength=3).min() > 900
    spread = (points - centres[flat][nearest]).abs().amax(-1) / (half_diagonals[flat][nearest] / math.sqrt(3))
    assert spread.max() <= 1 and spread.mean() > 0.7  # a uniform cube's max-norm averages 3/4
    grid.occupied.fill_(False)
    assert grid.occupied_points(10).shape == (0, 3)


def test_occupancy_state_dict_round_trip():
    grid = OccupancyGrid(UNIT, 16, levels=2)
    grid.update(box_density(-0.3, 0.6, 5.0), warmup=True, generator=torch.Generator().manual_seed(0))
    buffer = io.BytesIO()
    torch.save(grid.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer)
    assert set(state) == {"values", "occupied"}
    restored = OccupancyGrid(UNIT, 16, levels=2)
    restored.load_state_dict(state)
    assert torch.equal(restored.values, grid.values) and torch.equal(restored.occupied, grid.occupied)
    x = torch.rand(1000, 3) * 4 - 2
    assert torch.equal(restored.query(x), grid.query(x))
    assert 0 < restored.occupancy_fraction < 1


def test_seed_keeps_cells_outside_the_mask_empty():
    grid = OccupancyGrid(UNIT, 8)
    mask = torch.zeros_like(grid.occupied)
    mask[0, : 8**3 // 2] = True  # the half x < 0
    grid.seed(mask)
    grid.update(box_density(-2, 2, 10.0), warmup=True)  # density everywhere
    assert torch.equal(grid.occupied, mask)


# --- stepping ----------------------------------------------------------------------------------


def test_cone_angle_steps_grow_with_distance_as_the_rule_says():
    step, cone = 0.01, 0.25
    grid = OccupancyGrid(UNIT, 16, levels=3)  # outermost box [-4, 4]^3
    max_step = 8 / 16 * math.sqrt(3)  # a cell diagonal of the coarsest level
    outer = UNIT * 4
    g = torch.Generator().manual_seed(0)
    rays = Rays(torch.rand(16, 3, generator=g) * 0.2, unit(torch.randn(16, 3, generator=g)))
    samples = march(rays, grid, outer, step, cone_angle=cone)
    _, t_far = ray_aabb(rays.origins, rays.dirs, outer)
    last = torch.ones(len(samples), dtype=torch.bool)
    last[:-1] = samples.ray_idx[1:] != samples.ray_idx[:-1]

    expected = (samples.t0 * cone).clamp(step, max_step)
    assert torch.allclose(samples.dt[~last], expected[~last], rtol=1e-5, atol=1e-6)
    assert torch.allclose(samples.t1[last], t_far, atol=1e-5)  # cut at the exit
    assert torch.allclose(samples.t1[~last], samples.t0[1:][~last[:-1]], rtol=1e-6)  # contiguous
    # all three regimes occur: constant, geometric, capped
    t = samples.t0[~last]
    assert (t < step / cone).any() and ((t > step / cone) & (t < max_step / cone)).any() and (t > max_step / cone).any()


def test_jitter_and_sample_cap():
    rays = Rays(torch.tensor([[-3.0, 0.1, 0.2]] * 4), unit([[1, 0.1, 0], [1, 0, 0.1], [1, -0.1, 0], [1, 0, -0.1]]))
    grid = OccupancyGrid(UNIT, 16)
    t_near, _ = ray_aabb(rays.origins, rays.dirs, UNIT)
    first = lambda s: s.t0[torch.searchsorted(s.ray_idx, torch.arange(4))]
    a = march(rays, grid, UNIT, STEP, generator=torch.Generator().manual_seed(0))
    b = march(rays, grid, UNIT, STEP, generator=torch.Generator().manual_seed(0))
    c = march(rays, grid, UNIT, STEP, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.t0, b.t0) and not torch.equal(first(a), first(c))
    offset = first(a) - t_near
    assert (offset >= 0).all() and (offset < STEP).all()

    plain = march(rays, grid, UNIT, STEP)
    capped = march(rays, grid, UNIT, STEP, max_samples_per_ray=5)
    assert torch.equal(capped.ray_idx, torch.arange(4).repeat_interleave(5))
    assert torch.equal(capped.t0, plain.t0.view(4, -1)[:, :5].reshape(-1))


def test_render_chunked_accepts_an_empty_batch():
    grid = OccupancyGrid(UNIT, resolution=8)
    rays = Rays(torch.zeros(0, 3), torch.zeros(0, 3))
    out = render_chunked(rays, constant_field(box_density(-0.5, 0.5, 1.0), (1.0, 0.0, 0.0)),
                         lambda part: march(part, grid, UNIT, STEP))
    assert out["rgb"].shape == (0, 3) and out["depth"].shape == (0,) and out["opacity"].shape == (0,)


def test_a_render_queries_the_field_in_pieces_with_the_same_result(monkeypatch):
    import recon.renderers.render as render_module

    # A field whose colour varies along x, so a sample answered out of place would change the image.
    field_fn = lambda x, d, dt: {"tau": box_density(-0.6, 0.6, 3.0)(x) * dt,
                                 "rgb": torch.stack([x[:, 0].sigmoid(), d[:, 1].abs(), dt * 0], -1)}
    g = torch.Generator().manual_seed(2)
    rays = Rays(torch.cat([torch.full((50, 1), -3.0), torch.rand(50, 2, generator=g) - 0.5], 1),
                unit(torch.cat([torch.ones(50, 1), 0.2 * torch.rand(50, 2, generator=g) - 0.1], 1)))
    grid = OccupancyGrid(UNIT, 32)
    sample_fn = lambda part: march(part, grid, UNIT, 0.05)
    whole = render_chunked(rays, field_fn, sample_fn)
    sizes = []
    monkeypatch.setattr(render_module, "CPU_QUERY_POINTS", 37)
    pieced = render_chunked(rays, lambda x, d, dt: (sizes.append(len(x)), field_fn(x, d, dt))[1], sample_fn)
    assert max(sizes) == 37 and len(sizes) > 8
    for key in ("rgb", "depth", "opacity"):
        assert torch.equal(pieced[key], whole[key])


def test_near_camera_gradient_scaling_scales_each_samples_gradient_by_its_squared_distance():
    """"Floaters No More": the render is unchanged, and a sample at distance t passes back min(1, (t / r)^2) of its
    optical depth's and colour's gradients."""
    t0 = torch.linspace(0.1, 3.0, 30)
    samples = Samples(torch.zeros(30, dtype=torch.long), t0, t0 + 0.05, 1)
    rays = Rays(torch.zeros(1, 3), unit([[0.0, 0.0, -1.0]]))
    density, colour = torch.full((30,), 0.3, requires_grad=True), torch.rand(30, 3, requires_grad=True)

    def field_fn(x, d, dt):
        return {"tau": density * dt, "rgb": colour}

    grads = []
    for near_scale in (None, 2.0):
        out = render_rays(rays, field_fn, samples, torch.ones(3), near_scale=near_scale)
        grads.append((out["rgb"], *torch.autograd.grad(out["rgb"].sum(), (density, colour))))
    (plain, d_density, d_colour), (scaled, d_density_scaled, d_colour_scaled) = grads
    assert torch.equal(plain, scaled)
    expected = ((t0 + 0.025) / 2.0).square().clamp(max=1)
    torch.testing.assert_close(d_density_scaled, d_density * expected)
    torch.testing.assert_close(d_colour_scaled, d_colour * expected[:, None])
    assert expected[0] < 0.01 and (expected[-10:] == 1).all()
