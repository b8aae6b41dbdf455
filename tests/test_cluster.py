"""Sweeps on a real multi-node Ray started on this machine (ray.cluster_utils.Cluster): a head
without GPUs and two worker nodes declaring logical GPUs."""

import json
import subprocess
import sys
import threading
import time

import pytest
from ray.cluster_utils import Cluster

from conftest import write_slow_spec

pytestmark = pytest.mark.slow
OBJECT_STORE = 300 * 1024**2  # Cluster's default of 150 MiB per node is tight for datasets


def add_worker(cluster):
    return cluster.add_node(num_cpus=2, num_gpus=1, object_store_memory=OBJECT_STORE)


@pytest.fixture(scope="module")
def cluster():
    """One cluster for the module (each start costs seconds of CPU): every test leaves it with its
    head and two worker nodes, idle; a test that removes a node adds a new one."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TLTUNE_LOGICAL_GPUS", "1")  # its nodes' GPUs are logical: trials train on the CPU (the nodes inherit it)
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "num_gpus": 0, "object_store_memory": OBJECT_STORE})
        workers = [add_worker(cluster) for _ in range(2)]
        cluster.wait_for_nodes()
        yield cluster, workers
        cluster.shutdown()


def trials(exp_dir):
    found = {}
    for result in exp_dir.glob("*/result.json"):
        found[result.parent.name] = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
    return found


def overlapping(a, b):
    return a[0]["started_at"] < b[-1]["reported_at"] and b[0]["started_at"] < a[-1]["reported_at"]


def test_trials_fill_every_gpu_at_once_and_share_one_only_by_fraction(cluster, real_data_root, tmp_path, command):
    """With a searcher Tune starts one trial at a time unless told how many may be pending:
    the sweep asks for as many as the cluster holds, so both GPUs work from the start. The model
    sleeps in each training step (3 s an epoch, 9 s a trial): trials overlap on any machine, and
    the CPU goes to the scheduling this test is about, not to training. At half a GPU a trial, two
    share each GPU and no more; whole-GPU trials, one a GPU, are test_fake_cluster's (its sweep
    runs two at once on two GPU workers)."""
    cluster, _ = cluster
    gpus_per_trial, per_gpu = 0.5, 2
    slots = 2 * per_gpu
    samples = slots + 1  # one more than the GPUs hold: it waits for a slot (each trial is a worker process importing torch)
    spec = write_slow_spec(tmp_path / "project", "gpus", epochs=3, num_samples=samples, seconds_per_batch=0.3)
    code, out, err = command("sweep", str(spec), "--train-subset", "600", "--test-subset", "200", "--grace-period", "3",
                             "--data-root", str(real_data_root), "--storage-path", str(tmp_path), "--name", "gpus", "--address", cluster.address,
                             "--cpus-per-trial", "0.5", "--gpus-per-trial", str(gpus_per_trial))  # fmt: skip  (the driver: this process)
    assert code == 0, out[-3000:] + err[-3000:]
    assert f"up to {slots} at once" in out, "concurrency = the trials the two GPUs hold"
    found = trials(tmp_path / "gpus" / "gpus")
    assert len(found) == samples
    gpus = {name: (rows[0]["node_id"], rows[0]["gpu_ids"]) for name, rows in found.items()}
    assert all(gpu_ids == "0" for _, gpu_ids in gpus.values()), "GPU ids are numbered per node: each node has GPU 0"
    for name, rows in found.items():  # at the moment each trial started, how many ran on its GPU
        at = rows[0]["started_at"]
        running = [o for o, r in found.items() if gpus[o] == gpus[name] and r[0]["started_at"] <= at < r[-1]["reported_at"]]
        assert len(running) <= per_gpu, f"{running} ran on node/GPU {gpus[name]} at once"
    first = sorted(found, key=lambda t: found[t][0]["started_at"])[:slots]
    assert len({gpus[t][0] for t in first}) == 2, "the first trials go to both worker nodes"
    latest_start = max(found[t][0]["started_at"] for t in first)
    assert all(latest_start < found[t][-1]["reported_at"] for t in first), "the first trials all run together"
    print(f"{slots} trial slots occupied {latest_start - min(found[t][0]['started_at'] for t in first):.1f}s after the first trial started")


def test_a_trial_whose_node_dies_goes_on_from_its_checkpoint(cluster, real_data_root, tmp_path):
    """Two trials of two CPUs each: one on each worker node (a node holds one), so one is on the
    node that dies. The model sleeps in each training step (5 s an epoch, 30 s a trial, however
    fast the machine): that trial is still part-way when Tune's copy of its results (which lags by
    up to 10 s) shows it, so the node dies under it on any machine; it goes on on the other node
    once that node's trial is done."""
    cluster, workers = cluster
    epochs = 6
    spec = write_slow_spec(tmp_path / "project", "failover", epochs=epochs, num_samples=2, seconds_per_batch=0.5)
    argv = [sys.executable, "-m", "tltune", "sweep", str(spec), "--train-subset", "600", "--test-subset", "200",
            "--grace-period", str(epochs), "--data-root", str(real_data_root), "--storage-path", str(tmp_path), "--name", "failover",
            "--address", cluster.address, "--cpus-per-trial", "2", "--gpus-per-trial", "0"]  # fmt: skip
    driver = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    output = []
    reader = threading.Thread(target=lambda: output.extend(driver.stdout), daemon=True)
    reader.start()
    exp_dir = tmp_path / "failover" / "failover"
    victim = workers[1]
    deadline = time.time() + 300
    while time.time() < deadline:  # a trial on the victim node is part-way, with a checkpoint
        rows = trials(exp_dir) if exp_dir.exists() else {}
        if any(len(r) >= 2 and r[-1]["node_id"] == victim.node_id and r[-1]["epoch"] < epochs for r in rows.values()):
            break
        assert driver.poll() is None, "".join(output)[-4000:]
        time.sleep(0.2)
    else:
        raise AssertionError("no trial got part-way on the worker node")
    cluster.remove_node(victim, allow_graceful=False)
    try:
        assert driver.wait(timeout=600) == 0, "".join(output)[-4000:]
    finally:
        workers[1] = add_worker(cluster)  # the next test finds two worker nodes again
        cluster.wait_for_nodes()
    found = trials(exp_dir)
    assert len(found) == 2
    assert len({rows[0]["node_id"] for rows in found.values()}) == 2, "the trials started on both worker nodes"
    moved = 0
    for name, rows in found.items():
        assert [r["training_iteration"] for r in rows] == list(range(1, epochs + 1)), f"{name}: every epoch once"
        moved += len({r["node_id"] for r in rows}) > 1
    assert moved >= 1, "a trial of the removed node finished on the other one"
    summary = json.loads((exp_dir / "tltune_best.json").read_text())
    assert summary["trials"] == 2 and summary["errored_trials"] == 0


def test_a_user_factory_reaches_every_node_with_the_trials(cluster, real_data_root, tmp_path, command):
    """A spec's ``module:function`` model lives in the user's folder, not on the nodes: Ray's
    runtime environment ships it, and the trials on both worker nodes build it from there (two
    trials of two CPUs each: a worker node holds one)."""
    cluster, _ = cluster
    project = tmp_path / "project"
    project.mkdir()
    marker = tmp_path / "built-from.txt"  # the nodes' workers do not inherit the driver's environment: a path in the code
    (project / "usernet.py").write_text(
        "import torch.nn as nn\n\n\n"
        "def build(num_classes, hidden=16):\n"
        f"    with open({str(marker)!r}, 'a') as f:\n"
        "        f.write(__file__ + '\\n')\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))\n"
    )
    (project / "spec.yaml").write_text(
        "experiments:\n"
        "  - name: usernet\n"
        "    dataset: mnist\n"
        "    model: usernet:build\n"
        "    mode: scratch\n"
        "    reference: {optimizer: adam, lr: 0.001, epochs: 1, hidden: 16}\n"
        "    space:\n"
        "      hidden: {choice: [8, 16, 32]}\n"
        "    num_samples: 2\n"
        "    repeats: 1\n"
    )
    code, out, err = command("sweep", str(project / "spec.yaml"), "--train-subset", "600", "--test-subset", "200",
                             "--data-root", str(real_data_root), "--storage-path", str(tmp_path), "--name", "usernet", "--address", cluster.address,
                             "--cpus-per-trial", "2", "--gpus-per-trial", "0")  # fmt: skip
    assert code == 0, out[-3000:] + err[-3000:]
    node_ids = {rows[0]["node_id"] for rows in trials(tmp_path / "usernet" / "usernet").values()}
    assert len(node_ids) == 2, "trials ran on both worker nodes"
    shipped = [line for line in marker.read_text().splitlines() if "runtime_resources" in line]
    assert shipped, f"the trials built the factory from Ray's shipped copy, not {project}: {marker.read_text()}"
