"""``xdyna-export``: consolidate a training checkpoint into per-component safetensors.

    xdyna-export CHECKPOINT OUT_DIR
    xdyna-export runs/<run id>/checkpoints/latest OUT_DIR     # follows the ``latest`` pointer

CHECKPOINT is a DeepSpeed ZeRO checkpoint directory (any stage, any number of ranks) or a
single-file Lightning checkpoint. OUT_DIR gets ``<component>.safetensors`` for each trained
component (dynamics_adapter, motion_modules, pose_controlnet, face_controlnet) and
``export.json``; ``xdyna.checkpoint_io.load_components`` reads them back into the model.
``provenance.json`` beside them says where the weights came from (commit, config, data, versions,
resume chain, pretrained file hashes; :mod:`xdyna.provenance`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from xdyna.errors import XDynaUserError
from xdyna.provenance import PROVENANCE_FILE
from xdyna.train import checkpointing
from xdyna.train.export import export_checkpoint


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint path, or a ``latest`` pointer / checkpoints directory standing for the newest one."""
    if path.name == checkpointing.LATEST_POINTER and path.is_file():
        path = path.parent
    if path.is_dir() and not checkpointing.is_complete(path) and not (path / "checkpoint").is_dir():
        newest = checkpointing.newest_complete_checkpoint(path)
        if newest is None:
            raise XDynaUserError(f"{path} holds no complete checkpoint")
        return newest
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xdyna-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="checkpoint dir/file, a checkpoints/ dir or its 'latest' pointer")
    parser.add_argument("out_dir", type=Path, help="directory for <component>.safetensors + export.json")
    args = parser.parse_args(argv)
    try:
        checkpoint = resolve_checkpoint(args.checkpoint)
        manifest = export_checkpoint(checkpoint, args.out_dir)
    except XDynaUserError as error:
        print(f"xdyna-export: error: {error}", file=sys.stderr)
        return 2
    print(f"exported step {manifest['step']} of {checkpoint}")
    for component in manifest["components"]:
        print(f"  {args.out_dir / (component + '.safetensors')}")
    print(f"  {args.out_dir / PROVENANCE_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
