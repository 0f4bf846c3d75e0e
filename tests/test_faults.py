"""Training and storage faults: non-finite steps, divergence, a kill mid-save, a malicious
checkpoint, a viewer port in use. Each loses nothing that was already saved."""

import os
import signal
import socket
import subprocess
import sys
import time

import imageio.v2 as imageio
import numpy as np
import pytest
import torch

from recon.app import trainer as trainer_module
from recon.app.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from recon.app.cli import main
from recon.app.config import FitConfig
from recon.app.trainer import Trainer, TrainingDiverged
from recon.app.viewer import free_port
from recon.data.targets import load_image


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    y, x = np.mgrid[0:32, 0:32] / 32.0
    image = np.stack([0.5 + 0.4 * np.sin(6 * x), 0.3 + 0.5 * y, 0.5 + 0.4 * np.cos(5 * x * y)], -1)
    path = tmp_path_factory.mktemp("image") / "photo.png"
    imageio.imwrite(path, (image * 255).astype(np.uint8))
    return path


def image_trainer(photo, steps: int) -> Trainer:
    cfg = FitConfig(scene=str(photo), out="", field="hashgrid", field_options={"levels": 4, "log2_table": 10},
                    steps=steps, batch_points=512, log_every=5, device="cpu")
    return Trainer(cfg, load_image(photo))


def poison(trainer: Trainer, bad_steps) -> None:
    """Make the task's loss NaN at the given steps (as a blown-up field would)."""
    loss = trainer.task.loss

    def poisoned(generator):
        result = loss(generator)
        if trainer.step in bad_steps:
            result.loss = result.loss * float("nan")
        return result

    trainer.task.loss = poisoned


def parameters(trainer: Trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.pipeline.field.parameters()]


def test_non_finite_steps_are_skipped_and_training_goes_on(photo, tmp_path):
    trainer = image_trainer(photo, steps=200)
    poison(trainer, {3, 4, 5})
    trainer.run(stop_at=3)
    before = parameters(trainer)
    trainer.run(stop_at=6)  # three poisoned steps: nothing learnt, nothing broken
    for a, b in zip(before, parameters(trainer)):
        assert torch.equal(a, b)
    trainer.run()
    assert trainer.step == 200 and trainer.skipped_steps == 3 and trainer.lr_scale == 1.0
    assert trainer.task.evaluate(tmp_path)["mean"]["psnr"] > 30


def test_a_loss_that_stays_non_finite_lowers_the_learning_rate_then_stops(photo):
    trainer = image_trainer(photo, steps=500)
    poison(trainer, range(10, 500))
    with pytest.raises(TrainingDiverged):
        trainer.run()
    drops = trainer_module.LR_DROPS
    assert trainer.lr_scale == 0.5**drops
    assert trainer.skipped_steps == trainer_module.SKIPS_BEFORE_LR_DROP * (drops + 1)


def test_divergence_keeps_the_last_good_checkpoint_and_exits_3(photo, tmp_path, monkeypatch, capsys):
    original = Trainer._finite
    monkeypatch.setattr(Trainer, "_finite", lambda self, finite: original(self, finite and self.step < 25))
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        main(["fit", str(photo), "--out", str(run), "--steps", "300", "--checkpoint-every", "20", "--device", "cpu",
              "-o", "levels=4", "-o", "log2_table=10"])
    assert stop.value.code == 3
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("recon: error")]
    # Steps 25..44 were skipped, so the checkpoint of step 40 holds step 25's (finite) parameters.
    assert len(errors) == 1 and "diverged" in errors[0] and "step-0000040.pt" in errors[0]
    state = load_checkpoint(latest_checkpoint(run / "checkpoints"))
    assert state["step"] == 40
    assert all(torch.isfinite(t).all() for t in state["pipeline"]["field"]["state"].values())


def test_kill_9_mid_save_leaves_the_previous_checkpoint_intact(tmp_path):
    folder = tmp_path / "checkpoints"
    save_checkpoint(folder, 1, {"weights": torch.ones(1000)})
    writer = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, torch; from pathlib import Path; from recon.app.checkpoint import save_checkpoint\n"
         "big = torch.randn(2**24)\n"
         "print('ready', flush=True)\n"
         "for step in range(2, 10**6): save_checkpoint(Path(sys.argv[1]), step, {'weights': big})",
         str(folder)], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "ready"
    time.sleep(1.5)  # a 64 MB tensor per save: the kill lands mid-write
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    state = load_checkpoint(latest_checkpoint(folder))
    assert state["weights"].numel() in (1000, 2**24) and torch.isfinite(state["weights"]).all()


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['RECON_EXPLOIT_MARK']}",))


def test_a_malicious_checkpoint_is_refused_without_running_it(tmp_path, monkeypatch):
    mark = tmp_path / "owned"
    monkeypatch.setenv("RECON_EXPLOIT_MARK", str(mark))
    path = tmp_path / "step-0000001.pt"
    torch.save({"format": 1, "payload": Exploit()}, path)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)
    assert not mark.exists()


def test_a_viewer_port_in_use_moves_to_the_next_free_one():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert free_port("127.0.0.1", port) > port


def test_out_of_memory_halves_the_batch_and_goes_on(photo, caplog):
    trainer = image_trainer(photo, steps=20)
    loss = trainer.task.loss

    def tight_memory(generator):  # as a GPU with room for 300 points per step would behave
        if trainer.task.cfg.batch_points > 300:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return loss(generator)

    trainer.task.loss = tight_memory
    trainer.run()
    assert trainer.step == 20 and trainer.task.cfg.batch_points == 256
    assert "out of CPU memory, batch halved to 256 points" in caplog.text
    trainer.task.loss = lambda generator: (_ for _ in ()).throw(torch.OutOfMemoryError("still too big"))
    trainer.progress.steps = 21
    with pytest.raises(torch.OutOfMemoryError):  # at the smallest batch there is nothing left to try
        trainer.run()
