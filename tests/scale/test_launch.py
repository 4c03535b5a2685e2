"""xdyna-launch: sbatch rendering from the Hydra config and stable run ids (no cluster needed)."""

from __future__ import annotations

import pytest

from launch.cli import main as launch_main
from xdyna.train import slurm

# GPU nodes are refused around the tiny CPU default: the real-size preset with its required paths.
REAL_SIZE = ["preset=sd15", "model.pretrained.sd15=/weights/sd15", "data.shards=/data/human"]


def test_dry_run_renders_job_shape_from_config(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("XDYNA_RUN_ID", raising=False)
    code = launch_main(["slurm", "--dry-run", *REAL_SIZE, "experiment=wo_fusion", f"run.root={tmp_path}",
                        "launcher.nodes=4", "launcher.devices_per_node=8", "launcher.partition=gpu",
                        "launcher.account=proj", "launcher.time=02:00:00"])
    assert code == 0
    out = capsys.readouterr().out
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --signal=SIGUSR1@90", "#SBATCH --requeue", "#SBATCH --partition=gpu",
                 "#SBATCH --account=proj", "#SBATCH --time=02:00:00"):
        assert line in out, line
    assert "trainer.num_nodes=4 trainer.devices=8" in out and "srun --kill-on-bad-exit=1" in out
    run_id = next(l.split()[1] for l in out.splitlines() if l.startswith("run_id"))
    assert run_id.startswith("wo_fusion-") and f"export XDYNA_RUN_ID={run_id}" in out
    # The same command gives the same run: a resubmission continues in place.
    code = launch_main(["slurm", "--dry-run", *REAL_SIZE, "experiment=wo_fusion", f"run.root={tmp_path}",
                        "launcher.nodes=4", "launcher.devices_per_node=8", "launcher.partition=gpu",
                        "launcher.account=proj", "launcher.time=02:00:00"])
    assert f"run_id   {run_id}" in capsys.readouterr().out


def test_bad_job_shape_is_one_line_error(tmp_path, capsys):
    assert launch_main(["slurm", "--dry-run", f"run.root={tmp_path}", "launcher.time=forever"]) == 2
    assert "launcher.time 'forever'" in capsys.readouterr().err
    with pytest.raises(slurm.LaunchError, match="run id"):
        slurm.check_run_id("a/b")
