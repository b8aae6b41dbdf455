"""cluster-local.yaml: Ray's fake multi-node autoscaler, started with zero workers and a head
that takes no trials, adds GPU worker nodes when a sweep with default flags asks for them.
Only the Ray processes this test started are stopped."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow


def port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def kill_processes_mentioning(*texts: str) -> None:
    """SIGKILL each process whose command line, or a file it holds open, mentions all ``texts``
    (Ray's agents rename themselves, but keep their logs in the temp dir open)."""
    assert sum(map(len, texts)) > 8, "never match every process"
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            seen = (proc / "cmdline").read_bytes().decode(errors="replace")
            seen += " ".join(os.readlink(fd) for fd in (proc / "fd").iterdir())
            if all(t in seen for t in texts):
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


@pytest.fixture(scope="module")
def fake_cluster():
    """One fake cluster for the module, started with its head only (the first test checks that)."""
    if not port_free(6379):
        pytest.skip("port 6379 is taken: the fake multi-node provider needs Ray's default port")
    temp_dir = tempfile.mkdtemp(prefix="tlray", dir="/tmp")  # short: Ray's socket paths are length-limited
    # TLTUNE_LOGICAL_GPUS: the fake GPU workers' GPUs are logical, trials train on the CPU
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "RAY_AUTH_MODE": "disabled", "TLTUNE_LOGICAL_GPUS": "1"}
    ray_cli = str(Path(sys.executable).with_name("ray"))
    subprocess.run([ray_cli, "start", "--head", f"--autoscaling-config={ROOT / 'cluster-local.yaml'}", f"--temp-dir={temp_dir}",
                    "--include-dashboard=false", "--num-cpus=0", "--num-gpus=0"],
                   env=env, check=True, capture_output=True, timeout=120)  # fmt: skip
    yield env
    for _ in range(20):  # fake worker nodes may still be starting: repeat until none is left
        kill_processes_mentioning(temp_dir)
        kill_processes_mentioning("ray.util.client.server", ":6379")  # its command line lacks the temp dir
        time.sleep(0.5)
    shutil.rmtree(temp_dir, ignore_errors=True)


def alive_node_ids(env) -> list[str]:
    # A marked line: Ray's driver may print the autoscaler's events ("(autoscaler +0s) Tip: ...") to stdout too
    code = "import ray; ray.init(address='127.0.0.1:6379', log_to_driver=False); print('alive:', *(n['NodeID'] for n in ray.nodes() if n['Alive']))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=True)
    (line,) = [line for line in out.stdout.splitlines() if line.startswith("alive:")]
    return line.split()[1:]


def test_default_flags_get_gpu_workers_launched_from_zero(fake_cluster, real_data_root, tmp_path):
    head = alive_node_ids(fake_cluster)
    assert len(head) == 1, "the cluster starts with its head only"
    argv = [sys.executable, str(ROOT / "sweeps" / "cifar10.py"), "--quick", "--experiments", "cifar10-cnn-search",
            "--num-samples", "2", "--max-epochs", "1", "--train-subset", "300", "--test-subset", "100",
            "--address", "127.0.0.1:6379",
            "--data-root", str(real_data_root), "--storage-path", str(tmp_path), "--name", "fake"]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=fake_cluster)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "wait for the autoscaler to add gpu_worker" in out.stderr
    assert "1 CPU / 1 GPU per trial, up to 2 at once" in out.stdout
    rows = [json.loads(p.read_text().splitlines()[-1]) for p in (tmp_path / "fake" / "cifar10-cnn-search").glob("*/result.json")]
    assert len(rows) == 2
    assert all(r["gpu_ids"] == "0" for r in rows), "each trial got the GPU of a worker node"
    assert not {r["node_id"] for r in rows} & set(head), "no trial ran on the head"
    status = subprocess.run([str(Path(sys.executable).with_name("ray")), "status", "--address", "127.0.0.1:6379"],
                            capture_output=True, text=True, env=fake_cluster, timeout=60)  # fmt: skip
    assert "gpu_worker" in status.stdout, status.stdout + status.stderr


def test_gpus_the_autoscaler_can_never_provide_are_one_line(fake_cluster, real_data_root, tmp_path):
    argv = [sys.executable, str(ROOT / "sweeps" / "cifar10.py"), "--quick", "--experiments", "cifar10-cnn-search",
            "--gpus-per-trial", "1", "--cpus-per-trial", "4", "--address", "127.0.0.1:6379",  # its GPU workers have 1 CPU
            "--data-root", str(real_data_root), "--storage-path", str(tmp_path), "--name", "toobig"]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=fake_cluster)
    assert out.returncode == 2, out.stdout[-3000:] + out.stderr[-3000:]
    assert "no node of the cluster has or can add that many" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "toobig").exists(), "no run directory is left behind"
