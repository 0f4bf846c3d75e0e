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

import pytest
import torch
from test_cli import TINY
from test_fit import small_config

from recon.app.distributed import join, leave
from recon.app.trainer import Trainer
from recon.data.scene import load_scene

STEPS = 16


def recon(*args: str, cwd: Path, threads: int = 1) -> subprocess.CompletedProcess:
    """One thread a process on both sides of a comparison, so that no reduction runs in another order."""
    return subprocess.run([sys.executable, "-m", "recon", *args], capture_output=True, text=True, cwd=cwd,
                          env=os.environ | {"OMP_NUM_THREADS": str(threads)}, timeout=300)


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
    with socket.socket() as probe:  # a free port for the group's rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torch.multiprocessing.spawn(paused_rank, (str(tiny_scene), tmp_path, port, pause), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]
    for name, value in ranks[0]["field"].items():
        assert torch.equal(value, ranks[1]["field"][name]), name
    for rank in ranks:
        assert rank["wall"] > pause - 1 and rank["train"] < rank["wall"] - pause + 2  # off the training clock
