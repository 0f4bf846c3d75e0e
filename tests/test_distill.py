"""`recon distill`: a student of another backend learns a trained teacher's field (progressive volume
distillation), and the run it writes is an ordinary run."""

import json

import pytest
import torch

from recon.app.cli import main
from recon.app.cli_shared import load_run
from recon.app.distill import LOG_DENSITY_RANGE, clamped_log_density
from recon.app.metrics import psnr
from recon.data.scene import load_scene

TEACHER = ["-o", "levels=8", "-o", "log2_table=15", "-o", "max_resolution=256", "--grid-resolution", "32",
           "--device", "cpu", "--no-viewer"]


@pytest.fixture(scope="module")
def teacher(tiny_scene, tmp_path_factory):
    run = tmp_path_factory.mktemp("distill") / "teacher"
    main(["fit", str(tiny_scene), "--steps", "400", "--out", str(run), *TEACHER])
    return run


def test_clamped_log_density_has_no_gradient_outside_its_range():
    density = torch.tensor([0.0, 1e-3, 1.0, 1e4], requires_grad=True)
    value = clamped_log_density(density)
    value.sum().backward()
    assert torch.allclose(value, torch.tensor([LOG_DENSITY_RANGE[0], LOG_DENSITY_RANGE[0], 0.0, LOG_DENSITY_RANGE[1]]))
    assert torch.equal(density.grad, torch.tensor([0.0, 0.0, 1.0, 0.0]))  # empty space and zeros: no pull, no NaN


def test_a_voxel_student_learns_the_hash_grid_teacher_and_its_run_is_a_run(teacher, tiny_scene, tmp_path):
    student = tmp_path / "student"
    main(["distill", str(teacher), "--field", "voxel", "--steps", "300", "--out", str(student), "--no-viewer"])
    config = json.loads((student / "config.json").read_text())
    assert config["field"] == "voxel" and config["distilled_from"]["run"] == str(teacher.absolute())
    assert "PVD" in config["distilled_from"]["method"]

    # The student renders what the teacher renders (its target), and the photos nearly as well as the teacher.
    test = load_scene(tiny_scene).splits["test"]
    _, _, teacher_pipeline, _ = load_run(str(teacher))
    _, _, student_pipeline, _ = load_run(str(student))
    for index in range(len(test)):
        taught = teacher_pipeline.render_view(test.cameras, index)["rgb"]
        learnt = student_pipeline.render_view(test.cameras, index)["rgb"]
        assert psnr(learnt, taught) > 30.0
    scores = {name: json.loads((run / "metrics.json").read_text())["mean"]["psnr"] for name, run in
              (("teacher", teacher), ("student", student))}
    assert scores["student"] > scores["teacher"] - 1.5, scores

    # Every command reads it: eval, render, export; a resume continues it as a distillation.
    main(["eval", str(student), "--stride", "2"])
    main(["render", str(student), "--path", "orbit", "--frames", "2", "--downscale", "2"])
    main(["export", "mesh", str(student), "--resolution", "32"])
    main(["fit", "--resume", str(student), "--steps", "320"])
    assert json.loads((student / "metrics.json").read_text())["train"]["steps"] == 320


def test_what_cannot_be_distilled_is_one_line_and_nothing_is_lost(teacher, tmp_path, capsys):
    before = sorted(p.name for p in teacher.iterdir())
    with pytest.raises(SystemExit) as exit_info:
        main(["distill", str(teacher), "--field", "vm", "--out", str(teacher), "--overwrite", "--no-viewer"])
    assert exit_info.value.code == 2 and "holds the teacher run" in capsys.readouterr().err
    assert sorted(p.name for p in teacher.iterdir()) == before

    sdf = tmp_path / "sdf"
    (sdf / "checkpoints").mkdir(parents=True)
    config = json.loads((teacher / "config.json").read_text()) | {"model": "sdf"}
    (sdf / "config.json").write_text(json.dumps(config))
    for checkpoint in (teacher / "checkpoints").iterdir():
        (sdf / "checkpoints" / checkpoint.name).write_bytes(checkpoint.read_bytes())
    with pytest.raises(SystemExit) as exit_info:
        main(["distill", str(sdf), "--field", "vm", "--out", str(tmp_path / "out"), "--no-viewer"])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "an SDF" in error and len(error.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
