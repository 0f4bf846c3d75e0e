"""Data-parallel training (app.distributed) on the CPU: two gloo ranks started by `recon fit --nproc 2`
(torchrun's launcher) against one process summing the same ray batches."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from test_cli import TINY
from test_fit import small_config
from test_viewer import Browser

from recon.app.distributed import join, leave
from recon.app.trainer import Trainer
from recon.app.viser_cameras import cameras_to_viser
from recon.data.scene import load_scene

STEPS = 16


def recon(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """One thread a process on both sides of a comparison, so that no reduction runs in another order."""
    return subprocess.run([sys.executable, "-m", "recon", *args], capture_output=True, text=True, cwd=cwd,
                          env=os.environ | {"OMP_NUM_THREADS": "1"} | env, timeout=300)


def fit(scene: Path, out: Path, *options: str) -> subprocess.CompletedProcess:
    result = recon("fit", str(scene), "--out", str(out), "--steps", str(STEPS), "--checkpoint-every", "8",
                   "--no-viewer", *TINY, *options, cwd=out.parent)
    assert result.returncode == 0, result.stderr
    return result


def resume(run: Path, *options: str) -> None:
    result = recon("fit", "--resume", str(run), "--steps", str(STEPS), *options, cwd=run.parent)
    assert result.returncode == 0, result.stderr


def weights(run: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run / "checkpoints" / f"step-{STEPS:07d}.pt", weights_only=False)
    pipeline = state["pipeline"]
    return {**{f"field.{k}": v for k, v in pipeline["field"]["state"].items()},
            **{f"grid.{k}": v for k, v in pipeline["grid"].items()}}


@pytest.fixture(scope="module")
def runs(tiny_scene, tmp_path_factory):
    """Runs of two ray batches a step: 16 steps on two ranks and in one process; and 8 steps (a schedule of 8)
    resumed to 16 in one process, or with the ranks changed from two to one and from one to two."""
    root = tmp_path_factory.mktemp("ranks")
    fit(tiny_scene, root / "two-ranks", "--nproc", "2")
    fit(tiny_scene, root / "one-process", "--batches", "2")
    fit(tiny_scene, root / "two-then-one", "--nproc", "2", "--steps", "8")
    resume(root / "two-then-one")
    fit(tiny_scene, root / "one-then-one", "--batches", "2", "--steps", "8")
    shutil.copytree(root / "one-then-one", root / "one-then-two")
    resume(root / "one-then-one")
    resume(root / "one-then-two", "--nproc", "2")
    return root, {run.name: weights(run) for run in root.iterdir()}


def test_two_ranks_learn_what_one_process_learns_from_both_batches(runs):
    root, learnt = runs
    two, one = learnt["two-ranks"], learnt["one-process"]
    assert two.keys() == one.keys()
    for name in two:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6, msg=name)
    assert json.loads((root / "two-ranks" / "config.json").read_text())["batches"] == 2
    metrics = json.loads((root / "two-ranks" / "metrics.json").read_text())
    assert metrics["train"]["ranks"] == 2 and metrics["eval"]["views_evaluated"] == 4  # the ranks shared the views
    assert len(list((root / "two-ranks" / "renders" / "test").glob("*.png"))) == 4


def test_only_rank_zero_writes(runs):
    root, _ = runs
    assert sorted(p.name for p in root.iterdir()) == ["one-process", "one-then-one", "one-then-two", "two-ranks",
                                                      "two-then-one"]
    log = [json.loads(line) for line in (root / "two-ranks" / "log.jsonl").read_text().splitlines()]
    assert [record["step"] for record in log] == [STEPS]  # one writer: no record twice
    assert sorted(p.name for p in (root / "two-ranks" / "checkpoints").iterdir()) == [
        "latest", "step-0000008.pt", f"step-{STEPS:07d}.pt"]


def test_torchrun_renders_with_the_ranks_taking_turns(runs):
    root, _ = runs
    run = root / "two-ranks"
    launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                               "-m", "recon", "render", str(run), "--path", "orbit", "--frames", "3"], cwd=root,
                              capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert launched.returncode == 0, launched.stderr
    assert launched.stdout.count("wrote 3 frames") == 1  # rank 0 says it, and writes
    frames = sorted((run / "renders" / "orbit-render").glob("*.png"))
    assert len(frames) == 3 and (run / "renders" / "orbit.mp4").stat().st_size > 0
    shared = [iio.imread(frame) for frame in frames]
    single = recon("render", str(run), "--path", "orbit", "--frames", "3", cwd=root)
    assert single.returncode == 0, single.stderr
    for frame, image in zip(frames, shared):  # the same frames in the same order as one process renders
        assert np.array_equal(iio.imread(frame), image), frame.name


def test_a_run_resumes_on_another_number_of_ranks(runs):
    _, learnt = runs
    for resumed in ("two-then-one", "one-then-two"):
        for name, value in learnt["one-then-one"].items():
            torch.testing.assert_close(learnt[resumed][name], value, rtol=1e-5, atol=1e-6, msg=f"{resumed} {name}")


def rank_process(launcher: int, rank: int) -> int:
    """The pid of rank `rank` among the launcher's children (torchrun's workers carry RANK in their environment)."""
    for child in Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split():
        if f"RANK={rank}".encode() in Path(f"/proc/{child}/environ").read_bytes().split(b"\0"):
            return int(child)
    raise AssertionError(f"no rank {rank} under {launcher}")


def test_a_killed_rank_ends_the_others_with_a_message(tiny_scene, tmp_path):
    run = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "recon", "fit", str(tiny_scene), "--out", str(run), "--steps",
                                "100000", "--nproc", "2", "--checkpoint-every", "20", "--no-viewer", *TINY],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    deadline = time.time() + 120
    while not list(run.glob("checkpoints/step-*.pt")) and time.time() < deadline:
        time.sleep(0.2)
    os.kill(rank_process(process.pid, 1), signal.SIGKILL)
    killed = time.time()
    _, err = process.communicate(timeout=60)
    assert time.time() - killed < 30
    assert process.returncode == 4, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("recon: error: rank 1 of 2 ended (signal SIGKILL) and the others were stopped; "
                           "the last checkpoint is "), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_sigterm_reaches_every_rank_and_ends_in_one_checkpoint(tiny_scene, tmp_path):
    run = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "recon", "fit", str(tiny_scene), "--out", str(run), "--steps",
                                "100000", "--nproc", "2", "--no-viewer", *TINY],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    deadline = time.time() + 120
    while not (run / "log.jsonl").exists() and time.time() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)  # as a scheduler does to the launcher: torchrun passes it to each rank
    out, err = process.communicate(timeout=60)
    assert process.returncode == 143, err
    checkpoints = list((run / "checkpoints").glob("step-*.pt"))
    assert len(checkpoints) == 1 and f"saved {checkpoints[0]}" in out


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PausedViewer:
    """The viewer's side of the trainer's gate: paused from the start, resumed after `seconds`."""

    def __init__(self, seconds: float):
        self.lock, self.paused = threading.Lock(), threading.Event()
        self.paused.set()
        threading.Timer(seconds, self.paused.clear).start()


def paused_rank(rank: int, scene: str, out: Path, port: int, pause: float) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", RECON_COLLECTIVE_TIMEOUT=str(pause / 3))
    torch.set_num_threads(1)
    join("cpu")
    trainer = Trainer(small_config(scene, steps=10, batch_rays=256, sample_budget=None), load_scene(scene))
    started = time.perf_counter()
    trainer.run(gate=PausedViewer(pause) if rank == 0 else None)
    torch.save({"field": trainer.pipeline.field.state_dict(), "wall": time.perf_counter() - started,
                "train": trainer.progress.seconds}, out / f"rank{rank}.pt")
    leave()


def test_the_viewers_pause_on_rank_zero_holds_every_rank_longer_than_the_collective_timeout(tiny_scene, tmp_path):
    pause = 9.0
    torch.multiprocessing.spawn(paused_rank, (str(tiny_scene), tmp_path, free_port(), pause), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]
    for name, value in ranks[0]["field"].items():
        assert torch.equal(value, ranks[1]["field"][name]), name
    for rank in ranks:
        assert rank["wall"] > pause - 1 and rank["train"] < rank["wall"] - pause + 2  # off the training clock


def test_rank_zero_serves_the_viewer_while_every_rank_trains(tiny_scene, tmp_path):
    run, port = tmp_path / "run", free_port()
    process = subprocess.Popen([sys.executable, "-m", "recon", "fit", str(tiny_scene), "--out", str(run), "--steps",
                                "150", "--nproc", "2", "--viewer", "--port", str(port), *TINY],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    deadline = time.time() + 120
    while not (run / "log.jsonl").exists() and time.time() < deadline:
        time.sleep(0.2)
    browser = Browser(port)
    try:
        browser.look(*cameras_to_viser(load_scene(tiny_scene).splits["train"].cameras, 0)[:3])
        frames = browser.frames(4.0)
    finally:
        browser.close()
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    assert frames >= 1 and f"viewer: http://127.0.0.1:{port}" in out
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(25, 151, 25))  # every rank trained on to the end, rank 0 logging


def test_a_scheduler_array_fits_one_scene_of_a_list_a_task(tiny_scene, tmp_path):
    (tmp_path / "scenes").mkdir()
    shutil.copytree(tiny_scene, tmp_path / "scenes" / "ball")
    listed = tmp_path / "scenes" / "list.txt"
    listed.write_text("# one scene a line, relative to this file\nball\n\n/nowhere/else\n")
    short = ["--steps", "5", "--eval-stride", "4", "--no-viewer", *TINY]
    done = recon("fit", str(listed), "--out", "batch", *short, cwd=tmp_path, SLURM_ARRAY_TASK_ID="0")
    assert done.returncode == 0, done.stderr
    config = json.loads((tmp_path / "batch" / "ball" / "config.json").read_text())
    assert config["scene"] == str(tmp_path / "scenes" / "ball")
    for options, env, error in [
            ([], {}, f"{listed}: a list of 2 scenes: pick one with --scene-index I (0 to 1) or run it as a Slurm "
                     "array (SLURM_ARRAY_TASK_ID)"),
            (["--scene-index", "2"], {"SLURM_ARRAY_TASK_ID": "0"}, f"{listed}: lists 2 scenes (0 to 1); there is no "
                                                                   "scene 2"),
            (["--scene-index", "1"], {}, "/nowhere/else: no such file or folder")]:
        refused = recon("fit", str(listed), "--out", "other", *options, *short, cwd=tmp_path, **env)
        assert refused.returncode == 2 and refused.stderr.strip() == f"recon: error: {error}", refused.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["batch", "scenes"]


def test_the_proposal_fields_stay_identical_on_every_rank(tiny_scene, tmp_path):
    for out, options in (("two-ranks", ["--nproc", "2"]), ("one-process", ["--batches", "2"])):
        fit(tiny_scene, tmp_path / out, "--sampler", "proposal", "--steps", "8", *options)
    two, one = (torch.load(tmp_path / out / "checkpoints" / "step-0000008.pt", weights_only=False)["pipeline"]
                for out in ("two-ranks", "one-process"))
    for name, value in two["proposals"].items():
        torch.testing.assert_close(value, one["proposals"][name], rtol=1e-5, atol=1e-6, msg=name)


def test_a_bad_scene_on_two_ranks_is_one_line_and_exit_2(tmp_path):
    refused = recon("fit", str(tmp_path / "nowhere"), "--nproc", "2", "--no-viewer", cwd=tmp_path)
    assert refused.returncode == 2, refused.stderr  # every rank leaves cleanly: no rank aborts on the way out
    assert refused.stderr.strip() == f"recon: error: {tmp_path / 'nowhere'}: no such file or folder"
    assert list(tmp_path.iterdir()) == []
