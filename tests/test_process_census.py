"""bench/process_census.py: a command's CPU by kind of process, its exit code passed on."""

import subprocess
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
from process_census import kind_of  # noqa: E402


def test_processes_are_told_apart_by_their_command_lines():
    starting = "/v/bin/python /v/ray/_private/workers/default_worker.py --raylet-name=/tmp/ray/session_1/sockets/raylet"
    assert kind_of("ray::ImplicitFunc") == kind_of("ray::IDLE") == kind_of(starting) == "trial worker (Ray actor or task)"
    assert kind_of("ray::DashboardAgent") == kind_of("/v/ray/core/src/ray/raylet/raylet --raylet_socket_name=x --python_worker_command=/v/python /v/ray/_private/workers/default_worker.py") == "Ray daemon"
    assert kind_of("/v/bin/python -m tltune sweep mnist --storage-path /tmp/pytest-of-root/x") == "sweep driver"
    assert kind_of("/home/me/tltune/.venv/bin/python /home/me/tltune/sweeps/cifar10.py --quick") == "sweep driver"
    assert kind_of("/home/me/tltune/.venv/bin/python -m pytest -n 2") == "pytest"
    assert kind_of("/v/bin/python -u -c import sys;exec(eval(sys.stdin.readline()))") == "pytest"  # an xdist worker
    assert kind_of("/v/bin/python3 /v/bin/optuna-dashboard /tmp/x/optuna.journal") == "other"


def test_a_command_is_counted_and_its_exit_code_passed_on():
    busy = "import sys, time\nend = time.process_time() + 0.6\nwhile time.process_time() < end: pass\nsys.exit(3)"
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "process_census.py"), sys.executable, "-c", busy],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 3, out.stderr
    assert "exit code 3" in out.stdout
    other = next(line for line in out.stdout.splitlines() if line.rstrip().endswith("other"))
    assert float(other.split()[0]) >= 0.4, out.stdout
