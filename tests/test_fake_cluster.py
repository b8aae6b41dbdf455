"""cluster-local.yaml: Ray's fake multi-node autoscaler adds GPU worker nodes on demand and a
sweep runs on them. Only the Ray processes this test started are stopped."""

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


def kill_processes_mentioning(text: str) -> None:
    assert len(text) > 8, "never match every process"
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text.encode() in (proc / "cmdline").read_bytes():
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


@pytest.fixture
def fake_cluster():
    if not port_free(6379):
        pytest.skip("port 6379 is taken: the fake multi-node provider needs Ray's default port")
    temp_dir = tempfile.mkdtemp(prefix="tlray", dir="/tmp")  # short: Ray's socket paths are length-limited
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "RAY_AUTH_MODE": "disabled"}
    ray_cli = str(Path(sys.executable).with_name("ray"))
    subprocess.run([ray_cli, "start", "--head", f"--autoscaling-config={ROOT / 'cluster-local.yaml'}", f"--temp-dir={temp_dir}",
                    "--include-dashboard=false"], env=env, check=True, capture_output=True, timeout=120)  # fmt: skip
    yield env
    for _ in range(20):  # fake worker nodes may still be starting: repeat until none is left
        kill_processes_mentioning(temp_dir)
        time.sleep(0.5)
    shutil.rmtree(temp_dir, ignore_errors=True)


def test_sweep_on_gpu_workers_the_autoscaler_adds(fake_cluster, real_data_root, tmp_path):
    argv = [sys.executable, str(ROOT / "sweeps" / "cifar10.py"), "--quick", "--experiments", "cifar10-cnn-search",
            "--num-samples", "2", "--max-epochs", "1", "--train-subset", "300", "--test-subset", "100",
            "--gpus-per-trial", "1", "--cpus-per-trial", "1", "--address", "127.0.0.1:6379",
            "--data-root", str(real_data_root), "--storage-path", str(tmp_path), "--name", "fake"]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=fake_cluster)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = [json.loads(p.read_text().splitlines()[-1]) for p in (tmp_path / "fake" / "cifar10-cnn-search").glob("*/result.json")]
    assert len(rows) == 2 and all(r["gpu_ids"] == "0" for r in rows), "each trial got the GPU of a worker node"
    status = subprocess.run([str(Path(sys.executable).with_name("ray")), "status", "--address", "127.0.0.1:6379"],
                            capture_output=True, text=True, env=fake_cluster, timeout=60)  # fmt: skip
    assert "gpu_worker" in status.stdout, status.stdout + status.stderr
