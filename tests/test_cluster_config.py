"""cluster.yaml passes Ray's own cluster-config validation; a broken one does not."""

import copy
import re

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from conftest import ROOT


def load():
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_is_a_valid_ray_cluster_config():
    config = prepare_config(load())
    validate_config(config)
    assert config["head_node_type"] == "head"
    worker = config["available_node_types"]["gpu_worker"]
    assert worker["node_config"]["InstanceType"].startswith(("g4dn", "g5")) and worker["min_workers"] == 0
    assert any("pip install" in c and "tltune" in c for c in config["setup_commands"])
    assert all("--dashboard-host=127.0.0.1" in c for c in config["head_start_ray_commands"] if "--head" in c)


def test_the_head_takes_no_trials():
    config = load()
    assert config["available_node_types"]["head"]["resources"] == {"CPU": 0, "GPU": 0}
    assert all("--num-cpus=0" in c and "--num-gpus=0" in c for c in config["head_start_ray_commands"] if "--head" in c)


def test_ray_up_uploads_only_the_source():
    config = load()
    assert {".venv", "data", "results", ".git"} <= set(config["rsync_exclude"])
    assert ".gitignore" in config["rsync_filter"], "everything git ignores stays home"


def test_nodes_install_the_pins_readme_installs_without_the_test_extras():
    readme_install = re.search(r"pip install -e '\.(\[test\])?' -c constraints\.txt", (ROOT / "README.md").read_text())
    assert readme_install, "README's set-up command installs the project with constraints.txt's pins"
    installs = [c for c in load()["setup_commands"] if "pip install" in c and "tltune" in c]
    assert installs and all('-e "$HOME/tltune" -c "$HOME/tltune/constraints.txt"' in c for c in installs)
    assert not any("[" in c for c in installs), "no extras on the nodes: pytest, moto and its servers are for tests"


@pytest.mark.parametrize(
    "breakage",
    [
        lambda c: c.update(max_workers="many"),
        lambda c: c.update(head_node_type="nosuch"),
        lambda c: c["available_node_types"]["gpu_worker"].update(min_workers=50),
        lambda c: c.update(unknown_field=1),
    ],
)
def test_an_invalid_cluster_yaml_is_rejected(breakage):
    config = copy.deepcopy(load())
    breakage(config)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        validate_config(prepare_config(config))
