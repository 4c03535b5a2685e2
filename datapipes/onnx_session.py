"""onnxruntime sessions for the user-supplied models of the data tools (DWPose, YOLOX, 68-point
landmarks): local files only, one clear error per way a model can be missing or unreadable."""
from __future__ import annotations

import os


DEVICES = ("cpu", "cuda")


def providers_for(device: str) -> list[str]:
    """onnxruntime execution providers for ``device`` (``pack --device``); ``cuda`` needs the
    onnxruntime-gpu build, which is checked here rather than left to a silent CPU fallback."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "cpu":
        return ["CPUExecutionProvider"]
    import onnxruntime

    available = onnxruntime.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        raise ValueError(f"--device cuda needs onnxruntime-gpu (pip install onnxruntime-gpu); this onnxruntime "
                         f"offers {available}")
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def load_onnx_session(model_path: str, what: str, hint: str, providers: list[str] | None = None):
    """An ``onnxruntime.InferenceSession`` of ``model_path``; errors name ``what`` and the file,
    and ``hint`` says where such a model comes from (nothing is ever downloaded)."""
    if not os.path.isfile(model_path):
        raise FileNotFoundError(f"{what} model {model_path!r} does not exist; {hint}")
    try:
        import onnxruntime
    except ImportError as error:
        raise ImportError(f"the {what} model needs onnxruntime: pip install onnxruntime ({error})") from None
    try:
        return onnxruntime.InferenceSession(model_path, providers=providers or ["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own untyped errors for unreadable models
        raise ValueError(f"{what} model {model_path!r} cannot be loaded by onnxruntime: {error}") from None
