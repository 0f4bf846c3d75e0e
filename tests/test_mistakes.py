"""A user's mistakes: nothing they own is lost, no bad value slips through, runs work from anywhere.

Each refusal is one line naming the option (or the file and its field), exit 2, and nothing written."""

import json
import os
import shutil

import pytest

from recon.app.cli import main

TINY = ["-o", "levels=4", "-o", "log2_table=12", "-o", "max_resolution=64", "--batch-rays", "256",
        "--grid-resolution", "16", "--device", "cpu"]


def refused(capsys, argv: list[str]) -> str:
    """The one line of a refusal (exit 2)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2, (argv, err)
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_scene):
    """A project folder holding a copy of the scene and a short run of it: the whole can be moved."""
    project = tmp_path_factory.mktemp("project")
    shutil.copytree(tiny_scene, project / "scene")
    main(["fit", str(project / "scene"), "--steps", "20", "--out", str(project / "run"), "--eval-stride", "4", *TINY])
    return project


# One row a mistake: the command (SCENE and RUN filled in), and what the line must name.
BAD_VALUES = [
    (["fit", "SCENE", "--max-time", "0"], "--max-time"),
    (["fit", "SCENE", "--max-time", "-5"], "--max-time"),
    (["fit", "SCENE", "--steps", "-5"], "--steps"),
    (["fit", "SCENE", "--steps", "2.5"], "--steps"),
    (["fit", "SCENE", "--params", "-1"], "--params"),
    (["fit", "SCENE", "--quantize", "nan"], "--quantize"),
    (["fit", "SCENE", "--grid-resolution", "0"], "--grid-resolution"),
    (["fit", "SCENE", "--batch-rays", "0"], "--batch-rays"),
    (["fit", "SCENE", "--sample-budget", "0"], "--sample-budget"),
    (["fit", "SCENE", "--lr", "inf"], "--lr"),
    (["fit", "SCENE", "--pose-lr", "0"], "--pose-lr"),
    (["fit", "SCENE", "--cam-bits", "1"], "--cam-bits"),
    (["fit", "SCENE", "--checkpoint-every", "0"], "--checkpoint-every"),
    (["fit", "SCENE", "--distortion", "-0.1"], "--distortion"),
    (["fit", "SCENE", "--seed", "-1"], "--seed"),
    (["fit", "SCENE", "--device", "tpu"], "--device"),
    (["fit", "SCENE", "--field", "nerf"], "--field"),
    (["fit", "SCENE", "--downscale", "1000"], "--downscale 1000"),
    (["fit", "SCENE", "--viewer-share", "2"], "--viewer-share"),
    (["fit", "SCENE", "--port", "0"], "--port"),
    (["fit", "SCENE", "--surface-box", "0", "0", "0", "1", "1", "nan"], "--surface-box"),
    (["demo", "--steps", "0"], "--steps"),
    (["eval", "RUN", "--stride", "-1"], "--stride"),
    (["eval", "RUN", "--stride", "0"], "--stride"),
    (["render", "RUN", "--frames", "0"], "--frames"),
    (["render", "RUN", "--downscale", "0"], "--downscale"),
    (["render", "RUN", "--downscale", "100"], "--downscale 100"),
    (["render", "RUN", "--path", "nowhere"], "--path"),
    (["render", "RUN", "--camera-path", "nowhere.json"], "nowhere.json: not a readable JSON file"),
    (["export", "video", "RUN", "--camera-path", "RUN/config.json"], "config.json: no 'camera_path' list"),
    (["export", "mesh", "RUN", "--resolution", "4"], "--resolution"),
    (["export", "mesh", "RUN", "--level", "nan"], "--level"),
    (["export", "mesh", "RUN", "--simplify", "2"], "--simplify"),
    (["export", "sdf", "RUN", "--resolution", "0"], "--resolution"),
    (["export", "pointcloud", "RUN", "--points", "0"], "--points"),
    (["export", "pointcloud", "RUN", "--min-opacity", "1.5"], "--min-opacity"),
    (["export", "video", "RUN", "--fps", "0"], "--fps"),
    (["eval-mesh", "RUN/a.ply", "RUN/b.ply", "--samples", "0"], "--samples"),
    (["eval-mesh", "RUN/a.ply", "RUN/b.ply", "--tau", "0"], "--tau"),
    (["process", "video", "RUN/clip.mp4", "RUN/new", "--frames", "1"], "--frames"),
    (["fit", "--resume", "RUN", "--lr", "0.1"], "--lr would change the run"),
    (["fit", "--resume", "RUN", "--field", "vm"], "--field would change the run"),
]


@pytest.mark.parametrize("argv, named", BAD_VALUES, ids=[" ".join(row[0][:1] + row[0][2:]) for row in BAD_VALUES])
def test_a_bad_value_is_refused_before_anything_is_written(trained, tmp_path, capsys, argv, named):
    run = trained / "run"
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    argv = [a.replace("SCENE", str(trained / "scene")).replace("RUN", str(run)) for a in argv]
    if argv[0] in ("fit", "demo") and "--resume" not in argv:
        argv += ["--out", str(tmp_path / "never"), *TINY[6:]]
    line = refused(capsys, argv)
    assert named in line
    assert not (tmp_path / "never").exists()
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before  # the run untouched


def lone_scene(folder, doc_changes=None, frame_changes=None, text=None):
    """A copy of a 4-view transforms.json scene with fields replaced (or the file's text replaced)."""
    from recon.data.synthetic import make_scene

    make_scene(folder, resolution=16, n_train=4, n_test=1, seed=0)
    doc = json.loads((folder / "transforms_train.json").read_text())
    doc.update(doc_changes or {})
    for frame in doc["frames"]:
        frame.update(frame_changes or {})
    (folder / "transforms_train.json").write_text(text if text is not None else json.dumps(doc))
    return folder


BAD_FIELDS = [
    ({"camera_angle_x": 0}, None, "camera_angle_x 0"),
    ({"camera_angle_x": -0.5}, None, "camera_angle_x -0.5"),
    ({"camera_angle_x": 3.5}, None, "camera_angle_x 3.5"),
    ({"camera_angle_x": "0.8"}, None, "camera_angle_x '0.8'"),
    (None, {"fl_x": 0}, "fl_x 0"),
    (None, {"fl_x": "big"}, "fl_x 'big'"),
    (None, {"w": "abc"}, "w 'abc'"),
    (None, {"k1": float("nan")}, "k1 nan"),
    ({"aabb_scale": 1024}, None, "aabb_scale 1024"),
    ({"aabb_scale": 0.5}, None, "aabb_scale 0.5"),
    ({"scale": 0}, None, "scale 0"),
]


@pytest.mark.parametrize("doc, frame, named", BAD_FIELDS, ids=[row[2] for row in BAD_FIELDS])
def test_a_bad_camera_field_is_refused_naming_the_file_and_field(tmp_path, capsys, doc, frame, named):
    scene = lone_scene(tmp_path / "scene", doc, frame)
    line = refused(capsys, ["fit", str(scene), "--out", str(tmp_path / "run")])
    assert "transforms_train.json" in line and named in line
    assert not (tmp_path / "run").exists()


def test_a_json_nested_thousands_deep_is_one_line(tmp_path, capsys):
    scene = lone_scene(tmp_path / "scene", text="[" * 100_000 + "]" * 100_000)
    assert "nested too deep" in refused(capsys, ["fit", str(scene), "--out", str(tmp_path / "run")])


def test_overwrite_never_deletes_the_scene_or_a_users_files(trained, tmp_path, capsys):
    scene = trained / "scene"
    photos = sorted(p.name for p in scene.rglob("*"))
    for out, why in ((scene, "holds the input"), (trained, "holds the input"),  # the scene, a folder holding it
                     (scene / "train", "only a recon run folder")):  # a folder of its photos
        assert why in refused(capsys, ["fit", str(scene), "--out", str(out), "--overwrite", *TINY])
    assert sorted(p.name for p in scene.rglob("*")) == photos
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    assert "only a recon run folder" in refused(capsys, ["fit", str(scene), "--out", str(mine), "--overwrite", *TINY])
    (mine / "config.json").write_text(json.dumps({"name": "my project"}))  # a config.json, but not a run's
    refused(capsys, ["fit", str(scene), "--out", str(mine), "--overwrite", *TINY])
    assert (mine / "thesis.tex").read_text() == "precious"
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    assert "is a file" in refused(capsys, ["fit", str(scene), "--out", str(a_file), "--overwrite", *TINY])
    assert "cannot be created" in refused(capsys, ["fit", str(scene), "--out", str(a_file / "run"), *TINY])
    assert a_file.read_text() == "mine"


def test_overwrite_replaces_a_run_but_not_one_holding_other_files(trained, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained / "run", run)
    (run / "notes.md").write_text("mine")
    assert "notes.md" in refused(capsys, ["fit", str(trained / "scene"), "--out", str(run), "--overwrite", *TINY])
    (run / "notes.md").unlink()
    main(["fit", str(trained / "scene"), "--out", str(run), "--overwrite", "--steps", "3", "--eval-stride", "4", *TINY])
    assert json.loads((run / "metrics.json").read_text())["train"]["steps"] == 3


def test_outputs_are_checked_before_the_work(trained, tmp_path, capsys):
    run = trained / "run"
    folder = tmp_path / "a-folder"
    folder.mkdir()
    assert "is a folder" in refused(capsys, ["export", "mesh", str(run), "--resolution", "16", "--output", str(folder)])
    mine = tmp_path / "mesh.ply"
    mine.write_text("the user's own mesh")
    assert "--overwrite" in refused(capsys, ["export", "mesh", str(run), "--resolution", "16", "--output", str(mine)])
    assert mine.read_text() == "the user's own mesh"
    for record in ("config.json", "metrics.json"):  # a run's records, even with --overwrite
        assert "belongs to the run" in refused(capsys, ["export", "sdf", str(run), "--resolution", "16", "--output",
                                                        str(run / record), "--overwrite"])
    image = next((trained / "scene" / "train").glob("*.png"))
    refused(capsys, ["export", "video", str(run), "--output", str(image), "--overwrite"])
    assert not list(tmp_path.glob("*.json")) and not (run / "export" / "mesh-16.ply").exists()
    main(["export", "mesh", str(run), "--resolution", "16", "--output", str(mine), "--overwrite"])
    assert mine.read_bytes() != b"the user's own mesh"


def test_a_bad_evaluation_never_replaces_good_metrics(trained, capsys):
    metrics = trained / "run" / "metrics.json"
    good = metrics.read_text()
    refused(capsys, ["eval", str(trained / "run"), "--stride", "-1"])
    refused(capsys, ["eval", str(trained / "run"), "--split", "nowhere"])
    assert metrics.read_text() == good and json.loads(good)["mean"]["psnr"] > 5


def test_a_run_works_from_any_folder_and_after_it_moves(trained, tmp_path, capsys, monkeypatch):
    config = json.loads((trained / "run" / "config.json").read_text())
    assert os.path.isabs(config["scene"]) and config["scene_from_run"] == os.path.join("..", "scene")
    monkeypatch.chdir(tmp_path)  # another working folder
    main(["eval", str(trained / "run"), "--stride", "4"])
    moved = tmp_path / "elsewhere"  # the project moved (or copied to another machine), the original gone
    shutil.copytree(trained, moved)
    config["scene"] = str(tmp_path / "gone" / "scene")
    (moved / "run" / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    main(["eval", "elsewhere/run", "--stride", "4"])
    out = capsys.readouterr().out
    assert "is gone; using" in out and str(moved / "scene") in out
    shutil.rmtree(moved / "scene")
    line = refused(capsys, ["export", "mesh", "elsewhere/run", "--resolution", "16"])
    assert "its scene is not at" in line and "gone" in line


def test_a_config_with_unknown_keys_or_bad_values_is_refused(trained, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained / "run", run)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps(config | {"lerning_rate": 0.1}))
    assert "unknown key lerning_rate" in refused(capsys, ["eval", str(run)])
    (run / "config.json").write_text(json.dumps(config | {"steps": -5}))
    line = refused(capsys, ["fit", "--resume", str(run)])
    assert "config.json" in line and "--steps -5" in line


def test_first_contact_help_defaults_and_what_is_printed(tmp_path, capsys):
    import imageio.v3 as iio
    import numpy as np
    import torch

    from recon.app.fit_command import parameter_counts
    from recon.fields import build_field

    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "training steps (progress = step / steps) (default 1000)" in help_text  # the demo's, not fit's 20000
    assert "{hashgrid,neurbf,pe,triplane,vm,voxel}" in help_text
    assert "(preset: 128 gpu, 64 cpu); an integer in [4, 1024]" in help_text
    box = torch.tensor([[-1.0] * 3, [1.0] * 3])
    assert parameter_counts(build_field("hashgrid", box, levels=4, log2_table=10)).endswith(" parameters")
    assert "once grown" in parameter_counts(build_field("voxel", box, num_voxels=32**3))
    # A greyscale photo stays grey: fitted as one channel, written without colour tints.
    y, x = np.mgrid[0:32, 0:32] / 32.0
    iio.imwrite(tmp_path / "grey.png", ((0.5 + 0.4 * np.sin(6 * x) * np.cos(4 * y)) * 255).astype(np.uint8))
    main(["fit", str(tmp_path / "grey.png"), "--steps", "60", "--out", str(tmp_path / "run"), "-o", "levels=4",
          "-o", "log2_table=10", "--batch-points", "512", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "greyscale: fitted as one channel" in out and "viewer: not started" in out
    picture = iio.imread(tmp_path / "run" / "renders" / "reconstruction.png").astype(int)
    assert (picture[..., 0] == picture[..., 1]).all() and (picture[..., 1] == picture[..., 2]).all()
