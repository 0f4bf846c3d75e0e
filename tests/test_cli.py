"""The command line end to end: fit, eval, render, resume, Ctrl-C / SIGTERM and bad input."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import imageio.v3 as iio
import pytest
import torch
import trimesh

from recon.app.cli import main
from recon.data.camera_paths import CameraPath, Keyframe
from recon.data.scene import load_scene

TINY = ["-o", "levels=4", "-o", "log2_table=12", "-o", "max_resolution=64", "--batch-rays", "256",
        "--grid-resolution", "16", "--device", "cpu"]


def recon(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "recon.app.cli", *args], capture_output=True, text=True, **kwargs)


def test_fit_eval_render_and_resume(tiny_scene, tmp_path):
    run = tmp_path / "run"
    main(["fit", str(tiny_scene), "--steps", "30", "--out", str(run), *TINY])
    for name in ("config.json", "scene.json", "log.jsonl", "metrics.json", "checkpoints/latest"):
        assert (run / name).exists(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["schema"] == "recon.metrics/1" and metrics["train"]["steps"] == 30
    assert len(metrics["views"]) == metrics["eval"]["views_evaluated"] == 4
    assert metrics["mean"]["psnr"] > 10 and metrics["mean"]["lpips"] is None
    assert len(list((run / "renders" / "test").glob("*.png"))) == 4

    main(["eval", str(run), "--stride", "2"])
    assert json.loads((run / "metrics.json").read_text())["eval"]["views_evaluated"] == 2

    main(["render", str(run), "--path", "orbit", "--frames", "4", "--downscale", "2"])
    assert (run / "renders" / "orbit.mp4").stat().st_size > 0
    frames = sorted((run / "renders" / "orbit-render").glob("*.png"))
    assert len(frames) == 4 and iio.imread(frames[0]).shape[:2] == (24, 24)  # the 48-pixel scene, halved

    # A camera path through training views 0 and 3 (world frame, as the viewer saves it): 1 s at 3 fps, and
    # its first frame is training view 0.
    scene = load_scene(tiny_scene)
    train = scene.splits["train"].cameras
    world = train.transformed(torch.linalg.inv(scene.to_unit))
    fov = math.degrees(2 * math.atan(24 / float(train.fy[0])))
    CameraPath([Keyframe(world.c2w[0], fov), Keyframe(world.c2w[3], fov)], seconds=1.0, fps=3, height=48,
               width=48).save(tmp_path / "walk.json")
    main(["render", str(run), "--camera-path", str(tmp_path / "walk.json")])
    walk = sorted((run / "renders" / "walk-render").glob("*.png"))
    assert len(walk) == 3 and (run / "renders" / "walk.mp4").stat().st_size > 0
    main(["render", str(run), "--path", "train"])
    first_view = iio.imread(run / "renders" / "train-render" / "0000.png").astype(float)
    assert abs(iio.imread(walk[0]).astype(float) - first_view).mean() < 1.0

    main(["export", "mesh", str(run), "--resolution", "32", "--format", "obj"])
    mesh = trimesh.load(run / "export" / "mesh-32.obj", force="mesh")
    truth = trimesh.load(tiny_scene / "mesh.ply")
    # In the input cameras' frame: the mesh overlaps the ground truth's box, never far outside it.
    assert len(mesh.faces) > 0 and mesh.visual.vertex_colors.shape == (len(mesh.vertices), 4)
    assert (mesh.bounds[0] > truth.bounds[0] - 0.3).all() and (mesh.bounds[1] < truth.bounds[1] + 0.3).all()
    main(["export", "pointcloud", str(run), "--points", "50", "--min-opacity", "0.5"])
    cloud = trimesh.load(run / "export" / "pointcloud.ply")
    assert len(cloud.vertices) == 50 and (cloud.bounds[0] > truth.bounds[0] - 0.3).all()
    main(["export", "video", str(run), "--path", "test", "--fps", "2"])
    frame = iio.imread(run / "export" / "video-test-frames" / "0000.png")
    assert frame.shape == (48, 96, 3) and (run / "export" / "video-test.mp4").stat().st_size > 0  # colour | depth
    for bad in (["export", "mesh", str(run), "--format", "xyz"], ["export", "mesh", str(run), "--method", "poisson"],
                ["export", "sdf", str(run), "--resolution", "2"], ["export", "pointcloud", str(run), "--points", "0"],
                ["export", "video", str(run), "--path", "nowhere"],
                ["fit", str(tiny_scene), "--quantize", "-1", "--out", str(tmp_path / "never")],
                ["fit", str(tiny_scene), "-o", "levels=-3", "--out", str(tmp_path / "never")],
                ["export", "mesh", str(run), "--resolution", "4"],
                ["export", "mesh", str(run), "--crop", "10", "10", "10", "11", "11", "11"],
                ["export", "mesh", str(run), "--resolution", "16", "--level", "2"],  # no opacity reaches 2: no surface
                ["render", str(run), "--downscale", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            main(bad)
        assert exit_info.value.code == 2, bad
    assert not (run / "export" / "mesh-16.ply").exists()

    main(["fit", "--resume", str(run), "--steps", "40"])
    assert (run / "checkpoints" / "step-0000040.pt").exists()
    assert json.loads((run / "metrics.json").read_text())["train"]["steps"] == 40


def test_existing_run_folder_is_not_overwritten(tiny_scene, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "keep.txt").write_text("precious")
    result = recon("fit", str(tiny_scene), "--steps", "5", "--out", str(run), *TINY)
    assert result.returncode == 2
    assert "--overwrite" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert (run / "keep.txt").read_text() == "precious"


@pytest.mark.parametrize("make_bad, expected", [
    (lambda d: d / "missing", "missing"),
    (lambda d: d, "transforms"),
    (lambda d: (d / "transforms.json").write_text("{ not json") and d, "transforms.json"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, make_bad, expected):
    bad = make_bad(tmp_path)
    result = recon("fit", str(bad), "--out", str(tmp_path / "run"))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr and expected in lines[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_a_run_trained_on_a_gpu_loads_on_a_machine_without_one(tiny_scene, tmp_path, capsys):
    run = tmp_path / "run"
    main(["fit", str(tiny_scene), "--steps", "5", "--out", str(run), "--eval-stride", "4", *TINY])
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps(config | {"device": "cuda"}))  # as `--device cuda` records it
    capsys.readouterr()
    main(["eval", str(run), "--stride", "4"])
    assert "no GPU here, so it runs on the CPU" in capsys.readouterr().out
    assert json.loads((run / "metrics.json").read_text())["eval"]["views_evaluated"] == 1


def test_a_bad_kernels_setting_is_one_line_exit_2(tiny_scene, tmp_path):
    result = recon("fit", str(tiny_scene), "--out", str(tmp_path / "run"), env=os.environ | {"RECON_KERNELS": "gpu"})
    assert (result.returncode == 2
            and result.stderr.strip() == "recon: error: RECON_KERNELS='gpu' is not one of auto, off, cpu")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"])
def test_a_signal_writes_a_checkpoint_and_resume_continues(tiny_scene, tmp_path, signum, code):
    run = tmp_path / "run"
    # SIGINT as a terminal delivers it: a test runner started in the background (`pytest &`) inherits
    # SIGINT ignored from the shell, and Python then installs no KeyboardInterrupt handler.
    process = subprocess.Popen([sys.executable, "-m", "recon.app.cli", "fit", str(tiny_scene), "--steps", "100000",
                                "--out", str(run), *TINY], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not (run / "log.jsonl").exists() and time.time() < deadline:
        time.sleep(0.2)
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    assert process.returncode == code, err
    checkpoints = list((run / "checkpoints").glob("step-*.pt"))
    assert len(checkpoints) == 1
    step = int(checkpoints[0].stem.split("-")[1])
    assert step >= 25
    result = recon("fit", "--resume", str(run), "--steps", str(step + 5))
    assert result.returncode == 0, result.stderr
    assert (run / "checkpoints" / f"step-{step + 5:07d}.pt").exists()
