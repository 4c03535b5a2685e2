"""``xdyna-animate``: a reference image and a driving (pose) video -> an animation.

    xdyna-animate --reference person.png --pose dance.pose.mp4 --pretrained xdyna-sd15/ \\
        --out dance.mp4 --device cuda --dtype fp16
    xdyna-animate --model tiny --reference person.png --pose dance.pose.mp4 --out demo.mp4 --steps 4

Writes ``OUT``, ``OUT.preview.mp4`` (reference | driving pose | result) and ``OUT.contact.png``
(and with ``--save-ground-truth GT.mp4`` the driving frames the animation follows, for xdyna-eval).
Every argument is checked (:func:`check_args`) before any model is built; an error prints one line
naming the flag and exits with status 2 (``--debug`` or ``XDYNA_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

PROG = "xdyna-animate"
DEFAULT_STRIDE = 2  # the release's 30 fps sources animated at 15 fps


def _box(text: str) -> tuple[float, float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4 or values[2] <= values[0] or values[3] <= values[1]:
        raise argparse.ArgumentTypeError(f"{text!r} is not x0,y0,x1,y1 with x1 > x0 and y1 > y0")
    return values


def build_parser() -> argparse.ArgumentParser:
    from ..cli_common import OneLineParser, add_debug_flag

    parser = OneLineParser(prog=PROG, description=__doc__.splitlines()[0],
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    inputs = parser.add_argument_group("inputs")
    inputs.add_argument("--reference", required=True, help="reference image (person + scene)")
    driving = inputs.add_mutually_exclusive_group(required=True)
    driving.add_argument("--driving", help="driving video (pose from --pose-estimator, faces from this video)")
    driving.add_argument("--pose", help="head-less skeleton (DWPose/OpenPose colours) video")
    inputs.add_argument("--pose-video", dest="pose_with_driving", metavar="VIDEO",
                        help="skeleton video of --driving (instead of a pose estimator)")
    inputs.add_argument("--face", help="video whose face drives the expression (default: --driving)")
    inputs.add_argument("--no-face", action="store_true",
                        help="no face condition (S-Face maps, or a w/lmk model's landmarks in the pose)")
    inputs.add_argument("--pose-estimator", metavar="dwpose|MODULE:FACTORY",
                        help="pose estimator: dwpose (needs --pose-model) or a plugin (see docs/inference.md)")
    inputs.add_argument("--pose-model", metavar="ONNX", help="local DWPose .onnx file for --pose-estimator dwpose")
    inputs.add_argument("--pose-detector-model", metavar="ONNX",
                        help="local YOLOX .onnx (DWPose's yolox_l.onnx) finding the person for --pose-estimator "
                             "dwpose; without it the whole frame is the person box")
    inputs.add_argument("--face-detector", default="mtcnn", metavar="mtcnn|MODULE:FACTORY", help="face landmark model")

    weights = parser.add_argument_group("weights (one of --pretrained, --checkpoint, --model)")
    weights.add_argument("--pretrained", metavar="DIR",
                         help="pipeline folder (XDynaPipeline.save_pretrained), export folder (xdyna-export, <run>/export) "
                              "or run directory (its export/)")
    weights.add_argument("--checkpoint", action="append", default=[], metavar="CKPT",
                         help="xdyna-train checkpoint (.ckpt file or DeepSpeed folder); repeat to stack (stage 1, then stage 2)")
    weights.add_argument("--model", metavar="FLAVOUR|YAML",
                         help="model config: a flavour name (tiny: random weights, for demos and tests) or a model YAML "
                              "with local pretrained paths; with --checkpoint or an export it replaces their own config")
    weights.add_argument("--weights", choices=["ema", "raw"], default=None,
                         help="with an export or --checkpoint: the EMA of the trained weights or the raw ones "
                              "(default: the EMA when the stage kept one, else raw)")
    weights.add_argument("--sd15", metavar="DIR",
                         help="local diffusers SD1.5 folder for an export (default: the folder the export records)")

    generation = parser.add_argument_group("generation")
    generation.add_argument("--out", required=True, help="output .mp4")
    generation.add_argument("--steps", type=int, default=25, help="DDIM steps")
    generation.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance on the image prompt")
    generation.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0: deterministic)")
    generation.add_argument("--frames", type=int, default=None, help="at most this many output frames")
    generation.add_argument("--stride", type=int, default=DEFAULT_STRIDE, help="use every n-th driving frame")
    generation.add_argument("--start", type=int, default=0, help="first driving frame")
    generation.add_argument("--fps", type=float, default=None, help="output fps (default: driving fps / stride)")
    generation.add_argument("--height", type=int, default=None, help="output height (default: the model's)")
    generation.add_argument("--width", type=int, default=None, help="output width (default: the model's)")
    generation.add_argument("--seed", type=int, default=0)
    generation.add_argument("--device", default="cuda" if _cuda_available() else "cpu")
    generation.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    generation.add_argument("--pose-scale", type=float, default=None, help="pose ControlNet scale (default: model config)")
    generation.add_argument("--face-scale", type=float, default=None, help="S-Face ControlNet scale (default: model config)")
    generation.add_argument("--context-frames", type=int, default=16, help="frames per context window")
    generation.add_argument("--context-overlap", type=int, default=4, help="frames shared by neighbouring windows")
    generation.add_argument("--open-loop", action="store_true", help="windows do not wrap from the end to the start")
    generation.add_argument("--windows-per-batch", type=int, default=1, help="context windows per forward pass")
    generation.add_argument("--align", action="store_true", help="scale and centre the skeleton onto the reference body")
    generation.add_argument("--reference-box", type=_box, metavar="X0,Y0,X1,Y1",
                            help="reference body box in reference-image pixels (for --align without a pose estimator)")
    generation.add_argument("--allow-blank-pose", action="store_true", help="accept an all-black pose (scene motion only)")
    generation.add_argument("--no-preview", action="store_true", help="write only the video")
    generation.add_argument("--save-ground-truth", metavar="GT.mp4",
                            help="also write the --driving frames the animation follows (same size, frames and fps): "
                                 "the ground truth for xdyna-eval")
    add_debug_flag(parser)
    return parser


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _model_config(spec: str):
    """A flavour name or a model YAML -> a model config mapping."""
    from ..models.flavours import FLAVOURS
    from .checks import InputError, require_file

    if spec in FLAVOURS:
        return {"flavour": spec}
    from omegaconf import OmegaConf

    file = require_file(spec, "--model config")
    try:
        return OmegaConf.to_container(OmegaConf.load(file), resolve=True, throw_on_missing=True)
    except Exception as error:  # omegaconf raises its own error family for bad YAML and ??? values
        raise InputError(f"--model config {str(file)!r} is unusable ({str(error).splitlines()[0]})") from None


SEED_LIMIT = 2**64  # torch.Generator.manual_seed takes unsigned 64-bit seeds


def check_frame_args(args: argparse.Namespace) -> None:
    """The rules on ``--frames --stride --start --fps --height --width``, which pick the output
    frames (here and in ``xdyna-eval prepare-gt``, which must pick the same ones)."""
    from .checks import InputError
    from .pipeline import SIZE_MULTIPLE

    problems = [
        (args.frames is not None and args.frames < 1, f"--frames must be >= 1, got {args.frames}"),
        (args.stride < 1, f"--stride must be >= 1, got {args.stride}"),
        (args.start < 0, f"--start must be >= 0, got {args.start}"),
        (args.fps is not None and not (math.isfinite(args.fps) and args.fps > 0), f"--fps must be > 0, got {args.fps}"),
        *((value is not None and (value <= 0 or value % SIZE_MULTIPLE != 0),
           f"{flag} must be a positive multiple of {SIZE_MULTIPLE}, got {value}")
          for flag, value in (("--height", args.height), ("--width", args.width))),
    ]
    for broken, message in problems:
        if broken:
            raise InputError(message)


def check_args(args: argparse.Namespace) -> None:
    """Every rule on the arguments, checked before any model is built (which takes seconds to
    minutes): ranges, files, sizes, device and dtype. The first broken rule raises an
    :class:`InputError` naming the flag. Sets ``args.weights_kind`` (pretrained, export,
    checkpoint or config), ``args.export_config`` and ``args.model_config`` for :func:`load_pipeline`."""
    from ..cli_common import device_problem
    from ..models.flavours import FLAVOURS
    from .checks import InputError, require_file
    from .inputs import VideoFile
    from .pipeline import checkpoint_file, export_model_config, resolve_dtype, weights_folder
    from .preview import check_output_path, preview_paths

    def need(condition: bool, message: str) -> None:
        if not condition:
            raise InputError(message)

    def finite(value: float | None) -> bool:
        return value is None or math.isfinite(value)

    # Numbers.
    need(args.steps >= 1, f"--steps must be >= 1, got {args.steps}")
    need(finite(args.guidance), f"--guidance must be a finite number, got {args.guidance}")
    need(0.0 <= args.eta <= 1.0, f"--eta must be in [0, 1] (0: deterministic DDIM), got {args.eta}")
    check_frame_args(args)
    need(0 <= args.seed < SEED_LIMIT, f"--seed must be in [0, 2**64), got {args.seed}")
    for flag, value in (("--pose-scale", args.pose_scale), ("--face-scale", args.face_scale)):
        need(value is None or (math.isfinite(value) and value >= 0), f"{flag} must be a finite number >= 0, got {value}")
    need(args.context_frames >= 1, f"--context-frames must be >= 1, got {args.context_frames}")
    need(0 <= args.context_overlap < args.context_frames,
         f"--context-overlap must be in [0, --context-frames={args.context_frames}), got {args.context_overlap}")
    need(args.windows_per_batch >= 1, f"--windows-per-batch must be >= 1, got {args.windows_per_batch}")

    # Device and dtype.
    problem = device_problem("--device", args.device)
    need(problem is None, problem or "")
    try:
        resolve_dtype(args.dtype, args.device)
    except InputError as error:
        raise InputError(f"--dtype {args.dtype} --device {args.device}: {error}") from None

    # Combinations of inputs.
    need(not (args.pose_with_driving and not args.driving), "--pose-video goes with --driving; with --pose alone, --pose is the skeleton video")
    need(not (args.align and args.reference_box is None and args.pose_estimator is None),
         "--align needs the reference body: give --reference-box or --pose-estimator")
    if args.pose_estimator == "dwpose":
        need(args.pose_model is not None, "--pose-estimator dwpose needs --pose-model PATH (a local DWPose .onnx file)")
    elif args.pose_estimator is not None:
        need(":" in args.pose_estimator, f"--pose-estimator must be dwpose or module:Factory, got {args.pose_estimator!r}")
    need(args.pose_model is None or args.pose_estimator == "dwpose", "--pose-model goes with --pose-estimator dwpose")
    need(args.pose_detector_model is None or args.pose_estimator == "dwpose", "--pose-detector-model goes with --pose-estimator dwpose")
    need(args.face_detector == "mtcnn" or ":" in args.face_detector,
         f"--face-detector must be mtcnn or module:Factory, got {args.face_detector!r}")
    need(not (args.save_ground_truth and not args.driving),
         "--save-ground-truth needs --driving (the video whose frames are the ground truth)")

    # Files.
    require_file(args.reference, "--reference image")
    if args.pose_model:
        require_file(args.pose_model, "--pose-model DWPose model")
    if args.pose_detector_model:
        require_file(args.pose_detector_model, "--pose-detector-model YOLOX model")
    videos = [VideoFile(path, f"{flag} video") for flag, path in
              (("--pose", args.pose), ("--pose-video", args.pose_with_driving), ("--driving", args.driving),
               ("--face", None if args.no_face else args.face)) if path]
    shortest = min(len(video) for video in videos)
    need(args.start < shortest, f"--start {args.start} is outside the driving input's {shortest} frames")
    out = check_output_path(args.out, "--out")
    if args.save_ground_truth:
        ground_truth = check_output_path(args.save_ground_truth, "--save-ground-truth")
        taken = {out.resolve(), *(p.resolve() for p in (preview_paths(out) if not args.no_preview else ()))}
        need(ground_truth.resolve() not in taken, f"--save-ground-truth {args.save_ground_truth} would overwrite an output of --out")

    # Weights: exactly one source, never a silent default.
    args.model_config = _model_config(args.model) if args.model else None
    args.export_config = None
    need(not (args.pretrained and args.checkpoint), "--pretrained is a complete model: do not combine it with --checkpoint")
    if args.pretrained:
        kind, _ = weights_folder(args.pretrained)
        need(kind == "export" or not args.model, "--pretrained pipeline folder is a complete pipeline: do not combine it with --model")
        need(kind == "export" or not args.sd15, "--sd15 goes with an export folder or run directory; a pipeline folder holds its base weights")
        if kind == "export":
            args.export_config = export_model_config(args.pretrained, args.model_config, args.sd15, args.weights or "default")
        args.weights_kind = kind
    elif args.checkpoint:
        need(not args.sd15, "--sd15 goes with --pretrained EXPORT; with --checkpoint give --model YAML with local paths")
        for path in args.checkpoint:
            checkpoint_file(path)
        args.weights_kind = "checkpoint"
    else:
        need(args.model is not None, "no weights: give --pretrained DIR, --checkpoint CKPT or --model (tiny for random weights)")
        need(not args.sd15, "--sd15 goes with --pretrained EXPORT; with --model give a model YAML with local paths")
        need(args.model not in FLAVOURS or args.model == "tiny",
             f"--model {args.model} alone has no weights: give a model YAML with pretrained paths, --checkpoint or --pretrained")
        args.weights_kind = "config"
    need(args.weights is None or args.weights_kind in ("export", "checkpoint"),
         "--weights picks between an export's or a checkpoint's EMA and raw weights: give --pretrained EXPORT or --checkpoint")

    # The default face detector is an optional dependency: say so now, not after the model is built.
    faces_wanted = not args.no_face and (args.driving or args.face) and args.face_detector == "mtcnn"
    if faces_wanted and _model_face(args) == "sface":
        import importlib.util

        need(importlib.util.find_spec("facenet_pytorch") is not None,
             "--face-detector mtcnn (faces from --driving/--face) needs facenet-pytorch: "
             "pip install --no-deps 'facenet-pytorch>=2.6,<2.7', or animate without the face condition with --no-face")


def _model_face(args: argparse.Namespace) -> str:
    """The ``face`` setting of the model the weight options name, where it is known without
    building it; ``sface`` (the default) where it is not (a checkpoint's config is inside it)."""
    import json

    from .pipeline import PIPELINE_FILE

    config = args.export_config or args.model_config
    if config is None and args.weights_kind == "pipeline":
        try:
            config = json.loads((Path(args.pretrained).expanduser() / PIPELINE_FILE).read_text()).get("model_config")
        except (OSError, ValueError, AttributeError):
            config = None
    return str(config.get("face", "sface")) if isinstance(config, dict) else "sface"


def load_pipeline(args: argparse.Namespace):
    """The pipeline the weight options name, after :func:`check_args`."""
    from .pipeline import XDynaPipeline, export_schedule

    if args.weights_kind == "pipeline":
        return XDynaPipeline.from_pretrained(args.pretrained, device=args.device, dtype=args.dtype)
    if args.weights_kind == "export":
        return XDynaPipeline.from_config(args.export_config, device=args.device, dtype=args.dtype,
                                         schedule=export_schedule(args.pretrained))
    if args.weights_kind == "checkpoint":
        return XDynaPipeline.from_checkpoints(args.checkpoint, args.model_config, device=args.device, dtype=args.dtype,
                                              weights=args.weights or "default")
    if args.model == "tiny":
        logging.getLogger(__name__).warning("model tiny with random weights: the output shows the pipeline working, not a person")
    return XDynaPipeline.from_config(args.model_config, device=args.device, dtype=args.dtype)


def weights_provenance(args: argparse.Namespace) -> list[str]:
    """Where the weights ``args`` name came from (:func:`xdyna.provenance.describe`), one block per
    export or checkpoint that records it; call after :func:`check_args`."""
    from .. import provenance
    from .pipeline import weights_folder

    if args.weights_kind == "export":
        sources = [weights_folder(args.pretrained)[1]]
    else:
        sources = args.checkpoint if args.weights_kind == "checkpoint" else []
    records = [provenance.read(source) for source in sources]
    return [provenance.describe(record) for record in records if record is not None]


def run(args: argparse.Namespace) -> dict:
    """Animate as ``args`` say; returns what was written and how long it took."""
    from datapipes.atomic import write_bytes_atomic
    from datapipes.video import encode_mp4

    from .context import ContextOptions
    from .driving import load_plugin, load_pose_estimator, prepare_driving, prepare_reference, reference_body_box
    from .inputs import load_image
    from .preview import ground_truth_frames, to_uint8, write_animation

    log = logging.getLogger(__name__)
    check_args(args)
    for block in weights_provenance(args):
        print(block, flush=True)
    reference_image = load_image(args.reference, "--reference image")
    context = ContextOptions(args.context_frames, args.context_overlap, closed_loop=not args.open_loop,
                             windows_per_batch=args.windows_per_batch)
    pose_estimator = (load_pose_estimator(args.pose_estimator, args.pose_model, args.pose_detector_model)
                      if args.pose_estimator else None)
    face_plugin = None if args.no_face or args.face_detector == "mtcnn" else load_plugin(args.face_detector, "face detector")
    pipeline = load_pipeline(args)
    default_height, default_width = pipeline.default_size
    size = (args.height or default_height, args.width or default_width)
    face_model = None
    # A w/lmk model reads the face from landmarks drawn into its pose: it needs the detector too.
    if not args.no_face and (pipeline.has_face_controlnet or pipeline.face_landmarks_in_pose):
        face_model = face_plugin or args.face_detector
    elif args.face and not args.no_face:
        log.warning("--face %s ignored: this model has no face condition (model.face=none)", args.face)
    reference_box = None
    if args.align:
        reference_box = reference_body_box(reference_image, size, args.reference_box, pose_estimator)

    signals = prepare_driving(
        size,
        pose_video=args.pose or args.pose_with_driving,
        driving_video=args.driving,
        face_video=args.face,
        pose_estimator=pose_estimator,
        face_model=face_model,
        face_landmarks_in_pose=pipeline.face_landmarks_in_pose,
        stride=args.stride,
        max_frames=args.frames,
        start=args.start,
        allow_blank_pose=args.allow_blank_pose,
        reference_box=reference_box,
    )
    fps = args.fps or signals.fps
    reference = prepare_reference(reference_image, size)
    ground_truth = None
    if args.save_ground_truth:
        # Written before sampling: the frames the animation follows, whatever happens next.
        ground_truth = write_bytes_atomic(args.save_ground_truth, encode_mp4(ground_truth_frames(args.driving, signals.indices, size), fps))
    log.info("animating %d frames at %dx%d on %s (%s), %d steps", len(signals), size[0], size[1], args.device, args.dtype, args.steps)
    started = time.perf_counter()
    animation = pipeline(
        reference, signals.pose, signals.face, num_inference_steps=args.steps, guidance_scale=args.guidance, eta=args.eta,
        seed=args.seed, context=context, fps=fps, pose_scale=args.pose_scale, face_scale=args.face_scale, progress=True,
    )
    seconds = time.perf_counter() - started
    if args.guidance != 1.0 and not animation.guidance_applied:
        log.warning("guidance %g not applied: the model has no image prompt", args.guidance)
    written = write_animation(args.out, animation.frames, fps, to_uint8(reference, (-1, 1)), to_uint8(signals.pose, (0, 1)),
                              preview=not args.no_preview)
    summary = {
        "video": str(written.video),
        "preview": str(written.preview) if written.preview else None,
        "contact_sheet": str(written.contact_sheet) if written.contact_sheet else None,
        "ground_truth": str(ground_truth) if ground_truth else None,
        "frames": int(animation.frames.shape[0]),
        "size": f"{animation.frames.shape[1]}x{animation.frames.shape[2]}",
        "fps": fps,
        "seconds": round(seconds, 2),
        "seconds_per_frame": round(seconds / animation.frames.shape[0], 3),
        "notes": signals.notes,
    }
    return summary


def main(argv: list[str] | None = None) -> int:
    from ..cli_common import debug_requested, report_user_error
    from ..errors import XDynaUserError

    args = build_parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
    package_log = logging.getLogger("xdyna.pipelines")
    package_log.addHandler(handler)
    package_log.setLevel(logging.INFO)
    package_log.propagate = False
    try:
        summary = run(args)
    except (XDynaUserError, FileNotFoundError) as error:
        if debug_requested(args):
            raise
        return report_user_error(PROG, error)
    finally:
        package_log.removeHandler(handler)
    for key in ("video", "preview", "contact_sheet", "ground_truth", "frames", "size", "fps", "seconds", "seconds_per_frame"):
        if summary[key] is not None:
            print(f"  {key:18s} {summary[key]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
