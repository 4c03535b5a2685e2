"""A real, local SLURM cluster for end-to-end tests: munged, slurmctld and two slurmd on this host.

Two emulated nodes ``n1`` and ``n2`` (one CPU each) run on this machine under separate slurmd
daemons (``slurmd -N n1`` / ``-N n2``), so ``sbatch --nodes=2`` and ``srun`` behave as on a real
two-node cluster. Everything lives in one private work directory (config, munge socket and key,
state, spool, logs); nothing under /etc/slurm or /etc/munge is touched. The only system change is
mapping ``n1``/``n2`` to 127.0.0.1 in /etc/hosts (Lightning derives MASTER_ADDR from
SLURM_NODELIST, and real clusters resolve node names), undone at teardown.

Clients (sbatch, srun, submitit, scontrol inside jobs) find the cluster through ``SLURM_CONF``;
use :attr:`LocalSlurmCluster.env` for every subprocess.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

SLURM_PACKAGES = ("slurm-wlm", "munge")
_REQUIRED_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "sinfo", "scontrol", "squeue", "scancel")
_HOSTS_FILE = Path("/etc/hosts")
_HOSTS_TAG = "# xdyna-test-slurm"
NODE_NAMES = ("n1", "n2")


class SlurmUnavailable(RuntimeError):
    """SLURM cannot be installed or started here; the message says why (tests skip with it)."""


def _which(name: str) -> str | None:
    return shutil.which(name) or next(
        (str(p) for p in (Path("/usr/sbin") / name, Path("/usr/bin") / name) if p.exists()), None
    )


def ensure_slurm_installed(timeout_s: float = 900) -> None:
    """Install munge + slurm-wlm with apt-get when missing; raise SlurmUnavailable when impossible."""
    if all(_which(b) for b in _REQUIRED_BINARIES):
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable("SLURM is not installed and installing it (apt-get) needs root")
    apt = _which("apt-get")
    if apt is None:
        raise SlurmUnavailable("SLURM is not installed and there is no apt-get to install it")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in ([apt, "update", "-qq"], [apt, "install", "-y", "-qq", *SLURM_PACKAGES]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        if done.returncode != 0:
            raise SlurmUnavailable(f"{' '.join(cmd)} failed: {done.stderr.strip().splitlines()[-1:]}")
    missing = [b for b in _REQUIRED_BINARIES if not _which(b)]
    if missing:
        raise SlurmUnavailable(f"apt-get installed {SLURM_PACKAGES} but these are still missing: {missing}")


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _slurm_conf(work: Path, ports: list[int], munge_socket: Path) -> str:
    host = socket.gethostname()
    ctld_port, *node_ports = ports
    lines = [
        "ClusterName=xdyna-test",
        f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={ctld_port}",
        "SlurmUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={munge_socket}",
        f"StateSaveLocation={work}/state",
        f"SlurmdSpoolDir={work}/spool/%n",
        f"SlurmctldPidFile={work}/slurmctld.pid",
        f"SlurmdPidFile={work}/slurmd-%n.pid",
        f"SlurmctldLogFile={work}/log/slurmctld.log",
        f"SlurmdLogFile={work}/log/slurmd-%n.log",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "MpiDefault=none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "SchedulerType=sched/backfill",
        "ReturnToService=2",
        "JobRequeue=1",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        # Fast turnaround for tests: short grace between SIGTERM and SIGKILL, quick cleanup.
        "KillWait=10",
        "MinJobAge=300",
        "InactiveLimit=0",
        "SlurmctldTimeout=30",
        "SlurmdTimeout=30",
    ]
    for name, port in zip(NODE_NAMES, node_ports):
        lines.append(
            f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs=1 State=UNKNOWN"
        )
    lines.append(f"PartitionName=debug Nodes={','.join(NODE_NAMES)} Default=YES MaxTime=INFINITE State=UP")
    return "\n".join(lines) + "\n"


class LocalSlurmCluster:
    """Start with :meth:`start`, stop with :meth:`stop` (also on failure)."""

    def __init__(self, work_dir: str | os.PathLike | None = None) -> None:
        # A directory other users (munge) may traverse: pytest's tmp dirs are root-only.
        self.work = Path(work_dir or tempfile.mkdtemp(prefix="xdyna-slurm-"))
        self.work.chmod(0o755)
        self.conf_path = self.work / "slurm.conf"
        self._daemons: list[subprocess.Popen] = []
        self._hosts_added = False
        self.env = dict(os.environ, SLURM_CONF=str(self.conf_path))
        # A rank's rendezvous address must come from the job's node list, not from the caller.
        for key in ("MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID", "SLURM_NODELIST", "SLURM_JOB_NODELIST"):
            self.env.pop(key, None)

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, timeout_s: float = 60) -> "LocalSlurmCluster":
        try:
            self._start_munge()
            ports = _free_ports(1 + len(NODE_NAMES))
            for sub in ("state", "log", *(f"spool/{n}" for n in NODE_NAMES)):
                (self.work / sub).mkdir(parents=True, exist_ok=True)
            self.conf_path.write_text(_slurm_conf(self.work, ports, self.munge_socket))
            self._map_node_names()
            self._spawn(["slurmctld", "-D", "-i", "-f", str(self.conf_path)], "slurmctld")
            for name in NODE_NAMES:
                self._spawn(["slurmd", "-D", "-N", name, "-f", str(self.conf_path)], f"slurmd-{name}")
            self._wait_idle(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if any(proc.args[0].endswith("slurmctld") and proc.poll() is None for proc in self._daemons):
            # Jobs' processes belong to slurmstepd, not to us: cancel them before the daemons go.
            try:
                subprocess.run(["scancel", "--full", "--user=root"], env=self.env, capture_output=True, timeout=15)
                time.sleep(1)
            except subprocess.TimeoutExpired:
                pass
        for proc in reversed(self._daemons):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self._daemons.clear()
        self._unmap_node_names()

    def __enter__(self) -> "LocalSlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- pieces ------------------------------------------------------------------------------
    def _start_munge(self) -> None:
        try:
            munge_user = pwd.getpwnam("munge")
        except KeyError as err:
            raise SlurmUnavailable("the munge package created no 'munge' user") from err
        munge_dir = self.work / "munge"
        munge_dir.mkdir(exist_ok=True)
        # munged insists that every client can traverse to its socket: world execute, no read.
        munge_dir.chmod(0o711)
        key = munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        for path in (munge_dir, key):
            os.chown(path, munge_user.pw_uid, munge_user.pw_gid)
        self.munge_socket = munge_dir / "munge.socket"
        runuser = _which("runuser")
        if runuser is None:
            raise SlurmUnavailable("runuser (util-linux) is missing: cannot start munged as user munge")
        self._spawn(
            [runuser, "-u", "munge", "--", _which("munged"), "--foreground",
             f"--socket={self.munge_socket}", f"--key-file={key}",
             f"--pid-file={munge_dir}/munged.pid", f"--log-file={munge_dir}/munged.log",
             f"--seed-file={munge_dir}/munged.seed"],
            "munged",
        )
        self._wait_for(lambda: self._check_daemons() or self.munge_socket.exists(), 20, "munged socket")

    def _spawn(self, cmd: list[str], name: str) -> None:
        cmd[0] = _which(cmd[0]) or cmd[0]
        log = open(self.work / f"{name}.out", "w")
        self._daemons.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env))

    def _map_node_names(self) -> None:
        hosts = _HOSTS_FILE.read_text()
        if all(f" {n} " in hosts or f" {n}\n" in hosts for n in NODE_NAMES):
            return
        with open(_HOSTS_FILE, "a") as handle:
            handle.write(f"127.0.0.1 {' '.join(NODE_NAMES)} {_HOSTS_TAG}\n")
        self._hosts_added = True

    def _unmap_node_names(self) -> None:
        if not self._hosts_added:
            return
        kept = [line for line in _HOSTS_FILE.read_text().splitlines(keepends=True) if _HOSTS_TAG not in line]
        _HOSTS_FILE.write_text("".join(kept))
        self._hosts_added = False

    def _wait_idle(self, timeout_s: float) -> None:
        def both_idle() -> bool:
            self._check_daemons()
            out = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False).stdout
            states = dict(line.split() for line in out.splitlines() if line.strip())
            return all(states.get(n) == "idle" for n in NODE_NAMES)

        self._wait_for(both_idle, timeout_s, "both nodes idle in sinfo")

    def _check_daemons(self) -> None:
        for proc in self._daemons:
            if proc.poll() is not None:
                raise SlurmUnavailable(f"{proc.args[0]} exited with {proc.returncode}; see {self.work}/*.out and log/")

    def _wait_for(self, predicate, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.5)
        raise SlurmUnavailable(f"timed out after {timeout_s:.0f}s waiting for {what}; logs in {self.work}")

    # -- client helpers ------------------------------------------------------------------------
    def run(self, cmd: list[str], check: bool = True, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
        done = subprocess.run(cmd, env=kwargs.pop("env", self.env), capture_output=True, text=True, timeout=timeout, **kwargs)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")
        return done

    def job_state(self, job_id: str) -> str:
        """State from squeue while the job is known to the controller (MinJobAge keeps finished ones)."""
        out = self.run(["scontrol", "show", "job", job_id, "-o"], check=False).stdout
        for field in out.split():
            if field.startswith("JobState="):
                return field.split("=", 1)[1]
        return "UNKNOWN"

    def job_field(self, job_id: str, name: str) -> str | None:
        out = self.run(["scontrol", "show", "job", job_id, "-o"], check=False).stdout
        for field in out.split():
            if field.startswith(name + "="):
                return field.split("=", 1)[1]
        return None

    def wait_job(self, job_id: str, timeout_s: float, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state in states:
                return state
            self._check_daemons()
            time.sleep(1)
        raise TimeoutError(f"job {job_id} not in {states} after {timeout_s:.0f}s (last state {self.job_state(job_id)})")
