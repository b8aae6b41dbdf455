"""cluster.yaml passes Ray's own cluster-config validation; a broken one does not."""

import copy

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
