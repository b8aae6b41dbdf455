"""Starting or joining Ray, and sizing trials to what the cluster has or can add.

A local Ray listens on 127.0.0.1 only. A joined cluster may be autoscaling: with no GPU
worker up yet, the GPUs a trial gets come from the node types the autoscaler can launch,
never from the nodes that happen to be alive when the sweep starts.
"""

from __future__ import annotations

import functools
import math
import os
import signal
import sys
import threading
from dataclasses import dataclass

import ray

from tltune import console
from tltune.errors import UserError
from tltune.raytune.address import cluster_address, check_reachable  # noqa: F401 (where they were)

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class NodeShape:
    """The resources of one node, alive or of a type the autoscaler can launch."""

    name: str
    cpus: float
    gpus: float
    count: int = 1  # nodes of this shape: 1 alive, or as many as the autoscaler may launch

    def trials(self, cpus: float, gpus: float) -> int:
        """How many trials of (cpus, gpus) fit on the nodes of this shape at once."""
        per_node = min(fits(self.cpus, cpus) if cpus else math.inf, fits(self.gpus, gpus) if gpus else math.inf)
        return int(per_node * self.count) if per_node != math.inf else 0


RESOURCE_UNITS = 10_000  # Ray counts resources in fixed point: 1e-4 of a CPU or GPU


def fits(capacity: float, request: float) -> int:
    """How many requests of ``request`` fit in ``capacity``, counted as Ray counts them (fixed
    point, rounded half up): 10 trials of 0.1 GPU on one GPU, where ``1.0 // 0.1`` says 9."""
    units = lambda amount: int(amount * RESOURCE_UNITS + 0.5)  # noqa: E731
    return units(capacity) // units(request)


@dataclass(frozen=True)
class TrialSize:
    cpus: float
    gpus: float
    concurrent: int  # trials started together: Tune asks the searcher and the autoscaler for this many


# Ray starts one idle worker process per CPU for the first driver; Tune's trial actors start
# workers of their own and never take them, so on a 64-core machine 64 processes import Ray
# (about a CPU-second and 80 MB each) for nothing. Ray tasks start a worker when they need one.
LOCAL_RAY_CONFIG = {"prestart_worker_first_driver": False}


def connect(address: str | None, py_modules: tuple[str, ...] = ()) -> None:
    """Join the cluster at ``address``, or start a local Ray bound to the loopback interface.
    ``py_modules``: local packages or ``.py`` files (users' model factories) that Ray ships to
    every node the trials run on."""
    from tltune import storage

    storage.keep_credentials_out_of_ray()  # Tune would copy AWS_SECRET_ACCESS_KEY into each trial's runtime env (and its log)
    runtime_env = {"py_modules": list(py_modules)} if py_modules else None
    if address is None:
        # Every Ray server binds to the node's IP, and Ray swaps a loopback node IP for the
        # machine's outward one unless this flag (meant for single-machine platforms) is off.
        # It is read only while the node starts, so it is restored at once.
        from ray._private import ray_constants

        saved = ray_constants.ENABLE_RAY_CLUSTER
        ray_constants.ENABLE_RAY_CLUSTER = False
        try:
            # Ray 2.60 turns token authentication on for a new local Ray (RAY_AUTH_MODE unset) and
            # says so at each start; what it chose stays as it is, the notice is not printed.
            with console.quiet_logger("ray._private.authentication.authentication_token_setup"):
                ray.init(address="local", include_dashboard=False, logging_level="WARNING", _node_ip_address=LOOPBACK, runtime_env=runtime_env,
                         _system_config=LOCAL_RAY_CONFIG)  # fmt: skip
        finally:
            ray_constants.ENABLE_RAY_CLUSTER = saved
    else:
        try:
            ray.init(address=address, logging_level="WARNING", runtime_env=runtime_env)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise UserError(f"cannot connect to the Ray cluster at {address} ({exc}): check the address, or leave --address out to start a local Ray") from None
    hide_teardown_tracebacks()


def disconnect(stopped: bool = False) -> None:
    """Shut this driver's Ray down; ``stopped``: the user stopped the sweep, so what the trial
    workers print from now on is their shutdown and is not shown."""
    if stopped:
        mute_worker_output()
    ray.shutdown()
    _muted_handlers.clear()  # ray.shutdown removed the printer; the next ray.init adds its own
    # Ray's core worker sets SIGTERM back to the default action in the kernel as it shuts down,
    # while Python still reports its own handler: a SIGTERM from here on (a Slurm notice while
    # the table prints) would kill the process at once with 143. Set the handler Python reports.
    handler = signal.getsignal(signal.SIGTERM)
    if handler is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


_muted_handlers: list = []  # the driver's worker-output printer while muted, to give a caller's Ray back


def mute_worker_output() -> None:
    """Stop printing the trial workers' output on this driver. Once a sweep is stopped, Ray ends
    the workers with SIGTERM, and one caught in a weakref callback prints a Python traceback
    ("Exception ignored in ... SystemExit") that would end the user's terminal."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    printers = [pair for pair in dispatcher.handlers if pair[0] == "ray_print_logs"]  # added by ray.init(log_to_driver=True)
    _muted_handlers.extend(printers)
    dispatcher.remove_handler("ray_print_logs")


def unmute_worker_output() -> None:
    """Print the workers' output again (a sweep on the caller's Ray gives it back as it was)."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    while _muted_handlers:
        dispatcher.add_handler(*_muted_handlers.pop())


def hide_teardown_tracebacks() -> None:
    """Ray ends the worker of a trial that finished with SIGTERM; one caught in a weakref
    callback prints "Exception ignored in ... SystemExit: 1", a traceback of nothing wrong, in
    the middle of a running sweep. The driver's printer of worker output drops such blocks and
    passes everything else."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    printers = [handler for name, handler in dispatcher.handlers if name == "ray_print_logs"]
    dispatcher.remove_handler("ray_print_logs")
    for printer in printers:
        dispatcher.add_handler("ray_print_logs", functools.partial(_print_without_teardown_tracebacks, printer))


def _print_without_teardown_tracebacks(printer, batch: dict) -> None:
    lines = without_teardown_tracebacks(batch.get("lines") or [])
    if lines:
        printer({**batch, "lines": lines})


def without_teardown_tracebacks(lines: list[str]) -> list[str]:
    """``lines`` less each "Exception ignored in ..." block whose traceback ends in SystemExit."""
    kept, i = [], 0
    while i < len(lines):
        if lines[i].startswith("Exception ignored in"):
            end = next((j for j in range(i + 1, len(lines)) if not lines[j].startswith(("Traceback", " ", "\t")) and lines[j].strip()), None)
            if end is not None and lines[end].startswith("SystemExit"):
                i = end + 1
                continue
        kept.append(lines[i])
        i += 1
    return kept


def alive_nodes() -> list[NodeShape]:
    return [
        NodeShape(n["NodeID"][:8], n["Resources"].get("CPU", 0.0), n["Resources"].get("GPU", 0.0))
        for n in ray.nodes()
        if n.get("Alive")
    ]


def launchable_node_types() -> list[NodeShape] | None:
    """Node types the cluster's autoscaler can add; [] when it launches nothing (a local Ray, a
    cluster started by hand), None when it cannot be told.

    Ray publishes no node types while none of them runs, so this reads the config file the
    head's autoscaler monitor was started with, as the monitor itself does: from this machine
    when the driver runs on the head, else through a task pinned to the head node."""
    gcs_port = ray.get_runtime_context().gcs_address.rpartition(":")[2]
    found, config = _monitor_config(gcs_port)
    if not found:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        heads = [n["NodeID"] for n in ray.nodes() if n.get("Alive") and "node:__internal_head__" in n["Resources"]]
        if not heads:
            return None
        on_head = NodeAffinitySchedulingStrategy(heads[0], soft=False)
        try:
            reader = ray.remote(num_cpus=0, max_retries=0)(_monitor_config)
            found, config = ray.get(reader.options(scheduling_strategy=on_head).remote(gcs_port), timeout=60)
        except Exception:  # a head that cannot run the task: nothing can be told
            return None
    if not found or config is None:
        return None
    cluster_max = config.get("max_workers", float("inf"))
    shapes = []
    for name, spec in (config.get("available_node_types") or {}).items():
        spec = spec or {}
        if min(spec.get("max_workers", 0), cluster_max) <= 0:  # the head's type, or switched off
            continue
        resources = spec.get("resources") or {}
        if not resources:  # left for the cloud to detect: `ray up` fills the head's copy, a hand-started one does not
            return None
        count = int(min(spec.get("max_workers", 0), cluster_max))
        shapes.append(NodeShape(name, float(resources.get("CPU", 0)), float(resources.get("GPU", 0)), count))
    return shapes


def _monitor_config(gcs_port: str) -> tuple[bool, dict | None]:
    """(found, config) of the autoscaler monitor of the cluster whose GCS listens on
    ``gcs_port``, among this machine's processes; config {} for a monitor without one
    (it launches nothing), None for one whose file cannot be read."""
    import yaml

    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if not any(a.endswith(("/autoscaler/_private/monitor.py", "/autoscaler/v2/monitor.py")) for a in argv[:3]):
            continue
        flags = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
        if flags.get("gcs-address", "").rpartition(":")[2] != gcs_port:
            continue  # another cluster's monitor on this machine
        path = flags.get("autoscaling-config")
        if not path:
            return True, {}
        path = os.path.join(os.readlink(f"/proc/{pid}/cwd"), os.path.expanduser(path))
        try:
            with open(path) as f:
                return True, yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError):
            return True, None
    return False, None


def cpu_share(node: NodeShape, gpus: float, num_samples: int) -> float:
    """A trial's whole CPUs on ``node``: its CPUs shared among the trials that fit there at
    once (by their GPU share, or one CPU each), at least 1."""
    per_node = min(num_samples, fits(node.gpus, gpus)) if gpus else min(num_samples, int(node.cpus))
    return float(max(1, int(node.cpus) // max(1, per_node)))


def size_trials(
    cpus_per_trial: float | None, gpus_per_trial: float | None, num_samples: int, max_concurrent: int | None, joined: bool
) -> TrialSize:
    """CPUs and GPUs per trial and how many trials start together.

    GPUs: the user's, else 1 when the cluster has GPU nodes or its autoscaler can add them,
    else 0. CPUs: the user's, else the CPUs of the nodes that host such trials shared among
    the trials that fit there. Concurrency: the user's, else as many trials as the cluster
    holds at its largest (Tune otherwise starts one at a time with a searcher, so an
    autoscaler would add one node at a time and idle GPUs would wait).

    A trial that no node has or can get resources for would wait forever: an error. On a
    joined cluster whose autoscaler cannot be read, that is only a warning."""
    alive = alive_nodes()
    launchable = launchable_node_types() if joined else []
    shapes = alive + (launchable or [])
    gpus = gpus_per_trial
    if gpus is None:
        if any(s.gpus for s in alive):
            gpus = 1.0
        elif launchable is None:
            raise UserError(
                "this cluster has no GPU node up and its autoscaler's node types cannot be read: "
                "pass --gpus-per-trial (1 to wait for GPU workers, 0 to train on CPUs)"
            )
        elif any(s.gpus for s in launchable):
            gpus = 1.0
            types = ", ".join(sorted({s.name for s in launchable if s.gpus}))
            print(f"no GPU node is up yet: trials get 1 GPU each and wait for the autoscaler to add {types}", file=sys.stderr)
        else:
            gpus = 0.0
    cpus = cpus_per_trial
    if cpus is None:
        hosts = [s for s in shapes if s.gpus >= gpus and s.cpus >= 1] if gpus else [s for s in shapes if s.cpus]
        node = max(hosts or shapes, key=lambda s: (s.cpus, s.gpus))
        cpus = cpu_share(node, gpus, num_samples)
    slots = sum(s.trials(cpus, gpus) for s in shapes)
    if not slots:
        need = f"{cpus:g} CPUs" + (f" and {gpus:g} GPUs" if gpus else "")
        have = "; ".join(f"{s.name}: {s.cpus:g} CPUs, {s.gpus:g} GPUs" for s in shapes) or "no nodes"
        problem = f"a trial needs {need} but no node of the cluster has or can add that many ({have})"
        if launchable is not None:
            raise UserError(f"{problem}: trials would wait forever; lower --gpus-per-trial/--cpus-per-trial")
        print(f"warning: {problem}: trials wait until the autoscaler adds such nodes (Ctrl-C if it has none)", file=sys.stderr)
    return TrialSize(cpus, gpus, max_concurrent or min(num_samples, slots or num_samples))
