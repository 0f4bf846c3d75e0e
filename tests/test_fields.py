"""Field backends: the hash encoding against a naive reference, SH, and a small fit."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from recon.fields import REGISTRY, build_field
from recon.fields.encodings import HashGridEncoding, SHEncoding, tcnn_available, trunc_exp
from recon.fields.hashgrid import HashGridField

BOX = torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]])
PRIMES = (1, 2654435761, 805459861)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Batches here are tiny: extra threads only add sync cost (and thrash on a shared CPU).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_encoding() -> HashGridEncoding:
    """6 levels over 3 dense (4^3, 7^3, 13^3 vertices <= 4096 rows) and 3 hashed levels."""
    torch.manual_seed(0)
    enc = HashGridEncoding(levels=6, features=2, log2_table=12, base_resolution=4, max_resolution=64)
    with torch.no_grad():
        enc.table.uniform_(-1, 1)  # large values, so any wrong corner or weight shows
    return enc


def reference_encoding(enc: HashGridEncoding, points: np.ndarray) -> np.ndarray:
    """Per point and level by hand: tcnn's grid, positions in fp32, the rest exact."""
    table = enc.table.detach().double().numpy()
    size = 1 << enc.log2_table
    growth = (enc.max_resolution / enc.base_resolution) ** (1 / (enc.levels - 1))
    out = np.zeros((len(points), enc.levels * enc.features))
    offset = 0
    for level in range(enc.levels):
        # The module's fp32 scale (exp2 differs by an ulp between libraries), checked against the formula.
        scale = enc.hash_levels.scale[level].item()
        assert scale == pytest.approx(enc.base_resolution * growth**level - 1, rel=1e-6)
        scale = np.float32(scale)
        verts = math.ceil(scale) + 1
        dense = verts**3 <= size
        rows = min(-(-(verts**3) // 8) * 8, size)
        for p, point in enumerate(points):
            feature = np.zeros(enc.features)
            pos = np.minimum(np.float32(point) * scale + np.float32(0.5), np.float32(verts - 1))
            cell = np.minimum(np.floor(pos), verts - 2).astype(int)
            frac = pos.astype(np.float64) - cell
            for cz in (0, 1):
                for cy in (0, 1):
                    for cx in (0, 1):
                        ix, iy, iz = cell[0] + cx, cell[1] + cy, cell[2] + cz
                        assert max(ix, iy, iz) < verts
                        if dense:
                            index = ix + iy * verts + iz * verts * verts
                        else:
                            index = (ix * PRIMES[0] ^ iy * PRIMES[1] ^ iz * PRIMES[2]) & (size - 1)
                        assert index < rows
                        weight = ((frac[0] if cx else 1 - frac[0]) * (frac[1] if cy else 1 - frac[1])
                                  * (frac[2] if cz else 1 - frac[2]))
                        feature += weight * table[offset + index]
            out[p, level * enc.features : (level + 1) * enc.features] = feature
        offset += rows
    assert offset == table.shape[0]
    return out


def test_hash_encoding_matches_naive_reference():
    enc = small_encoding()
    assert enc.dense_levels == 3
    rng = np.random.default_rng(1)
    points = [rng.random((20, 3), dtype=np.float32),
              np.array([[0, 0, 0], [1, 1, 1], [1, 0, 1], [1, 0.3, 0.7], [0.2, 1, 1]], np.float32)]
    # On vertices of levels 0 and 3 (x * scale + 0.5 integral, up to fp32 rounding).
    for level in (0, 3):
        scale = enc.hash_levels.scale[level].item()
        on_vertex = np.array([(k - 0.5) / scale for k in range(1, 4)], np.float32)
        points.append(np.stack([on_vertex, on_vertex[::-1], np.ones(3, np.float32)], -1))
    points = np.concatenate(points)
    ours = enc(torch.from_numpy(points)).detach().double().numpy()
    np.testing.assert_allclose(ours, reference_encoding(enc, points), atol=1e-6, rtol=0)


def test_default_layout_is_tcnn_and_boundary_stays_in_range():
    enc = HashGridEncoding()
    # tcnn's sizes: levels of 16, 23, 31, 43, 59 vertices per axis are dense (rounded up to 8), 11 hashed.
    assert enc.dense_levels == 5
    assert enc.table.shape == (4096 + 12168 + 29792 + 79512 + 205384 + 11 * 2**19, 2)
    assert list(enc.state_dict()) == ["table"]
    corners = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 1.0]])
    out = enc(corners)
    assert out.shape == (3, 32) and torch.isfinite(out).all()
    assert torch.equal(enc(torch.tensor([[2.0, -1.0, 1.5]])), enc(torch.tensor([[1.0, 0.0, 1.0]])))  # clamped
    assert enc(torch.rand(2, 5, 3)).shape == (2, 5, 32)
    assert enc(torch.rand(0, 3)).shape == (0, 32)


def test_interpolation_is_continuous():
    enc = small_encoding()
    t = torch.linspace(0, 1, 40001)[:, None]
    line = torch.tensor([0.01, 0.97, 0.2]) + t * torch.tensor([0.98, -0.95, 0.79])
    values = enc(line).detach()
    # |d feature / d x| <= 3 axes * 2 (table values in [-1, 1]) * scale (<= 63): steps of ~3e-5 move < 0.02.
    assert (values[1:] - values[:-1]).abs().max() < 0.05
    top = torch.tensor([[0.5, 0.3, 1.0], [0.5, 0.3, 1.0 - 1e-6]])
    assert (enc(top)[0] - enc(top)[1]).abs().max() < 1e-3


def test_gradients_match_finite_differences():
    enc = small_encoding().double()
    x = torch.rand(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).requires_grad_()
    assert torch.autograd.gradcheck(enc, (x,))
    assert torch.autograd.gradgradcheck(enc, (x,))  # eikonal losses differentiate d out / d x
    # Table gradients (and through them the fast scatter) on a grid small enough to perturb every entry.
    tiny = HashGridEncoding(levels=2, features=2, log2_table=6, base_resolution=2, max_resolution=6).double()
    table = tiny.table.detach().clone().requires_grad_()
    encode = lambda table, x: torch.func.functional_call(tiny, {"table": table}, (x,))  # noqa: E731
    assert torch.autograd.gradcheck(encode, (table, x))
    assert torch.autograd.gradgradcheck(encode, (table, x))
    lone = HashGridEncoding(levels=1, features=2, log2_table=6, base_resolution=3, max_resolution=3).double()
    assert torch.autograd.gradcheck(lone, (x,))  # a single level lays its corner weights out differently
    table = lone.table.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: torch.func.functional_call(lone, {"table": t}, (x,)), (table,))


def real_sh(l: int, m: int, d: np.ndarray) -> float:
    """Orthonormal real SH from the associated Legendre recurrences (Condon-Shortley phase)."""
    x, y, z = d
    a = abs(m)
    p_prev, p = 0.0, (-1) ** a * math.prod(range(1, 2 * a, 2)) * (1 - z * z) ** (a / 2)  # P_a^a
    for n in range(a + 1, l + 1):
        p_prev, p = p, ((2 * n - 1) * z * p - (n + a - 1) * p_prev) / (n - a)
    k = math.sqrt((2 * l + 1) / (4 * math.pi) * math.factorial(l - a) / math.factorial(l + a))
    phi = math.atan2(y, x)
    if m == 0:
        return k * p
    return math.sqrt(2) * k * p * (math.cos(m * phi) if m > 0 else math.sin(a * phi))


def test_sh_matches_formula_and_is_orthonormal():
    sh = SHEncoding(4)
    dirs = F.normalize(torch.tensor([[1.0, 0, 0], [0, 0, -1], [0.3, -0.5, 0.8], [-0.7, 0.2, -0.1], [0.1, 0.9, 0.4]],
                                    dtype=torch.float64), dim=-1)
    expected = [[real_sh(l, m, d.numpy()) for l in range(4) for m in range(-l, l + 1)] for d in dirs]
    np.testing.assert_allclose(sh(dirs).numpy(), expected, atol=1e-12)
    assert SHEncoding(2)(dirs).shape == (5, 4)

    n = 20000  # Fibonacci sphere: near-uniform, so the mean approximates the integral / (4 pi)
    i = torch.arange(n, dtype=torch.float64) + 0.5
    z = 1 - 2 * i / n
    phi = math.pi * (3 - math.sqrt(5)) * i
    r = (1 - z * z).sqrt()
    y = sh(torch.stack([r * phi.cos(), r * phi.sin(), z], -1))
    gram = 4 * math.pi * y.T @ y / n
    assert (gram - torch.eye(16, dtype=torch.float64)).abs().max() < 1e-3


def test_trunc_exp():
    x = torch.tensor([-2.0, 0.0, 20.0], requires_grad=True)
    y = trunc_exp(x)
    y.sum().backward()
    assert torch.allclose(y, x.detach().exp())
    assert torch.allclose(x.grad, torch.tensor([-2.0, 0.0, 15.0]).exp())


def sphere_targets(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    inside = x.norm(dim=-1) < 0.5
    return inside * 10.0, (x + 1) / 2


def test_field_fits_a_sphere_and_its_gradient_points_inward():
    torch.manual_seed(0)
    field = build_field("hashgrid", BOX, levels=8, log2_table=14, max_resolution=256)
    opt = torch.optim.Adam(field.param_groups(1e-2), betas=(0.9, 0.99), eps=1e-15)
    for _ in range(400):
        x = torch.rand(4096, 3) * 2 - 1
        out = field(x, F.normalize(torch.randn(4096, 3), dim=-1))
        density, rgb = sphere_targets(x)
        loss = F.mse_loss(out["density"], density) / 100 + F.mse_loss(out["rgb"], rgb)
        opt.zero_grad()
        loss.backward()
        opt.step()

    with torch.no_grad():
        x = torch.rand(20000, 3) * 2 - 1
        out = field(x, F.normalize(torch.randn(20000, 3), dim=-1))
        density, rgb = sphere_targets(x)
        away = (x.norm(dim=-1) - 0.5).abs() > 0.1
        assert (out["density"] - density)[away].abs().mean() < 0.3
        assert F.mse_loss(out["rgb"], rgb) < 5e-3
        assert torch.allclose(field.density(x), out["density"])

        normal = F.normalize(torch.randn(2000, 3), dim=-1)
        grad = field.gradient(normal * (0.49 + 0.02 * torch.rand(2000, 1)), "density")
    assert not grad.requires_grad
    assert ((grad * normal).sum(-1) < 0).float().mean() > 0.85  # density falls outward
    assert F.cosine_similarity(grad, -normal, dim=-1).median() > 0.8


def test_field_outputs_and_outside_the_box():
    field = HashGridField(BOX, levels=4, log2_table=12)
    x = torch.tensor([[0.0, 0.0, 0.0], [0.9, -0.9, 0.5], [1.5, 0.0, 0.0], [0.0, -3.0, 0.0]])
    out = field(x, F.normalize(torch.randn(4, 3), dim=-1))
    assert field.outputs <= out.keys()
    assert out["density"].shape == (4,) and out["rgb"].shape == (4, 3)
    assert (out["density"][:2] > 0).all() and (out["density"][2:] == 0).all()
    assert ((out["rgb"] >= 0) & (out["rgb"] <= 1)).all()
    assert torch.equal(field.density(x), out["density"])
    # max_resolution scales with the box, as instant-ngp's 2048 * aabb_scale.
    assert HashGridField(BOX * 2, levels=2, log2_table=10).encoding.max_resolution == 4096


def test_options_round_trip_and_param_groups():
    """The registry records what rebuilds a field: the options given and the constructor's default values (None:
    derived again, as max_resolution from the box)."""
    assert REGISTRY["hashgrid"] is HashGridField
    field = build_field("hashgrid", BOX, levels=4, log2_table=12, hidden=32)
    config = json.loads(json.dumps(field.options))
    assert config == {"levels": 4, "features": 2, "log2_table": 12, "base_resolution": 16, "hidden": 32, "tcnn": False}
    rebuilt = build_field("hashgrid", BOX, **config)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in field.state_dict().items()}
    rebuilt.load_state_dict(field.state_dict())
    x, d = torch.rand(16, 3) * 2 - 1, F.normalize(torch.randn(16, 3), dim=-1)
    assert all(torch.equal(a, b) for a, b in zip(rebuilt(x, d).values(), field(x, d).values()))

    groups = {g["name"]: g for g in field.param_groups(1e-2)}
    assert set(groups) == {"encoding", "mlp"}
    ids = [id(p) for g in groups.values() for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in field.parameters())
    assert [p is field.encoding.table for p in groups["encoding"]["params"]] == [True]
    assert groups["encoding"]["weight_decay"] == 0 and groups["mlp"]["weight_decay"] == 1e-6
    assert groups["encoding"]["lr"] == groups["mlp"]["lr"] == 1e-2


@pytest.mark.skipif(tcnn_available(), reason="tiny-cuda-nn is installed")
def test_tcnn_absent_raises_one_line():
    assert tcnn_available() is False
    with pytest.raises(RuntimeError, match="^tiny-cuda-nn is not installed") as err:
        HashGridField(BOX, levels=2, log2_table=10, tcnn=True)
    assert "\n" not in str(err.value)


def test_every_backend_file_registers_itself():
    """A backend is its file: each `@register("name")` in fields/ is in the registry without an import list."""
    import ast
    from pathlib import Path

    import recon.fields

    declared = set()
    for path in Path(recon.fields.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "register" and node.args:
                declared.add(node.args[0].value)
    assert declared == set(REGISTRY) and len(declared) >= 6
    for cls in REGISTRY.values():  # the capabilities the app relies on are declared, with their types
        assert isinstance(cls.bounded, bool) and isinstance(cls.smooth_gradient, bool) and cls.has_coordinate_encoding()
