"""recon's kernels and their loader.

The kernel bodies live in `kernels.h` as functions both nvcc and the C++ compiler build: `kernels.cu`
launches them on a GPU, `ops.cpp` runs them in loops on a CPU and binds both into one compiled module. `ops`
holds each kernel as a torch op beside its pure-torch twin in `twins` (same name, arguments and results), which
runs wherever the kernel does not and is the tests' oracle. Callers use `ops` only.

`extension("cuda")` builds the GPU module on first use, only when torch sees a GPU (never merely because
nvcc is on PATH), into a private folder keyed by torch's version and the device's architecture, and logs
how long the build took; without a GPU, a compiler or a successful build it says why in one line, once, and
returns None, and every op stays on its twin. `extension("cpu")` builds the same sources for the CPU, which
is how the tests check the kernel bodies against the twins on machines without a GPU. Nothing compiles at
`pip install`.

`compiled_for(tensor)` is the one place that picks a path, by the tensor's device and `RECON_KERNELS`:
"auto" (default: the CUDA build for GPU tensors, the twins for CPU ones), "off" (the twins everywhere: the
baseline the GPU benchmarks compare with) or "cpu" (the CPU build for CPU tensors too: the tests run whole
fits through the kernel bodies that way).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger("recon.cuda")
SOURCES = Path(__file__).parent
MODES = ("auto", "off", "cpu")


def kernels_mode() -> str:
    """RECON_KERNELS, checked: a bad value is a one-line ValueError naming the variable."""
    mode = os.environ.get("RECON_KERNELS", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"RECON_KERNELS={mode!r} is not one of {', '.join(MODES)}")
    return mode


def compiled_for(tensor: torch.Tensor) -> ModuleType | None:
    """The compiled module for `tensor`'s device under RECON_KERNELS, or None: use the torch twin."""
    mode = kernels_mode()
    if mode == "off":
        return None
    if tensor.is_cuda:
        return extension("cuda")
    return extension("cpu") if mode == "cpu" else None


def build_folder(kind: str) -> Path:
    arch = "cpu"
    if kind == "cuda":
        major, minor = torch.cuda.get_device_capability()
        arch = f"sm{major}{minor}"
    root = Path(os.environ.get("RECON_EXTENSIONS_DIR", Path.home() / ".cache" / "recon" / "extensions"))
    folder = root / f"torch{torch.__version__.replace('+', '-')}-{arch}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _cuda_environment() -> list[str]:
    """The toolkit for torch's build, and extra include folders.

    torch guesses the toolkit's root once, when cpp_extension is first imported, from nvcc on PATH; a wrapper
    script at /usr/local/bin/nvcc makes that /usr/local, where there is no CUDA runtime to link. Unless the user
    set CUDA_HOME, a guess without the runtime's headers gives way to /usr/local/cuda. The nvidia wheels'
    headers (cuBLAS and friends, missing from the slim toolkit) go on the include path if they are there."""
    from torch.utils import cpp_extension

    def has_runtime(root: str | None) -> bool:
        return root is not None and (Path(root) / "include" / "cuda_runtime.h").exists()

    if "CUDA_HOME" not in os.environ and not has_runtime(cpp_extension.CUDA_HOME) and has_runtime("/usr/local/cuda"):
        os.environ["CUDA_HOME"] = cpp_extension.CUDA_HOME = "/usr/local/cuda"
    wheel_headers = [p for p in (Path(torch.__file__).parents[1] / "nvidia").glob("cu*/include") if p.is_dir()]
    return [str(p) for p in wheel_headers]


@functools.cache
def extension(kind: str = "cuda") -> ModuleType | None:
    """The compiled module for `kind` ("cuda" or "cpu"), or None (said once) when it cannot be had."""
    if kind == "cuda" and not torch.cuda.is_available():
        return None  # the twins are the CPU path; nothing to say
    try:
        from torch.utils.cpp_extension import load

        started = time.perf_counter()
        flags = ["-O3", "-DRECON_CUDA"] if kind == "cuda" else ["-O3"]
        include = _cuda_environment() if kind == "cuda" else []
        sources = [SOURCES / "ops.cpp"] + ([SOURCES / "kernels.cu"] if kind == "cuda" else [])
        module = load(name=f"recon_ops_{kind}", sources=[str(s) for s in sources], extra_cflags=flags,
                      extra_cuda_cflags=flags, extra_include_paths=include, build_directory=str(build_folder(kind)),
                      with_cuda=kind == "cuda", verbose=False)
        log.info("recon: %s kernels ready in %.1f s", kind, time.perf_counter() - started)
        return module
    except Exception as error:  # a missing compiler, ninja or toolkit, or a failed build: the twins serve
        print(f"recon: {kind} kernels unavailable, using the torch path ({type(error).__name__}: "
              f"{str(error).strip().splitlines()[-1] if str(error).strip() else 'no detail'})")
        return None
