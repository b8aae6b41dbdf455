"""cluster/slurm.sbatch on a real Slurm (`cluster/slurm-ci-setup.sh` makes a one-node one): the
job starts its own Ray cluster, runs a sweep against it, stops Ray and exits with the sweep's
exit code; a time limit shorter than the sweep, or a requeue, costs nothing: the job goes on
where it stopped until the sweep is done. Jobs are submitted from a plain environment (no RAY_*
variables: Ray's own defaults). The test's tmp_path must be visible to the node the job runs on
(true on one node)."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from collections.abc import Callable
from typing import NamedTuple

import pytest

from conftest import ROOT, write_slow_spec

pytestmark = pytest.mark.slow

UNFINISHED = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING", "SIGNALING")


class Job(NamedTuple):
    rc: int  # the exit code of the job's last run
    job_id: str
    log: str  # the job's output, every run of it
    restarts: int  # how often it was requeued


@pytest.fixture
def sbatch(tmp_path):
    """Submit cluster/slurm.sbatch with these sweep arguments and wait for the job to end."""
    if not (shutil.which("sbatch") and shutil.which("sinfo")):
        pytest.skip("no Slurm here: `sudo bash cluster/slurm-ci-setup.sh` sets up a one-node one")
    idle = subprocess.run(["sinfo", "-h", "-t", "idle", "-o", "%n"], capture_output=True, text=True, timeout=30)
    if idle.returncode != 0 or not idle.stdout.strip():
        pytest.skip(f"no idle Slurm node: {idle.stdout.strip() or idle.stderr.strip() or 'sinfo shows none'}")
    # as from a plain shell: none of Ray's settings (RAY_AUTH_MODE, RAY_ADDRESS...), so Ray's defaults
    plain = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env = {**plain, "TLTUNE_DIR": str(ROOT), "TLTUNE_VENV": str(Path(sys.executable).parent.parent)}

    def run(*sweep_args: str, options=("--time=15",), sweep: str = "cifar10", minutes: float = 20,
            while_running: Callable[[str, dict], None] | None = None) -> Job:  # fmt: skip
        # polled with scontrol: `sbatch --wait` checks only after 2, 10, 42, 74... s
        argv = ["sbatch", "--parsable", "--nodes=1", "--cpus-per-task=2", *options, f"--chdir={ROOT}",
                f"--output={tmp_path}/job-%j.out", str(ROOT / "cluster" / "slurm.sbatch"), *sweep_args]  # fmt: skip
        submit = subprocess.run(argv, capture_output=True, text=True, timeout=60, env={**env, "SWEEP": sweep})
        if submit.returncode != 0 and os.geteuid() == 0:
            pytest.skip(f"Slurm refused a job from root (DisableRootJobs?): {submit.stderr.strip()}")
        assert submit.returncode == 0, submit.stderr
        job_id = submit.stdout.strip().split(";")[0]
        started, finished = time.time(), False
        try:
            while (state := job_state(job_id))["JobState"] in UNFINISHED:
                if time.time() - started > minutes * 60:
                    pytest.fail(f"slurm job {job_id} still {state['JobState']} after {minutes} minutes: cancelled")
                if while_running:
                    while_running(job_id, state)
                time.sleep(1)
            finished = True
        finally:
            if not finished:
                subprocess.run(["scancel", job_id], timeout=60)
        rc, restarts = int(state["ExitCode"].split(":")[0]), int(state["Restarts"])
        print(f"slurm job {job_id}: {state['JobState']}, exit code {rc}, {restarts} requeue(s), after {time.time() - started:.0f}s")
        return Job(rc, job_id, (tmp_path / f"job-{job_id}.out").read_text(), restarts)

    return run


def job_state(job_id: str) -> dict[str, str]:
    """JobState, ExitCode, Restarts... from slurmctld, which keeps finished jobs for MinJobAge (300 s by default)."""
    show = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=60)
    assert show.returncode == 0, show.stderr
    return dict(re.findall(r"(\w+)=(\S*)", show.stdout))


def ray_processes(job_id: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and f"/tmp/ray-{job_id}/".encode() in (proc / "cmdline").read_bytes():
                found.append(proc.name)
        except OSError:
            pass
    return found


def test_the_job_exits_with_the_sweeps_exit_code(sbatch, tmp_path):
    rc, job_id, log, restarts = sbatch("--experiments", "cifar10-cnn-search", "--num-samples", "0", "--storage-path", str(tmp_path))
    assert rc == 2 and "error: " in log and restarts == 0, log[-3000:]
    assert not ray_processes(job_id)


def epochs_of_trials(exp_dir: Path) -> dict[str, list[int]]:
    found = {}
    for result in exp_dir.glob("*/result.json"):
        rows = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        found[result.parent.name] = [r["training_iteration"] for r in rows]
    return found


def assert_done_once(job: Job, exp_dir: Path, trials: int) -> dict[str, list[int]]:
    """The requeued job ended with the sweep done: every trial once, every epoch of it once."""
    assert job.rc == 0, job.log[-6000:]
    assert "Authentication token is missing" not in job.log
    assert job.restarts >= 1 and job.log.count("tltune-slurm: resuming ") == job.restarts, job.log[-6000:]
    epochs = epochs_of_trials(exp_dir)
    assert len(epochs) == trials, f"every trial exactly once: {epochs}"
    for trial, seen in epochs.items():
        assert seen and seen == list(range(1, len(seen) + 1)), f"{trial}: each epoch once, none repeated: {seen}"
    summary = json.loads((exp_dir / "tltune_best.json").read_text())
    assert summary["trials"] == trials and summary["errored_trials"] == 0 and "test_acc" in summary, summary
    assert not Path(f"/tmp/ray-{job.job_id}").exists(), "the job removes its Ray temp dir"
    assert not ray_processes(job.job_id), "the job stops its Ray processes"
    return epochs


def test_a_requeue_by_slurm_and_a_time_limit_shorter_than_the_sweep_cost_nothing(sbatch, real_data_root, tmp_path):
    """One job meets both ways a Slurm job ends before its sweep does (one job instead of two: each
    start costs a Ray start and torch's import on every node), and runs a spec file (SWEEP=my.yaml:
    `tltune sweep my.yaml`, its model the user's factory beside the file):
    - `scontrol requeue` (as preemption with PreemptMode=REQUEUE does), once, as soon as a start
      of the job has trained an epoch: Slurm ends every process of the job at once, then starts
      it again, and it resumes its run;
    - --time=2 with Slurm's notice (SIGTERM 40-70 s before the limit: Slurm looks every 30 s), so
      at most 80 s after each start: the notice stops the sweep, which saves its state; the job
      requeues itself and resumes its run directory (named after the job: no --name).
    The sweep is 18 epochs, one trial at a time (one trial worker importing torch per start, not
    two), of a model that sleeps 10 s in each epoch's training steps: 180 s or more however fast
    the machine, so no start after the requeue finishes it before its notice (a sweep that trained
    faster on a faster machine once finished before the notice came).
    The model stops sleeping from the third start on, once Slurm's requeue has come, so the last
    start finishes the sweep: three starts, more where a busy machine trained no epoch before a
    start's notice. (Stopping the sleep at the third start whether or not Slurm had requeued once
    let that start finish the sweep just as Slurm's requeue came, leaving the last start nothing
    to run.)"""
    def exp_dir(job_id: str) -> Path:  # the run is named after the job
        return tmp_path / f"slow-slurm-{job_id}" / "timelimit"

    before, seen_at_start, requeued_at = {}, {}, {}
    sleeping = tmp_path / "the-model-sleeps-while-this-exists"
    sleeping.touch()

    def requeue_part_way(job_id: str, state: dict) -> None:
        restarts = int(state["Restarts"])
        if restarts >= 2 and restarts > requeued_at.get("restarts", restarts):  # a start after Slurm's requeue
            sleeping.unlink(missing_ok=True)
        if before or state["JobState"] != "RUNNING":
            return
        epochs = epochs_of_trials(exp_dir(job_id))  # none before the run folder exists
        trained = sum(len(seen) for seen in epochs.values())
        baseline = seen_at_start.setdefault(restarts, trained)  # what earlier starts trained
        if trained > baseline:  # this start trained an epoch: trials are part-way, with checkpoints
            out = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
            if out.returncode == 0:  # (refused only while the job requeues itself: try at a later start)
                before.update(epochs)
                requeued_at["restarts"] = restarts

    spec = write_slow_spec(tmp_path / "project", "timelimit", epochs=3, num_samples=6, seconds_per_batch=1.0, sleep_while=sleeping)
    job = sbatch(
        "--grace-period", "3", "--max-concurrent-trials", "1", "--train-subset", "600", "--test-subset", "500", "--data-root", str(real_data_root),
        "--storage-path", str(tmp_path), sweep=str(spec), options=("--time=2", "--signal=B:TERM@40"), minutes=15,
        while_running=requeue_part_way,
    )  # fmt: skip
    assert f"running {spec} " in job.log, job.log[-3000:]
    assert before, "Slurm requeued the job while trials were part-way"
    epochs = assert_done_once(job, exp_dir(job.job_id), trials=6)
    assert all(epochs[t][: len(seen)] == seen for t, seen in before.items()), "unfinished trials go on, not over"
    assert all(seen == [1, 2, 3] for seen in epochs.values()), epochs
    assert "DUE TO JOB REQUEUE" in job.log and "DUE TO TIME LIMIT" not in job.log, "stopped before the limit"
    requeued_itself = job.log.count("tltune-slurm: requeueing job")
    assert requeued_itself >= 1 and job.restarts == requeued_itself + 1, "one requeue by Slurm, the others by the job itself"
    # each notice reached the sweep; the last start's notice may come as its sweep finishes (exit 0)
    # or, logged apart, once it has ended (stop 24's CI run: at 68 s, with Ray stopping)
    # (the job's state at a notice is RUNNING, or SIGNALING while Slurm delivers the signal)
    forwarded = re.findall(r"SIGTERM after \d+s \(job (?:RUNNING|SIGNALING)\): stopping the sweep", job.log)
    assert requeued_itself <= len(forwarded) <= requeued_itself + 1, job.log[-6000:]
    assert "continue with --resume" in job.log
    # each start of the job: its own Ray with token authentication from a plain shell, and at the
    # end a clean stop (assert_done_once: its temp dir removed, none of its processes left)
    starts = job.log.split("tltune-slurm: job ")[1:]
    assert len(starts) == job.restarts + 1
    for start in starts:
        assert "Ray authentication: token (a token of this job's own)" in start and "1 node(s), 2 CPUs" in start, start[-3000:]
    # a notice as the sweep's process exited (its table printed) once killed it with 143 and the
    # job requeued a finished sweep (stop 27's CI run): the last start must be the one that finished
    assert "results:" in starts[-1], "\n---- the start before:\n".join(start[-2500:] for start in starts[-2:])
    stopping = starts[-1].split("exited with 0")[-1]
    assert "srun: error" not in stopping and "Traceback" not in stopping, "Ray stops cleanly: " + stopping
