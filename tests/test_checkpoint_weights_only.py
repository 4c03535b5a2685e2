"""Every checkpoint read is weights-only: a file holding an object outside the allow-list is
refused with one line naming the object and the file, and nothing in it runs. Real Lightning and
DeepSpeed checkpoints load through the same path in tests/scale (test_deepspeed_resume,
test_resume) and tests/test_train_cli.py."""

from __future__ import annotations

import os

import pytest
import torch

from xdyna.pipelines.pipeline import PipelineFormatError, read_training_checkpoint
from xdyna.checkpoint_io import ExportError, read_checkpoint


class RunsCode:
    """Unpickling this calls ``os.system``: what a weights-only loader must never do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def lightning_like(tmp_path, extra):
    path = tmp_path / "step.ckpt"
    torch.save({"state_dict": {"model.x": torch.zeros(2)}, "hyper_parameters": {"model": {"flavour": "tiny"}}, **extra}, path)
    return path


def test_lightning_checkpoint_with_code_is_refused_by_export_and_pipeline(tmp_path):
    marker = tmp_path / "ran"
    path = lightning_like(tmp_path, {"callbacks": {"x": RunsCode(marker)}})
    with pytest.raises(ExportError, match=r"step.ckpt' is refused: it holds (posix|os)\.system, which is not allowed"):
        read_checkpoint(path)
    with pytest.raises(PipelineFormatError, match=r"is refused: it holds (posix|os)\.system"):
        read_training_checkpoint(path)
    assert not marker.exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # the switch is scoped to the read


def test_allowed_checkpoint_contents_still_load(tmp_path):
    """Tensors, plain containers, and Lightning's AttributeDict hyper-parameters (older Lightning)."""
    from lightning.fabric.utilities.data import AttributeDict

    path = lightning_like(tmp_path, {"hyper_parameters": AttributeDict(model={"flavour": "tiny"}), "global_step": 3})
    weights, meta = read_checkpoint(path)
    assert torch.equal(weights["model.x"], torch.zeros(2)) and meta["hyper_parameters"] == {"model": {"flavour": "tiny"}}
    assert read_training_checkpoint(path)[1] == {"flavour": "tiny"}


def test_deepspeed_shard_with_code_is_refused_naming_the_shard(tmp_path):
    """DeepSpeed's consolidation asks torch.load for ``weights_only=False``; inside our read it is
    forced weights-only, and the refusal names the shard that holds the object."""
    marker = tmp_path / "ran"
    tag = tmp_path / "step=000002.ckpt" / "checkpoint"
    tag.mkdir(parents=True)
    # Model states as DeepSpeed writes them (what its consolidation reads before the shards).
    torch.save({"hyper_parameters": {"model": {"flavour": "tiny"}}, "module": {}, "buffer_names": [], "param_shapes": [],
                "shared_params": {}}, tag / "mp_rank_00_model_states.pt")
    torch.save({"optimizer_state_dict": RunsCode(marker)}, tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(ExportError, match=r"zero_pp_rank_0_mp_rank_00_optim_states.pt' is refused: it holds (posix|os)\.system"):
        read_checkpoint(tmp_path / "step=000002.ckpt")
    assert not marker.exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ
