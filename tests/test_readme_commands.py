"""The README's commands, parsed out of its ```bash blocks and run in a config-only mode, so the
docs cannot drift from the code: ``xdyna-train ... --cfg job`` composes without training (a sweep
composes each of its points), ``xdyna-launch ... --dry-run`` renders the sbatch script,
``xdyna-info`` composes its config, and every other tool's ``--help`` must know every flag used."""

from __future__ import annotations

import itertools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BIN = Path(sys.executable).parent
COMMANDS = ("xdyna-train", "xdyna-launch", "xdyna-info", "xdyna-data", "xdyna-animate", "xdyna-eval", "xdyna-export")


def readme_commands(text: str) -> list[list[str]]:
    """Every xdyna command line of the ```bash blocks, continuation lines joined, comments and
    shell quoting removed as the shell would (``$PWD`` is left for the test to fill in)."""
    lines = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] in COMMANDS:
                lines.append(words)
    return lines


COMMAND_LINES = readme_commands(README.read_text())


def test_the_readme_shows_the_training_and_launch_commands():
    # Guards the parser itself: an empty list would let every test below pass vacuously.
    used = {words[0] for words in COMMAND_LINES}
    assert {"xdyna-train", "xdyna-launch", "xdyna-info", "xdyna-data", "xdyna-animate"} <= used, used


def test_readme_parser_joins_continuations_and_drops_comments():
    text = "```bash\n# a comment\nxdyna-train a=1 \\\n    b=\"'{x..y}'\"  # why\nmake demo\n```\n"
    assert readme_commands(text) == [["xdyna-train", "a=1", "b='{x..y}'"]]


def _ids() -> list[str]:
    return [f"{i}-{words[0]}" for i, words in enumerate(COMMAND_LINES)]


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from xdyna.train.cli import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def _sweep_points(overrides: list[str]) -> list[list[str]]:
    """The override lists of a ``-m`` sweep's jobs, as Hydra's basic sweeper expands them."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    choices = []
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.input_line.split("=", 1)[0]
        values = list(override.sweep_string_iterator()) if override.is_sweep_override() else None
        choices.append([f"{key}={value}" for value in values] if values else [override.input_line])
    return [list(point) for point in itertools.product(*choices)]


def _flags_in_help(command: list[str], cwd: Path) -> None:
    words = command[1:]
    subcommand = [words[0]] if words and not words[0].startswith("-") and "=" not in words[0] else []
    shown = subprocess.run([str(BIN / command[0]), *subcommand, "--help"], cwd=cwd, capture_output=True, text=True,
                           timeout=300)
    assert shown.returncode == 0, shown.stderr[-2000:]
    for flag in (w.split("=", 1)[0] for w in words if w.startswith("--")):
        assert flag in shown.stdout, f"{' '.join(command[:2])}: README uses {flag}, --help does not list it"


@pytest.mark.parametrize("command", COMMAND_LINES, ids=_ids())
def test_readme_command_runs_in_config_only_mode(command, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("XDYNA_RUN_ID", raising=False)
    command = [word.replace("$PWD", str(tmp_path)) for word in command]
    name, args = command[0], command[1:]
    if name == "xdyna-train" and "-m" in args:
        for point in _sweep_points([a for a in args if a != "-m"]):
            _compose(point)  # raises on an unknown option, key or unparsable value
    elif name == "xdyna-train":
        env = dict(os.environ, WANDB_MODE="disabled")
        env.pop("XDYNA_RUN_ID", None)
        shown = subprocess.run([str(BIN / name), *args, "--cfg", "job"], cwd=tmp_path, env=env,
                               capture_output=True, text=True, timeout=300)
        assert shown.returncode == 0, shown.stderr[-2000:]
    elif name == "xdyna-launch":
        from launch.cli import main as launch_main

        assert args[0] == "slurm"
        assert launch_main(["slurm", "--dry-run", *args[1:]]) == 0, capsys.readouterr().err
        assert "#SBATCH" in capsys.readouterr().out
    elif name == "xdyna-info":
        _compose([a for a in args if "=" in a and not a.startswith("-")])
        _flags_in_help(command, tmp_path)
    else:
        _flags_in_help(command, tmp_path)
