"""``xdyna-eval``: the paper's metrics over folders of videos, offline.

    xdyna-eval --pred runs/x/videos --gt data/test/gt --ref data/test/ref --metrics paper \
               --weights weights/manifest.json --out runs/x/eval
    xdyna-eval --compare runs/a/eval/metrics.json runs/b/eval/metrics.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .face import load_callable
from .masks import PersonDeepLabSegmenter
from .report import compare_table, load_run, markdown_table, write_run
from .runner import ALL_METRICS, METRIC_GROUPS, EvalOptions, evaluate
from .sources import EvalInputError, pair_videos
from .weights import WeightsError, WeightsManifest, verified_weights


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xdyna-eval", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=f"metrics: {', '.join(ALL_METRICS)}\ngroups: " +
                                     "; ".join(f"{k} = {','.join(v)}" for k, v in METRIC_GROUPS.items()))
    parser.add_argument("--pred", type=Path, help="folder of generated videos (*.mp4 or frame folders)")
    parser.add_argument("--gt", type=Path, help="folder of ground-truth videos, same names")
    parser.add_argument("--ref", type=Path, help="folder of reference images <name>.png/.jpg (Face-Cos target)")
    parser.add_argument("--masks", type=Path, help="folder of foreground mask videos <name>.mp4 (FG/BG metrics)")
    parser.add_argument("--metrics", default="cheap", help="comma-separated metrics and groups (default: cheap)")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.compare:
            run_a, run_b = (load_run(path) for path in args.compare)
            print(compare_table(run_a, run_b, str(args.compare[0]), str(args.compare[1])), end="")
            return 0
        if args.pred is None or args.gt is None:
            parser.error("--pred and --gt are required (or use --compare)")
        manifest = WeightsManifest.load(args.weights) if args.weights else WeightsManifest.empty()
        segmenter = None
        if args.segmenter == "deeplabv3":
            segmenter = PersonDeepLabSegmenter(manifest, args.device)
        elif args.segmenter:
            segmenter = load_callable(args.segmenter)()
        backend = load_callable(args.face_exp_backend)() if args.face_exp_backend else None
        pairs = pair_videos(args.pred, args.gt, args.ref, args.masks)
        options = EvalOptions(metrics=[m.strip() for m in args.metrics.split(",") if m.strip()], manifest=manifest,
                              device=args.device, clip_frames=args.clip_frames, num_bootstrap=args.bootstrap,
                              face_policy=args.face_policy, segmenter=segmenter, expression_backend=backend,
                              max_frames=args.max_frames, seed=args.seed, progress=not args.quiet)
        report = evaluate(pairs, options)
        report["inputs"] = {"pred": str(args.pred), "gt": str(args.gt), "ref": str(args.ref) if args.ref else None,
                            "masks": str(args.masks) if args.masks else None}
        report["weights"] = verified_weights(manifest)
        out_dir = args.out or args.pred.parent / "eval"
        paths = write_run(report, out_dir)
    except (EvalInputError, WeightsError, ValueError) as error:
        print(f"xdyna-eval: error: {error}", file=sys.stderr)
        return 2
    print(markdown_table(report), end="")
    print(f"wrote {paths['json']}, {paths['markdown']}, {paths['plot']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
