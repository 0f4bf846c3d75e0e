"""bench/gpu_session.sh in its CPU dry run (QUICK=1): every stage of the GPU session runs, tiny, and writes its
results, so a device call (minutes of a small budget) is never spent finding a broken script."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["kernel-parity", "renderer-throughput", "training-kernels-off", "training-kernels-auto", "psnr-against-time"]
PHASES = {"occupancy_update", "sample_rays", "sample", "field", "composite", "interlevel", "backward", "optimizer"}


def positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_the_quick_gpu_session_runs_every_stage_on_a_cpu(tiny_scene: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "RECON_KERNELS"}  # each stage sets its own kernel mode
    env.update(OUT=str(out), QUICK="1", PY=sys.executable, SCENE=str(tiny_scene),
               # one thread a process: two on a busy 2-core machine made the stages several times slower
               OMP_NUM_THREADS="1",
               # the test suite's CPU build of the kernels (the script's default folder would build it again)
               RECON_EXTENSIONS_DIR=os.environ.get("RECON_EXTENSIONS_DIR",
                                                   str(Path.home() / ".cache" / "recon" / "extensions")))
    done = subprocess.run(["bash", "bench/gpu_session.sh", "run"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=400)
    log = (out / "session.log").read_text()
    assert done.returncode == 0, log[-3000:]
    assert "gpu False" in log  # the dry run, not a GPU session: nerfacc is neither built nor imported
    exits = {name: int(code) for name, code in re.findall(r"^== (\S+): exit (\d+) after \d+ s$", log, re.M)}
    assert exits == dict.fromkeys(STAGES, 0), log[-3000:]

    kernels = json.loads((out / "kernels.json").read_text())
    assert kernels["device"] == "cpu" and kernels["rays"] == 1024 and 0 < kernels["occupancy"] <= 1
    assert set(kernels["results"]) == {"torch", "recon-cpu-build"}  # no nerfacc row without a GPU
    assert not kernels["notes"] or set(kernels["notes"]) == {"nerfacc"}  # at most the reason it was skipped
    for row in kernels["results"].values():
        assert all(positive(row[k]) for k in ("seconds_per_batch", "rays_per_second", "samples", "speedup_over_torch"))
    assert kernels["results"]["torch"]["speedup_over_torch"] == 1.0
    samples = {row["samples"] for row in kernels["results"].values()}
    assert len(samples) == 1, "the twins and the CPU build marched different samples on the same rays"
    nearest = kernels["nearest_kernels"]
    assert nearest["kernels"] == 256 and set(nearest["results"]) == {"torch", "kernel", "kd-tree"}
    assert all(positive(row["points_per_second"]) for row in nearest["results"].values())

    for mode in ("off", "auto"):
        profile = json.loads((out / f"profile-{mode}.json").read_text())
        assert profile["kernels"] == mode and profile["device"] == "cpu"
        assert (profile["warmup_steps"], profile["profiled_steps"], profile["render_size"]) == (2, 4, "24x24")
        assert set(profile["phases_ms"]) == PHASES and all(v >= 0 for v in profile["phases_ms"].values())
        assert positive(profile["phases_ms"]["field"]), "the profiler saw no field queries"
        keys = ("ms_per_step", "rays_per_step", "samples_per_step", "rays_per_second", "render_seconds")
        assert all(positive(profile[k]) for k in keys), {k: profile[k] for k in keys}

    curve = json.loads((out / "lego-curve.json").read_text())
    assert curve["device"] == "cpu" and curve["eval_stride"] == 4 and positive(curve["parameters"])
    rows = curve["curve"]
    assert len(rows) == 2 and 0 < rows[0]["steps"] <= rows[1]["steps"]  # one row a mark (1 and 2 s)
    for row in rows:
        assert row["views"] == 1 and 0 < row["train_seconds"] < 10
        assert 10 < row["psnr"] < 60 and 0 < row["ssim"] <= 1, row  # a render of the scene, not a blank or NaNs
