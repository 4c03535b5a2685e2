"""``xdyna-animate``: a reference image and a driving (pose) video -> an animation.

    xdyna-animate --reference person.png --pose dance.pose.mp4 --pretrained xdyna-sd15/ \\
        --out dance.mp4 --device cuda --dtype fp16
    xdyna-animate --model tiny --reference person.png --pose dance.pose.mp4 --out demo.mp4 --steps 4

Writes ``OUT``, ``OUT.preview.mp4`` (reference | driving pose | result) and ``OUT.contact.png``.
Input errors print one line naming the culprit and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

PROG = "xdyna-animate"


def _box(text: str) -> tuple[float, float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4 or values[2] <= values[0] or values[3] <= values[1]:
        raise argparse.ArgumentTypeError(f"{text!r} is not x0,y0,x1,y1 with x1 > x0 and y1 > y0")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    inputs = parser.add_argument_group("inputs")
    inputs.add_argument("--reference", required=True, help="reference image (person + scene)")
    driving = inputs.add_mutually_exclusive_group(required=True)
    driving.add_argument("--driving", help="driving video (pose from --pose-estimator, faces from this video)")
    driving.add_argument("--pose", help="head-less skeleton (DWPose/OpenPose colours) video")
    inputs.add_argument("--pose-video", dest="pose_with_driving", metavar="VIDEO",
                        help="skeleton video of --driving (instead of a pose estimator)")
    inputs.add_argument("--face", help="video whose face drives the expression (default: --driving)")
    inputs.add_argument("--no-face", action="store_true", help="no S-Face condition")
    inputs.add_argument("--pose-estimator", metavar="dwpose|MODULE:FACTORY",
                        help="pose estimator: dwpose (needs --pose-model) or a plugin (see docs/inference.md)")
    inputs.add_argument("--pose-model", metavar="ONNX", help="local DWPose .onnx file for --pose-estimator dwpose")
    inputs.add_argument("--pose-detector-model", metavar="ONNX",
                        help="local YOLOX .onnx (DWPose's yolox_l.onnx) finding the person for --pose-estimator "
                             "dwpose; without it the whole frame is the person box")
    inputs.add_argument("--face-detector", default="mtcnn", metavar="mtcnn|MODULE:FACTORY", help="face landmark model")

    weights = parser.add_argument_group("weights (one of --pretrained, --checkpoint, --model)")
    weights.add_argument("--pretrained", metavar="DIR", help="pipeline folder written by XDynaPipeline.save_pretrained")
    weights.add_argument("--checkpoint", action="append", default=[], metavar="CKPT",
                         help="xdyna-train checkpoint file; repeat to stack (stage 1, then stage 2)")
    weights.add_argument("--model", metavar="FLAVOUR|YAML",
                         help="model config: a flavour name (tiny: random weights, for demos and tests) or a model YAML "
                              "with local pretrained paths; with --checkpoint it replaces the checkpoint's own config")

    generation = parser.add_argument_group("generation")
    generation.add_argument("--out", required=True, help="output .mp4")
    generation.add_argument("--steps", type=int, default=25, help="DDIM steps")
    generation.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance on the image prompt")
    generation.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0: deterministic)")
    generation.add_argument("--frames", type=int, default=None, help="at most this many output frames")
    generation.add_argument("--stride", type=int, default=2, help="use every n-th driving frame")
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

    file = require_file(spec, "model config")
    try:
        return OmegaConf.to_container(OmegaConf.load(file), resolve=True, throw_on_missing=True)
    except Exception as error:  # omegaconf raises its own error family for bad YAML and ??? values
        raise InputError(f"model config {str(file)!r} is unusable ({str(error).splitlines()[0]})") from None


def load_pipeline(args: argparse.Namespace):
    """The pipeline the weight options name; exactly one source, never a silent default."""
    from ..models.flavours import FLAVOURS
    from .checks import InputError
    from .pipeline import XDynaPipeline

    if args.pretrained and (args.checkpoint or args.model):
        raise InputError("--pretrained is a complete pipeline: do not combine it with --checkpoint or --model")
    if args.pretrained:
        return XDynaPipeline.from_pretrained(args.pretrained, device=args.device, dtype=args.dtype)
    config = _model_config(args.model) if args.model else None
    if args.checkpoint:
        return XDynaPipeline.from_checkpoints(args.checkpoint, config, device=args.device, dtype=args.dtype)
    if config is None:
        raise InputError("no weights: give --pretrained DIR, --checkpoint CKPT or --model (tiny for random weights)")
    if args.model in FLAVOURS and args.model != "tiny":
        raise InputError(f"--model {args.model} alone has no weights: give a model YAML with pretrained paths, --checkpoint or --pretrained")
    if args.model == "tiny":
        logging.getLogger(__name__).warning("model tiny with random weights: the output shows the pipeline working, not a person")
    return XDynaPipeline.from_config(config, device=args.device, dtype=args.dtype)


def run(args: argparse.Namespace) -> dict:
    """Animate as ``args`` say; returns what was written and how long it took."""
    from .context import ContextOptions
    from .driving import load_plugin, load_pose_estimator, prepare_driving, prepare_reference, reference_body_box
    from .checks import InputError
    from .inputs import load_image
    from .preview import check_output_path, to_uint8, write_animation

    log = logging.getLogger(__name__)
    out = check_output_path(args.out)
    reference_image = load_image(args.reference)
    context = ContextOptions(args.context_frames, args.context_overlap, closed_loop=not args.open_loop,
                             windows_per_batch=args.windows_per_batch)
    if args.align and args.reference_box is None and args.pose_estimator is None:
        raise InputError("--align needs the reference body: give --reference-box or --pose-estimator")
    if args.pose_with_driving and not args.driving:
        raise InputError("--pose-video goes with --driving; with --pose alone, --pose is the skeleton video")
    pipeline = load_pipeline(args)
    default_height, default_width = pipeline.default_size
    size = (args.height or default_height, args.width or default_width)
    pose_estimator = (load_pose_estimator(args.pose_estimator, args.pose_model, args.pose_detector_model)
                      if args.pose_estimator else None)
    face_model = None
    if not args.no_face and pipeline.has_face_controlnet:
        face_model = args.face_detector if args.face_detector == "mtcnn" else load_plugin(args.face_detector, "face detector")
    elif args.face and not args.no_face:
        log.warning("--face %s ignored: this model has no S-Face ControlNet", args.face)
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
        stride=args.stride,
        max_frames=args.frames,
        start=args.start,
        allow_blank_pose=args.allow_blank_pose,
        reference_box=reference_box,
    )
    fps = args.fps or signals.fps
    if not fps > 0:
        raise InputError(f"output fps must be > 0, got {fps}")
    reference = prepare_reference(reference_image, size)
    log.info("animating %d frames at %dx%d on %s (%s), %d steps", len(signals), size[0], size[1], args.device, args.dtype, args.steps)
    started = time.perf_counter()
    animation = pipeline(
        reference, signals.pose, signals.face, num_inference_steps=args.steps, guidance_scale=args.guidance, eta=args.eta,
        seed=args.seed, context=context, fps=fps, pose_scale=args.pose_scale, face_scale=args.face_scale, progress=True,
    )
    seconds = time.perf_counter() - started
    if args.guidance != 1.0 and not animation.guidance_applied:
        log.warning("guidance %g not applied: the model has no image prompt", args.guidance)
    written = write_animation(out, animation.frames, fps, to_uint8(reference, (-1, 1)), to_uint8(signals.pose, (0, 1)),
                              preview=not args.no_preview)
    summary = {
        "video": str(written.video),
        "preview": str(written.preview) if written.preview else None,
        "contact_sheet": str(written.contact_sheet) if written.contact_sheet else None,
        "frames": int(animation.frames.shape[0]),
        "size": f"{animation.frames.shape[1]}x{animation.frames.shape[2]}",
        "fps": fps,
        "seconds": round(seconds, 2),
        "seconds_per_frame": round(seconds / animation.frames.shape[0], 3),
        "notes": signals.notes,
    }
    return summary


def main(argv: list[str] | None = None) -> int:
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
        if os.environ.get("XDYNA_DEBUG"):
            raise
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    finally:
        package_log.removeHandler(handler)
    for key in ("video", "preview", "contact_sheet", "frames", "size", "fps", "seconds", "seconds_per_frame"):
        if summary[key] is not None:
            print(f"  {key:18s} {summary[key]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
