"""recon's kernels against their torch twins (compositing, the hash grid, occupancy-grid marching, NeuRBF's
nearest kernels): the CPU build of the same bodies everywhere, the CUDA build where there is a GPU. Values and
gradients must agree within float tolerance."""

import inspect
import os
import shutil
import subprocess
import sysconfig
from pathlib import Path
from unittest import mock

import pytest
import torch

from recon.app.cli import main
from recon.app.cli_shared import load_run
from recon.app.export import extract_mesh
from recon.app.export_command import run_frame
from recon.cuda import _cuda_environment, compiled_for, extension, ops, twins
from recon.data.rays import Rays
from recon.data.scene import load_scene
from recon.fields.encodings import HashGridEncoding
from recon.fields.rbf import NearestKernels, nearest_brute_force
from recon.renderers import OccupancyGrid, Samples, march
from recon.renderers.compositing import integrate


def builds() -> list:
    kinds = [pytest.param("cpu", id="cpu")]
    reason = "no GPU: the CUDA build is checked on a GPU machine (BENCHMARKS.md records those runs)"
    kinds.append(pytest.param("cuda", id="cuda",
                              marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=reason)))
    return kinds


@pytest.fixture(scope="module", params=builds())
def kernels(request):
    ext = extension(request.param)
    assert ext is not None, f"the {request.param} kernels did not build"
    return request.param, ext


def packed_samples(device: str, seed: int = 0) -> Samples:
    g = torch.Generator().manual_seed(seed)
    ray_idx = torch.sort(torch.randint(0, 80, (4000,), generator=g)).values  # rays 80..99 and some below: empty
    t0 = torch.rand(4000, generator=g) * 4
    return Samples(ray_idx.to(device), t0.to(device), (t0 + 0.01).to(device), 100)


@pytest.mark.parametrize("stop_eps, ahead", [(0.0, False), (1e-4, False), (1e-2, True)],
                         ids=["no-stop", "ngp", "ahead"])
def test_compositing_matches_the_twin(kernels, stop_eps, ahead):
    """Colour, opacity, weighted distance and weights, and the gradients of all four, with early termination
    (some rays turn opaque part way) and optical depth already crossed (front-to-back rendering)."""
    device, ext = kernels
    samples = packed_samples(device)
    g = torch.Generator().manual_seed(1)
    tau = torch.rand(len(samples), generator=g) * 0.4
    tau[::97] = 12.0  # a few opaque samples: the rest of their ray is terminated
    rgb = torch.rand(len(samples), 3, generator=g)
    before = torch.rand(samples.n_rays, generator=g) * 3 if ahead else None
    grads = {"color": torch.randn(100, 3, generator=g), "opacity": torch.randn(100, generator=g),
             "weighted_t": torch.randn(100, generator=g), "weights": torch.randn(len(samples), generator=g)}

    def run(device: str, kernels) -> tuple[dict, tuple]:
        inputs = [x.to(device).requires_grad_() for x in (tau, rgb) + ((before,) if ahead else ())]
        on = Samples(*(x.to(device) for x in (samples.ray_idx, samples.t0, samples.t1)), samples.n_rays)
        with mock.patch("recon.cuda.ops.compiled_for", lambda _: kernels):
            out = integrate(inputs[1], inputs[0], on, inputs[2] if ahead else None, stop_eps)
        loss = sum((out[key] * grad.to(device)).sum() for key, grad in grads.items())
        return {k: v.detach().cpu() for k, v in out.items()}, tuple(x.cpu() for x in torch.autograd.grad(loss, inputs))

    ours, our_grads = run(device, ext)
    twin, twin_grads = run("cpu", None)
    if stop_eps:
        assert (twin["weights"] == 0).sum() > 100  # termination took effect: some rays turned opaque part way
    for key in twin:
        assert torch.allclose(ours[key], twin[key], atol=1e-5), key
    for a, b in zip(our_grads, twin_grads):
        assert torch.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("layout", ["small", "default"])
def test_hash_encoding_matches_the_twin(kernels, layout):
    device, ext = kernels
    torch.manual_seed(0)
    # small: 3 dense levels and 3 hashed; default: tcnn's 16 x 2 layout (5 dense levels, 11 hashed)
    enc = HashGridEncoding(6, 2, 12, 4, 64) if layout == "small" else HashGridEncoding()
    with torch.no_grad():
        enc.table.uniform_(-1, 1)
    enc = enc.to(device)
    x = torch.rand(5000, 3)
    x[:6] = torch.tensor([[0.0, 0, 0], [1, 1, 1], [1, 0, 1], [0.5, 1, 0.2], [1e-7, 1 - 1e-7, 0.5], [1.5, -0.2, 0.5]])
    x = x.clamp(0, 1).to(device)  # the encoding clamps before either runs
    with mock.patch("recon.cuda.ops.compiled_for", lambda _: ext):
        ours = ops.hash_encode(x, enc.table, enc.hash_levels)
    twin = twins.hash_encode(x, enc.table, enc.hash_levels)
    assert torch.allclose(ours.cpu(), twin.detach().cpu(), atol=1e-5)
    grad = torch.randn_like(ours)
    (ours_table,) = torch.autograd.grad((ours * grad).sum(), enc.table)
    (twin_table,) = torch.autograd.grad((twin * grad.to(twin.device)).sum(), enc.table)
    assert torch.allclose(ours_table.cpu(), twin_table.cpu(), atol=1e-4)


def test_every_op_sits_beside_a_twin_of_its_signature():
    """The callers' one entry (recon.cuda.ops) and the torch twins (recon.cuda.twins) pair up by name."""
    names = sorted(name for name, value in vars(ops).items()
                   if inspect.isfunction(value) and value.__module__ == ops.__name__ and not name.startswith("_"))
    assert names == ["hash_encode", "integrate", "march", "nearest"]
    for name in names:
        assert inspect.signature(getattr(ops, name)) == inspect.signature(getattr(twins, name)), name


def test_cpu_tensors_stay_on_the_twins_unless_asked(monkeypatch):
    assert extension("cuda") is None or torch.cuda.is_available()
    monkeypatch.delenv("RECON_KERNELS", raising=False)
    assert compiled_for(torch.zeros(1)) is None
    monkeypatch.setenv("RECON_KERNELS", "cpu")
    assert compiled_for(torch.zeros(1)) is extension("cpu")
    monkeypatch.setenv("RECON_KERNELS", "off")
    assert compiled_for(torch.zeros(1)) is None
    monkeypatch.setenv("RECON_KERNELS", "fast")
    with pytest.raises(ValueError, match="^RECON_KERNELS='fast' is not one of auto, off, cpu$"):
        compiled_for(torch.zeros(1))


def test_a_kernel_refuses_tensors_on_two_devices(kernels):
    """A pointer from another device would fault inside the kernel, far from the cause; the entry point says
    which devices met instead (the meta device stands in for the other one on a machine with one device)."""
    device, ext = kernels
    tau, t, tau_before = torch.rand(4, device=device), torch.rand(4, device=device), torch.zeros(1, device=device)
    starts = torch.tensor([0, 4], device=device)
    with pytest.raises(RuntimeError, match=f"share one device, got {device}.* and meta"):
        ext.integrate_forward(tau, torch.rand(4, 3, device="meta"), t, starts, tau_before, 0.0)
    with pytest.raises(RuntimeError, match="share one device"):
        ext.march_count(*[torch.rand(n, device=device) for n in ((1, 3), (1, 3), 1, 1)],
                        torch.ones(1, 8, device="meta", dtype=torch.bool), [-1.0] * 3 + [1.0] * 3, 1, 2, 0.1, 0.0, 0.1,
                        16)


@pytest.mark.parametrize("dims, k", [(2, 4), (3, 8), (3, 1)])
def test_nearest_kernels_match_brute_force(kernels, monkeypatch, dims, k):
    """NeuRBF's lookup through candidate lists, one thread a point, against the brute force (clustered centres,
    points on the box's faces)."""
    device, _ = kernels
    monkeypatch.setenv("RECON_KERNELS", "cpu" if device == "cpu" else "auto")
    g = torch.Generator().manual_seed(dims)
    centres = torch.cat([torch.rand(300, dims, generator=g),
                         0.5 + 0.03 * torch.randn(300, dims, generator=g)]).clamp(0, 1)
    points = torch.cat([torch.rand(5000, dims, generator=g), torch.tensor([[0.0] * dims, [1.0] * dims])])
    index, distance = NearestKernels(centres.to(device), k, "grid").query(points.to(device))
    expected_index, expected_distance = nearest_brute_force(points, centres, k)
    assert torch.allclose(distance.cpu(), expected_distance, atol=1e-6)
    assert (index.cpu() == expected_index).float().mean() > 0.999  # ties may swap


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no CUDA toolkit (nvcc) on this machine")
@pytest.mark.parametrize("standard", ["c++20", "c++17"])
def test_the_cuda_sources_compile_with_nvcc(tmp_path, standard):
    """The GPU half compiles here too: nvcc over kernels.cu against this torch's headers (device code for sm_90),
    and the bindings with the CUDA entry points declared; in C++20 as torch >= 2.13 builds extensions, and in
    C++17 as torch 2.11 and 2.12 do (the GPU machines' torch; this torch's headers only warn there)."""
    include = Path(torch.__file__).parent / "include"
    python_include = sysconfig.get_paths()["include"]
    common = ["-DRECON_CUDA", f"-I{include}", f"-I{include / 'torch/csrc/api/include'}", f"-I{python_include}",
              f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", f"-std={standard}", "-O1", "-w"]
    sources = Path(ops.__file__).parent
    nvcc = subprocess.run(["nvcc", "-c", str(sources / "kernels.cu"), "-o", str(tmp_path / "kernels.o"), "-arch=sm_90",
                           "--expt-relaxed-constexpr", *common], capture_output=True, text=True)
    assert nvcc.returncode == 0, nvcc.stderr[-3000:]
    cxx = subprocess.run(["c++", "-c", str(sources / "ops.cpp"), "-o", str(tmp_path / "ops.o"), "-fPIC",
                          "-DTORCH_EXTENSION_NAME=recon_ops_cuda", *common], capture_output=True, text=True)
    assert cxx.returncode == 0, cxx.stderr[-3000:]


BUILD_WITHOUT_A_GPU = """
import torch
torch.cuda.is_available = lambda: True  # a machine without a GPU: the build is told of an sm_90 one
torch.cuda.get_device_capability = lambda *args: (9, 0)
from recon.cuda import extension
ext = extension("cuda")
print(torch.__version__, "built:", " ".join(sorted(n for n in dir(ext) if not n.startswith("_"))) if ext else None)
"""


@pytest.mark.skipif(not os.environ.get("RECON_CUDA_PYTHON"),
                    reason="RECON_CUDA_PYTHON (a python with a CUDA build of torch, and recon) not set; "
                           ".ci/run sets it")
def test_the_cuda_extension_builds_against_a_cuda_torch(tmp_path):
    """The whole first-use build on a GPU machine, done without one: recon's loader with a CUDA build of torch
    compiles both sources, links them against torch's CUDA libraries and the CUDA runtime, and imports the
    module, which offers what the CPU build offers."""
    env = {**os.environ, "RECON_EXTENSIONS_DIR": str(tmp_path), "TORCH_CUDA_ARCH_LIST": "9.0"}
    run = subprocess.run([os.environ["RECON_CUDA_PYTHON"], "-c", BUILD_WITHOUT_A_GPU], env=env, capture_output=True,
                         text=True, timeout=1800)
    cpu = " ".join(sorted(n for n in dir(extension("cpu")) if not n.startswith("_")))
    assert run.returncode == 0 and "+cu" in run.stdout and run.stdout.strip().endswith(f"built: {cpu}"), \
        run.stdout + run.stderr[-3000:]


@pytest.mark.skipif(not Path("/usr/local/cuda/include/cuda_runtime.h").exists(), reason="no toolkit at /usr/local/cuda")
def test_the_cuda_build_finds_the_toolkit_behind_an_nvcc_wrapper(monkeypatch, tmp_path):
    """torch guesses the toolkit from nvcc on PATH, once, at import; a wrapper at /usr/local/bin/nvcc makes that
    /usr/local, with no runtime to link (a build that failed at its last step on these machines). The loader
    puts /usr/local/cuda in its place, but never overrides a CUDA_HOME the user set."""
    from torch.utils import cpp_extension

    monkeypatch.setenv("CUDA_HOME", "")  # recorded, so the loader's own setting is undone after the test
    monkeypatch.delenv("CUDA_HOME")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path))  # a root without cuda_runtime.h
    _cuda_environment()
    assert cpp_extension.CUDA_HOME == "/usr/local/cuda" and os.environ["CUDA_HOME"] == "/usr/local/cuda"
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path))
    _cuda_environment()
    assert cpp_extension.CUDA_HOME == str(tmp_path)


@pytest.mark.parametrize("levels, cone, near, cap",
                         [(1, 0.0, 0.0, 1024), (3, 1 / 256, 0.2, 1024), (2, 1 / 128, 0.1, 7)])
def test_marching_keeps_the_twins_intervals(kernels, levels, cone, near, cap):
    device, ext = kernels
    g = torch.Generator().manual_seed(levels)
    grid = OccupancyGrid(torch.tensor([[-1.0] * 3, [1.0] * 3]), 32, levels)
    grid.occupied.copy_(torch.rand(grid.occupied.shape, generator=g) < 0.3)
    grid = grid.to(device)
    aabb = torch.tensor([[-1.0] * 3, [1.0] * 3], device=device) * 2 ** (levels - 1)
    rays = Rays((torch.randn(800, 3, generator=g) * 3).to(device),
                torch.nn.functional.normalize(torch.randn(800, 3, generator=g), dim=-1).to(device))
    step = 2 * 3**0.5 / 256
    jitter = torch.Generator(device=device).manual_seed(5)
    with mock.patch("recon.cuda.ops.compiled_for", lambda _: None):
        twin = march(rays, grid, aabb, step, cone, near, generator=torch.Generator(device=device).manual_seed(5),
                     max_samples_per_ray=cap)
    with mock.patch("recon.cuda.ops.compiled_for", lambda _: ext):
        ours = march(rays, grid, aabb, step, cone, near, generator=jitter, max_samples_per_ray=cap)
    assert len(twin) > 1000
    # The same intervals: exp and log may differ in their last bit between the two builds, which can move a
    # midpoint across a cell boundary; that has not happened here, but allow one interval in ten thousand.
    assert abs(len(ours) - len(twin)) <= len(twin) // 10_000
    if len(ours) == len(twin):
        assert torch.equal(ours.ray_idx, twin.ray_idx)
        assert torch.allclose(ours.t0, twin.t0, atol=1e-5) and torch.allclose(ours.t1, twin.t1, atol=1e-5)


def test_a_run_trained_through_the_kernels_renders_and_exports_the_same_on_the_twins(kernels, tiny_scene, tmp_path,
                                                                                     monkeypatch):
    """Runs move between paths: trained through the kernels (the CPU build, or CUDA on a GPU), then loaded on the
    CPU's torch twins, the run renders the same test view and exports the same coloured mesh."""
    device, _ = kernels
    monkeypatch.setenv("RECON_KERNELS", "cpu" if device == "cpu" else "auto")
    run = tmp_path / "run"
    main(["fit", str(tiny_scene), "--steps", "60", "--out", str(run), "--device", device, "--eval-stride", "4",
          "-o", "levels=8", "-o", "log2_table=14", "-o", "max_resolution=128", "--grid-resolution", "32"])
    run_dir, cfg, pipeline, _ = load_run(str(run))
    train_cameras, to_unit = run_frame(run_dir, cfg, "export mesh")
    test_cameras = load_scene(tiny_scene).splits["test"].cameras

    def outputs() -> tuple[torch.Tensor, ...]:
        view = pipeline.render_view(test_cameras, 0)
        mesh, _ = extract_mesh(pipeline, train_cameras, to_unit, resolution=48)
        return view["rgb"].cpu(), view["depth"].cpu(), torch.from_numpy(mesh.vertices), torch.from_numpy(mesh.colors)

    on_kernels = outputs()
    monkeypatch.setenv("RECON_KERNELS", "off")
    pipeline.to("cpu")
    on_twins = outputs()
    rgb, depth, vertices, colors = on_kernels
    assert rgb.std() > 0.05 and len(vertices) > 100  # a trained field, not a blank one
    assert torch.allclose(rgb, on_twins[0], atol=1e-4) and torch.allclose(depth, on_twins[1], atol=1e-4)
    assert vertices.shape == on_twins[2].shape and torch.allclose(vertices, on_twins[2], atol=1e-5)
    assert (colors.int() - on_twins[3].int()).abs().max() <= 1  # 8-bit colours: at most one level of rounding
