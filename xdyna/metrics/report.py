"""Writing a run: JSON (strict: non-finite numbers become strings), a Markdown table, a plot;
and the side-by-side comparison of two runs."""
from __future__ import annotations

import json
import math
from pathlib import Path

# Direction of "better" for the Markdown arrows and the comparison.
HIGHER_IS_BETTER = {"psnr", "ssim", "disco_psnr", "disco_ssim", "face_det", "face_cos"}


def _strict(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def headline(entry: dict) -> float | str | None:
    """The one number of a metric entry (``mean`` for per-frame metrics, else ``value``)."""
    return entry.get("mean", entry.get("value"))


def _format(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, str):
        return value
    return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"


def _detail(name: str, entry: dict) -> str:
    if "error" in entry:
        return entry["error"]
    if "frames" in entry and "mean" in entry:
        extra = f", {entry['non_finite_frames']} non-finite" if entry.get("non_finite_frames") else ""
        return f"{entry['definition']}; std {_format(entry['std'])} over {entry['frames']} frames{extra}"
    if "ci" in entry:
        low, high = entry["ci"]
        note = "; N <= dim, covariance rank-deficient" if entry.get("rank_deficient") else ""
        return (f"{entry['region']} {entry['unit']}s; {int(entry['ci_level'] * 100)}% CI [{_format(low)}, {_format(high)}]; "
                f"N pred {entry['n_pred']}, gt {entry['n_gt']}, dim {entry['dim']}{note}")
    if name == "face_det":
        return f"{entry['frames_with_face']} / {entry['frames']} frames"
    if name == "face_cos":
        return (f"vs {entry['target']}; policy {entry['policy']}; {entry['frames_used']} frames used; "
                f"Face-Det {entry['face_det_pred']:.3f}")
    if name == "face_exp":
        return f"{entry['frames_used']} frames; backend not verified against the paper"
    return ""


def markdown_table(report: dict) -> str:
    lines = ["| metric | value | detail |", "|---|---|---|"]
    for name, entry in report["metrics"].items():
        arrow = "↑" if name in HIGHER_IS_BETTER else "↓"
        lines.append(f"| {name} {arrow} | {_format(headline(entry))} | {_detail(name, entry)} |")
    protocol = report["protocol"]
    lines.append("")
    lines.append(f"{protocol['videos']} videos, {protocol['frames']} frames; clips of {protocol['clip_frames']} frames.")
    if report.get("skipped"):
        left_out = ", ".join(f"{m} (needs {' and '.join(n)})" for m, n in report["skipped"].items())
        lines.append(f"Skipped: {left_out}.")
    return "\n".join(lines) + "\n"


def write_plot(report: dict, path: Path) -> None:
    """Per-frame curves of every per-frame metric, one panel per metric, one line per video."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt

    names = sorted({m for video in report["per_frame"].values() for m in video})
    figure, axes = plt.subplots(max(len(names), 1), 1, figsize=(8, 2.2 * max(len(names), 1)), squeeze=False)
    for axis, name in zip(axes[:, 0], names):
        for video, values in report["per_frame"].items():
            axis.plot([v if math.isfinite(v) else float("nan") for v in values[name]], label=video, linewidth=1)
        axis.set_ylabel(name)
    if not names:
        axes[0, 0].text(0.5, 0.5, "no per-frame metrics in this run", ha="center", va="center")
    axes[-1, 0].set_xlabel("frame")
    if names and len(report["per_frame"]) <= 10:
        axes[0, 0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_run(report: dict, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "metrics.json", "markdown": out_dir / "metrics.md", "plot": out_dir / "metrics.png"}
    paths["json"].write_text(json.dumps(_strict(report), indent=1, allow_nan=False))
    paths["markdown"].write_text(markdown_table(report))
    write_plot(report, paths["plot"])
    return paths


def load_run(path: Path) -> dict:
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read run {path}: {error}") from None
    if not isinstance(report, dict) or report.get("tool") != "xdyna-eval" or "metrics" not in report:
        raise ValueError(f"{path} is not an xdyna-eval metrics.json")
    return report


def compare_table(run_a: dict, run_b: dict, label_a: str, label_b: str) -> str:
    """Side-by-side Markdown table of two runs; the better value per row is marked with *."""
    names = list(run_a["metrics"]) + [m for m in run_b["metrics"] if m not in run_a["metrics"]]
    lines = [f"| metric | {label_a} | {label_b} | delta (b - a) |", "|---|---|---|---|"]
    for name in names:
        a = headline(run_a["metrics"].get(name, {}))
        b = headline(run_b["metrics"].get(name, {}))
        cells = [_format(a), _format(b)]
        delta = "n/a"
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            delta = _format(b - a) if math.isfinite(b - a) else "n/a"
            if a != b:
                better_b = (b > a) == (name in HIGHER_IS_BETTER)
                cells[1 if better_b else 0] += " *"
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {delta} |")
    return "\n".join(lines) + "\n"
