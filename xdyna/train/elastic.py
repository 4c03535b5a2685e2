"""Resuming a DeepSpeed checkpoint on another world size through DeepSpeed's universal checkpoint.

A ZeRO checkpoint holds one optimizer shard per rank (fp32 master weights and Adam moments of the
rank's slice of one flat buffer); another world size slices that buffer differently, so DeepSpeed
cannot load it as it is. DeepSpeed's own answer is the *universal checkpoint*:
``deepspeed.checkpoint.ds_to_universal`` rewrites the shards as one folder per parameter
(``zero/<name>/{fp32,exp_avg,exp_avg_sq,step}.pt``, whole tensors), and an engine whose config
has ``"checkpoint": {"load_universal": true}`` re-slices them for its own world size on load.

Here (:func:`ensure_universal`): the world size a checkpoint was written with is read from its
``COMPLETE`` marker (:mod:`xdyna.train.checkpointing` records ``world_size`` and ``zero_stage``);
when it differs from the run's, global rank 0 converts the checkpoint once into the sibling folder
``<checkpoint>.universal`` (written under a hidden partial name, renamed into place; the source is
only read) and every rank loads that. A conversion left from an earlier attempt is reused.

Only trainable parameters are in the optimizer (frozen SD1.5 weights never reach DeepSpeed and
``exclude_frozen_parameters`` keeps them out of the model states), and the conversion keeps it so:
it writes a folder for every optimizer parameter plus the tensors of the (trainable-only) model
states, i.e. buffers such as the motion modules' positional tables, which the loader never reads.
DeepSpeed asks the client for a ``universal_checkpoint_info`` entry (Megatron writes one); a
plain model has nothing to put there but the format version, which is what its
``--inject_missing_state`` option adds, in memory only.

Convert ahead of a job (e.g. on a login node, for a checkpoint too large to convert within the
process group's timeout): ``python -m xdyna.train.elastic <checkpoint>``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

from xdyna.train import checkpointing

# Lightning saves DeepSpeed checkpoints under this tag (the sub-folder of the checkpoint directory).
DEEPSPEED_TAG = "checkpoint"
# DeepSpeed's engine reads the tag of a universal folder from this file (ds_to_universal writes it).
_LATEST_UNIVERSAL = "latest_universal"
CONVERSION_LOG = "conversion.log"


def elastic_lr_scale(policy: str, start_world_size: int, world_size: int) -> float:
    """The factor on ``stage.optim.lr`` for a run on ``world_size`` ranks that started on
    ``start_world_size`` (the configured LR is the start's): ``keep`` 1, ``linear`` M/N0, ``sqrt``
    its square root. Always against the start, so 64 -> 48 -> 64 ranks ends at exactly 1 again."""
    ratio = world_size / start_world_size
    return {"keep": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[policy]


def rescale_learning_rate(schedulers, lr: float, scale: float) -> None:
    """Set the base LR of every (LambdaLR-like) scheduler to ``lr * scale`` and its optimizer's
    current LR to what the schedule gives at its position, so that the very next step uses it (the
    optimizer's groups were restored from the checkpoint with the old LR). Under DeepSpeed the
    client optimizer's groups are the ones the ZeRO optimizer steps with."""
    for scheduler in schedulers:
        scheduler.base_lrs = [lr * scale for _ in scheduler.base_lrs]
        current = [base * factor(scheduler.last_epoch) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
        for group, value in zip(scheduler.optimizer.param_groups, current):
            group["lr"] = value
        scheduler._last_lr = current


def saved_world_size(checkpoint: str | os.PathLike) -> int | None:
    """The world size a committed checkpoint directory was written with (``None``: not recorded,
    e.g. a single-file checkpoint or one written before the metadata existed)."""
    metadata = checkpointing.read_metadata(checkpoint)
    size = metadata.get("world_size")
    return int(size) if size is not None else None


def universal_path(checkpoint: str | os.PathLike) -> Path:
    """Where the universal conversion of ``checkpoint`` lives: its sibling ``<name>.universal``
    (not a checkpoint name: never a resume candidate itself, removed with its source)."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name + checkpointing.UNIVERSAL_SUFFIX)


def _converter_args(source_tag_dir: Path, output_tag_dir: Path) -> argparse.Namespace:
    # ds_to_universal's own options: one worker each (no process pool forked inside a training
    # process that holds a process group), strict checks, the version entry injected (see above).
    return argparse.Namespace(input_folder=str(source_tag_dir), output_folder=str(output_tag_dir),
                              num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                              strict=True, inject_missing_state=True)


def convert_to_universal(checkpoint: str | os.PathLike) -> Path:
    """Convert a committed DeepSpeed checkpoint directory to a universal one beside it, once.

    One process only (global rank 0). The source is read, never written. Returns the universal
    folder, which holds ``latest_universal``, ``checkpoint/`` (DeepSpeed's tag) and the
    converter's output in ``conversion.log``.
    """
    from deepspeed.checkpoint import ds_to_universal

    checkpoint = Path(checkpoint)
    if not checkpointing.is_complete(checkpoint) or not checkpoint.is_dir():
        raise checkpointing.CheckpointError(f"{checkpoint} is not a complete DeepSpeed checkpoint directory")
    target = universal_path(checkpoint)
    if checkpointing.is_complete(target):
        return target
    tmp = checkpointing.partial_path(target)
    tmp.mkdir()
    output = io.StringIO()
    try:
        # The converter prints its progress (and tqdm bars): kept in the folder, not the job log.
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            ds_to_universal.main(_converter_args(checkpoint / DEEPSPEED_TAG, tmp / DEEPSPEED_TAG))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    (tmp / CONVERSION_LOG).write_text(output.getvalue())
    if (tmp / _LATEST_UNIVERSAL).read_text().strip() != DEEPSPEED_TAG:
        raise checkpointing.CheckpointError(f"ds_to_universal wrote an unexpected tag into {tmp / _LATEST_UNIVERSAL}")
    metadata = dict(checkpointing.read_metadata(checkpoint), universal_of=checkpoint.name)
    checkpointing.commit(tmp, target, metadata, move_latest=False)
    return target


def ensure_universal(checkpoint: str | os.PathLike, world_size: int, *, is_global_zero: bool,
                     broadcast: Callable[[Any], Any], barrier: Callable[[], None]) -> Path | None:
    """Collective. The universal folder to load instead of ``checkpoint`` when the checkpoint was
    written on another world size (converted by rank 0 on first need), else ``None``."""
    saved = saved_world_size(checkpoint)
    if saved is None or saved == world_size:
        return None
    error = None
    if is_global_zero:
        try:
            convert_to_universal(checkpoint)
        except Exception as caught:  # every rank must leave together, with the reason
            error = f"{type(caught).__name__}: {caught}"
    error = broadcast(error)
    if error is not None:
        raise checkpointing.CheckpointError(
            f"cannot resume {checkpoint} (written on {saved} ranks) on {world_size}: its universal conversion failed ({error})")
    barrier()
    return universal_path(checkpoint)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xdyna.train.elastic",
                                     description="Convert a DeepSpeed checkpoint of xdyna-train to a universal one "
                                                 "beside it, for a resume on another world size.")
    parser.add_argument("checkpoint", help="a committed checkpoint directory (checkpoints/step=NNNNNN.ckpt)")
    args = parser.parse_args(argv)
    from xdyna.checkpoint_io import deepspeed_globals, weights_only_loading

    try:
        with weights_only_loading(deepspeed_globals()):
            target = convert_to_universal(args.checkpoint)
    except checkpointing.CheckpointError as error:
        print(f"xdyna.train.elastic: error: {error}", file=sys.stderr)
        return 2
    print(f"universal checkpoint: {target} ({json.dumps(checkpointing.read_metadata(target), sort_keys=True)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
