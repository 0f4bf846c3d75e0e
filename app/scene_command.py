"""The commands on files rather than runs: `recon convert` and `recon process` (a scene folder from another
layout, or from photos or a video), `recon eval-mesh` (a mesh file scored against a ground truth)."""

from __future__ import annotations

import argparse
from pathlib import Path

from recon.app.cli_shared import number_option, output_file, output_option
from recon.app.run import write_json
from recon.data.checks import POSITIVE, POSITIVE_INT, Number
from recon.data.sfm import CAMERA_MODELS, MATCHERS, VIDEO_FRAMES, SfmOptions


def cmd_convert(args: argparse.Namespace) -> None:
    from recon.data.convert import write_transforms
    from recon.data.scene import read_capture

    source = Path(args.scene).expanduser().absolute()
    capture = read_capture(source, downscale=1)
    files = write_transforms(capture, Path(args.out))
    views = sum(len(found.frames) for found in capture.lists.values())
    print(f"{source}: {capture.convention}")
    turned = " turned so the cameras' mean up is +z" if capture.points is not None else ""
    print(f"wrote {views} views to {', '.join(str(f) for f in files)} (world frame of the input{turned})")


def cmd_process(args: argparse.Namespace) -> None:
    from recon.data.sfm import process_images, process_video

    source, scene = Path(args.source).expanduser().absolute(), Path(args.scene).expanduser().absolute()
    matcher = args.matcher or ("sequential" if args.kind == "video" else "exhaustive")
    options = SfmOptions(matcher=matcher, camera_model=args.camera_model, max_image_side=args.max_image_side)
    print(f"{source}: structure from motion with pycolmap on the CPU ({matcher} matching, {args.camera_model} camera)")
    if args.kind == "video":
        report = process_video(source, scene, args.frames, options)
    else:
        report = process_images(source, scene, options)
    seconds = sum(report[key] for key in ("prepare_s", "features_s", "matching_s", "mapping_s"))
    print(f"registered {report['registered']} of {report['images']} images ({report['registered_fraction']:.0%}), "
          f"{report['points']:,} sparse points, mean reprojection error {report['reprojection_error_px']:.2f} px, "
          f"{seconds:.0f} s")
    if len(report["models"]) > 1 and report["unregistered"]:
        print(f"note: the views fell into {len(report['models'])} unconnected models {report['models']}; "
              "kept the largest")
    if "warning" in report:
        print(f"warning: {report['warning']}")
    print(f"wrote {scene} (transforms.json, images/, colmap/sparse/0; report process.json, picture process.png); "
          f"next: recon fit {scene}")


def cmd_eval_mesh(args: argparse.Namespace) -> None:
    from recon.app.metrics import mesh_distances

    pred, truth = Path(args.pred), Path(args.gt)
    output = output_file(args.output, pred.with_suffix(".eval.json"), args.overwrite, protected=(pred, truth))
    result = mesh_distances(pred, truth, samples=args.samples, tau_fraction=args.tau)
    print(f"Chamfer {result['chamfer']:.6g}  F-score {result['fscore']:.4f} at tau {result['tau']:.4g} "
          f"({args.tau:g} of the ground truth's diagonal), {args.samples:,} samples per mesh")
    write_json(output, result)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert",
                       help="write any scene layout recon reads (COLMAP, NeuS, transforms) as transforms.json")
    p.add_argument("scene")
    p.add_argument("out", help="a new folder")
    p.set_defaults(func=cmd_convert)

    process = sub.add_parser("process", help="camera poses for photos or a video (structure from motion, pycolmap)")
    kinds = process.add_subparsers(dest="kind", required=True)
    for kind, what in (("images", "a folder of photos"), ("video", "a video file")):
        p = kinds.add_parser(kind, help=f"{what} in, a posed scene folder out")
        p.add_argument("source", help=what)
        p.add_argument("scene", help="a new folder for the scene")
        if kind == "video":
            p.add_argument("--frames", **number_option(Number(int, 2), VIDEO_FRAMES,
                                                       "frames to keep, the sharpest of equal stretches"))
        p.add_argument("--matcher", choices=MATCHERS,
                       help="exhaustive: every pair (default for photos); sequential: neighbours in order (video)")
        p.add_argument("--camera-model", default="OPENCV", choices=CAMERA_MODELS, help="COLMAP camera model")
        p.add_argument("--max-image-side", **number_option(Number(int, 64), SfmOptions.max_image_side,
                                                           "features on images downscaled to this side"))
        p.set_defaults(func=cmd_process)

    p = sub.add_parser("eval-mesh", help="Chamfer distance and F-score of a mesh against a ground truth")
    p.add_argument("pred")
    p.add_argument("gt")
    p.add_argument("--samples", **number_option(POSITIVE_INT, 200_000, "surface points sampled from each mesh"))
    p.add_argument("--tau", **number_option(POSITIVE, 0.01,
                                            "F-score distance, a fraction of the ground truth's diagonal"))
    output_option(p, "PRED.eval.json")
    p.set_defaults(func=cmd_eval_mesh)
