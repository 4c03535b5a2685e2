"""What the inference and evaluation commands share: one-line errors, exit status 2, and the
traceback only on request (``--debug`` or ``XDYNA_DEBUG=1``)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line (``PROG: error: ...``) instead of the usage block,
    exit status 2 as argparse's own."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (also: XDYNA_DEBUG=1)")


def debug_requested(args: argparse.Namespace | None = None) -> bool:
    return bool(getattr(args, "debug", False) or os.environ.get("XDYNA_DEBUG"))


def report_user_error(prog: str, error: BaseException) -> int:
    """Print ``error`` as one line naming ``prog``; the exit status of a user error."""
    message = " ".join(str(error).split()) or type(error).__name__
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


def device_problem(flag: str, spec: str) -> str | None:
    """Why the device ``spec`` given as ``flag`` cannot be used here, or None."""
    import torch

    try:
        device = torch.device(spec)
    except RuntimeError:
        return f"{flag} {spec!r} is not a device; use cpu or cuda[:N]"
    if device.type not in ("cpu", "cuda"):
        return f"{flag} {spec!r}: use cpu or cuda[:N]"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return f"{flag} {spec} but no CUDA device is available here: use {flag} cpu"
        if device.index is not None and device.index >= torch.cuda.device_count():
            return f"{flag} {spec}: only {torch.cuda.device_count()} CUDA device(s) here"
    return None
