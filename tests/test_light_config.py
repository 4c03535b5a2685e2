"""A bad config is answered before the ML stack is imported: composing conf/, the schema, the config
rules (``check_config``) and xdyna-launch's sbatch rendering import no Lightning, diffusers,
DeepSpeed, transformers, webdataset, scipy or torch (seconds instead of ~12 s per command)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("lightning", "diffusers", "deepspeed", "transformers", "webdataset", "scipy", "torch")
MARKER = "heavy-imports:"

# Runs an installed console script (its entry point, as pyproject.toml declares it) in this process
# and, at exit, prints which of HEAVY it imported.
WRAPPER = f"""
import atexit, json, sys
from importlib.metadata import entry_points

atexit.register(lambda: print({MARKER!r}, json.dumps(sorted({{name.split(".")[0] for name in sys.modules}}
                                                          & set({HEAVY!r})))))
script = sys.argv[1]
(entry,) = entry_points(group="console_scripts", name=script)
sys.argv = [script, *sys.argv[2:]]
sys.exit(entry.load()())
"""

# Real-size jobs: GPU nodes around the tiny CPU default are refused (as in tests/scale/test_launch.py).
REAL_SIZE = ["preset=sd15", "model.pretrained.sd15=/weights/sd15", "data.shards=/data/human"]


def run_entry_point(script: str, *args: str, cwd: Path) -> tuple[subprocess.CompletedProcess, list[str]]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("XDYNA_RUN_ID", None)
    # A guard against a hung run only, never a timing check.
    result = subprocess.run([sys.executable, "-c", WRAPPER, script, *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=600)
    lines = [line for line in result.stdout.splitlines() if line.startswith(MARKER)]
    assert len(lines) == 1, result.stdout[-2000:] + result.stderr[-2000:]
    return result, json.loads(lines[0].removeprefix(MARKER))


@pytest.mark.parametrize("args, status, culprit", [
    # refused by Hydra's composition against the schema (a typo of model.flavour)
    (["model.flavor=tiny"], 2, "model.flavor"),
    # refused by check_config's rules, after composition, before the data module or model
    (["data.shards=null"], 2, "data.shards is not set"),
], ids=["schema", "config-rules"])
def test_xdyna_train_refuses_a_bad_config_without_the_ml_stack(tmp_path, args, status, culprit):
    result, heavy = run_entry_point("xdyna-train", "logger=none", f"run.root={tmp_path}", *args, cwd=tmp_path)
    assert result.returncode == status and culprit in result.stderr, result.stderr[-2000:]
    assert heavy == [], f"xdyna-train imported {heavy} to refuse {args}"


def test_xdyna_launch_renders_the_sbatch_script_without_the_ml_stack(tmp_path):
    result, heavy = run_entry_point("xdyna-launch", "slurm", "--dry-run", *REAL_SIZE, f"run.root={tmp_path}",
                                    "launcher.nodes=2", "launcher.partition=gpu", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "#SBATCH --nodes=2" in result.stdout and "#SBATCH --partition=gpu" in result.stdout
    assert heavy == [], f"xdyna-launch imported {heavy} to render a script"


def test_xdyna_models_exports_every_name_it_had():
    """The package imports its names on first use; each still comes from its defining module."""
    import xdyna.models as models
    from xdyna.models import attention, build, config, loading, reference_variants, xdyna_model

    defined_in = {attention: ["ReferenceFeatures"], build: ["build_model"],
                  config: ["COMPONENTS", "FACE_VARIANTS", "ModelConfig", "PretrainedPaths"],
                  loading: ["LoadReport", "PretrainedNotFoundError", "WeightsMismatchError", "load_component_safetensors",
                            "read_state_dict", "save_component_safetensors"],
                  reference_variants: ["REFERENCE_VARIANTS", "ReferenceVariant", "reference_variant"],
                  xdyna_model: ["COMPONENTS", "FROZEN_PARTS", "XDynaModel"]}
    for module, names in defined_in.items():
        for name in names:
            assert getattr(models, name) is getattr(module, name), name
    assert sorted(models.__all__) == sorted({name for names in defined_in.values() for name in names})
    with pytest.raises(AttributeError, match="no attribute 'build_modle'"):
        models.build_modle
