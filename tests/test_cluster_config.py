"""cluster/config.yaml and cluster/local.yaml pass the checks `ray up` applies, and say what they promise."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parent.parent / "cluster"


def launcher_checked(path: Path) -> dict:
    """What `ray up` does to a file before it touches a cloud: fill defaults, then validate the schema.

    (``commands._bootstrap_config``: ``prepare_config`` merges the provider's
    defaults.yaml and per-type worker counts; ``validate_config`` applies
    ``ray/autoscaler/ray-schema.json`` and the cross-field rules.)
    """
    config = prepare_config(yaml.safe_load(path.read_text()))
    validate_config(config)
    return config


def test_aws_config_is_valid_and_shaped_as_documented():
    config = launcher_checked(CLUSTER / "config.yaml")
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert config["provider"]["type"] == "aws"
    assert head["resources"] == {"CPU": 0}  # the head runs no worker actors
    gpu = [t for name, t in types.items() if name != config["head_node_type"]]
    assert len(gpu) == 1 and gpu[0]["resources"]["GPU"] >= 1
    assert 0 <= gpu[0]["min_workers"] <= gpu[0]["max_workers"] <= config["max_workers"]
    _check_common(config)


def test_runs_wait_for_the_machines_a_cluster_file_can_add_instead_of_being_refused():
    """What a driver on the head reads of the autoscaler's node types (``placement.node_types``), from each
    shipped file as `ray up` prepares it. The local provider's machines share the head's node type and
    declare no resources (Ray finds them when a machine joins): a run that no node up can hold yet waits
    for them; it is refused at once only against types whose resources are declared."""
    from distmaml.cluster.capacity import Bundle, NodeShape, why_not
    from distmaml.cluster.placement import node_types

    head_only = [NodeShape("node 127.0.0.2", {"CPU": 0.0})]
    run = [Bundle("driver", {"CPU": 1.0}), Bundle("worker", {"CPU": 2.0}), Bundle("worker", {"CPU": 2.0})]

    types, limit = node_types(launcher_checked(CLUSTER / "local.yaml"))
    assert [(t.name, t.count, t.known) for t in types] == [("node type local.cluster.node", 2, False)]
    assert limit == 2
    assert why_not(run, "PACK", head_only + types, limit) is None
    assert why_not(run, "PACK", head_only, 0) is not None  # the same run with no machine to add

    types, limit = node_types(launcher_checked(CLUSTER / "config.yaml"))
    assert [(t.name, t.resources, t.known) for t in types] == [("node type gpu_worker", {"CPU": 4.0, "GPU": 1.0}, True)]
    huge = [Bundle("worker", {"CPU": 64.0, "GPU": 1.0}, {"CPU": "engine.cpus_per_worker"})]
    assert "fits no node the Ray cluster has or can launch" in (why_not(huge, "PACK", head_only + types, limit) or "")


def test_local_config_is_valid_and_shaped_as_documented():
    config = launcher_checked(CLUSTER / "local.yaml")
    assert config["provider"]["type"] == "local"
    assert config["provider"]["head_ip"] and len(config["provider"]["worker_ips"]) == 2
    # prepare_config turns the IP list into one node type with a worker per IP, as `ray up` does
    (node_type,) = config["available_node_types"].values()
    assert node_type["min_workers"] == node_type["max_workers"] == 2
    _check_common(config)


def _check_common(config: dict) -> None:
    assert config["file_mounts"]["~/distmaml"] == "."  # the project reaches every node ...
    assert any("-e ~/distmaml" in c for c in config["setup_commands"])  # ... and is installed there
    head_cmds = " ".join(config["head_start_ray_commands"])
    assert "--num-cpus=0" in head_cmds
    # MLflow bound to the head's private address (not loopback: trials on other nodes log to it; not 0.0.0.0)
    assert "IP=$(hostname -I | awk '{print $1}');" in head_cmds
    assert 'mlflow server --host $IP --port 5000 --allowed-hosts "$IP:5000,localhost:5000' in head_cmds
    assert "(MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false nohup mlflow server" in head_cmds  # no job runner
    assert "--serve-artifacts" in head_cmds
    assert "--dashboard-host=127.0.0.1" in head_cmds and "0.0.0.0" not in head_cmds


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda c: c.update(setup_comands=[]), "'setup_comands' was unexpected"),  # a misspelled key
        (lambda c: c["available_node_types"]["gpu_worker"].update(min_workers="two"), "'two' is not of type"),
        (lambda c: c.update(head_node_type="gpu"), "must be one of `available_node_types`"),
        (
            lambda c: c.update(max_workers=0) or c["available_node_types"]["gpu_worker"].update(min_workers=1),
            "smaller than the sum of `min_workers`",
        ),
    ],
)
def test_the_validator_rejects_broken_files(breakage, message):
    broken = copy.deepcopy(yaml.safe_load((CLUSTER / "config.yaml").read_text()))
    breakage(broken)
    with pytest.raises((jsonschema.ValidationError, ValueError), match=message):
        validate_config(prepare_config(broken))


@pytest.mark.parametrize("name", ["config.yaml", "local.yaml"])
def test_ray_up_hashes_every_file_mount_of_a_fresh_clone(name, tmp_path, monkeypatch):
    """`ray up` hashes each file_mounts source before it launches anything (commands.get_or_create_head_node):
    Ray's own hash_runtime_conf, run from the root of a fresh clone, as a user runs `ray up`."""
    from projectcopy import fresh_clone
    from ray.autoscaler._private import util

    clone = fresh_clone(tmp_path / "clone")
    monkeypatch.chdir(clone)
    config = prepare_config(yaml.safe_load((clone / "cluster" / name).read_text()))
    sources = set(config["file_mounts"].values())
    assert sources == {"."}  # the project only: data/ travels inside it
    assert (clone / "data" / "README.md").is_file()  # ... and is in every clone
    monkeypatch.setattr(util, "_hash_cache", {})  # hash for real, not from another test's cache
    runtime_hash, _ = util.hash_runtime_conf(
        config["file_mounts"], None, config, generate_file_mounts_contents_hash=True
    )
    assert runtime_hash


def test_the_cluster_files_name_files_that_exist():
    """The header's example commands name search spaces that ship."""
    for name in ("config.yaml", "local.yaml"):
        text = (CLUSTER / name).read_text()
        for space in re.findall(r"tune_spaces/[\w.]+\.yaml", text):
            assert (CLUSTER.parent / space).is_file(), f"{name} names {space}"
