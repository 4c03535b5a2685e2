"""``xdyna-data``: make, pack and inspect WebDataset shards of human-motion and scene clips.

Thin over ``datapipes``: argument parsing and printing only.
"""
from __future__ import annotations

import argparse
import os
import sys

# Level names only (no heavy imports at parse time); datapipes.validate checks they agree.
VERIFY_LEVELS = ("open", "ends", "full")


def _synth(args: argparse.Namespace) -> int:
    from datapipes.synthetic import write_synthetic_shards

    summary = write_synthetic_shards(args.out, human=args.human, scene=args.scene, frames=args.frames,
                                     height=args.height, width=args.width, seed=args.seed,
                                     shard_size=args.shard_size, fps=args.fps,
                                     progress=sys.stderr.isatty())
    print(summary)
    return 0


def _pack(args: argparse.Namespace) -> int:
    from datapipes.pack import PackOptions, items_from_folder, items_from_manifest, pack
    from datapipes.validate import Rules

    if args.input.endswith(".jsonl"):
        items = items_from_manifest(args.input)
    else:
        items = items_from_folder(args.input, kind=args.kind, license=args.license)
    options = PackOptions(Rules(args.min_frames, args.min_height, args.min_width, args.verify),
                          face_detector=args.face_detector, face_landmarks_model=args.face_landmarks_model,
                          require_pose=not args.allow_missing_pose,
                          pose_estimator=args.pose_estimator, pose_model=args.pose_model,
                          pose_detector_model=args.pose_detector_model,
                          max_video_bytes=int(args.max_video_mib * 2**20), max_json_bytes=int(args.max_json_mib * 2**20),
                          item_timeout=args.item_timeout or None)
    summary = pack(items, args.out, options, shard_size=args.shard_size, shard_bytes=args.shard_bytes,
                   workers=args.workers, prefix=args.prefix, progress=True, log_every=args.log_every)
    print(summary)
    return 0 if summary.accepted else 1


def _inspect(args: argparse.Namespace) -> int:
    import json

    from datapipes.clips import ClipSpec
    from datapipes.inspection import InspectOptions, inspect_shards
    from datapipes.loader import ClipLoaderConfig

    defaults = ClipLoaderConfig()  # unset: the data config's defaults
    num_frames = defaults.num_frames if args.num_frames is None else args.num_frames
    frame_stride = defaults.frame_stride if args.frame_stride is None else args.frame_stride
    if num_frames < 1 or frame_stride < 1:
        raise ValueError("--num-frames and --frame-stride must be >= 1")
    if not 0 <= args.min_coverage <= 1:
        raise ValueError(f"--min-coverage must be in [0, 1], got {args.min_coverage}")
    # The loader's clip; face tracks are always checked (with_face), whatever the training uses.
    clip = ClipSpec(num_frames, frame_stride, ((1, 1),), with_face=True, pose_from=args.pose_from)
    report = inspect_shards(args.shards, InspectOptions(clip, args.verify, args.min_coverage),
                            workers=args.workers, progress=sys.stderr.isatty())
    report.every_clip = args.clips
    print(json.dumps(report.as_dict(), indent=1) if args.json else report)
    return 1 if report.failures else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xdyna-data", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    synth = commands.add_parser("synth", help="write synthetic stick-figure and scene clips as shards")
    synth.add_argument("--out", required=True, help="output directory (must hold no shards yet)")
    synth.add_argument("--human", type=int, default=6, help="number of human clips")
    synth.add_argument("--scene", type=int, default=2, help="number of scene-only clips")
    synth.add_argument("--frames", type=int, default=24)
    synth.add_argument("--height", type=int, default=128)
    synth.add_argument("--width", type=int, default=64)
    synth.add_argument("--fps", type=float, default=8.0)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--shard-size", type=int, default=100, help="samples per shard")
    synth.set_defaults(run=_synth)

    pack = commands.add_parser("pack", help="validate source videos and write them as shards")
    pack.add_argument("input", help="a folder of videos (companions X.pose.mp4, X.pose.json, X.face.json "
                                    "beside X.mp4) or a JSONL manifest (*.jsonl)")
    pack.add_argument("--out", required=True, help="output directory (must hold no shards yet)")
    pack.add_argument("--kind", choices=("human", "scene"), default="human", help="kind of a folder's clips")
    pack.add_argument("--license", default="unknown", help="licence of a folder's clips")
    pack.add_argument("--shard-size", type=int, default=1000, help="max samples per shard")
    pack.add_argument("--shard-bytes", type=float, default=1e9, help="max bytes per shard")
    pack.add_argument("--prefix", default="shard", help="shard file prefix: PREFIX-000000.tar")
    pack.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)),
                      help="worker processes (started fresh, one input at a time each); 0: in this process, "
                           "without the protection against crashing or hanging decoders")
    pack.add_argument("--min-frames", type=int, default=16)
    pack.add_argument("--min-height", type=int, default=64)
    pack.add_argument("--min-width", type=int, default=64)
    pack.add_argument("--verify", choices=VERIFY_LEVELS, default="ends",
                      help="decode check: open, ends (first/middle/last frame) or full")
    pack.add_argument("--face-detector", default=None, metavar="mtcnn|MODULE:FACTORY",
                      help="compute face tracks for human clips without one: mtcnn (facenet-pytorch), or "
                           "'package.module:factory' returning a datapipes.facetrack.LandmarkModel")
    pack.add_argument("--face-landmarks-model", default=None, metavar="PATH",
                      help="local 68-point landmark .onnx run on the detector's faces (iBUG 68 points in "
                           "face.json instead of MTCNN's 5; docs/data.md lists the accepted model shapes)")
    pack.add_argument("--pose-estimator", choices=("dwpose",), default=None,
                      help="estimate keypoints (pose.json) for human clips without pose video or keypoints")
    pack.add_argument("--pose-model", default=None, metavar="PATH",
                      help="local DWPose .onnx file for --pose-estimator dwpose (never downloaded)")
    pack.add_argument("--pose-detector-model", default=None, metavar="PATH",
                      help="local YOLOX .onnx (DWPose's yolox_l.onnx) finding the person for --pose-estimator "
                           "dwpose; without it the whole frame is the person box")
    pack.add_argument("--allow-missing-pose", action="store_true",
                      help="accept human clips without pose video or keypoints")
    pack.add_argument("--max-video-mib", type=float, default=4096,
                      help="reject larger video files before reading them")
    pack.add_argument("--max-json-mib", type=float, default=256,
                      help="reject larger keypoint / face-track files before reading them")
    pack.add_argument("--item-timeout", type=float, default=3600, metavar="SECONDS",
                      help="reject an input whose worker takes longer (0: no limit)")
    pack.add_argument("--log-every", type=float, default=30, metavar="SECONDS",
                      help="when stderr is no terminal (a log file, a SLURM job), a progress line this often")
    pack.set_defaults(run=_pack)

    inspect = commands.add_parser("inspect", help="count and verify the samples of a shard set")
    inspect.add_argument("shards", nargs="+", help="directory, brace pattern, glob or files")
    inspect.add_argument("--verify", choices=("none",) + VERIFY_LEVELS, default="ends")
    inspect.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)))
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    inspect.add_argument("--num-frames", type=int, default=None,
                         help="the loader's data.num_frames: clips shorter than its span fail (default: data config's)")
    inspect.add_argument("--frame-stride", type=int, default=None,
                         help="the loader's data.frame_stride (default: data config's)")
    inspect.add_argument("--pose-from", choices=("auto", "video", "keypoints"), default="auto",
                         help="the loader's data.pose_from: which pose member a human clip must have")
    inspect.add_argument("--min-coverage", type=float, default=0.5,
                         help="flag human clips with a face or a person in fewer than this fraction of frames")
    inspect.add_argument("--clips", action="store_true", help="list every human clip's face and person coverage")
    inspect.set_defaults(run=_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt as interrupt:  # datapipes.pack.PackInterrupted too (Ctrl-C, SIGTERM)
        signum = getattr(interrupt, "signum", 2)
        cleaned = "; workers stopped, no partial shard published" if args.command == "pack" else ""
        print(f"xdyna-data {args.command}: {interrupt or 'interrupted'}{cleaned}", file=sys.stderr)
        return 128 + signum
    except (OSError, ValueError, ImportError, RuntimeError) as error:
        if os.environ.get("XDYNA_DEBUG"):
            raise
        print(f"xdyna-data {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
