"""A stop signal once a run's results are written: the run stays finished. The first signal lets
the end (trackers, Ray stopping, the table) finish and the command exits 0; a second ends it at
once with 128 + signal and one line, never a traceback. A Slurm notice can come just then."""

import os
import signal
import subprocess
import sys
import time

import pytest

from tltune import cli, signals
from tltune.plan import SweepOutcome


def sigterm_to_self():
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)  # a handler that raises does so here
    except signals.Interrupted:
        raise AssertionError("the signal raised inside finishing()") from None


def test_finishing_records_the_first_signal_and_raises_on_the_second():
    with signals.installed():
        with signals.finishing():
            sigterm_to_self()
        with pytest.raises(signals.Interrupted, match="SIGTERM"):  # the next experiment does not start
            signals.raise_if_stopped()
    with signals.installed(), signals.finishing():
        sigterm_to_self()
        with pytest.raises(signals.Interrupted, match="SIGINT"):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)


def test_finishing_after_a_signal_of_the_run_raises_the_next_at_once():
    with signals.installed():
        with signals.finishing():
            sigterm_to_self()
        with signals.finishing(), pytest.raises(signals.Interrupted, match="SIGTERM"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)


@pytest.fixture
def finished_sweep(monkeypatch, tmp_path):
    """``tltune sweep`` whose sweep has finished (a stand-in for tltune.plan.sweep), and the
    report it prints: ``signals`` stop signals arrive while the report prints."""
    printed = []
    monkeypatch.setattr("tltune.plan.sweep", lambda *args, **kwargs: SweepOutcome(str(tmp_path), {"cifar10-x": "no weights"}))

    def run(*signums: int) -> int:
        def report(run_dir):
            for signum in signums:
                os.kill(os.getpid(), signum)
                time.sleep(0.2)
            printed.append(run_dir)

        monkeypatch.setattr(cli, "print_report", report)
        return cli.main(["mnist-cnn"], "test", ["--storage-path", str(tmp_path)])

    return run, printed


def test_a_signal_while_the_table_prints_keeps_the_run_finished(finished_sweep, capsys):
    run, printed = finished_sweep
    with signals.installed():
        assert run(signal.SIGTERM) == 0
    assert printed and "Not run: cifar10-x (no weights)" in capsys.readouterr().out


def test_a_second_signal_ends_the_report_with_its_exit_code_and_no_traceback(finished_sweep, capsys):
    run, printed = finished_sweep
    with signals.installed():
        assert run(signal.SIGTERM, signal.SIGINT) == 128 + signal.SIGINT
    out = capsys.readouterr()
    assert not printed and "Traceback" not in out.err + out.out


SLOW_EXIT = """
import sys, time
from tltune import signals
signals.install()
if sys.argv[1] == "settled":
    signals.settle()

class SlowExit:  # freed with the module's globals, after Python's own signal handling has ended
    def __del__(self):
        time.sleep(2)

slow_exit = SlowExit()
print("ready", flush=True)
"""


@pytest.mark.parametrize("state, exit_code", [("settled", 0), ("running", -signal.SIGTERM)])
def test_a_sigterm_in_the_last_seconds_of_a_settled_command_changes_nothing(tmp_path, state, exit_code):
    """A Slurm notice that came as a finished sweep's process was exiting (torch's and Ray's
    teardown) killed it with 143, and the job requeued a finished sweep (stop 27's CI run). The
    unsettled process shows the window is real."""
    script = tmp_path / "slow_exit.py"
    script.write_text(SLOW_EXIT)
    child = subprocess.Popen([sys.executable, str(script), state], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stdout.readline() == "ready\n"
    time.sleep(1)  # in SlowExit.__del__
    child.send_signal(signal.SIGTERM)
    assert child.wait(timeout=30) == exit_code, child.stderr.read()


def kernel_catches(signum: int) -> bool:
    """Whether the kernel hands ``signum`` to a handler of this process (not what Python reports)."""
    line = next(line for line in open("/proc/self/status").read().splitlines() if line.startswith("SigCgt:"))
    return bool(int(line.split()[1], 16) >> (signum - 1) & 1)


def test_the_stop_signal_handlers_hold_after_ray_shuts_down(monkeypatch):
    """ray.shutdown() sets SIGTERM back to the default action in the kernel while Python still
    reports its handler: a Slurm notice while a finished sweep printed its table killed it with
    143, and the job requeued a finished sweep (stop 27's CI run). cluster.disconnect sets it again.
    The same start: Ray 2.60 turns token authentication on for a new local Ray and printed a
    WARNING saying so at every sweep's start; the choice stays, the notice goes."""
    import logging

    from tltune.raytune import cluster

    notices = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = notices.append
    auth = logging.getLogger("ray._private.authentication.authentication_token_setup")
    auth.addHandler(handler)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    try:
        with signals.installed():
            cluster.connect(None)
            signals.install(keep_received=True)  # as run_sweep does: Ray's core worker replaced the handler
            assert os.environ.get("RAY_AUTH_MODE") == "token"
            cluster.disconnect()
            assert signal.getsignal(signal.SIGTERM) is signals._handle
            assert all(kernel_catches(signum) for signum in signals.STOP_SIGNALS)
    finally:
        auth.removeHandler(handler)
    assert not notices, [record.getMessage() for record in notices]
