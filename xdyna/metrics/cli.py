"""``xdyna-eval``: the paper's metrics over folders of videos, offline.

    xdyna-eval --pred runs/x/videos --gt data/test/gt --ref data/test/ref --metrics paper \
               --weights weights/manifest.json --out runs/x/eval
    xdyna-eval --pred dance.mp4 --gt dance.gt.mp4     # one pair; without --weights: what needs no weight files
    xdyna-eval --compare runs/a/eval/metrics.json runs/b/eval/metrics.json
    xdyna-eval prepare-gt --driving dance.mp4 --out dance_gt.mp4 --height 896 --width 512  # the ground truth

Arguments are checked before any video is decoded; an error is one line, exit status 2
(``--debug`` or ``XDYNA_DEBUG=1`` shows the traceback).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..cli_common import OneLineParser, add_debug_flag, debug_requested, device_problem, report_user_error
from ..errors import XDynaUserError
from .distribution import DISTRIBUTION_METRICS, split_region
from .face import load_callable
from .masks import PersonDeepLabSegmenter
from .report import compare_table, load_run, markdown_table, write_run
from .runner import (ALL_METRICS, DEFAULT_METRICS, METRIC_GROUPS, EvalOptions, evaluate, metric_weights, resolve_metrics,
                     usable_metrics)
from .sources import EvalInputError, pair_videos
from .weights import WEIGHT_SOURCES, WeightsError, WeightsManifest, verified_weights

PROG = "xdyna-eval"


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog=f"metrics: {', '.join(ALL_METRICS)}\ngroups: " +
                           "; ".join(f"{k} = {','.join(v)}" for k, v in METRIC_GROUPS.items()) +
                           "\nground truth of an animation: xdyna-eval prepare-gt --help")
    parser.add_argument("--pred", type=Path, help="generated video (.mp4), or a folder of them (*.mp4 or frame folders)")
    parser.add_argument("--gt", type=Path, help="ground-truth video, or a folder of them with the same names "
                                                "(xdyna-animate --save-ground-truth writes one)")
    parser.add_argument("--ref", type=Path, help="reference image, or a folder of <name>.png/.jpg (Face-Cos target)")
    parser.add_argument("--masks", type=Path, help="foreground mask video, or a folder of <name>.mp4 (FG/BG metrics)")
    parser.add_argument("--metrics", help="comma-separated metrics and groups (default: cheap, less those whose weights "
                                          "--weights does not list; a note names them)")
    parser.add_argument("--weights", type=Path, help="JSON manifest of local weight files with sha256")
    parser.add_argument("--out", type=Path, help="output folder (default: <pred>/../eval)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--clip-frames", type=int, default=16, help="frames per clip for video metrics (default 16)")
    parser.add_argument("--max-frames", type=int, help="evaluate only the first N frames of each video")
    parser.add_argument("--bootstrap", type=int, default=100, help="bootstrap resamples for FD intervals (0: none)")
    parser.add_argument("--face-policy", choices=("skip", "zero"), default="skip",
                        help="Face-Cos for frames without a face: skip them or count 0")
    parser.add_argument("--segmenter", help="'deeplabv3' (weights from the manifest) or module:callable returning a segmenter")
    parser.add_argument("--face-exp-backend", help="module:callable returning an expression backend (none ships)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("RUN_A", "RUN_B"), help="print two runs side by side")
    add_debug_flag(parser)
    return parser


def _needs(flag: str, metric: str, needs: list[str], entries: tuple[str, ...] = ()) -> str:
    """``flag metric needs ...``, with where each listed weight file comes from."""
    where = "; ".join(f"{e}: {WEIGHT_SOURCES[e].where_from}" for e in entries if e in WEIGHT_SOURCES)
    return f"{flag} {metric} needs {', '.join(needs)} (docs/metrics.md)" + (f"; {where}" if where else "")


def check_args(args: argparse.Namespace) -> None:
    """Every rule on the arguments, checked before any video is decoded or backbone built: the
    first broken one raises an error naming the flag. Sets ``args.manifest``, ``args.metric_list``
    and ``args.skipped`` (default metrics left out for want of weights or packages)."""

    def need(condition: bool, message: str) -> None:
        if not condition:
            raise EvalInputError(message)

    if args.compare:
        need(args.pred is None and args.gt is None, "--compare prints two finished runs: do not combine it with --pred/--gt")
        return
    need(args.pred is not None and args.gt is not None, "--pred and --gt are required (or --compare RUN_A RUN_B)")
    for flag, path in (("--pred", args.pred), ("--gt", args.gt), ("--ref", args.ref), ("--masks", args.masks)):
        need(path is None or path.exists(), f"{flag} {path} does not exist")
    need(args.pred.is_file() == args.gt.is_file(), "--pred and --gt must both be video files or both folders")
    if args.pred.is_file():
        need(args.pred.suffix.lower() == ".mp4" and args.gt.suffix.lower() == ".mp4", "--pred and --gt files must be .mp4 videos")
    need(args.clip_frames >= 1, f"--clip-frames must be >= 1, got {args.clip_frames}")
    need(args.max_frames is None or args.max_frames >= 1, f"--max-frames must be >= 1, got {args.max_frames}")
    need(args.bootstrap >= 0, f"--bootstrap must be >= 0, got {args.bootstrap}")
    need(args.out is None or not args.out.is_file(), f"--out {args.out} is a file, expected a folder")
    problem = device_problem("--device", args.device)
    need(problem is None, problem or "")
    try:
        args.manifest = WeightsManifest.load(args.weights) if args.weights else WeightsManifest.empty()
    except WeightsError as error:
        raise EvalInputError(f"--weights: {error}") from None
    try:
        requested = resolve_metrics([m.strip() for m in (args.metrics or ",".join(DEFAULT_METRICS)).split(",") if m.strip()])
    except ValueError as error:
        raise EvalInputError(f"--metrics: {error}") from None
    args.metric_list, args.skipped = usable_metrics(requested, args.manifest)
    if args.metrics is not None and args.skipped:
        metric, needs = next(iter(args.skipped.items()))
        raise EvalInputError(_needs("--metrics", metric, needs, metric_weights(metric)))
    need("face_exp" not in args.metric_list or args.face_exp_backend,
         "--metrics face_exp needs --face-exp-backend module:callable (none ships: X-Dyna's expression model is unpublished)")
    regional = [m for m in args.metric_list if m in DISTRIBUTION_METRICS and split_region(m)[0] != "full"]
    need(not regional or args.masks or args.segmenter, f"--metrics {regional[0] if regional else ''} needs --masks or --segmenter")
    need(args.segmenter != "deeplabv3" or "deeplabv3_person" in args.manifest,
         _needs("--segmenter", "deeplabv3", ["weights manifest entry 'deeplabv3_person'"], ("deeplabv3_person",)))


def _prepare_gt_parser() -> argparse.ArgumentParser:
    from ..pipelines.cli import DEFAULT_STRIDE

    parser = OneLineParser(prog=f"{PROG} prepare-gt",
                           description="The ground truth of an animation: its driving video at the inference size, start, "
                                       "stride and length, as xdyna-animate --save-ground-truth writes it (no model needed). "
                                       "Give the selection flags the animation was made with.")
    parser.add_argument("--driving", required=True, help="the driving video the animation followed")
    parser.add_argument("--pose-video", help="its skeleton video, if the animation used one (the shorter sets the length)")
    parser.add_argument("--out", required=True, help="ground-truth .mp4 to write")
    parser.add_argument("--height", type=int, required=True, help="the animation's height")
    parser.add_argument("--width", type=int, required=True, help="the animation's width")
    parser.add_argument("--stride", type=int, default=DEFAULT_STRIDE, help="as xdyna-animate --stride")
    parser.add_argument("--start", type=int, default=0, help="as xdyna-animate --start")
    parser.add_argument("--frames", type=int, help="as xdyna-animate --frames")
    parser.add_argument("--fps", type=float, help="as xdyna-animate --fps (default: driving fps / stride)")
    add_debug_flag(parser)
    return parser


def prepare_gt(argv: list[str]) -> int:
    """``xdyna-eval prepare-gt``: see :func:`_prepare_gt_parser`."""
    from ..pipelines.checks import require_file
    from ..pipelines.cli import check_frame_args
    from ..pipelines.preview import write_ground_truth

    args = _prepare_gt_parser().parse_args(argv)
    try:
        check_frame_args(args)
        require_file(args.driving, "--driving video")
        if args.pose_video:
            require_file(args.pose_video, "--pose-video")
        path = write_ground_truth(args.out, args.driving, (args.height, args.width), args.stride, args.start, args.frames,
                                  args.fps, args.pose_video)
    except XDynaUserError as error:
        if debug_requested(args):
            raise
        return report_user_error(f"{PROG} prepare-gt", error)
    print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["prepare-gt"]:
        return prepare_gt(argv[1:])
    args = _parser().parse_args(argv)
    try:
        check_args(args)
        if args.compare:
            run_a, run_b = (load_run(path) for path in args.compare)
            print(compare_table(run_a, run_b, str(args.compare[0]), str(args.compare[1])), end="")
            return 0
        if args.skipped:
            left_out = ", ".join(f"{m} (needs {' and '.join(n)})" for m, n in args.skipped.items())
            print(f"{PROG}: skipped {left_out}; --weights MANIFEST lists weight files (docs/metrics.md), "
                  "--metrics names the metrics to require", file=sys.stderr)
        manifest = args.manifest
        segmenter = None
        if args.segmenter == "deeplabv3":
            segmenter = PersonDeepLabSegmenter(manifest, args.device)
        elif args.segmenter:
            segmenter = load_callable(args.segmenter)()
        backend = load_callable(args.face_exp_backend)() if args.face_exp_backend else None
        pairs = pair_videos(args.pred, args.gt, args.ref, args.masks)
        options = EvalOptions(metrics=args.metric_list, manifest=manifest,
                              device=args.device, clip_frames=args.clip_frames, num_bootstrap=args.bootstrap,
                              face_policy=args.face_policy, segmenter=segmenter, expression_backend=backend,
                              max_frames=args.max_frames, seed=args.seed, progress=not args.quiet)
        report = evaluate(pairs, options)
        report["skipped"] = args.skipped
        report["inputs"] = {"pred": str(args.pred), "gt": str(args.gt), "ref": str(args.ref) if args.ref else None,
                            "masks": str(args.masks) if args.masks else None}
        report["weights"] = verified_weights(manifest)
        out_dir = args.out or args.pred.parent / "eval"
        paths = write_run(report, out_dir)
    except (XDynaUserError, EvalInputError, ValueError) as error:
        if debug_requested(args):
            raise
        return report_user_error(PROG, error)
    print(markdown_table(report), end="")
    print(f"wrote {paths['json']}, {paths['markdown']}, {paths['plot']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
