"""Two copies of one pack/encode part cannot run at once (datapipes/parts.py): the second stops
with one line naming the first, and leaves its work alone; a killed copy leaves no stale lock."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from datapipes.parts import PartBusyError, PartSettings, begin_part, end_part, make_plan

HOLD_PART = """
import sys
from datapipes.parts import PartSettings, begin_part, make_plan
finished, removed, staging = begin_part(sys.argv[1], make_plan([], PartSettings(parts=2)), 0)
print(staging, flush=True)
sys.stdin.read()  # holds part 0 until killed
"""


def test_a_second_copy_of_a_running_part_is_refused_and_a_killed_one_leaves_no_lock(tmp_path):
    out = str(tmp_path / "packed")
    plan = make_plan([], PartSettings(parts=2))
    holder = subprocess.Popen([sys.executable, "-c", HOLD_PART, out], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=dict(os.environ, SLURM_JOB_ID="4242"))
    try:
        holder_staging = holder.stdout.readline().strip()  # printed once part 0 is held
        assert os.path.isdir(holder_staging), holder_staging
        with pytest.raises(PartBusyError) as refused:
            begin_part(out, plan, 0)
        holder_line = json.loads(str(refused.value).split("(", 1)[1].split(")", 1)[0])
        assert holder_line["pid"] == holder.pid and holder_line["job"] == "4242"
        assert os.path.isdir(holder_staging)  # the running copy's work is untouched
        # Locks are per part: the other part starts and finishes meanwhile.
        finished, _, staging = begin_part(out, plan, 1)
        assert finished is None
        assert end_part(out, plan, 1, [], staging, {})["part"] == 1
    finally:
        holder.send_signal(signal.SIGKILL)  # what a node failure or scancel -s KILL leaves
        holder.wait(timeout=60)
    # The kernel dropped the dead copy's lock: the rerun takes the part and clears its leftovers.
    finished, removed, staging = begin_part(out, plan, 0)
    assert finished is None and removed == [os.path.relpath(holder_staging, out)]
    assert end_part(out, plan, 0, [], staging, {})["skipped"] is False
    assert begin_part(out, plan, 0)[0]["skipped"] is True
    assert not list((tmp_path / "packed" / ".parts").glob("*.lock"))  # finished parts remove their lock files
