"""``logger=csv`` that keeps ``metrics.csv`` across resumes.

Lightning's CSVLogger deletes ``metrics.csv`` when it finds one in its directory, so every resume
(a requeue, a Ctrl-C and rerun) lost the run's history. Here the rows of steps the resumed
checkpoint holds are kept and new rows are appended under one header; rows of steps after it
are dropped, because those steps are trained again and log again.
"""

from __future__ import annotations

import csv

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment


class HistoryWriter(ExperimentWriter):
    """Keeps the rows with ``step < keep_before_step`` of an existing ``metrics.csv``."""

    def __init__(self, log_dir: str, keep_before_step: int) -> None:
        self.keep_before_step = keep_before_step
        super().__init__(log_dir=log_dir)

    def _check_log_dir_exists(self) -> None:
        # Called by the base __init__ in place of its delete-the-file check.
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            reader = csv.DictReader(file)
            keys = list(reader.fieldnames or [])
            rows = [row for row in reader if _step(row) < self.keep_before_step]
        if not rows:
            self._fs.rm_file(self.metrics_file_path)
            return
        with self._fs.open(self.metrics_file_path, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
        # Appended rows use this header; a new key rewrites the file with the extended one.
        self.metrics_keys = keys


def _step(row: dict) -> float:
    try:
        return float(row.get("step") or "inf")
    except ValueError:
        return float("inf")


class HistoryCSVLogger(CSVLogger):
    """CSVLogger whose writer is a :class:`HistoryWriter`. ``keep_before_step``: the optimizer
    step of the checkpoint the run resumes from (0 for a fresh start). Rows carry Lightning's
    0-based step index, so that checkpoint's steps are the rows with ``step < keep_before_step``."""

    def __init__(self, *args, keep_before_step: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.keep_before_step = keep_before_step

    @property
    @rank_zero_experiment  # as the base's: other ranks get a no-op writer and never touch the file
    def experiment(self) -> HistoryWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = HistoryWriter(self.log_dir, self.keep_before_step)
        return self._experiment
