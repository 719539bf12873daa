"""A real single-node Slurm for tests: munge + slurmctld + slurmd with a minimal slurm.conf
in a temporary directory (Debian's slurm-wlm; see ENVIRONMENT.md). Needs root.

    python tests/launch/slurm_cluster.py start DIR   # prints `export SLURM_CONF=...`
    python tests/launch/slurm_cluster.py stop DIR

``Cluster(dir).start()`` returns the environment (``SLURM_CONF``) for sbatch/squeue/scontrol.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "sacct")


def unavailable() -> str | None:
    """Why a real Slurm cannot run here, or None."""
    missing = [d for d in DAEMONS[:5] if shutil.which(d) is None and not Path(f"/usr/sbin/{d}").exists()]
    if missing:
        return (f"{', '.join(missing)} not installed (apt-get install -y slurmctld slurmd slurm-client munge; "
                ".ci/run does it)")
    if os.geteuid() != 0:
        return "the test Slurm runs its daemons as root"
    return None


def _exe(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class Cluster:
    def __init__(self, root: Path, kill_wait_s: int = 30):
        self.root = Path(root)
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.kill_wait_s = kill_wait_s

    @property
    def env(self) -> dict:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def _write_conf(self) -> None:
        r = self.root
        for d in ("spool/ctld", "spool/d", "log"):
            (r / d).mkdir(parents=True, exist_ok=True)
        cpus = os.cpu_count() or 1
        self.conf.write_text("\n".join([
            "ClusterName=dlmtest", f"SlurmctldHost={self.host}", "AuthType=auth/munge", "CredType=cred/munge",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SwitchType=switch/none",
            "MpiDefault=none", "SlurmUser=root", "SlurmdUser=root", "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/none",
            "ReturnToService=2", "SchedulerType=sched/backfill", f"KillWait={self.kill_wait_s}",
            "MinJobAge=600",  # finished jobs stay visible to scontrol show job
            "SlurmctldPort=16817", "SlurmdPort=16818",
            f"SlurmctldPidFile={r}/slurmctld.pid", f"SlurmdPidFile={r}/slurmd.pid",
            f"StateSaveLocation={r}/spool/ctld", f"SlurmdSpoolDir={r}/spool/d",
            f"SlurmctldLogFile={r}/log/slurmctld.log", f"SlurmdLogFile={r}/log/slurmd.log",
            f"NodeName={self.host} CPUs={cpus} RealMemory=16000 State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4",
            "",
        ]))

    @staticmethod
    def _munge() -> None:
        if subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0:
            return
        subprocess.run("mkdir -p /run/munge && chown munge:munge /run/munge && "
                       "chown -R munge:munge /var/log/munge /var/lib/munge /etc/munge", shell=True, check=True)
        subprocess.run(["su", "-s", "/bin/sh", "munge", "-c", _exe("munged")], check=True)
        for _ in range(50):
            if subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError("munged did not start")

    def start(self, timeout_s: float = 30) -> dict:
        self._munge()
        self._write_conf()
        env = self.env
        subprocess.run([_exe("slurmctld"), "-c"], env=env, check=True)
        subprocess.run([_exe("slurmd"), "-c"], env=env, check=True)
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            r = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True)
            if r.returncode == 0 and r.stdout.strip() in ("idle", "mix", "alloc"):
                return env
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the test Slurm did not come up in {timeout_s} s; see {self.root}/log")

    def stop(self) -> None:
        for name in ("slurmd", "slurmctld"):
            pid_file = self.root / f"{name}.pid"
            try:
                pid = int(pid_file.read_text().strip())
            except (OSError, ValueError):
                continue
            try:
                os.kill(pid, 15)
            except ProcessLookupError:
                continue
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)

    def job(self, job_id: str) -> dict:
        """`scontrol show job` as a dict (JobState, RestartCnt, ExitCode, ...)."""
        r = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=self.env, capture_output=True, text=True)
        out = {}
        for item in r.stdout.split():
            k, _, v = item.partition("=")
            out[k] = v
        return out


if __name__ == "__main__":
    cmd, root = sys.argv[1], Path(sys.argv[2])
    c = Cluster(root)
    if cmd == "start":
        c.start()
        print(f"export SLURM_CONF={c.conf}")
    else:
        c.stop()
