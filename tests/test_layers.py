"""The layering the design holds (docs/design.md, Layout): inference and the checkpoint reader
load without the Lightning layer, the models without Lightning, Hydra or W&B."""

from __future__ import annotations

import subprocess
import sys

import pytest

FORBIDDEN = ("lightning", "pytorch_lightning", "hydra", "wandb", "xdyna.train")


@pytest.mark.parametrize("module", ["xdyna.checkpoint_io", "xdyna.pipelines.pipeline", "xdyna.pipelines.cli", "xdyna.models"])
def test_module_imports_nothing_of_the_training_layer(module):
    # A fresh interpreter: this test process has imported everything already.
    code = (f"import sys, {module}; "
            f"print(sorted({{m for m in sys.modules if m.startswith({FORBIDDEN!r})}}))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]", f"{module} imports {loaded}"
