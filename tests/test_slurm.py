"""cluster/slurm.sbatch on a real Slurm (`cluster/slurm-ci-setup.sh` makes a one-node one): the
job starts its own Ray cluster, runs a sweep against it, stops Ray and exits with the sweep's
exit code. The test's tmp_path must be visible to the node the job runs on (true on one node)."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow


@pytest.fixture
def sbatch(tmp_path):
    """Submit cluster/slurm.sbatch with these sweep arguments and wait: (exit code, job id, job output)."""
    if not (shutil.which("sbatch") and shutil.which("sinfo")):
        pytest.skip("no Slurm here: `sudo bash cluster/slurm-ci-setup.sh` sets up a one-node one")
    idle = subprocess.run(["sinfo", "-h", "-t", "idle", "-o", "%n"], capture_output=True, text=True, timeout=30)
    if idle.returncode != 0 or not idle.stdout.strip():
        pytest.skip(f"no idle Slurm node: {idle.stdout.strip() or idle.stderr.strip() or 'sinfo shows none'}")
    env = {**os.environ, "TLTUNE_DIR": str(ROOT), "TLTUNE_VENV": str(Path(sys.executable).parent.parent),
           "RAY_AUTH_MODE": "disabled"}  # fmt: skip
    env.pop("RAY_ADDRESS", None)

    def run(*sweep_args: str) -> tuple[int, str, str]:
        # polled with scontrol: `sbatch --wait` checks only after 2, 10, 42, 74... s
        argv = ["sbatch", "--parsable", "--nodes=1", "--cpus-per-task=2", "--time=15", f"--chdir={ROOT}",
                f"--output={tmp_path}/job-%j.out", str(ROOT / "cluster" / "slurm.sbatch"), *sweep_args]  # fmt: skip
        submit = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
        if submit.returncode != 0 and os.geteuid() == 0:
            pytest.skip(f"Slurm refused a job from root (DisableRootJobs?): {submit.stderr.strip()}")
        assert submit.returncode == 0, submit.stderr
        job_id = submit.stdout.strip().split(";")[0]
        started, finished = time.time(), False
        try:
            while (state := job_state(job_id))[0] in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED"):
                if time.time() - started > 20 * 60:
                    pytest.fail(f"slurm job {job_id} still {state[0]} after 20 minutes: cancelled")
                time.sleep(1)
            finished = True
        finally:
            if not finished:
                subprocess.run(["scancel", job_id], timeout=60)
        print(f"slurm job {job_id}: {state[0]}, exit code {state[1]} after {time.time() - started:.0f}s")
        return state[1], job_id, (tmp_path / f"job-{job_id}.out").read_text()

    return run


def job_state(job_id: str) -> tuple[str, int]:
    """(state, exit code) from slurmctld, which keeps finished jobs for MinJobAge (300 s by default)."""
    show = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=60)
    assert show.returncode == 0, show.stderr
    return re.search(r"JobState=(\w+)", show.stdout).group(1), int(re.search(r"ExitCode=(\d+):", show.stdout).group(1))


def ray_processes(job_id: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and f"/tmp/ray-{job_id}/".encode() in (proc / "cmdline").read_bytes():
                found.append(proc.name)
        except OSError:
            pass
    return found


def test_sweep_as_a_slurm_job(sbatch, real_data_root, tmp_path):
    rc, job_id, log = sbatch(
        "--quick", "--experiments", "cifar10-cnn-search", "--num-samples", "2", "--max-epochs", "1",
        "--train-subset", "300", "--test-subset", "100", "--data-root", str(real_data_root),
        "--storage-path", str(tmp_path), "--name", "slurm",
    )  # fmt: skip
    assert rc == 0, log[-5000:]
    assert "tltune-slurm: Ray at" in log and "1 node(s), 2 CPUs" in log and "results:" in log, log[-5000:]
    summary = json.loads((tmp_path / "slurm" / "cifar10-cnn-search" / "tltune_best.json").read_text())
    assert summary["trials"] == 2 and summary["errored_trials"] == 0, summary
    stopping = log.split("exited with 0")[-1]
    assert "srun: error" not in stopping and "Traceback" not in stopping, "Ray stops cleanly: " + stopping
    assert not Path(f"/tmp/ray-{job_id}").exists(), "the job removes its Ray temp dir"
    assert not ray_processes(job_id), "the job stops its Ray processes"


def test_the_job_exits_with_the_sweeps_exit_code(sbatch, tmp_path):
    rc, job_id, log = sbatch("--experiments", "cifar10-cnn-search", "--num-samples", "0", "--storage-path", str(tmp_path))
    assert rc == 2 and "error: " in log, log[-3000:]
    assert not ray_processes(job_id)
