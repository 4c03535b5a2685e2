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


# pack options that shape the SLURM array job, not the pack itself (left out of the job's command)
_SLURM_ONLY = {"--slurm": 0, "--dry-run": 0, "--slurm-partition": 1, "--slurm-time": 1, "--slurm-cpus": 1,
               "--slurm-setup": 1, "--slurm-max-running": 1, "--slurm-gpus": 1}


def _curate_config(args: argparse.Namespace):
    if not args.shots:
        return None
    from datapipes.curate import CurateConfig

    return CurateConfig(shot_threshold=args.shot_threshold, min_clip_frames=args.min_clip_frames,
                        max_clip_frames=args.max_clip_frames, cut_margin=args.cut_margin, motion=args.motion,
                        min_motion=args.min_motion, max_people=args.max_people,
                        person_detector_model=args.person_detector_model).validate()


def _pack(args: argparse.Namespace) -> int:
    from datapipes.pack import PackOptions, items_from_folder, items_from_manifest, pack
    from datapipes.validate import Rules

    if args.input.endswith(".jsonl"):
        items = items_from_manifest(args.input)
    else:
        items = items_from_folder(args.input, kind=args.kind, license=args.license)
    curate = _curate_config(args)
    if args.dry_run and not args.slurm:
        raise ValueError("--dry-run writes the SLURM script without submitting it: it needs --slurm")
    if (args.part is not None or args.slurm or curate is not None) and args.parts is None:
        raise ValueError("--part, --slurm and --shots work on a partitioned pack: give --parts P (1 is fine)")
    options = PackOptions(Rules(args.min_frames, args.min_height, args.min_width, args.verify),
                          face_detector=args.face_detector, face_landmarks_model=args.face_landmarks_model,
                          require_pose=not args.allow_missing_pose,
                          pose_estimator=args.pose_estimator, pose_model=args.pose_model,
                          pose_detector_model=args.pose_detector_model,
                          max_video_bytes=int(args.max_video_mib * 2**20), max_json_bytes=int(args.max_json_mib * 2**20),
                          item_timeout=args.item_timeout or None, device=args.device)
    if args.parts is not None:
        return _pack_parts(args, items, options, curate)
    summary = pack(items, args.out, options, shard_size=args.shard_size, shard_bytes=args.shard_bytes,
                   workers=args.workers, prefix=args.prefix, progress=True, log_every=args.log_every)
    print(summary)
    return 0 if summary.accepted else 1


def _pack_parts(args: argparse.Namespace, items, options, curate) -> int:
    """``--parts P``: one part (``--part i``), every part in turn here, or an array job (``--slurm``)."""
    from datapipes.index import build_index
    from datapipes.parts import PartSettings, finished_parts, make_plan, run_part, dedupe_keys

    settings = PartSettings(parts=args.parts, prefix=args.prefix, shard_size=args.shard_size,
                            shard_bytes=args.shard_bytes, options=options, curate=curate)
    if args.slurm:
        from launch.pack_array import submit_pack_array

        return submit_pack_array(args, _job_argv(args._argv), settings, items)
    chosen = range(args.parts) if args.part is None else [args.part]
    for part in chosen:
        record = run_part(items, args.out, settings, part, workers=args.workers, progress=True,
                          log_every=args.log_every)
        state = "already finished, skipped" if record["skipped"] else f"done in {record['timings']['total_s']:.1f} s"
        print(f"part {part}/{args.parts}: {state}: {record['packed']} packed, {len(record['quarantined'])} "
              f"quarantined, {len(record['shards'])} shard(s)")
    plan = make_plan(dedupe_keys(items), settings)
    done = finished_parts(args.out, plan)
    if len(done) == args.parts:  # the last part to finish writes the index (a tie writes the same bytes)
        index = build_index(args.out)
        print(f"index {os.path.join(args.out, 'index.json')}: {index['samples']} clip(s) "
              f"({', '.join(f'{n} {k}' for k, n in index['kinds'].items()) or 'none'}), "
              f"{index['quarantined']} quarantined, {len(index['shards'])} shard(s)")
    else:
        print(f"{len(done)} of {args.parts} part(s) finished; the index is written when all are")
    return 0


def _buckets(args: argparse.Namespace) -> tuple[tuple[int, int], ...]:
    if not args.bucket:
        return ((args.height, args.width),)
    buckets = []
    for text in args.bucket:
        height, _, width = text.lower().partition("x")
        if not (height.isdigit() and width.isdigit()) or min(int(height), int(width)) < 8:
            raise ValueError(f"--bucket {text!r}: want HEIGHTxWIDTH, e.g. 896x512")
        buckets.append((int(height), int(width)))
    return tuple(buckets)


def _encode(args: argparse.Namespace) -> int:
    """Cache VAE latents of a packed shard set into a new one (datapipes/latents.py, xdyna/latents.py)."""
    from datapipes.index import build_index
    from datapipes.latents import EncodeSettings, encode_part, make_plan
    from datapipes.parts import finished_parts
    from datapipes.shards import expand_shard_urls

    urls = expand_shard_urls(args.shards)
    if os.path.abspath(args.out) in {os.path.dirname(os.path.abspath(url)) for url in urls}:
        raise ValueError(f"--out {args.out!r} holds the source shards: encode writes a new shard set elsewhere")
    parts = 1 if args.parts is None else args.parts
    if args.dry_run and not args.slurm:
        raise ValueError("--dry-run writes the SLURM script without submitting it: it needs --slurm")
    from xdyna.latents import load_vae, posterior_encoder
    from xdyna.models import ModelConfig

    config = ModelConfig.from_mapping({"flavour": args.flavour, "vae_chunk_size": args.vae_chunk_size,
                                       "pretrained": {"sd15": args.sd15, "vae": args.vae}})
    vae, described = load_vae(config)  # a missing folder stops here, before anything is written
    # One dataset index given: its curation decisions carry over into the encoded set's index.
    source_index = os.path.abspath(args.shards[0]) if len(args.shards) == 1 and args.shards[0].endswith(".json") else None
    settings = EncodeSettings(parts=parts, buckets=_buckets(args), prefix=args.prefix, shard_size=args.shard_size,
                              vae=described, source_index=source_index)
    plan = make_plan(urls, settings)
    if args.slurm:
        from launch.pack_array import submit_parts_array

        return submit_parts_array(args, _job_argv(args._argv), plan, cpus=args.slurm_cpus or 1, command="encode")
    if args.device == "cuda":  # checked where the parts run (an array task), not where they are submitted
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda: no CUDA device here")
    encoder = posterior_encoder(vae, args.vae_chunk_size, args.device)
    for part in range(parts) if args.part is None else [args.part]:
        record = encode_part(urls, args.out, settings, part, encoder, log=lambda line: print(line, file=sys.stderr))
        state = "already finished, skipped" if record["skipped"] else f"done in {record['timings']['total_s']:.1f} s"
        print(f"part {part}/{parts}: {state}: {record['packed']} encoded, {len(record['quarantined'])} "
              f"quarantined, {len(record['shards'])} shard(s)")
    done = finished_parts(args.out, plan)
    if len(done) == parts:
        index = build_index(args.out)
        print(f"index {os.path.join(args.out, 'index.json')}: {index['samples']} clip(s) with latents, "
              f"{index['quarantined']} quarantined, {len(index['shards'])} shard(s)")
    else:
        print(f"{len(done)} of {parts} part(s) finished; the index is written when all are")
    return 0


def _job_argv(argv: list[str]) -> list[str]:
    """The pack command line of an array task: the user's, without the options of the job itself."""
    kept, skip = [], 0
    for word in argv:
        if skip:
            skip -= 1
            continue
        name = word.split("=", 1)[0]
        if name in _SLURM_ONLY:
            skip = _SLURM_ONLY[name] if "=" not in word else 0
            continue
        kept.append(word)
    return kept


def _index(args: argparse.Namespace) -> int:
    from datapipes.index import build_index

    index = build_index(args.out)
    print(f"index {os.path.join(args.out, 'index.json')}: {index['samples']} clip(s), {index['quarantined']} "
          f"quarantined, {len(index['shards'])} shard(s), {index['frames']} frames")
    return 0


def _retune(args: argparse.Namespace) -> int:
    from datapipes.index import retune

    if args.min_motion is None and args.max_people is None:
        raise ValueError("give --min-motion and/or --max-people: the thresholds to apply")
    index = retune(args.index, args.out, args.min_motion, args.max_people, args.shard_size, args.prefix)
    print(f"retuned into {args.out}: {index['samples']} clip(s) kept, {len(index['shards'])} shard(s); "
          f"{len(index['not_packed'])} clip(s) the new thresholds would keep were dropped at pack time "
          f"(rerun pack --shots to get them)")
    return 0


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


def _parts_arguments(parser: argparse.ArgumentParser, command: str, what: str, done: str) -> None:
    """--parts/--part/--slurm...: a partitioned, resumable run of pack or encode (datapipes/parts.py)."""
    parts = parser.add_argument_group(f"distributed, resumable {command} (docs/data.md, 'Distributed packing')")
    parts.add_argument("--parts", type=int, default=None, metavar="P",
                       help=f"split {what} into P parts, each {done} on its own and skipped when rerun once done")
    parts.add_argument("--part", type=int, default=None, metavar="I",
                       help=f"only part I (0-based; an array task); without it: every part, one after another")
    parts.add_argument("--slurm", action="store_true",
                       help="submit the unfinished parts as one SLURM array job (one task per part)")
    parts.add_argument("--dry-run", action="store_true", help="with --slurm: write the sbatch script, do not submit")
    parts.add_argument("--slurm-partition", default=None)
    parts.add_argument("--slurm-time", default="24:00:00")
    parts.add_argument("--slurm-cpus", type=int, default=None, help="cpus per array task (default: --workers or 1)")
    parts.add_argument("--slurm-gpus", type=int, default=0, help="GPUs per array task (with --device cuda)")
    parts.add_argument("--slurm-max-running", type=int, default=None, help="at most this many tasks at once (%%N)")
    parts.add_argument("--slurm-setup", action="append", default=[],
                       help=f"a shell line run before the {command} in each task (module load ..., source venv); repeatable")


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
    pack.add_argument("--out", required=True, help="output directory (must hold no shards yet; with --parts: "
                                                   "the same directory for every part and rerun)")
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
    pack.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                      help="where pose estimation (onnxruntime-gpu) and face tracking (MTCNN) run; cpu is the default")
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
    _parts_arguments(pack, "pack", "the inputs", "packed")
    shots = pack.add_argument_group("raw footage -> clips (--shots; docs/data.md, 'Curation')")
    shots.add_argument("--shots", action="store_true",
                       help="cut each input into shots and clips, score their motion, leave out static scene clips")
    shots.add_argument("--shot-threshold", type=float, default=27.0, help="PySceneDetect ContentDetector threshold")
    shots.add_argument("--min-clip-frames", type=int, default=16)
    shots.add_argument("--max-clip-frames", type=int, default=128)
    shots.add_argument("--cut-margin", type=int, default=2, help="frames left out on each side of a cut")
    shots.add_argument("--motion", choices=("farneback", "diff"), default="farneback")
    shots.add_argument("--min-motion", type=float, default=0.1,
                       help="scene clips with less motion are left out (farneback: px/frame at 128 px short side)")
    shots.add_argument("--max-people", type=int, default=1, help="human clips with more people are left out")
    shots.add_argument("--person-detector-model", default=None, metavar="PATH",
                       help="local YOLOX .onnx counting people in human clips (without it: not counted)")
    pack.set_defaults(run=_pack)

    encode = commands.add_parser("encode", help="cache the VAE latents of a packed shard set in a new one")
    encode.add_argument("shards", nargs="+", help="the packed shards: directory, index.json, brace pattern, glob or files")
    encode.add_argument("--out", required=True, help="a new folder for the shards with latents (same folder on rerun)")
    encode.add_argument("--height", type=int, default=128, help="the training resolution (data.height)")
    encode.add_argument("--width", type=int, default=64, help="the training resolution (data.width)")
    encode.add_argument("--bucket", action="append", default=[], metavar="HxW",
                        help="aspect-ratio buckets (data.buckets) instead of --height/--width; repeatable")
    encode.add_argument("--flavour", default="tiny", help="model flavour (tiny: random VAE, tests only; sd15)")
    encode.add_argument("--sd15", default=None, metavar="FOLDER", help="diffusers SD1.5 folder (its vae/ is used)")
    encode.add_argument("--vae", default=None, metavar="FOLDER",
                        help="diffusers AutoencoderKL folder (model.pretrained.vae; wins over --sd15)")
    encode.add_argument("--vae-chunk-size", type=int, default=16, help="frames per VAE call (model.vae_chunk_size)")
    encode.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    encode.add_argument("--shard-size", type=int, default=1000, help="max samples per shard")
    encode.add_argument("--prefix", default="shard", help="shard file prefix")
    _parts_arguments(encode, "encode", "the source shards", "encoded")
    encode.set_defaults(run=_encode)

    index = commands.add_parser("index", help="write DIR/index.json of a finished partitioned pack")
    index.add_argument("out", help="the pack's output directory")
    index.set_defaults(run=_index)

    retune = commands.add_parser("retune", help="apply stricter curation thresholds to a packed dataset (no decoding)")
    retune.add_argument("index", help="the dataset's index.json")
    retune.add_argument("--out", required=True, help="an empty folder for the new shards and index")
    retune.add_argument("--min-motion", type=float, default=None, help="scene clips below are left out")
    retune.add_argument("--max-people", type=int, default=None, help="human clips with more people are left out")
    retune.add_argument("--shard-size", type=int, default=1000)
    retune.add_argument("--prefix", default="shard")
    retune.set_defaults(run=_retune)

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
    args._argv = list(sys.argv[1:] if argv is None else argv)
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
